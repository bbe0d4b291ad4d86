"""Upstream HTTP/2 (h2c, prior knowledge): multiplexed connections per endpoint, one stream per attempt.

Owns the upstream side when a request goes out as HTTP/2: a pool per endpoint of connections that
each carry up to a stream limit (the server's SETTINGS_MAX_CONCURRENT_STREAMS, at most
`MAX_STREAMS_PER_CONNECTION`), opened on demand; each attempt's `UpstreamStream` (request headers
with `:authority`, `te: trailers` kept for gRPC, DATA within the server's windows with the client
slowed while the rest waits, request trailers); and the response callbacks into the Exchange
(head, DATA acknowledged only while the client is taking it, trailers, end, reset). A GOAWAY retires
a connection: its streams past the last one the server took fail as never sent (retried like a
connect failure), and no new stream uses it. It knows nothing of lanes, routes or local replies.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from laneproxy.core import headers as h
from laneproxy.dataplane.hpack_codec import Decoder, Encoder
from laneproxy.dataplane.http2 import send_within_window
from laneproxy.dataplane.http2_fields import fields_error
from laneproxy.core.errors import LocalReplyError, UpstreamConnectError, UpstreamProtocolError, UpstreamResetError

if TYPE_CHECKING:
    from laneproxy.dataplane.exchange import Exchange, UpstreamStream

    Waiter = Callable[[UpstreamStream | None, LocalReplyError | None], None]

MAX_STREAMS_PER_CONNECTION = 100
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 8 * 1024 * 1024
_AUTHORITY, _METHOD, _PATH, _SCHEME, _STATUS = b":authority", b":method", b":path", b":scheme", b":status"
_HTTP = b"http"
_TRAILERS = b"trailers"
# Never sent in an HTTP/2 request (RFC 9113 8.2.2); `te` is kept when it says `trailers` (gRPC requires it).
_NOT_IN_HTTP2 = (h.NOT_FORWARDED - {h.TE}) | frozenset({h.HOST})


def _trailer_fields(sink: Exchange | None) -> list[tuple[bytes, bytes]] | None:
    """The request trailers the client sent, as they go upstream."""
    trailers = sink.trailers if sink is not None else None
    return None if trailers is None else list(trailers)


class Http2UpstreamStream:
    """One attempt of one exchange on a shared HTTP/2 connection: the exchange's `UpstreamStream`."""

    __slots__ = ("connection", "pool", "stream_id", "sink", "outbox", "end_pending", "ended", "trailers", "paused",
                 "unacked", "received_any", "done", "reused", "blocked")

    def __init__(self, connection: Http2UpstreamConnection) -> None:
        self.connection = connection
        self.pool = connection.pool
        self.stream_id = 0
        self.sink: Exchange | None = None
        self.outbox: deque[bytes] = deque()  # request bytes waiting for the server's window
        self.end_pending = False
        self.ended = False  # END_STREAM went out
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.paused = False  # the client is not taking the response: its DATA is not acknowledged
        self.unacked = 0
        self.received_any = False
        self.done = False
        self.reused = False  # a new stream: never "a pooled connection the server had closed"
        self.blocked = False  # the exchange was told to stop reading the client's request body

    @property
    def connected(self) -> bool:
        return not self.done

    def lend(self, exchange: Exchange) -> None:
        self.sink = exchange

    def send_request(self, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]], skip: frozenset[bytes],
                     overrides: dict[bytes, bytes], attempt: int, chunked: bool, body: Sequence[bytes],
                     complete: bool) -> None:
        authority = overrides.get(h.HOST)
        # A list of Any, each field going on as itself: a never-indexed field keeps its type, the mark (RFC 7541
        # 7.1.3), which the compiled build would drop by rebuilding a typed tuple as a plain one.
        block: list[Any] = []
        field: Any
        for field in cast(Any, headers):  # as Any: the compiled loop would unbox each item first
            name, value = field
            if name == h.HOST:
                if authority is None:
                    authority = value
                continue
            if name in overrides or name[:1] == b":":
                continue
            if name in _NOT_IN_HTTP2 or name in skip:
                if not (name == h.TE and value.strip().lower() == _TRAILERS):
                    continue
            block.append(field)
        block.extend((name, value) for name, value in overrides.items() if name != h.HOST)
        block.append((h.X_ENVOY_ATTEMPT_COUNT, b"%d" % attempt))
        pseudo = [(_METHOD, method), (_SCHEME, _HTTP), (_AUTHORITY, authority or self.pool.authority), (_PATH, path)]
        connection = self.connection
        conn = connection.h2
        self.stream_id = conn.get_next_available_stream_id()
        connection.streams[self.stream_id] = self
        last = complete and not body and not (self.sink is not None and self.sink.trailers)
        # No field enters the upstream's HPACK table (hpack_codec.Encoder never indexes): one bad per-call value
        # (a grpc-timeout a peer refuses to store) cannot make the calls after it decode wrongly at the peer.
        conn.send_headers(self.stream_id, pseudo + block, end_stream=last)
        if last:
            self.end_pending = self.ended = True
        else:
            self.outbox.extend(body)
            if complete:
                self.end_pending = True
                self.trailers = _trailer_fields(self.sink)
        self._pump()

    def send_body(self, data: bytes) -> None:
        if self.done:
            return
        self.outbox.append(data)
        self._pump()

    def end_request(self) -> None:
        if self.done or self.end_pending:
            return
        self.end_pending = True
        self.trailers = _trailer_fields(self.sink)
        self._pump()

    def _pump(self) -> None:
        connection = self.connection
        outbox = self.outbox
        sent, ended = send_within_window(connection.h2, self.stream_id, outbox, self.trailers,
                                         end=self.end_pending and not self.ended)
        self.pool.tx_bytes += sent
        if ended:
            self.ended = True
        connection.flush_soon()
        sink = self.sink
        if sink is None:
            return
        if outbox and not self.blocked:
            self.blocked = True
            sink.pause_upstream_writes()  # the client's request body waits for the server's window
        elif not outbox and self.blocked:
            self.blocked = False
            sink.resume_upstream_writes()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self._acknowledge()

    def _acknowledge(self) -> None:
        if self.unacked and not self.paused and not self.done:
            unacked, self.unacked = self.unacked, 0
            self.connection.credit(unacked, self.stream_id)

    def give_back(self, reusable: bool) -> None:
        """The exchange has the whole response: the stream is done; the connection goes on for others."""
        self.sink = None
        if not self.done:
            self._close(ErrorCodes.NO_ERROR if reusable else ErrorCodes.CANCEL, reset=not reusable)

    def abandon(self) -> None:
        self.sink = None
        if not self.done:
            self._close(ErrorCodes.CANCEL, reset=True)

    def _close(self, code: ErrorCodes, *, reset: bool) -> None:
        self.done = True
        connection = self.connection
        if reset and self.stream_id:
            try:
                connection.h2.reset_stream(self.stream_id, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
        if self.unacked:
            connection.credit(self.unacked, self.stream_id)
            self.unacked = 0
        connection.stream_done(self)

    # from the connection -----------------------------------------------------------------------

    def on_data(self, data: bytes, flow_length: int) -> None:
        self.received_any = True
        self.pool.rx_bytes += len(data)
        self.unacked += flow_length
        sink = self.sink
        if sink is not None:
            sink.on_response_body(data)
        self._acknowledge()

    def fail(self, error: Exception) -> None:
        sink, self.sink = self.sink, None
        if not self.done:
            self.done = True
            self.connection.stream_done(self)
        if sink is not None:
            sink.on_upstream_error(error, self.received_any)


class Http2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint, shared by up to `capacity` streams at once."""

    def __init__(self, pool: Http2Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # As on the listener's side (http2.py): h2's header checks are http2_fields', compiled.
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False,
                                           normalize_inbound_headers=False, validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.encoder = Encoder()  # type: ignore[assignment]
        self.h2.decoder = Decoder()  # type: ignore[assignment]
        self.streams: dict[int, Http2UpstreamStream] = {}
        self.active = 0  # streams lent and not done
        self.closed = False
        self.retired = False  # GOAWAY received or sent: no new streams
        self.server_limit = MAX_STREAMS_PER_CONNECTION
        self.flush_pending = False

    @property
    def capacity(self) -> int:
        return min(self.server_limit, MAX_STREAMS_PER_CONNECTION)

    def usable(self) -> bool:
        """Room for one more stream (and stream ids left: a connection near the end of them is not used)."""
        if self.closed or self.retired or self.active >= self.capacity:
            return False
        highest = self.h2.highest_outbound_stream_id
        return highest is None or highest < 2**31 - 1001

    def open_stream(self) -> Http2UpstreamStream:
        self.active += 1
        return Http2UpstreamStream(self)

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open_count += 1
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.max_head_bytes,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()
            self._fail_all(UpstreamProtocolError(f"HTTP/2: {exc}"))
            self.close()
            return
        heads: list[Http2UpstreamStream] = []
        for event in events:
            if self.closed:
                return
            self._dispatch(event, heads)
        for stream in heads:
            if stream.sink is not None:
                stream.sink.flush_head()  # a head held for body bytes goes out once the read that brought it ends
        self.flush()

    def _dispatch(self, event: h2.events.Event, heads: list[Http2UpstreamStream]) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            if self._malformed(event.headers, trailers=False):
                return
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.sink is None:
                return
            heads.append(stream)
            stream.received_any = True
            status = 0
            headers: list[Any] = []  # of (name, value), each as decoded: see send_request
            field: Any
            for field in event.headers:
                name, value = field
                if name == _STATUS:
                    status = int(value)
                elif name[:1] != b":":
                    headers.append(field)
            stream.sink.on_response_head(status, b"", headers, True)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.credit(event.flow_controlled_length, event.stream_id)
                return
            stream.on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            if self._malformed(event.headers, trailers=True):
                return
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.sink is not None:
                stream.sink.on_response_trailers([(n, v) for n, v in event.headers if n[:1] != b":"])
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.sink is not None:
                stream.sink.on_response_complete()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if event.error_code == ErrorCodes.REFUSED_STREAM and not stream.received_any:
                    stream.fail(UpstreamConnectError("stream refused by the upstream"))
                else:
                    stream.fail(UpstreamResetError(f"upstream reset the stream ({event.error_code!r})"))
        elif isinstance(event, h2.events.WindowUpdated):
            targets = [self.streams.get(event.stream_id)] if event.stream_id else list(self.streams.values())
            for stream in targets:
                if stream is not None and (stream.outbox or stream.end_pending):
                    stream._pump()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                self.server_limit = changed.new_value
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.retired = True
            last = event.last_stream_id or 0
            for stream_id, stream in list(self.streams.items()):
                if stream_id > last:
                    stream.fail(UpstreamConnectError("the upstream's GOAWAY came before this stream"))
            if not self.streams:
                self.close()

    def _malformed(self, headers: Sequence[tuple[bytes, bytes]], *, trailers: bool) -> bool:
        """A malformed response block (RFC 9113 8.2/8.3) fails every stream and ends the connection, as h2's
        ProtocolError did: GOAWAY with PROTOCOL_ERROR, nothing of it reaches a client."""
        error = fields_error(headers, request=False, trailers=trailers)
        if error is None:
            return False
        try:
            self.h2.close_connection(error_code=ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        self._fail_all(UpstreamProtocolError(f"HTTP/2: malformed response header block: {error}"))
        self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        pool = self.pool
        if self.closed:
            pool.destroyed_local += 1
        else:
            pool.destroyed_remote += 1
        self.closed = True
        pool.open_count -= 1
        pool.forget(self)
        self._fail_all(UpstreamResetError(str(exc) if exc else "upstream closed the connection"))

    def _fail_all(self, error: LocalReplyError) -> None:
        for stream in list(self.streams.values()):
            stream.fail(error)

    def pause_writing(self) -> None:
        for stream in list(self.streams.values()):
            if stream.sink is not None and not stream.blocked:
                stream.blocked = True
                stream.sink.pause_upstream_writes()

    def resume_writing(self) -> None:
        for stream in list(self.streams.values()):
            if stream.sink is not None and stream.blocked and not stream.outbox:
                stream.blocked = False
                stream.sink.resume_upstream_writes()

    # called by streams -----------------------------------------------------------------------

    def stream_done(self, stream: Http2UpstreamStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self.active -= 1
        self.flush_soon()
        if self.retired and not self.streams:
            self.close()
        else:
            self.pool.stream_available(self)

    def credit(self, size: int, stream_id: int) -> None:
        if size <= 0 or self.closed:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            try:
                self.h2.increment_flow_control_window(size)
            except (h2.exceptions.FlowControlError, h2.exceptions.ProtocolError):
                pass
        self.flush_soon()

    def flush(self) -> None:
        self.flush_pending = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """Write once this pass of the event loop is over: the requests of many client streams opened in one
        pass go out in one write, not a send() each (see Http2Connection.flush_soon)."""
        if not self.flush_pending:
            self.flush_pending = True
            self.pool.loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        if self.flush_pending:
            self.flush()

    def close(self) -> None:
        if not self.closed:
            self.flush()  # frames a flush_soon() was to send (a RST_STREAM, the last request DATA)
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class Http2Pool:
    """One endpoint's HTTP/2 connections: a new stream goes on the first with room, else on a new connection."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop, *, connect_timeout: float,
                 max_head_bytes: int = 80 * 1024) -> None:
        self.host, self.port = host, port
        self.authority = f"{host}:{port}".encode()
        self.connections: list[Http2UpstreamConnection] = []
        self.connecting: Http2UpstreamConnection | None = None
        self.waiters: deque[Waiter] = deque()
        self.max_head_bytes = max_head_bytes
        self.open_count = 0
        self.pending = 0
        self.rx_bytes = self.tx_bytes = self.destroyed_local = self.destroyed_remote = 0
        self._loop = self.loop = loop
        self._connect_timeout = connect_timeout

    def take_stream(self) -> Http2UpstreamStream | None:
        for connection in self.connections:
            if connection.usable():
                return connection.open_stream()
        return None

    def connect(self, on_done: Waiter) -> bool:
        """Wait for a stream on a connection being opened; True if this call opened a new connection."""
        self.waiters.append(on_done)
        self.pending += 1
        if self.connecting is not None:
            return False
        connection = Http2UpstreamConnection(self)
        self.connecting = connection
        self._loop.create_task(self._connect(connection))
        return True

    async def _connect(self, connection: Http2UpstreamConnection) -> None:
        error: LocalReplyError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._loop.create_connection(lambda: connection, self.host, self.port)
        except TimeoutError as exc:
            self.destroyed_local += 1
            error = UpstreamConnectError(f"connect timeout to {self.host}:{self.port}").with_cause(exc)
        except OSError as exc:
            self.destroyed_remote += 1
            error = UpstreamConnectError(f"{self.host}:{self.port}: {exc.strerror or exc}").with_cause(exc)
        self.connecting = None
        if error is None:
            self.connections.append(connection)
        waiters, self.waiters = self.waiters, deque()
        self.pending -= len(waiters)
        for waiter in waiters:
            if error is not None:
                waiter(None, error)
                continue
            stream = self.take_stream()
            if stream is None:
                # More callers than one connection's streams: they wait for the next connection.
                self.connect(waiter)
                continue
            waiter(stream, None)

    def stream_available(self, connection: Http2UpstreamConnection) -> None:
        """A stream ended; nothing waits here for it (callers beyond the limit open another connection)."""

    def forget(self, connection: Http2UpstreamConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()


class Http2Pools:
    """Every endpoint's HTTP/2 pool in this process, created on first use."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, connect_timeout: float,
                 max_response_head_bytes: int = 80 * 1024) -> None:
        self._pools: dict[tuple[str, int], Http2Pool] = {}
        self._loop = loop
        self._connect_timeout = connect_timeout
        self._max_head_bytes = max_response_head_bytes

    def get(self, host: str, port: int) -> Http2Pool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = self._pools[(host, port)] = Http2Pool(host, port, self._loop, connect_timeout=self._connect_timeout,
                                                         max_head_bytes=self._max_head_bytes)
        return pool

    def find(self, host: str, port: int) -> Http2Pool | None:
        return self._pools.get((host, port))

    def reset_counters(self) -> None:
        for pool in self._pools.values():
            pool.rx_bytes = pool.tx_bytes = pool.destroyed_local = pool.destroyed_remote = 0

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
