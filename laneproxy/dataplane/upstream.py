"""Upstream HTTP/1.1 connections and the keep-alive pool of each endpoint.

Owns connecting, parsing responses with httptools, and handing connections back for reuse. It
knows nothing of lanes or routes: an Exchange borrows a connection, receives the response
callbacks, and returns it. A pooled connection is reused only after a complete response to a
complete request; anything else closes it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import httptools

from laneproxy.core import headers as h
from laneproxy.core.errors import LocalReplyError, UpstreamConnectError, UpstreamProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

_FRAMING = (h.CONTENT_LENGTH, h.TRANSFER_ENCODING)


class ResponseSink(Protocol):
    """What an upstream connection reports to: the exchange that borrowed it."""

    def on_response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    pending_head: bytes | None
    def flush_head(self) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_error(self, error: Exception, received_any: bool) -> None: ...
    def pause_upstream_writes(self) -> None: ...
    def resume_upstream_writes(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "sink", "headers", "reason", "received_any", "closed", "reused",
                 "until_close", "framed")

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
        self.framed = False  # the response has Content-Length or Transfer-Encoding

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open_count += 1

    def data_received(self, data: bytes) -> None:
        self.pool.rx_bytes += len(data)
        if self.sink is None:
            # An idle connection has nothing to say; whatever arrives makes it unusable.
            self.close()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(str(exc)))
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
        self.headers = []
        self.reason = b""
        self.until_close = False
        self.framed = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _FRAMING:
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200 and status not in (204, 304):
            self.until_close = not self.framed
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

    def give_back(self, reusable: bool) -> None:
        """The exchange is done with this connection; keep it for the next request if it can be."""
        self.sink = None
        if reusable and not self.closed:
            self.reused = True
            self.pool.keep(self)
        else:
            self.close()

    def abandon(self) -> None:
        """The exchange gave up mid-flight (client gone, timeout): the connection's state is unknown."""
        self.sink = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def _fail(self, error: Exception) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.on_upstream_error(error, self.received_any)


class UpstreamPool:
    """Idle keep-alive connections to one endpoint (host, port), most recently used first."""

    __slots__ = ("host", "port", "idle", "max_idle", "_loop", "_connect_timeout", "open_count", "pending", "rx_bytes",
                 "tx_bytes", "destroyed_local", "destroyed_remote")

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop, *, connect_timeout: float,
                 max_idle: int = 128) -> None:
        self.host, self.port = host, port
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
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
            if not connection.closed:
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

    __slots__ = ("_pools", "_loop", "_connect_timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, connect_timeout: float) -> None:
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        self._loop = loop
        self._connect_timeout = connect_timeout

    def get(self, host: str, port: int) -> UpstreamPool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = UpstreamPool(host, port, self._loop, connect_timeout=self._connect_timeout)
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

