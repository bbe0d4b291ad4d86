"""Upstream HTTP/1.1 connections and the keep-alive pool of each endpoint.

Owns connecting, parsing responses with httptools, and handing connections back for reuse. It
knows nothing of lanes or routes: an Exchange borrows a connection, receives the response
callbacks, and returns it. A pooled connection is reused only after a complete response to a
complete request; anything else closes it.

An upstream is not trusted to frame its responses honestly, because a pooled connection carries
many clients' requests in turn and a byte out of place becomes another client's response:

- Anything after a complete response closes the connection instead of pooling it: bytes in the
  same read (a second response, a stray `Set-Cookie` line), and bytes or EOF while it sits idle.
  The exchange in flight keeps its complete response. A connection given back in the middle of a
  read joins the pool only once that read has parsed to its end, and with its reading resumed
  (it may have been paused for the client's backpressure), so that idle bytes are noticed.
- Taking a connection from the pool first asks the kernel, without reading, whether anything (bytes
  or EOF) is waiting on it: that catches what arrived since the event loop last looked. What no
  HTTP/1.1 proxy can catch is an upstream that sends its stray bytes in the same instant as the
  next request is written, before they reach this host: HTTP/1.1 has no request ids, so those
  bytes are indistinguishable from the start of the next response.
- A response head is limited as Envoy limits it (80 KiB and 100 headers by default: Envoy's HTTP/1
  codec default for upstream responses, larger than its 60 KiB for requests), counted while it is
  still arriving, so an unterminated header costs at most the limit plus one read. (httptools
  joins an unfinished value with `bytes +=` on every read: without this count an endless header
  cost quadratic copying, 190 MiB in 16 s here, and those copies delayed the route timeout.)
  Beyond it, and on any parse error or a `101` nobody asked for, the exchange gets 502 (UPE)
  without a retry and the connection is closed. A head that trickles in under the limit is cut
  by the route timeout, which the listener's sweeper enforces.
- A response without Content-Length and not ending in chunked (no framing, or
  `Transfer-Encoding: identity`) ends when the upstream closes; it is complete, not a reset.
"""

from __future__ import annotations

import asyncio
import select
from typing import TYPE_CHECKING, Protocol

import httptools

from laneproxy.core import headers as h
from laneproxy.core.errors import LocalReplyError, UpstreamConnectError, UpstreamProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

_PEEK_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)
_STATUS_LINE_BYTES = len(b"HTTP/1.1 200 \r\n")


def _chunked_last(value: bytes) -> bool:
    """Whether a Transfer-Encoding value's final coding is chunked (RFC 9112 6.3: else the body ends at close)."""
    return value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


