"""One proxied request/response: from the parsed request head to the last byte of the response.

Owns forwarding: asking the listener's role where the request goes, borrowing an upstream
connection, streaming the request body up and the response down with backpressure, re-framing
(chunked where the length is unknown), stripping hop-by-hop headers, `Expect: 100-continue`
(answered once, by the proxy), circuit breaking, retries with `x-envoy-attempt-count` (any method
when nothing reached the upstream: a failed connect, or a 503 the next proxy marked
`x-laneproxy-not-forwarded`, replaying up to 64 KiB of body; each retry avoids the endpoints already tried
and waits a jittered back-off first, as core.attempts says), passive health (outlier) reports that
skip 5xx marked `x-laneproxy-failed-hop`, the route and stream-idle timeouts, and turning failures
into local replies (marked as above). Callback-driven: a coroutine runs only while a new upstream
connection is being opened.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

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
from laneproxy.dataplane import codec, egress, tunnel
from laneproxy.dataplane.route_trail import TRAIL_HOPS

if TYPE_CHECKING:
    from laneproxy.dataplane.downstream import DownstreamConnection
    from laneproxy.dataplane.listener import Listener, Target
    from laneproxy.dataplane.upstream import UpstreamConnection, UpstreamPool

_NO_BODY_STATUS = frozenset({204, 304})
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
# Request body bytes kept after they went upstream, so that a request the next proxy never forwarded
# (its app refused the connection) can go to another endpoint, POSTs included. Beyond this, no replay.
_REPLAY_LIMIT = 64 * 1024


class RetryPolicy:
    """How many retries a request may take and on what; parsed once per request only when overridden."""

    __slots__ = ("max_retries", "retry_on", "status_codes")

    def __init__(self, max_retries: int, retry_on: frozenset[str], status_codes: frozenset[int]) -> None:
        self.max_retries = max_retries
        self.retry_on = retry_on
        self.status_codes = status_codes

    def with_overrides(self, max_retries: bytes | None, retry_on: bytes | None) -> RetryPolicy:
        """Apply `x-envoy-max-retries` / `x-envoy-retry-on` from a trusted caller; bad values are ignored."""
        count = self.max_retries
        if max_retries is not None and max_retries.strip().isdigit():
            count = min(int(max_retries), 10)
        on = self.retry_on
        if retry_on is not None:
            on = frozenset(token.strip().decode("latin-1") for token in retry_on.split(b",") if token.strip())
        return RetryPolicy(count, on, self.status_codes)

    def on_failure(self, kind: str) -> bool:
        """kind: connect-failure or reset."""
        on = self.retry_on
        return kind in on or "5xx" in on or (kind == "connect-failure" and "gateway-error" in on)

    def on_status(self, status: int) -> bool:
        on = self.retry_on
        return (("5xx" in on and status >= 500) or ("gateway-error" in on and status in (502, 503, 504))
                or ("retriable-status-codes" in on and status in self.status_codes))


class Exchange:
    __slots__ = (
        "downstream", "listener", "method", "target", "http_minor", "headers", "host", "keep_alive",
        "request_chunked", "has_body", "request_complete", "pending_body", "upstream", "routed",
        "response_started", "response_chunked", "response_keep_alive", "response_status", "finished",
        "deadline", "start", "connection_tokens", "error", "expect_continue", "retry", "attempts",
        "discarding", "last_activity", "counted_active", "request_bytes", "response_bytes", "pending_head",
        "pending_bytes", "peer", "trail", "trail_key", "trace", "failed_hop", "replay", "replay_bytes", "tried",
        "upgrade",
    )

    def __init__(self, downstream: DownstreamConnection, method: bytes, target: bytes, http_minor: int,
                 headers: list[tuple[bytes, bytes]], host: bytes | None, keep_alive: bool, request_chunked: bool,
                 has_body: bool, connection_tokens: set[bytes] | None, expect_continue: bool,
                 retry: RetryPolicy) -> None:
        self.downstream = downstream
        self.listener: Listener = downstream.listener
        self.method = method
        self.target = target
        self.http_minor = http_minor
        self.headers = headers
        self.host = host
        self.keep_alive = keep_alive
        self.request_chunked = request_chunked
        self.has_body = has_body
        self.connection_tokens = connection_tokens
        self.expect_continue = expect_continue
        self.retry = retry
        self.request_complete = False
        self.pending_body: list[bytes] | None = None
        self.pending_bytes = 0  # counted against the client connection's buffer limit until sent or dropped
        self.upstream: UpstreamConnection | None = None
        self.routed: Target | None = None
        self.response_started = False
        self.response_chunked = False
        self.response_keep_alive = False
        self.response_status = 0
        self.finished = False
        self.deadline = 0.0  # route timeout, loop time; 0 when not armed (the listener's sweeper enforces it)
        self.pending_head: bytes | None = None  # the response head, held to go out in one write with the body
        self.start = 0.0
        self.error: LocalReplyError | None = None
        self.attempts = 0
        self.discarding = False  # swallowing a response that will be retried
        self.last_activity = downstream.listener.now
        self.counted_active = False
        self.request_bytes = 0  # body bytes as decoded, for the access log
        self.response_bytes = 0
        self.peer: bytes | None = None  # the upstream's peer header (who answered), for Istio's metrics
        self.trail: list[str] | None = None  # the hops so far, when the request asked where it went
        self.trail_key: bytes | None = None  # the trace the trail is kept under (inbound: answered and closed)
        self.trace: bytes | None = None  # the swimlane trace key, set by the role (sidecar listeners)
        self.failed_hop: bytes | None = None  # flags of a later hop's failure this 5xx carries (x-laneproxy-failed-hop)
        self.replay: list[bytes] | None = []  # body bytes sent upstream, while within _REPLAY_LIMIT; None past it
        self.replay_bytes = 0
        self.tried: tuple = ()  # endpoints of the attempts that failed, avoided by the retries
        self.upgrade: bytes | None = None  # tunnels: the protocol asked (websocket), or CONNECT

    # request side, driven by the downstream parser ---------------------------------------------

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
            self.downstream.write(_CONTINUE)  # once, from the proxy; the upstream never sees the Expect
        self._dispatch()

    def on_request_body(self, data: bytes) -> None:
        if self.finished:
            return  # answered already (a local reply or an early response): drain and drop
        self.last_activity = self.listener.now
        self.request_bytes += len(data)
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            if self.pending_body is None:
                self.pending_body = []
            self.pending_body.append(data)
            self.pending_bytes += len(data)
            self.downstream.hold(len(data))
            return
        if self.replay is not None:
            self._keep_for_replay(data)
        if self.request_chunked:
            parts = codec.chunk(data)
            upstream.pool.tx_bytes += sum(map(len, parts))
            upstream.transport.writelines(parts)
        else:
            upstream.pool.tx_bytes += len(data)
            upstream.transport.write(data)

    def _keep_for_replay(self, data: bytes) -> None:
        self.replay_bytes += len(data)
        if self.replay_bytes > _REPLAY_LIMIT:
            self.replay = None
        else:
            self.replay.append(data)  # type: ignore[union-attr]

    def on_request_complete(self) -> None:
        self.request_complete = True
        if self.finished:
            return
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and self.request_chunked:
            upstream.pool.tx_bytes += len(codec.LAST_CHUNK)
            upstream.transport.write(codec.LAST_CHUNK)
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

    def _open_connection(self, pool: UpstreamPool) -> None:
        assert self.routed is not None
        self.routed.cluster_stats.cx_total += 1  # Envoy counts every connection attempt
        pool.connect(self._on_connected)

    def _on_connected(self, connection: UpstreamConnection | None, error: LocalReplyError | None) -> None:
        routed = self.routed
        assert routed is not None
        if connection is None:
            routed.cluster_stats.cx_connect_fail += 1
            self._report_failure()
            if not self._retry_if("connect-failure"):
                self._fail_upstream(error or UpstreamResetError())
            return
        if self.finished:  # the client left while we were connecting
            connection.give_back(reusable=True)
            return
        self._attach(connection)

    def _attach(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        connection.lend(self)
        transport = connection.transport
        routed = self.routed
        assert transport is not None and routed is not None
        routed.cluster_stats.rq_total += 1  # an upstream request exists once it has a connection
        self.last_activity = self.listener.now
        parts = [self.method, b" ", routed.path, b" HTTP/1.1\r\n"]
        skip = h.NOT_FORWARDED if self.connection_tokens is None else h.NOT_FORWARDED | self.connection_tokens
        if self.expect_continue:
            skip = skip | {h.EXPECT}
        codec.write_headers(parts, self.headers, skip, routed.overrides)
        parts += (h.X_ENVOY_ATTEMPT_COUNT, b": %d\r\n" % self.attempts)
        if self.request_chunked:
            parts.append(_CHUNKED)
        parts.append(codec.CRLF)
        pending = self.pending_body
        if pending:
            self.pending_body = None
            for data in pending:
                parts += codec.chunk(data) if self.request_chunked else (data,)
                if self.replay is not None:
                    self._keep_for_replay(data)
        if self.request_complete and self.request_chunked:
            parts.append(codec.LAST_CHUNK)
        payload = b"".join(parts)
        connection.pool.tx_bytes += len(payload)
        transport.write(payload)
        if self.pending_bytes:
            self._release_pending()
        self._arm_timer()

    def _release_pending(self) -> None:
        held, self.pending_bytes = self.pending_bytes, 0
        self.downstream.release(held)

    def _arm_timer(self) -> None:
        if not self.deadline and self.request_complete and self.upstream is not None and not self.finished:
            routed = self.routed
            timeout = routed.timeout if routed is not None and routed.timeout is not None else \
                self.listener.settings.timeouts.route
            if timeout > 0:
                # No timer object per request: the listener's sweeper compares deadlines a few times a second.
                self.deadline = self.listener.loop.time() + timeout

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
                and not self.response_started and self.method in _IDEMPOTENT and not self.finished)

    def _unsent_retryable(self) -> bool:
        # The connection never opened, so nothing reached the upstream and every body byte received so far
        # is still held in pending_body (reading stops at the per-connection buffer limit): any method,
        # POST included, may go again, even while its body is still arriving.
        return self.attempts <= self.retry.max_retries and not self.response_started and not self.finished

    def _replayable(self) -> bool:
        # The next proxy answered that it never sent the request on: the whole body is still here
        # (kept for replay), so any method may go again.
        return (self.attempts <= self.retry.max_retries and self.request_complete and self.replay is not None
                and not self.response_started and not self.finished)

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
                and not self.has_body and not self.response_started and self.routed is not None):
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
        if self.finished:
            return
        if self.attempts > 1 and isinstance(error, (UpstreamConnectError, UpstreamResetError)):
            error = error.after_retries()
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.abandon()
        if self.response_started:
            # Headers are out: the only honest signal left is to reset the client's connection (before
            # _finish, which would close it cleanly and make a cut body look complete).
            self.error = error
            self.downstream.abort()
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
            self.discarding = True
            self.response_keep_alive = keep_alive
            return
        self.response_status = status
        self.response_keep_alive = keep_alive
        self.response_started = True
        if self.listener.reads_peer or self.trail is not None:
            self._read_mesh_headers(headers)
        overrides = self.listener.response_overrides(self)
        parts = [b"HTTP/1.1 %d " % status, reason or codec.reason_phrase(status), codec.CRLF]
        has_length = codec.write_response_headers(parts, headers, overrides, self.listener.response_dropped)
        head_only = self.method == b"HEAD" or status in _NO_BODY_STATUS
        if not has_length and not head_only:
            if self.http_minor >= 1:
                self.response_chunked = True
                parts.append(_CHUNKED)
            else:
                self.keep_alive = False  # HTTP/1.0 client: the end of the body is the end of the connection
        if not self.keep_alive or self.downstream.closes_after_this_response():
            self.keep_alive = False
            parts.append(_CLOSE)
        parts.append(codec.CRLF)
        self.pending_head = b"".join(parts)
        if self.method == b"HEAD":
            # httptools cannot be told a response to HEAD has no body: finish here, never reuse.
            self.response_keep_alive = False
            self.on_response_complete()

    def on_switching_protocols(self, connection: UpstreamConnection, from_upstream: bytes) -> None:
        """tunnels: the upstream answered this upgrade request 101; record the exchange, then join the sockets."""
        start = tunnel.switch_protocols(self, connection, from_upstream)
        self._finish()
        if start is not None:
            start()

    def finish_tunnelled(self) -> None:
        """tunnels: the exchange ends at its 101 or CONNECT 200 (recorded once); its sockets now belong to a tunnel."""
        self._finish()

    def _read_mesh_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The headers the next proxy answered with for this one: who it is, and where the request went next."""
        for name, value in headers:
            if name == h.X_LANEPROXY_PEER:
                self.peer = value
            elif name == h.X_LANEPROXY_ROUTE and value and self.trail is not None and len(self.trail) < TRAIL_HOPS:
                self.trail.append(value.decode("latin-1"))

    def on_response_body(self, data: bytes) -> None:
        if self.finished or self.discarding:
            return
        self.last_activity = self.listener.now
        self.response_bytes += len(data)
        head, self.pending_head = self.pending_head, None
        if self.response_chunked:
            parts = codec.chunk(data)
            if head is not None:
                parts.insert(0, head)
            self.downstream.writelines(parts)
        elif head is not None:
            self.downstream.writelines([head, data])
        else:
            self.downstream.write(data)

    def flush_head(self) -> None:
        """The upstream read ended after the head: send it now rather than wait for body bytes."""
        head, self.pending_head = self.pending_head, None
        if head is not None:
            self.downstream.write(head)

    def on_response_complete(self) -> None:
        if self.finished:
            return
        connection, self.upstream = self.upstream, None
        if self.discarding:
            self.discarding = False
            if connection is not None:
                connection.give_back(reusable=self.response_keep_alive)
            self._retry()
            return
        if not self.response_started:
            return  # a 1xx ended
        head, self.pending_head = self.pending_head, None
        if self.response_chunked:
            self.downstream.write(codec.LAST_CHUNK if head is None else head + codec.LAST_CHUNK)
        elif head is not None:
            self.downstream.write(head)
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
        close = not self.keep_alive or self.downstream.closes_after_this_response()
        # The outbound listener answers the app for the next hop: say so, for apps that pass headers on.
        flag = error.flag.encode()
        extra = ((h.X_LANEPROXY_FAILED_HOP, flag),) if error.status >= 500 and listener.marks_local_replies else ()
        if error.forwarded_nothing and not listener.edge_of_mesh:
            extra += ((h.X_LANEPROXY_NOT_FORWARDED, flag),)
        self.downstream.write(codec.local_reply(
            error.status, error.body.encode(), date=listener.dates.value(), server=listener.server_name, close=close,
            extra=extra,
        ))
        self.keep_alive = not close
        self._finish()

    def cancel(self) -> None:
        """The client went away: stop everything and release what can be released."""
        if self.finished:
            return
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.abandon()
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.deadline = 0.0
        self.pending_body = None
        if self.pending_bytes:
            self._release_pending()
        routed = self.routed
        if routed is not None and self.counted_active:
            stats = routed.cluster_stats
            stats.rq_active -= 1
            if self.response_status:
                stats.rq_by_code[self.response_status] += 1
            elapsed_ms = (self.listener.loop.time() - self.start) * 1000.0
            stats.rq_time_ms_sum += elapsed_ms
            stats.rq_time_count += 1
        self.listener.on_exchange_done(self)
        self.downstream.exchange_done(self)
