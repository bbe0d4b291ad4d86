"""One proxied request/response, whatever the codec: from the parsed request head to the last byte of the response.

Owns forwarding: asking the listener's role where the request goes, borrowing an upstream
stream, streaming the request body up and the response down with backpressure, stripping
hop-by-hop headers, `Expect: 100-continue` (answered once, by the proxy), circuit breaking, retries with `x-envoy-attempt-count` (any method
when nothing reached the upstream: a failed connect, or a 503 the next proxy marked
`x-laneproxy-not-forwarded`, replaying up to 64 KiB of body; each retry avoids the endpoints already tried
and waits a jittered back-off first, as core.attempts says), passive health (outlier) reports that
skip 5xx marked `x-laneproxy-failed-hop`, the route and stream-idle timeouts, and turning failures
into local replies (marked as above, written by local_reply). Callback-driven: a coroutine runs
only while a new upstream connection is being opened.

It never touches bytes on a wire: the client side is a `DownstreamStream` (an HTTP/1.1 connection's
current response, or an HTTP/2 stream) and the upstream side an `UpstreamStream` (a pooled HTTP/1.1
connection, or an HTTP/2 stream); each codec frames, and each reports back through the callbacks
below. The response side's progress is one named state (`ResponseState`).
"""

from __future__ import annotations

import random
from enum import Enum
from typing import TYPE_CHECKING, Protocol, Sequence

from laneproxy.core import attempts
from laneproxy.core import headers as h
from laneproxy.core.errors import (
    LocalReplyError,
    NoHealthyUpstreamError,
    RequestTimeoutError,
    StreamIdleTimeoutError,
    UpstreamConnectError,
    UpstreamOverflowError,
    UpstreamProtocolError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from laneproxy.core.retry import IDEMPOTENT, REPLAY_LIMIT
from laneproxy.dataplane import egress, local_reply, tunnel
from laneproxy.dataplane.route_trail import TRAIL_HOPS

if TYPE_CHECKING:
    import asyncio

    from laneproxy.core.model import Endpoint
    from laneproxy.core.retry import RetryPolicy
    from laneproxy.dataplane.listener import Listener, Target
    from laneproxy.dataplane.upstream import UpstreamConnection, UpstreamPool


class ResponseState(Enum):
    """How far the response to the client has got."""

    WAITING = "waiting"  # nothing sent to the client yet (routing, connecting, forwarding the request)
    DISCARDING = "discarding"  # an upstream answer that will be retried is being swallowed
    STARTED = "started"  # the response head went to the client (or is held to go with the first body bytes)
    DONE = "done"  # finished: answered, reset or abandoned; nothing more is sent or counted


# Module-level names for the states: an Enum member looked up on its class costs a descriptor call per use.
_WAITING, _DISCARDING, _STARTED, _DONE = (ResponseState.WAITING, ResponseState.DISCARDING, ResponseState.STARTED,
                                          ResponseState.DONE)
_UNANSWERED = frozenset({_WAITING, _DISCARDING})  # the client has seen nothing yet


class DownstreamStream(Protocol):
    """The client side of one exchange: an HTTP/1.1 connection's response in turn, or an HTTP/2 stream."""

    @property
    def listener(self) -> Listener: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...  # the client's connection (peer address, capture)

    def send_continue(self) -> None: ...
    def send_head(self, exchange: Exchange, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]],
                  overrides: dict[bytes, bytes]) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def flush_head(self) -> None: ...  # the upstream read ended after the head: send it without waiting for body
    def send_trailers(self, trailers: Sequence[tuple[bytes, bytes]]) -> None: ...
    def end(self) -> None: ...
    def send_local_reply(self, exchange: Exchange, reply: local_reply.LocalReply) -> None: ...
    def reset(self) -> None: ...  # the response cannot be completed honestly: the client must see a reset
    def hold(self, size: int) -> None: ...  # request body bytes held until an upstream takes them
    def release(self, size: int) -> None: ...
    def upstream_backpressure(self, full: bool) -> None: ...  # stop (or resume) reading the request body
    def exchange_done(self, exchange: Exchange) -> None: ...