class ResponseSink(Protocol):
    """What an upstream connection reports to: the exchange that borrowed it."""

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    pending_head: bytes | None
    def flush_head(self) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_error(self, error: Exception, received_any: bool) -> None: ...
    def on_switching_protocols(self, connection: UpstreamConnection, from_upstream: bytes) -> None: ...
    def pause_upstream_writes(self) -> None: ...
    def resume_upstream_writes(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "sink", "headers", "reason", "received_any", "closed", "reused",
                 "until_close", "framed", "chunked", "feeding", "returning", "head_open", "head_bytes", "head_raw", "poller")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.received_any = False
        self.closed = False
        self.reused = False
        self.until_close = False  # the response body ends when the connection does
        self.framed = False  # the response has Content-Length
        self.chunked = False  # the response's last Transfer-Encoding line ends in chunked
        self.feeding = False  # inside parser.feed_data
        self.returning = False  # given back reusable during the read being parsed; pooled once it parsed cleanly
        self.head_open = False  # a response head is expected or arriving
        self.head_bytes = 0  # of the head being parsed: status line, names and values, 4 per header line
        self.head_raw = 0  # every byte of the reads that ended with the head still unfinished
        self.poller: select.poll | None = None  # asks the kernel about this socket without reading it

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open_count += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Registered once: the check on every take from the pool is then one poll(2) call.
            self.poller = select.poll()
            self.poller.register(sock.fileno(), _PEEK_EVENTS)

    def data_received(self, data: bytes) -> None:
        self.pool.rx_bytes += len(data)
        if self.sink is None:
            # An idle connection has nothing to say; whatever arrives makes it unusable.
            self.close()
            return
        self.received_any = True
        error: LocalReplyError | None = None
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            error = cause if isinstance(cause, LocalReplyError) else UpstreamProtocolError(str(exc))
        except httptools.HttpParserUpgrade as exc:
            sink = self.sink
            if sink is not None and getattr(sink, "upgrade", None) is not None and self.parser.get_status_code() == 101:
                # tunnels: the 101 the request asked for; what followed it in this read is the tunnel's
                self.feeding = False
                sink.on_switching_protocols(self, bytes(memoryview(data)[exc.args[0]:]))
                return
            error = UpstreamProtocolError("101 Switching Protocols to a request that did not ask to upgrade")
        except httptools.HttpParserError as exc:
            error = UpstreamProtocolError(str(exc))
        finally:
            self.feeding = False
        if self.returning:
            # The exchange finished in this read; the rest of it parsed without starting another message.
            self.returning = False
            if error is None and not self.closed:
                self._pool()
            else:
                self.close()
            return
        if error is None and self.head_open:
            # httptools buffers an unfinished header line without bound and calls us only once it ends:
            # count the raw bytes of the head so far instead (a few bytes more than the parsed count).
            self.head_raw += len(data)
            if self.head_raw > self.pool.max_head_bytes:
                error = UpstreamProtocolError("response head larger than the limit")
        if error is not None:
            self._fail(error)
            return
        sink = self.sink
        if sink is not None and sink.pending_head is not None:
            sink.flush_head()

    def connection_lost(self, exc: Exception | None) -> None:
        pool = self.pool
        if self.closed:
            pool.destroyed_local += 1  # close() ran first: this proxy ended it
        else:
            pool.destroyed_remote += 1
        self.closed = True
        pool.open_count -= 1
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self.until_close and exc is None:
            sink.on_response_complete()  # httptools has no finish(): EOF is this body's end
        else:
            sink.on_upstream_error(exc or ConnectionResetError("upstream closed the connection"), self.received_any)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_upstream_writes()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_upstream_writes()

    # httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.sink is None:
            # The exchange got its whole response and these bytes belong to no one: never parse them for the next.
            raise UpstreamProtocolError("bytes after a complete response")
        self.headers = []
        self.reason = b""
        self.until_close = False
        self.framed = False
        self.chunked = False
        self.head_open = True
        self.head_bytes = _STATUS_LINE_BYTES

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self.head_bytes += len(reason)
        if self.head_bytes > self.pool.max_head_bytes:
            raise UpstreamProtocolError("response status line larger than the head limit")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.pool.max_head_bytes or len(self.headers) >= self.pool.max_headers:
            raise UpstreamProtocolError("response head larger than the limit")
        if name == h.CONTENT_LENGTH:
            self.framed = True
        elif name == h.TRANSFER_ENCODING:
            self.chunked = _chunked_last(value)
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_open = False
        self.head_raw = 0  # a final response may follow a 1xx
        status = self.parser.get_status_code()
        if status >= 200 and status not in (204, 304):
            self.until_close = not (self.framed or self.chunked)
        if self.sink is not None:
            self.sink.on_response_head(status, self.reason, self.headers, self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        self.until_close = False
        if self.sink is not None:
            self.sink.on_response_complete()

    # lending ----------------------------------------------------------------------------------

    def lend(self, sink: ResponseSink) -> None:
        self.sink = sink
        self.received_any = False
        self.head_open = True  # a read too short to begin the message still counts toward the head
        self.head_raw = 0

    def give_back(self, reusable: bool) -> None:
        """The exchange is done with this connection; keep it for the next request if it can be."""
        self.sink = None
        self.head_open = False
        if not reusable or self.closed:
            self.close()
        elif self.feeding:
            self.returning = True  # httptools goes on parsing this read after we return: judge it first
        else:
            self._pool()

    def _pool(self) -> None:
        self.reused = True
        transport = self.transport
        if transport is not None and not transport.is_reading():
            # Paused for the last client's backpressure, maybe in the very read that ended the response:
            # idle bytes and EOF must be seen, and the next request's response read.
            transport.resume_reading()
        self.pool.keep(self)

    def has_pending_input(self) -> bool:
        """Whether the kernel holds bytes or EOF that the event loop has not delivered yet (nothing is read).

        About 1.5 us on this project's test host, against about 100 us of proxy CPU per request.
        """
        return self.poller is not None and bool(self.poller.poll(0))

    def abandon(self) -> None:
        """The exchange gave up mid-flight (client gone, timeout): the connection's state is unknown."""
        self.sink = None
        self.returning = False
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def _fail(self, error: Exception) -> None:
        sink, self.sink = self.sink, None
        self.returning = False
        self.close()
        if sink is not None:
            sink.on_upstream_error(error, self.received_any)


class UpstreamPool:
    """Idle keep-alive connections to one endpoint (host, port), most recently used first."""

    __slots__ = ("host", "port", "idle", "max_idle", "_loop", "_connect_timeout", "open_count", "pending",
                 "max_head_bytes", "max_headers", "rx_bytes", "tx_bytes", "destroyed_local", "destroyed_remote")

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop, *, connect_timeout: float,
                 max_idle: int = 128, max_head_bytes: int = 80 * 1024, max_headers: int = 100) -> None:
        self.host, self.port = host, port
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.max_head_bytes = max_head_bytes  # response head limits, Envoy's defaults
        self.max_headers = max_headers
        self.open_count = 0  # connections open now, idle or lent
        self.pending = 0  # connections being opened for requests waiting on them
        # Envoy's upstream_cx_rx/tx_bytes_total and upstream_cx_destroy_local/remote, per endpoint.
        self.rx_bytes = self.tx_bytes = self.destroyed_local = self.destroyed_remote = 0
        self._loop = loop
        self._connect_timeout = connect_timeout

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            if connection.has_pending_input():
                connection.close()  # it spoke (or hung up) while idle: whatever it said belongs to no request
                continue
            return connection
        return None

    def connect(self, on_done: Callable[[UpstreamConnection | None, LocalReplyError | None], None]) -> asyncio.Task:
        """Open a new connection in the background and call `on_done(connection, error)`."""
        self.pending += 1
        return self._loop.create_task(self._connect(on_done))

    async def _connect(self, on_done: Callable[[UpstreamConnection | None, LocalReplyError | None], None]) -> None:
        error: LocalReplyError | None = None
        connection: UpstreamConnection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await self._loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
        except TimeoutError as exc:
            self.destroyed_local += 1  # as Envoy counts an attempt it gave up on
            error = UpstreamConnectError(f"connect timeout to {self.host}:{self.port}").with_cause(exc)
        except OSError as exc:
            self.destroyed_remote += 1  # as Envoy counts a refused or reset attempt
            error = UpstreamConnectError(f"{self.host}:{self.port}: {exc.strerror or exc}").with_cause(exc)
        finally:
            self.pending -= 1
        on_done(connection, error)

    def keep(self, connection: UpstreamConnection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        for connection in list(self.idle):
            connection.close()


class UpstreamPools:
    """Every endpoint's pool in this process, created on first use."""

    __slots__ = ("_pools", "_loop", "_connect_timeout", "_max_head_bytes", "_max_headers")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, connect_timeout: float, max_response_head_bytes: int = 80 * 1024,
                 max_response_headers: int = 100) -> None:
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        self._loop = loop
        self._connect_timeout = connect_timeout
        self._max_head_bytes = max_response_head_bytes
        self._max_headers = max_response_headers

    def get(self, host: str, port: int) -> UpstreamPool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = UpstreamPool(
                host, port, self._loop, connect_timeout=self._connect_timeout,
                max_head_bytes=self._max_head_bytes, max_headers=self._max_headers)
        return pool

    def reset_counters(self) -> None:
        for pool in self._pools.values():
            pool.rx_bytes = pool.tx_bytes = pool.destroyed_local = pool.destroyed_remote = 0

    def find(self, host: str, port: int) -> UpstreamPool | None:
        """The endpoint's pool if one was ever used (for the stats: never creates one)."""
        return self._pools.get((host, port))

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

