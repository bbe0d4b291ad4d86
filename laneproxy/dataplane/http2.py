"""HTTP/2 with prior knowledge (h2c) on every listener: the codec at the edge, one Exchange per stream.

Owns the client side of an HTTP/2 connection, framed and HPACK-coded by the `h2` library: turning
each stream's request headers into the same request model an HTTP/1.1 request gives (pseudo-headers
to method, path and Host; cookies joined), driving one Exchange per stream as its `DownstreamStream`,
flow control both ways (request DATA is acknowledged only once it went upstream, or was dropped, so
a slow upstream slows the client; response DATA is sent within the client's windows, and when they
are spent the upstream's reading pauses), response trailers (`grpc-status`), GOAWAY on drain, the
route timeout a gRPC client asks for (`grpc-timeout`), and the abuse limits with their `http2.*`
counters: at most `max_concurrent_streams` streams, a header list bounded by `max_header_list_size`
(HPACK bombs), the rapid-reset rule (CVE-2023-44487: a client that resets most of the streams it
opens is sent GOAWAY), and a control-frame flood (PING or SETTINGS frames whose acknowledgements
pile up unread) closed like Envoy's `max_outbound_control_frames`. Memory is bounded by the windows
it grants: a connection never holds more request bytes than its receive window.

It never routes, counts requests or builds local replies (the Exchange, the recorder and
local_reply do); nothing here parses HTTP/1.1.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from laneproxy.core import headers as h
from laneproxy.core.retry import grpc_timeout_seconds
from laneproxy.dataplane.exchange import Exchange
from laneproxy.dataplane.hpack_codec import Decoder, Encoder
from laneproxy.dataplane.http2_fields import fields_error

if TYPE_CHECKING:
    import asyncio

    from laneproxy.dataplane import local_reply
    from laneproxy.dataplane.listener import Listener
    from laneproxy.observability.stats import Http2Stats

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL = "HTTP/2"

MAX_CONCURRENT_STREAMS = 100  # Istio's default for its sidecars' HTTP/2 listeners
STREAM_WINDOW = 1024 * 1024  # request bytes one stream may have in flight before the proxy acknowledges them
CONNECTION_WINDOW = 8 * 1024 * 1024  # ... and a whole connection: the bound on request bytes held per client
# Rapid reset (CVE-2023-44487), as Envoy's overload rule: once a client has opened this many streams, if at
# least half of them were reset by the client within a second of opening, the connection ends.
PREMATURE_RESET_STREAMS = 100
PREMATURE_RESET_SECONDS = 1.0
# PING and SETTINGS the client sends while it is not reading their acknowledgements (Envoy's
# max_outbound_control_frames is 1000 queued frames).
MAX_UNREAD_CONTROL_FRAMES = 1000
DRAIN_GRACE_SECONDS = 1.0  # after a drain's GOAWAY, streams the client opened before reading it are still served

_PSEUDO_METHOD, _PSEUDO_PATH, _PSEUDO_AUTHORITY, _PSEUDO_SCHEME = b":method", b":path", b":authority", b":scheme"
_COOKIE = b"cookie"
_GRPC_TIMEOUT = b"grpc-timeout"
# Connection-specific headers an HTTP/2 message must not carry (RFC 9113 8.2.2), whatever the upstream sent.
_NOT_IN_HTTP2 = h.NOT_FORWARDED | frozenset({h.HOST})


def response_headers(status: int, headers: Sequence[tuple[bytes, bytes]], overrides: dict[bytes, bytes],
                     dropped: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """An upstream response head as an HTTP/2 header block: `:status` first, no connection-specific fields,
    none of `dropped` (the mesh's own marks, at the gateway)."""
    # Lists of Any, each field going on as itself: a never-indexed field keeps its type, the mark (RFC 7541 7.1.3),
    # which the compiled build would drop by rebuilding a typed tuple as a plain one.
    block: list[Any] = [(b":status", b"%d" % status)]
    field: Any
    for field in cast(Any, headers):  # as Any: the compiled loop would unbox each item first
        name = field[0]
        if name in _NOT_IN_HTTP2 or name in overrides or name in dropped or name[:1] == b":":
            continue
        block.append(field)
    block.extend(overrides.items())
    return block


def send_within_window(conn: h2.connection.H2Connection, stream_id: int, outbox: deque[bytes],
                       trailers: Sequence[tuple[bytes, bytes]] | None, *, end: bool) -> tuple[int, bool]:
    """Send from `outbox` what the stream's and the connection's windows allow, in frames no larger than the
    peer's; once the outbox is empty and `end` is asked, end the stream (with `trailers` if there are any).

    Returns (bytes sent, whether the stream was ended). Both directions use it: a client stream's response and
    an upstream stream's request. A stream the peer reset, or a connection going away, drops the outbox.
    """
    sent = 0
    ended = False
    try:
        while outbox:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                break
            data = outbox[0]
            if len(data) <= window:
                outbox.popleft()
                last = end and not outbox and not trailers  # the end rides on the last DATA: no empty frame
                conn.send_data(stream_id, data, end_stream=last)
                sent += len(data)
                if last:
                    return sent, True
            else:
                outbox[0] = data[window:]
                conn.send_data(stream_id, data[:window])
                sent += window
        if not outbox and end:
            ended = True
            if trailers:
                conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                conn.end_stream(stream_id)
    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
        outbox.clear()  # the peer reset the stream or is going away: nothing more to send on it
    return sent, ended


class Http2Stream:
    """One client stream: the `DownstreamStream` of its Exchange."""

    __slots__ = ("connection", "stream_id", "exchange", "head", "outbox", "end_pending", "trailers", "unacked", "held",
                 "blocked", "stalled", "request_ended", "response_ended", "opened_at", "closed", "pump_scheduled")

    def __init__(self, connection: Http2Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.exchange: Exchange | None = None
        self.head: list[tuple[bytes, bytes]] | None = None  # the response head, held until more follows (send_head)
        self.outbox: deque[bytes] = deque()  # response bytes waiting for the client's flow-control window
        self.end_pending = False
        self.trailers: Sequence[tuple[bytes, bytes]] | None = None
        self.unacked = 0  # request bytes received and not yet acknowledged (held, or the upstream is full)
        self.held = 0
        self.blocked = False  # the upstream is not taking request bytes
        self.stalled = False  # the upstream's reading is paused for this stream's window
        self.request_ended = False
        self.response_ended = False
        self.opened_at = time.monotonic()
        self.closed = False
        self.pump_scheduled = False  # response bytes wait for the end of this pass of the loop (send_data)

    # DownstreamStream ----------------------------------------------------------------------------

    @property
    def listener(self) -> Listener:
        return self.connection.listener

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.connection.transport

    def send_continue(self) -> None:
        """The proxy never forwards Expect; an HTTP/2 client that sent it gets the final response."""

    def send_head(self, exchange: Exchange, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]],
                  overrides: dict[bytes, bytes]) -> None:
        # Held until body bytes, trailers or the end follow, or the upstream read that brought it ends
        # (flush_head): a response with no body and no trailers (gRPC's Trailers-Only, every status an app
        # returns without a message) must be one HEADERS frame with END_STREAM, or gRPC clients call it broken.
        if not self.closed:
            self.head = response_headers(status, headers, overrides, exchange.listener.response_dropped)

    def send_data(self, data: bytes) -> None:
        """Sent once this pass of the loop is over: the end of the response, when the same upstream read brought
        it, then goes out on the last DATA frame rather than an empty one of its own."""
        if self.closed:
            return
        self.outbox.append(data)
        if not self.pump_scheduled:
            self.pump_scheduled = True
            self.connection.pump_soon(self)

    def flush_head(self) -> None:
        """The upstream read that brought the head ended with no end of the response: the head goes now (unless
        body bytes are about to go: they take it along)."""
        if self.head is not None and not self.closed and not self.pump_scheduled:
            self._send_head(end_stream=False)
            self.connection.flush_soon()

    def _send_head(self, *, end_stream: bool) -> None:
        head, self.head = self.head, None
        if head is None:
            return
        try:
            self.connection.h2.send_headers(self.stream_id, head, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.outbox.clear()  # the client reset the stream or is going away
            return
        if end_stream:
            self.response_ended = True

    def send_trailers(self, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        self.trailers = [(name, value) for name, value in trailers if name not in _NOT_IN_HTTP2]

    def end(self) -> None:
        self.end_pending = True
        if not self.pump_scheduled:  # else the pump this pass sends the end with the last DATA
            self._pump()

    def send_local_reply(self, exchange: Exchange, reply: local_reply.LocalReply) -> None:
        if self.closed:
            return
        block = [(b":status", b"%d" % reply.status), *((n, v) for n, v in reply.headers if n not in _NOT_IN_HTTP2)]
        self.connection.h2.send_headers(self.stream_id, block, end_stream=not reply.body)
        if reply.body:
            self.outbox.append(reply.body)
            self.end_pending = True
            self._pump()
        else:
            self.response_ended = True
            self.connection.flush_soon()

    def reset(self) -> None:
        self.connection.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    def hold(self, size: int) -> None:
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        self._acknowledge()

    def upstream_backpressure(self, full: bool) -> None:
        self.blocked = full
        if not full:
            self._acknowledge()

    def exchange_done(self, exchange: Exchange) -> None:
        self.connection.exchange_done(self)

    # flow control --------------------------------------------------------------------------------

    def on_request_data(self, data: bytes, flow_length: int) -> None:
        self.unacked += flow_length
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.on_request_body(data)
        self._acknowledge()

    def _acknowledge(self) -> None:
        """Open the client's window again for what went upstream (or was dropped): never for bytes still held."""
        unacked = self.unacked
        if not unacked or self.closed:
            return
        exchange = self.exchange
        if exchange is not None and not exchange.finished and (self.held > 0 or self.blocked):
            return
        self.unacked = 0
        connection = self.connection
        connection.credit(unacked, self.stream_id)
        connection.flush_soon()

    def _pump(self) -> None:
        """Send what the client's windows allow; the rest waits for WINDOW_UPDATE with the upstream paused."""
        if self.closed:
            return
        connection = self.connection
        outbox = self.outbox
        if self.head is not None:
            self._send_head(end_stream=not outbox and self.end_pending and not self.trailers)
        _, ended = send_within_window(connection.h2, self.stream_id, outbox, self.trailers,
                                      end=self.end_pending and not self.response_ended)
        if ended:
            self.response_ended = True
        connection.flush_soon()
        exchange = self.exchange
        if self.response_ended and not outbox and (exchange is None or exchange.finished):
            connection.finish_stream(self)  # the exchange ended while its last bytes waited for the window
            return
        upstream = exchange.upstream if exchange is not None else None
        if outbox and not self.stalled:
            self.stalled = True
            if upstream is not None:
                upstream.pause_reading()
        elif not outbox and self.stalled:
            self.stalled = False
            if upstream is not None:
                upstream.resume_reading()


class Http2Connection:
    """A client's HTTP/2 connection on a listener: the asyncio protocol once the preface has been seen."""

    __slots__ = ("listener", "transport", "h2", "streams", "closed", "draining", "writing_paused", "unread_control",
                 "streams_opened", "premature_resets", "last_activity", "counters", "drained_at", "flush_pending",
                 "to_pump")

    def __init__(self, listener: Listener, transport: asyncio.Transport) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = transport
        self.counters: Http2Stats = listener.stats.http2
        # Outbound header blocks are built here from parsed (lowercase, connection-header-free) fields, so h2's
        # outbound normalization and validation are skipped; what the client sends is checked by http2_fields
        # (h2's own inbound checks, compiled) before anything reads it, and its cookies are joined in _open.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                           normalize_inbound_headers=False, validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.encoder = Encoder()  # type: ignore[assignment]
        self.h2.decoder = Decoder()  # type: ignore[assignment]
        # Our SETTINGS as the values in force from the start (h2 applies update() only once they are acknowledged,
        # and our windows must agree with what the client is told).
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: listener.max_header_bytes,
        })
        # The limit holds before the client acknowledges our SETTINGS, too.
        self.h2.decoder.max_header_list_size = listener.max_header_bytes
        self.streams: dict[int, Http2Stream] = {}
        self.closed = False
        self.draining = False
        self.drained_at = 0.0
        self.writing_paused = False
        self.unread_control = 0
        self.streams_opened = 0
        self.premature_resets = 0
        self.last_activity = listener.now
        self.flush_pending = False
        self.to_pump: list[Http2Stream] = []  # streams with response bytes to send before the next flush
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - taken over
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = self.listener.now
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.DenialOfServiceError:
            self.counters.header_overflow += 1
            self._protocol_error()
            return
        except h2.exceptions.TooManyStreamsError:
            self.counters.too_many_streams += 1
            self._protocol_error()
            return
        except h2.exceptions.ProtocolError:
            self.counters.rx_messaging_error += 1
            self._protocol_error()
            return
        for event in events:
            if self.closed:
                return
            self._dispatch(event)
        if self.writing_paused and self.unread_control > MAX_UNREAD_CONTROL_FRAMES:
            self.counters.outbound_control_flood += 1
            self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, abort=True)
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connection_closed(self)  # type: ignore[arg-type]
        for stream in list(self.streams.values()):
            stream.closed = True
            if stream.exchange is not None:
                stream.exchange.cancel()
        self.streams.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.unread_control = 0
        for stream in list(self.streams.values()):
            if stream.outbox or stream.end_pending:
                stream._pump()

    def eof_received(self) -> bool:
        return False

    # events --------------------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.credit(event.flow_controlled_length, event.stream_id)
                return
            stream.on_request_data(event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                self._request_ended(stream)
        elif isinstance(event, h2.events.RequestReceived):
            if self._malformed(event.headers, trailers=False):
                return
            self._open(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._pump()
            else:
                for stream in list(self.streams.values()):
                    if stream.outbox:
                        stream._pump()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.request_ended:
                self._request_ended(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            if self._malformed(event.headers, trailers=True):
                return
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.exchange is not None:
                stream.exchange.on_request_trailers(list(event.headers))
                if event.stream_ended is not None:
                    self._request_ended(stream)
        elif isinstance(event, h2.events.StreamReset):
            self._client_reset(event.stream_id)
        elif isinstance(event, (h2.events.PingReceived, h2.events.RemoteSettingsChanged)):
            if self.writing_paused:
                self.unread_control += 1
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()

    def _malformed(self, headers: Sequence[tuple[bytes, bytes]], *, trailers: bool) -> bool:
        """A header block RFC 9113 8.2/8.3 calls malformed ends the connection with PROTOCOL_ERROR, as h2 did."""
        if fields_error(headers, request=True, trailers=trailers) is None:
            return False
        self.counters.rx_messaging_error += 1
        self.go_away(ErrorCodes.PROTOCOL_ERROR, abort=False)
        return True

    def _open(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        self.streams_opened += 1
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            # Past the stream limit (streams whose last DATA still waits for the client's window count too):
            # refused, never forwarded, and the client may retry it elsewhere.
            self.counters.too_many_streams += 1
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.counters.tx_reset += 1
            return
        method = path = authority = None
        host = None
        headers: list[Any] = []  # of (name, value), each as decoded: see response_headers
        cookies: list[bytes] = []
        max_retries = retry_on = None
        grpc_timeout = None
        field: Any  # kept as decoded: a never-indexed field's type is its mark (RFC 7541 7.1.3), forwarded with it
        for field in event.headers:
            name, value = field
            if name[:1] == b":":
                if name == _PSEUDO_METHOD:
                    method = value
                elif name == _PSEUDO_PATH:
                    path = value
                elif name == _PSEUDO_AUTHORITY:
                    authority = value
                continue
            if name == _COOKIE:
                cookies.append(value)
                continue
            if name == h.HOST:
                host = value
            elif name == h.X_ENVOY_MAX_RETRIES:
                max_retries = value
            elif name == h.X_ENVOY_RETRY_ON:
                retry_on = value
            elif name == _GRPC_TIMEOUT:
                grpc_timeout = grpc_timeout_seconds(value)
            headers.append(field)
        if cookies:
            headers.append((_COOKIE, b"; ".join(cookies)))
        if host is None and authority is not None:
            host = authority
            headers.insert(0, (h.HOST, authority))  # an HTTP/1.1 upstream needs Host; HTTP/2 upstreams take it back
        stream = Http2Stream(self, stream_id)
        self.streams[stream_id] = stream
        if method is None or path is None or method == b"CONNECT":
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        listener = self.listener
        retry = listener.retry_policy
        if (max_retries is not None or retry_on is not None) and listener.trust_envoy_headers:
            retry = retry.with_overrides(max_retries, retry_on)
        has_body = event.stream_ended is None
        has_length = any(name == h.CONTENT_LENGTH for name, _ in headers)
        exchange = Exchange(stream, method, path, 1, headers, host, True, has_body and not has_length, has_body,
                            None, False, retry, PROTOCOL)
        exchange.grpc_timeout = grpc_timeout
        stream.exchange = exchange
        if not has_body:
            stream.request_ended = True
            exchange.on_request_complete()
        exchange.begin()

    def _request_ended(self, stream: Http2Stream) -> None:
        stream.request_ended = True
        exchange = stream.exchange
        if exchange is not None and not exchange.finished:
            exchange.on_request_complete()
        elif stream.response_ended and not stream.outbox:
            self._forget(stream)

    def _client_reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self.counters.rx_reset += 1
        if stream is None:
            return
        stream.closed = True
        if time.monotonic() - stream.opened_at < PREMATURE_RESET_SECONDS and not stream.response_ended:
            self.premature_resets += 1
            self.counters.premature_reset += 1
            if self.streams_opened >= PREMATURE_RESET_STREAMS and self.premature_resets * 2 >= self.streams_opened:
                self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, abort=False)
        if stream.unacked:
            self.credit_connection(stream.unacked)
            stream.unacked = 0
        exchange = stream.exchange
        if exchange is not None:
            exchange.cancel()

    # called by streams ---------------------------------------------------------------------------

    def exchange_done(self, stream: Http2Stream) -> None:
        if stream.closed:
            return
        if stream.response_ended and not stream.outbox:
            self.finish_stream(stream)
        elif not stream.response_ended and not stream.end_pending:
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)  # ended without a complete response
        # else: DATA is still waiting for the client's window; the stream finishes once it went out.

    def finish_stream(self, stream: Http2Stream) -> None:
        """The response went out whole: forget the stream (and stop a request the client is still sending)."""
        if stream.closed:
            return
        if not stream.request_ended:
            # Answered before the client finished its request: tell it to stop sending (Envoy: NO_ERROR).
            self.reset_stream(stream, ErrorCodes.NO_ERROR)
            return
        self._forget(stream)

    def _forget(self, stream: Http2Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.stream_id, None)
        if stream.unacked:
            self.credit_connection(stream.unacked)
            stream.unacked = 0
        if self.listener.draining and not self.draining:
            self.drain()  # a connection opened while the listener drains: GOAWAY after its first response
        if self.draining and not self.streams:
            self.close_after_flush()

    def reset_stream(self, stream: Http2Stream, code: ErrorCodes) -> None:
        if stream.closed:
            return
        try:
            self.h2.reset_stream(stream.stream_id, code)
            self.counters.tx_reset += 1
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # already closed by the client
        self._forget(stream)
        exchange = stream.exchange
        if exchange is not None and not exchange.finished:
            exchange.cancel()
        self.flush()

    def credit(self, size: int, stream_id: int) -> None:
        """Acknowledge DATA for a stream that is gone, so the connection window does not shrink for good."""
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.StreamClosedError:
            self.credit_connection(size)

    def credit_connection(self, size: int) -> None:
        if size > 0 and not self.closed:
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
        """Write what h2 has queued once this pass of the event loop is over, not now.

        The streams of one connection are answered from many upstream reads in one pass of the loop; a write
        per stream was a send() system call per stream (and often a TCP segment each). Frames stay in h2's
        buffer in the order they were made, so a later immediate flush() sends these too, in order.
        """
        if not self.flush_pending:
            self.flush_pending = True
            self.listener.loop.call_soon(self._flush_pending)

    def pump_soon(self, stream: Http2Stream) -> None:
        self.to_pump.append(stream)
        self.flush_soon()

    def _flush_pending(self) -> None:
        if self.to_pump:
            streams, self.to_pump = self.to_pump, []
            for stream in streams:
                stream.pump_scheduled = False
                stream._pump()
        if self.flush_pending:
            self.flush()

    # connection lifecycle (the listener's view: the same as an HTTP/1.1 connection's) -----------

    def _protocol_error(self) -> None:
        # h2 has queued a GOAWAY with the error code; send it and close.
        self.counters.goaway_sent += 1
        self.flush()
        self.close()

    def go_away(self, code: ErrorCodes, *, abort: bool) -> None:
        if self.closed:
            return
        self.counters.goaway_sent += 1
        try:
            self.h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        if abort and self.transport is not None:
            self.closed = True
            self.transport.abort()
        else:
            self.close()

    def drain(self, *, close_idle: bool = True) -> None:
        """GOAWAY now, and close once no stream is left after a grace period.

        As Envoy's graceful drain does, the GOAWAY names the highest possible stream id: a stream the client
        opened before it read the GOAWAY is still served, and the client opens no new one on this connection.
        """
        if self.draining or self.closed:
            return
        self.draining = True
        self.drained_at = self.listener.now
        self.counters.goaway_sent += 1
        # Written by hand: h2's close_connection() would also stop the streams in flight from being answered.
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = 2**31 - 1
        frame.error_code = ErrorCodes.NO_ERROR
        self.flush()
        if self.transport is not None:
            self.transport.write(frame.serialize())

    def close_after_flush(self) -> None:
        """Draining and no stream left: close once streams racing the GOAWAY have had time to arrive."""
        if self.listener.now - self.drained_at >= DRAIN_GRACE_SECONDS:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.flush()  # frames a flush_soon() was to send
            self.closed = True
            self.transport.close()

    @property
    def idle(self) -> bool:
        return not self.streams

    def request_count(self) -> int:
        return sum(1 for stream in self.streams.values() if stream.exchange is not None and not stream.exchange.finished)

    def check_timeouts(self, now: float, headers_timeout: float, idle_timeout: float, stream_idle: float) -> None:
        if self.closed:
            return
        if not self.streams:
            if self.draining:
                self.close_after_flush()
            elif idle_timeout and now - self.last_activity > idle_timeout:
                self.go_away(ErrorCodes.NO_ERROR, abort=False)
            return
        for stream in list(self.streams.values()):
            exchange = stream.exchange
            if exchange is None or exchange.finished:
                continue
            if exchange.deadline and now >= exchange.deadline:
                exchange.on_timeout()
            elif stream_idle and now - exchange.last_activity > stream_idle:
                exchange.on_stream_idle()