class UpstreamStream(Protocol):
    """The upstream side of one attempt: a pooled HTTP/1.1 connection lent to the exchange, or an HTTP/2 stream."""

    reused: bool  # it carried a request before (a keep-alive connection the upstream may have closed meanwhile)

    @property
    def connected(self) -> bool: ...

    def send_request(self, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]], skip: frozenset[bytes],
                     overrides: dict[bytes, bytes], attempt: int, chunked: bool, body: Sequence[bytes],
                     complete: bool) -> None: ...
    def lend(self, exchange: Exchange) -> None: ...  # it reports the response to this exchange from now on
    def send_body(self, data: bytes) -> None: ...
    def end_request(self) -> None: ...
    def pause_reading(self) -> None: ...  # the client is not taking the response: stop reading it
    def resume_reading(self) -> None: ...
    def give_back(self, reusable: bool) -> None: ...
    def abandon(self) -> None: ...


class Exchange:
    __slots__ = (
        "downstream", "listener", "method", "target", "http_minor", "headers", "host", "keep_alive",
        "request_chunked", "has_body", "request_complete", "pending_body", "upstream", "routed",
        "state", "head_sent", "response_keep_alive", "grpc_timeout", "deadline_timer", "response_status", "protocol", "trailers",
        "deadline", "start", "connection_tokens", "error", "expect_continue", "retry", "attempts",
        "last_activity", "counted_active", "request_bytes", "response_bytes",
        "pending_bytes", "peer", "trail", "trail_key", "trace", "failed_hop", "replay", "replay_bytes", "tried",
        "upgrade", "tunnel_flag",
    )

    def __init__(self, downstream: DownstreamStream, method: bytes, target: bytes, http_minor: int,
                 headers: list[tuple[bytes, bytes]], host: bytes | None, keep_alive: bool, request_chunked: bool,
                 has_body: bool, connection_tokens: set[bytes] | None, expect_continue: bool,
                 retry: RetryPolicy, protocol: str | None = None) -> None:
        self.downstream = downstream
        self.listener: Listener = downstream.listener
        self.method = method
        self.target = target
        self.http_minor = http_minor  # HTTP/1.x: 1 or 0; an HTTP/2 stream says 1 (chunk-free, keep-alive semantics)
        self.protocol = protocol or ("HTTP/1.1" if http_minor else "HTTP/1.0")  # the downstream's, for the access log
        self.headers = headers
        self.host = host
        self.keep_alive = keep_alive  # HTTP/1.x: the client's connection may carry another request after this one
        self.request_chunked = request_chunked
        self.has_body = has_body
        self.connection_tokens = connection_tokens
        self.expect_continue = expect_continue
        self.retry = retry
        self.request_complete = False
        self.pending_body: list[bytes] | None = None
        self.pending_bytes = 0  # counted against the client connection's buffer limit until sent or dropped
        self.upstream: UpstreamStream | None = None
        self.routed: Target | None = None
        self.state = _WAITING
        self.head_sent = False  # the upstream's response head went to the client: stays true once DONE
        self.response_keep_alive = False  # the upstream connection may carry another request (HTTP/1.1 upstreams)
        self.response_status = 0
        self.trailers: list[tuple[bytes, bytes]] | None = None  # request trailers (HTTP/2, gRPC), sent at the end
        self.grpc_timeout: float | None = None  # the deadline a gRPC client asked for (grpc-timeout): the route timeout
        self.deadline_timer: asyncio.TimerHandle | None = None  # a gRPC deadline is kept to the millisecond
        self.deadline = 0.0  # route timeout, loop time; 0 when not armed (the listener's sweeper enforces it)
        self.start = 0.0
        self.error: LocalReplyError | None = None
        self.attempts = 0
        self.last_activity = downstream.listener.now
        self.counted_active = False
        self.request_bytes = 0  # body bytes as decoded, for the access log
        self.response_bytes = 0
        self.peer: bytes | None = None  # the upstream's peer header (who answered), for Istio's metrics
        self.trail: list[str] | None = None  # the hops so far, when the request asked where it went
        self.trail_key: bytes | None = None  # the trace the trail is kept under (inbound: answered and closed)
        self.trace: bytes | None = None  # the swimlane trace key, set by the role (sidecar listeners)
        self.failed_hop: bytes | None = None  # flags of a later hop's failure this 5xx carries (x-laneproxy-failed-hop)
        self.replay: list[bytes] | None = []  # body bytes sent upstream, while within REPLAY_LIMIT; None past it
        self.replay_bytes = 0
        self.tried: tuple[Endpoint, ...] = ()  # endpoints of the attempts that failed, avoided by the retries
        self.upgrade: bytes | None = None  # tunnels: the protocol asked (websocket), or CONNECT
        self.tunnel_flag: str | None = None  # tunnels: UC or DC, the side that ended the tunnel (Envoy's flag)

    @property
    def finished(self) -> bool:
        return self.state is _DONE

    @property
    def response_started(self) -> bool:
        """The upstream's response head went to the client (so a failure from now on is a reset)."""
        return self.head_sent

    # request side, driven by the downstream codec ----------------------------------------------

    def begin(self) -> None:
        """Route the request and start forwarding it (called when it is this exchange's turn)."""
        listener = self.listener
        self.start = listener.loop.time()
        if self.method == b"CONNECT":  # tunnels: a CONNECT goes where it says (egress), not through a route
            egress.connect(self)
            return
        try:
            self.routed = listener.role.prepare(self, listener.store.current)
        except LocalReplyError as error:
            self.reply_locally(error)
            return
        if self.upgrade is not None:  # tunnels: the upgrade headers go upstream with the request
            tunnel.ask_upgrade(self)
        if self.expect_continue and not self.request_complete:
            self.downstream.send_continue()  # once, from the proxy; the upstream never sees the Expect
        self._dispatch()

    def on_request_body(self, data: bytes) -> None:
        if self.state is _DONE:
            return  # answered already (a local reply or an early response): drain and drop
        self.last_activity = self.listener.now
        self.request_bytes += len(data)
        upstream = self.upstream
        if upstream is None or not upstream.connected:
            if self.pending_body is None:
                self.pending_body = []
            self.pending_body.append(data)
            self.pending_bytes += len(data)
            self.downstream.hold(len(data))
            return
        if self.replay is not None:
            self._keep_for_replay(data)
        upstream.send_body(data)

    def _keep_for_replay(self, data: bytes) -> None:
        self.replay_bytes += len(data)
        if self.replay_bytes > REPLAY_LIMIT:
            self.replay = None
        else:
            self.replay.append(data)  # type: ignore[union-attr]

    def on_request_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Request trailers (HTTP/2, gRPC): they go upstream with the end of the request."""
        self.trailers = trailers

    def on_request_complete(self) -> None:
        self.request_complete = True
        if self.state is _DONE:
            return
        upstream = self.upstream
        if upstream is not None and upstream.connected:
            upstream.end_request()
        self._arm_timer()

    # upstream side ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        routed = self.routed
        assert routed is not None
        stats = routed.cluster_stats
        limits = self.listener.settings.circuit_breakers
        if not self.counted_active:
            if stats.rq_active >= limits.max_requests:
                stats.rq_overflow += 1
                self.reply_locally(UpstreamOverflowError("max requests"))
                return
            stats.rq_active += 1
            self.counted_active = True
        self.attempts += 1
        if self._upstream_http2():
            self._dispatch_http2()
            return
        pool = self.listener.pools.get(routed.endpoint.host, routed.endpoint.port)
        connection = pool.take_idle()
        if connection is not None:
            self._attach(connection)
            return
        if pool.open_count >= limits.max_connections or pool.pending >= limits.max_pending_requests:
            routed.cluster_stats.rq_overflow += 1
            self.reply_locally(UpstreamOverflowError("max connections or pending requests"))
            return
        self._open_connection(pool)

    def _upstream_http2(self) -> bool:
        """The service port's protocol (Route.protocol, as Istio selects it) if it names one, else the client's."""
        assert self.routed is not None
        protocol = getattr(self.routed.route, "protocol", "auto")
        if protocol == "http2":
            return True
        if protocol == "http1":
            return False
        return self.protocol == "HTTP/2"

    def _dispatch_http2(self) -> None:
        """A stream on a multiplexed connection to the endpoint, opening one when none has room."""
        routed = self.routed
        assert routed is not None
        pool = self.listener.h2_pools.get(routed.endpoint.host, routed.endpoint.port)
        stream = pool.take_stream()
        if stream is not None:
            self._attach(stream)
            return
        if pool.pending >= self.listener.settings.circuit_breakers.max_pending_requests:
            routed.cluster_stats.rq_overflow += 1
            self.reply_locally(UpstreamOverflowError("max pending requests"))
            return
        if pool.connect(self._on_connected):
            routed.cluster_stats.cx_total += 1  # Envoy counts every connection attempt

    def _open_connection(self, pool: UpstreamPool) -> None:
        assert self.routed is not None
        self.routed.cluster_stats.cx_total += 1  # Envoy counts every connection attempt
        pool.connect(self._on_connected)

    def _on_connected(self, connection: UpstreamStream | None, error: LocalReplyError | None) -> None:
        routed = self.routed
        assert routed is not None
        if connection is None:
            routed.cluster_stats.cx_connect_fail += 1
            self._report_failure()
            if not self._retry_if("connect-failure"):
                self._fail_upstream(error or UpstreamResetError())
            return
        if self.state is _DONE:  # the client left while we were connecting
            connection.give_back(reusable=True)
            return
        self._attach(connection)

    def _attach(self, connection: UpstreamStream) -> None:
        self.upstream = connection
        connection.lend(self)
        routed = self.routed
        assert connection.connected and routed is not None
        routed.cluster_stats.rq_total += 1  # an upstream request exists once it has a connection
        self.last_activity = self.listener.now
        skip = h.NOT_FORWARDED if self.connection_tokens is None else h.NOT_FORWARDED | self.connection_tokens
        if self.expect_continue:
            skip = skip | {h.EXPECT}
        pending = self.pending_body
        body: Sequence[bytes] = ()
        if pending:
            self.pending_body = None
            body = pending
            if self.replay is not None:
                for data in pending:
                    self._keep_for_replay(data)
        connection.send_request(self.method, routed.path, self.headers, skip, routed.overrides, self.attempts,
                                self.request_chunked, body, self.request_complete)
        if self.pending_bytes:
            self._release_pending()
        self._arm_timer()

    def _release_pending(self) -> None:
        held, self.pending_bytes = self.pending_bytes, 0
        self.downstream.release(held)

    def _arm_timer(self) -> None:
        if not self.deadline and self.request_complete and self.upstream is not None \
                and self.state is not _DONE:
            routed = self.routed
            timeout = routed.timeout if routed is not None and routed.timeout is not None else \
                self.listener.settings.timeouts.route
            if self.grpc_timeout is not None:
                timeout = self.grpc_timeout  # as Envoy with max_grpc_timeout: the caller's deadline is the route's
            if timeout > 0:
                # No timer object per request: the listener's sweeper compares deadlines a few times a second.
                self.deadline = self.listener.loop.time() + timeout
                if self.grpc_timeout is not None:
                    # A caller's deadline also runs in the app, which answers DEADLINE_EXCEEDED itself the moment it
                    # passes: the proxy answers first, as Envoy's timer does, so it gets a timer of its own.
                    self.deadline_timer = self.listener.loop.call_at(self.deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.deadline_timer = None
        if self.deadline and self.state is not _DONE:
            self.on_timeout()

    def on_timeout(self) -> None:
        self.deadline = 0.0
        if self.routed is not None:
            self.routed.cluster_stats.rq_timeout += 1
        self._fail_upstream(UpstreamTimeoutError())

    def on_stream_idle(self) -> None:
        """Nothing moved for the stream idle timeout (the listener's sweeper calls this)."""
        self._fail_upstream(StreamIdleTimeoutError() if self.request_complete else RequestTimeoutError())

    def _retryable(self) -> bool:
        # A streamed body is gone once sent: only bodiless idempotent requests are replayed.
        return (self.attempts <= self.retry.max_retries and not self.has_body and self.request_complete
                and self.state in _UNANSWERED and self.method in IDEMPOTENT)

    def _unsent_retryable(self) -> bool:
        # The connection never opened, so nothing reached the upstream and every body byte received so far
        # is still held in pending_body (reading stops at the per-connection buffer limit): any method,
        # POST included, may go again, even while its body is still arriving.
        return self.attempts <= self.retry.max_retries and self.state in _UNANSWERED

    def _replayable(self) -> bool:
        # The next proxy answered that it never sent the request on: the whole body is still here
        # (kept for replay), so any method may go again.
        return (self.attempts <= self.retry.max_retries and self.request_complete and self.replay is not None
                and self.state in _UNANSWERED)

    def _retry_if(self, kind: str) -> bool:
        retryable = self._unsent_retryable() if kind == "connect-failure" else self._retryable()
        if not (retryable and self.retry.on_failure(kind)):
            return False
        self._retry()
        return True

    def _retry(self) -> None:
        routed = self.routed
        assert routed is not None
        self.upstream = None
        self.deadline = 0.0
        if self.deadline_timer is not None:  # the next attempt arms its own
            self.deadline_timer.cancel()
            self.deadline_timer = None
        self.tried = tried = (*self.tried, routed.endpoint)
        selector = self.listener.role.selector
        try:
            routed.endpoint = attempts.select_untried(lambda: selector.select(routed.route, routed.routes)[0], tried)
        except NoHealthyUpstreamError as error:
            self.reply_locally(error)
            return
        routed.cluster_stats.rq_retry += 1
        replay = self.replay
        if replay:
            # What went upstream last time goes again, ahead of anything still waiting (nothing, once complete).
            self.pending_body = replay + (self.pending_body or [])
            self.replay, self.replay_bytes = [], 0
        self.listener.loop.call_later(attempts.backoff_seconds(self.attempts, random.random()), self._dispatch_retry)

    def _dispatch_retry(self) -> None:
        if not self.finished:  # the client may have gone during the back-off
            self._dispatch()

    def _report_failure(self) -> None:
        outliers = self.listener.role.selector.outliers
        routed = self.routed
        if outliers is not None and routed is not None:
            outliers.failure(routed.endpoint, routed.route, routed.routes)

    def on_upstream_error(self, error: Exception, received_any: bool) -> None:
        """The upstream connection failed or closed before the response was complete."""
        connection = self.upstream
        if (connection is not None and connection.reused and not received_any and self.request_complete
                and not self.has_body and self.state is not _STARTED and self.routed is not None):
            # A keep-alive connection the upstream had already closed: the request never reached it.
            self.upstream = None
            self._open_connection(self.listener.pools.get(self.routed.endpoint.host, self.routed.endpoint.port))
            return
        if self.routed is not None:
            self.routed.cluster_stats.rq_reset += 1
        self._report_failure()
        # A response the proxy cannot trust (UPE) is answered once: replaying the request would ask again.
        if not isinstance(error, UpstreamProtocolError) and self._retry_if("reset"):
            return
        self._fail_upstream(error if isinstance(error, LocalReplyError) else UpstreamResetError(str(error)))

    def _fail_upstream(self, error: LocalReplyError) -> None:
        if self.state is _DONE:
            return
        if self.attempts > 1 and isinstance(error, (UpstreamConnectError, UpstreamResetError)):
            error = error.after_retries()
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.abandon()
        if self.state is _STARTED:
            # Headers are out: the only honest signal left is to reset the client's stream (before
            # _finish, which would end it cleanly and make a cut body look complete).
            self.error = error
            self.downstream.reset()
            self._finish()
            return
        self.reply_locally(error)

    def pause_upstream_writes(self) -> None:
        self.downstream.upstream_backpressure(True)

    def resume_upstream_writes(self) -> None:
        self.downstream.upstream_backpressure(False)

    # response side ---------------------------------------------------------------------------

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        if status < 200:
            return  # 1xx: the proxy answered Expect itself; informational responses end here
        self.last_activity = self.listener.now
        outliers = self.listener.role.selector.outliers
        routed = self.routed
        self.failed_hop = None  # this attempt's answer alone says whose failure it is
        not_forwarded = False
        if status >= 500:
            for name, value in headers:
                if name == h.X_LANEPROXY_FAILED_HOP:
                    self.failed_hop = value or b"-"  # the endpoint answered for a hop behind it
                elif name == h.X_LANEPROXY_NOT_FORWARDED:
                    not_forwarded = True  # the next proxy never sent it on: as safe to retry as a connect failure
            if not_forwarded and self.listener.role.name == "inbound":
                # The app answered, so it had the request: a mark it copied from a call of its own must not
                # make anyone replay this request.
                not_forwarded = False
                headers = [(name, value) for name, value in headers if name != h.X_LANEPROXY_NOT_FORWARDED]
        if outliers is not None and routed is not None:
            if status < 500:
                outliers.success(routed.endpoint)
            elif self.failed_hop is None:
                outliers.failure(routed.endpoint, routed.route, routed.routes)
            else:
                outliers.failed_hop_responses += 1
        if status >= 500 and ((self._retryable() and self.retry.on_status(status)) or (
                not_forwarded and self._replayable() and self.retry.on_failure("connect-failure"))):
            self.state = _DISCARDING
            self.response_keep_alive = keep_alive
            return
        self.response_status = status
        self.response_keep_alive = keep_alive
        self.state = _STARTED
        self.head_sent = True
        if self.listener.reads_peer or self.trail is not None:
            self._read_mesh_headers(headers)
        self.downstream.send_head(self, status, reason, headers, self.listener.response_overrides(self))
        if self.method == b"HEAD":
            # httptools cannot be told a response to HEAD has no body: finish here, never reuse.
            self.response_keep_alive = False
            self.on_response_complete()

    def on_switching_protocols(self, connection: UpstreamConnection, from_upstream: bytes) -> None:
        """tunnels: the upstream answered this upgrade request 101; join the sockets. The exchange is recorded
        when its tunnel ends (`end_tunnel`), or now if the client is already gone."""
        start = tunnel.switch_protocols(self, connection, from_upstream)
        if start is None:
            self._finish()
            return
        self._finish(record=False)
        start()

    def finish_tunnelled(self) -> None:
        """tunnels: the HTTP part ends at its 101 or CONNECT 200; its sockets now belong to a tunnel, whose end
        records the exchange (`end_tunnel`), as Envoy logs an upgraded stream when it ends."""
        self._finish(record=False)

    def end_tunnel(self, received: int, sent: int, ended_by: str | None) -> None:
        """tunnels: the tunnel this exchange became has ended (either side closed, idle timeout, drain, reset):
        the exchange is recorded now, once, with the tunnel's bytes both ways and its whole duration. As Envoy
        does, a tunnel the upstream ended first is flagged UC, one the client ended first DC."""
        self.request_bytes, self.response_bytes = received, sent
        if ended_by == "upstream":
            self.tunnel_flag = "UC"
        elif ended_by == "downstream":
            self.tunnel_flag = "DC"
        self.listener.on_exchange_done(self)

    def _read_mesh_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The headers the next proxy answered with for this one: who it is, and where the request went next."""
        for name, value in headers:
            if name == h.X_LANEPROXY_PEER:
                self.peer = value
            elif name == h.X_LANEPROXY_ROUTE and value and self.trail is not None and len(self.trail) < TRAIL_HOPS:
                self.trail.append(value.decode("latin-1"))

    def on_response_body(self, data: bytes) -> None:
        if self.state is not _STARTED:
            return
        self.last_activity = self.listener.now
        self.response_bytes += len(data)
        self.downstream.send_data(data)

    def flush_head(self) -> None:
        """The upstream read ended after the head: send it now rather than wait for body bytes."""
        if self.state is _STARTED:
            self.downstream.flush_head()

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Response trailers (`grpc-status`): they end the response, before on_response_complete."""
        if self.state is _STARTED:
            self.downstream.send_trailers(trailers)

    def on_response_complete(self) -> None:
        state = self.state
        if state is _DONE or state is _WAITING:
            return  # a 1xx ended: the final response follows on the same upstream stream
        connection, self.upstream = self.upstream, None
        if state is _DISCARDING:
            self.state = _WAITING
            if connection is not None:
                connection.give_back(reusable=self.response_keep_alive)
            self._retry()
            return
        self.downstream.end()
        if connection is not None:
            connection.give_back(reusable=self.response_keep_alive and self.request_complete)
        self._finish()

    # endings ---------------------------------------------------------------------------------

    def reply_locally(self, error: LocalReplyError) -> None:
        self.response_status = error.status
        self.error = error
        if self.has_body and not self.request_complete:
            self.keep_alive = False  # an unread body would be taken for the next request
        listener = self.listener
        # The outbound listener answers the app for the next hop: say so, for apps that pass headers on.
        reply = local_reply.build(error, date=listener.dates.value(), server=listener.server_name,
                                  grpc=local_reply.is_grpc(self.headers),
                                  marks=local_reply.marks(error, about_later_hop=listener.marks_local_replies,
                                                          edge_of_mesh=listener.edge_of_mesh))
        self.downstream.send_local_reply(self, reply)
        self._finish()

    def cancel(self) -> None:
        """The client went away: stop everything and release what can be released."""
        if self.state is _DONE:
            return
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.abandon()
        self._finish()

    def _finish(self, *, record: bool = True) -> None:
        self.state = _DONE
        self.deadline = 0.0
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        self.pending_body = None
        if self.pending_bytes:
            self._release_pending()
        if record:
            self.listener.on_exchange_done(self)
        self.downstream.exchange_done(self)
