"""One proxied request/response: from the parsed request head to the last byte of the response.

Owns forwarding: asking the listener's role where the request goes, borrowing an upstream
connection, streaming the request body up and the response down with backpressure, re-framing
(chunked where the length is unknown), stripping hop-by-hop headers, the route timeout, the retry
of a request that met a stale keep-alive connection, and turning failures into local replies.
Callback-driven: a coroutine runs only while a new upstream connection is being opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from laneproxy.core import headers as h
from laneproxy.core.errors import (
    LocalReplyError,
    UpstreamProtocolError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from laneproxy.dataplane import codec

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from laneproxy.dataplane.downstream import DownstreamConnection
    from laneproxy.dataplane.listener import Listener, Target
    from laneproxy.dataplane.upstream import UpstreamConnection

_NO_BODY_STATUS = frozenset({204, 304})


class Exchange:
    __slots__ = (
        "downstream", "listener", "method", "target", "http_minor", "headers", "host", "keep_alive",
        "request_chunked", "has_body", "request_complete", "pending_body", "upstream", "routed",
        "response_started", "response_chunked", "response_keep_alive", "response_status", "finished",
        "timer", "start", "retried", "connection_tokens", "informational", "error",
    )

    def __init__(self, downstream: DownstreamConnection, method: bytes, target: bytes, http_minor: int,
                 headers: list[tuple[bytes, bytes]], host: bytes | None, keep_alive: bool, request_chunked: bool,
                 has_body: bool, connection_tokens: set[bytes] | None) -> None:
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
        self.request_complete = False
        self.pending_body: list[bytes] | None = None
        self.upstream: UpstreamConnection | None = None
        self.routed: Target | None = None
        self.response_started = False
        self.response_chunked = False
        self.response_keep_alive = False
        self.response_status = 0
        self.informational = False
        self.finished = False
        self.timer: TimerHandle | None = None
        self.start = 0.0
        self.retried = False
        self.error: LocalReplyError | None = None

    # request side, driven by the downstream parser ---------------------------------------------

    def begin(self) -> None:
        """Route the request and start forwarding it (called when it is this exchange's turn)."""
        listener = self.listener
        self.start = listener.loop.time()
        try:
            self.routed = listener.role.prepare(self, listener.store.current)
        except LocalReplyError as error:
            self.reply_locally(error)
            return
        self._dispatch()

    def on_request_body(self, data: bytes) -> None:
        if self.finished:
            return  # answered already (a local reply or an early response): drain and drop
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            if self.pending_body is None:
                self.pending_body = []
            self.pending_body.append(data)
            return
        if self.request_chunked:
            upstream.transport.writelines(codec.chunk(data))
        else:
            upstream.transport.write(data)

    def on_request_complete(self) -> None:
        self.request_complete = True
        if self.finished:
            return
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and self.request_chunked:
            upstream.transport.write(codec.LAST_CHUNK)
        self._arm_timer()

    # upstream side ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        routed = self.routed
        assert routed is not None
        pool = self.listener.pools.get(routed.endpoint.host, routed.endpoint.port)
        routed.cluster_stats.rq_total += 1
        routed.cluster_stats.rq_active += 1
        connection = pool.take_idle()
        if connection is not None:
            self._attach(connection)
        else:
            pool.connect(self._on_connected)

    def _on_connected(self, connection: UpstreamConnection | None, error: Exception | None) -> None:
        routed = self.routed
        assert routed is not None
        if connection is None:
            routed.cluster_stats.cx_connect_fail += 1
            self._fail_upstream(error if isinstance(error, LocalReplyError) else UpstreamResetError(str(error)))
            return
        routed.cluster_stats.cx_total += 1
        if self.finished:  # the client left while we were connecting
            connection.give_back(reusable=True)
            return
        self._attach(connection)

    def _attach(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        connection.lend(self)
        transport = connection.transport
        assert transport is not None and self.routed is not None
        parts = [self.method, b" ", self.routed.path, b" HTTP/1.1\r\n"]
        skip = h.HOP_BY_HOP if self.connection_tokens is None else h.HOP_BY_HOP | self.connection_tokens
        codec.write_headers(parts, self.headers, skip, self.routed.overrides)
        if self.request_chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(codec.CRLF)
        pending = self.pending_body
        if pending:
            self.pending_body = None
            for data in pending:
                parts += codec.chunk(data) if self.request_chunked else (data,)
        if self.request_complete and self.request_chunked:
            parts.append(codec.LAST_CHUNK)
        transport.write(b"".join(parts))
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self.timer is None and self.request_complete and self.upstream is not None and not self.finished:
            timeout = self.listener.settings.timeouts.route
            if timeout > 0:
                self.timer = self.listener.loop.call_later(timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.routed is not None:
            self.routed.cluster_stats.rq_timeout += 1
        self._fail_upstream(UpstreamTimeoutError())

    def on_upstream_error(self, error: Exception, received_any: bool) -> None:
        """The upstream connection failed or closed before the response was complete."""
        connection = self.upstream
        if (connection is not None and connection.reused and not received_any and not self.retried
                and not self.has_body and self.request_complete and not self.response_started):
            # A keep-alive connection the upstream had already closed: the request never reached it.
            self.retried = True
            self.upstream = None
            pool = self.listener.pools.get(self.routed.endpoint.host, self.routed.endpoint.port)
            pool.connect(self._on_connected)
            return
        if self.routed is not None:
            self.routed.cluster_stats.rq_reset += 1
        self._fail_upstream(error if isinstance(error, LocalReplyError) else UpstreamResetError(str(error)))

    def _fail_upstream(self, error: LocalReplyError) -> None:
        if self.finished:
            return
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.abandon()
        if self.response_started:
            # Headers are out: the only honest signal left is to cut the client's connection.
            self._finish(ok=False)
            self.downstream.abort()
            return
        self.reply_locally(error)

    def pause_upstream_writes(self) -> None:
        self.downstream.pause_reading()

    def resume_upstream_writes(self) -> None:
        self.downstream.resume_reading()

    # response side ---------------------------------------------------------------------------

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        if status < 200:
            self.informational = True
            if status == 100:
                self.downstream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self.response_status = status
        self.response_keep_alive = keep_alive
        self.response_started = True
        skip: frozenset[bytes] | set[bytes] = h.HOP_BY_HOP
        has_length = False
        for name, value in headers:
            if name == h.CONNECTION:
                skip = skip | codec.connection_tokens(value)
            elif name == h.CONTENT_LENGTH:
                has_length = True
        overrides = self.listener.response_overrides(self)
        parts = [b"HTTP/1.1 %d " % status, reason or codec.reason_phrase(status), codec.CRLF]
        codec.write_headers(parts, headers, skip, overrides)
        head_only = self.method == b"HEAD" or status in _NO_BODY_STATUS
        if not has_length and not head_only:
            if self.http_minor >= 1:
                self.response_chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0 client: the end of the body is the end of the connection
        if not self.keep_alive or self.downstream.draining:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(codec.CRLF)
        self.downstream.write(b"".join(parts))
        if self.method == b"HEAD":
            # httptools cannot be told a response to HEAD has no body: finish here, never reuse.
            self.response_keep_alive = False
            self.on_response_complete()

    def on_response_body(self, data: bytes) -> None:
        if self.finished:
            return
        if self.response_chunked:
            self.downstream.writelines(codec.chunk(data))
        else:
            self.downstream.write(data)

    def on_response_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.finished:
            return
        if self.response_chunked:
            self.downstream.write(codec.LAST_CHUNK)
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.give_back(reusable=self.response_keep_alive and self.request_complete)
        self._finish(ok=True)

    # endings ---------------------------------------------------------------------------------

    def reply_locally(self, error: LocalReplyError) -> None:
        self.response_status = error.status
        self.error = error
        if self.has_body and not self.request_complete:
            self.keep_alive = False  # an unread body would be taken for the next request
        listener = self.listener
        close = not self.keep_alive or self.downstream.draining
        self.downstream.write(codec.local_reply(
            error.status, error.body.encode(), date=listener.dates.value(), server=listener.server_name, close=close,
        ))
        self.keep_alive = not close
        self._finish(ok=False)

    def cancel(self) -> None:
        """The client went away: stop everything and release what can be released."""
        if self.finished:
            return
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.abandon()
        self._finish(ok=False)

    def _finish(self, *, ok: bool) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        routed = self.routed
        if routed is not None:
            stats = routed.cluster_stats
            stats.rq_active -= 1
            if self.response_status:
                stats.rq_by_code[self.response_status] += 1
            elapsed_ms = (self.listener.loop.time() - self.start) * 1000.0
            stats.rq_time_ms_sum += elapsed_ms
            stats.rq_time_count += 1
        self.listener.on_exchange_done(self)
        self.downstream.exchange_done(self)
