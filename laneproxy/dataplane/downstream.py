"""A client connection to one of laneproxy's listeners: the HTTP/1.1 codec, request parsing and response ordering.

Owns the downstream side of the wire: strict parsing with httptools (llhttp rejects conflicting
framing, bad chunk sizes, obs-fold and whitespace before colons), header limits, Host checks,
pipelined requests answered in order with a bounded queue, keep-alive and closing, response framing
(the head held to go out with the first body bytes, chunked where the length is unknown, `Connection:
close`), and the backpressure between this socket and the exchange's upstream. It is the
`DownstreamStream` of the exchange whose response is being written (only that one writes).

Memory a client controls is bounded here: an incomplete head is cut off with 431 once it passes the
head limit (counted per read, since httptools keeps a header value it has not finished in memory);
request bodies buffered for requests that cannot be forwarded yet stop the reading past the
per-connection buffer limit; and a read holding many pipelined requests is fed to the parser one
head at a time (httptools cannot stop part-way through a buffer), so the queue bound holds to one
request. Reading stops for any of these reasons and resumes only when none is left.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Sequence

import httptools

from laneproxy.core import headers as h
from laneproxy.core.errors import DownstreamProtocolError, HeadersTooLargeError, LocalReplyError, RequestTimeoutError
from laneproxy.dataplane import codec, egress, local_reply, tunnel
from laneproxy.dataplane.exchange import Exchange
from laneproxy.dataplane.http2 import PREFACE, Http2Connection

if TYPE_CHECKING:
    from laneproxy.dataplane.listener import Listener


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_HEAD_END = b"\r\n\r\n"  # the strict parser ends every head here (bare LF is rejected)
_REQUEST_LINE_SLACK = 256  # method, version and separators: an incomplete head never counts more than a complete one


class _RejectRequestError(Exception):
    """Raised inside a parser callback to stop parsing; carries the local reply to send."""

    def __init__(self, error: LocalReplyError) -> None:
        super().__init__(str(error))
        self.error = error


class DownstreamConnection(asyncio.Protocol):
    __slots__ = (
        "listener", "transport", "parser", "url", "headers", "header_bytes", "host", "host_count", "chunked",
        "content_length", "parsing", "active", "queue", "closed", "draining", "reading_paused", "writing_paused",
        "connection_tokens", "expect_continue", "max_retries", "retry_on", "head_since", "last_activity",
        "transfer_codings", "in_trailers", "to_begin", "deferred_reply", "head_pending", "heads_begun",
        "buffered", "upstream_full", "input_done", "unparsed", "unparsed_from", "feed_scheduled", "tunnel_early",
        "pending_head", "response_chunked", "sniffed",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.host: bytes | None = None
        self.host_count = 0
        self.chunked = False
        self.content_length = False
        self.connection_tokens: set[bytes] | None = None
        self.parsing: Exchange | None = None  # the exchange whose request bytes are arriving
        self.active: Exchange | None = None  # the exchange whose response is being written
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting for their turn
        self.closed = False
        self.draining = False
        self.reading_paused = False
        self.writing_paused = False
        self.expect_continue = False
        self.max_retries: bytes | None = None
        self.retry_on: bytes | None = None
        self.head_since: float | None = listener.now  # waiting for a request head since (None: not waiting)
        self.last_activity = listener.now
        self.transfer_codings: list[bytes] = []
        self.in_trailers = False  # header callbacks after the head are chunked trailers: dropped, as Envoy does
        self.to_begin: Exchange | None = None  # routed once the whole buffer has parsed cleanly
        self.deferred_reply: bytes | None = None  # a 400 waiting for the response in flight to finish
        self.head_pending = -1  # bytes received for the head still arriving; -1 between heads
        self.heads_begun = 0
        self.buffered = 0  # request body bytes held by exchanges that cannot forward them yet
        self.upstream_full = False  # the active exchange's upstream socket is not taking more
        self.input_done = False  # an upgrade or a rejected request: whatever else the client sends is dropped
        self.unparsed: bytes | None = None  # the rest of a read, kept while reading is paused
        self.unparsed_from = 0
        self.feed_scheduled = False
        self.pending_head: bytes | None = None  # the active response's head, held to go out with its first body bytes
        self.response_chunked = False  # the active response is re-framed chunked (its length is unknown)
        self.sniffed: bytes | None = b""  # the first bytes, until they tell HTTP/2's preface from HTTP/1.x; then None
        self.tunnel_early: bytes | None = None  # tunnels: what the client sent after an upgrade or CONNECT head

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.listener.now
        if self.sniffed is not None:
            # The first bytes: HTTP/2 with prior knowledge starts with its 24-byte preface, which no HTTP/1.x
            # request does. Fewer bytes that could still be the preface wait for more (24 at most).
            seen = self.sniffed + data
            if seen[:24] == PREFACE[:len(seen)]:
                if len(seen) < len(PREFACE):
                    self.sniffed = seen
                    return
                self.sniffed = None
                self._become_http2(seen)
                return
            self.sniffed = None
            data = seen
        self._feed(data, 0, whole_if_room=True)

    def _become_http2(self, data: bytes) -> None:
        """Hand the connection to the HTTP/2 codec, which takes the transport and the bytes read so far."""
        transport = self.transport
        if transport is None:
            return
        self.closed = True  # this object is done; the listener counts the connection once, as HTTP/2
        connection = Http2Connection(self.listener, transport)
        transport.set_protocol(connection)  # type: ignore[arg-type]
        self.listener.connection_upgraded(self, connection)
        connection.data_received(data)

    def request_count(self) -> int:
        """Requests received and not yet answered, pipelined ones included."""
        return (self.active is not None) + len(self.queue)

    def _feed(self, data: bytes, start: int, *, whole_if_room: bool) -> bool:
        """Parse data[start:]; keep what is left when reading must stop (the queue or the buffer is full).

        True if bytes were kept for later (in `unparsed`). Callers test this rather than `unparsed` itself:
        a caller that has just set `unparsed` to None would see it narrowed to None by the type checker, and
        the compiled build trusts that narrowing (it raised TypeError when the feed had kept bytes again).
        """
        if self.input_done:
            return False
        end = len(data)
        room = self.listener.max_pipelined - len(self.queue)
        if whole_if_room and data.count(_HEAD_END, start) + 1 < room:
            # The common case, one request or a few per read: no slicing. (+1: a head whose end
            # straddles the previous read completes in this one without a whole terminator in it.)
            self._parse(data if start == 0 else memoryview(data)[start:])
            return False
        # A burst of pipelined requests: one head per feed, so that parsing stops where the queue fills.
        view = memoryview(data)
        while start < end:
            if not self._may_read():
                self.unparsed, self.unparsed_from = data, start  # bounded: no more is read until this is parsed
                self.pause_reading()
                return True
            stop = data.find(_HEAD_END, start)
            stop = end if stop < 0 else stop + len(_HEAD_END)
            if not self._parse(view[start:stop]):
                if self.tunnel_early is not None:
                    self.tunnel_early += bytes(view[stop:])  # tunnels: the rest of this read follows the head
                return False
            start = stop
        return False

    def _parse(self, data: bytes | memoryview) -> bool:
        """Feed the parser, enforce the head limit on a head still arriving; False if parsing must stop."""
        begun, between = self.heads_begun, self.parsing is None and self.head_pending < 0
        upgraded = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            error = cause.error if isinstance(cause, _RejectRequestError) else DownstreamProtocolError(str(exc))
            self._reject(error)
            return False
        except httptools.HttpParserUpgrade as exc:
            upgraded = True
            # tunnels: held, never parsed, never sent before the 101 (at most one read: reading stops below)
            self.tunnel_early = bytes(memoryview(data)[exc.args[0]:])
        except httptools.HttpParserError as exc:
            self._reject(DownstreamProtocolError(str(exc)))
            return False
        if self.head_pending >= 0:
            # httptools keeps an unfinished header value or name in memory: count the head per read. A head
            # that began after another message in the same data is counted from the next read on, so an
            # incomplete head holds at most the limit plus two reads (uvloop reads up to 256 KiB at once).
            # The target has its own limit (on_url) and is not counted here, like in a complete head.
            started = self.heads_begun - begun
            if started == 0:
                self.head_pending += len(data)
            elif started == 1 and between:
                self.head_pending = len(data)
            if self.head_pending - len(self.url) > self.listener.max_header_bytes + _REQUEST_LINE_SLACK:
                self._reject(HeadersTooLargeError())
                return False
        if upgraded:
            # An upgrade the proxy tunnels waits for the 101 with what followed its head (tunnel_early); any
            # other (h2c) is forwarded without the upgrade. Either way, answered once unless 101, then closed:
            # the exchange was told not to keep it alive, and nothing after the head is ever parsed.
            self.input_done = True
            self.pause_reading()
        # Nothing goes upstream before the bytes that arrived with the head have parsed: a broken chunk
        # right behind a good head must not leave a half-forwarded request behind.
        exchange, self.to_begin = self.to_begin, None
        if exchange is not None and not exchange.finished:
            exchange.begin()
        return not upgraded

    def _feed_unparsed(self) -> None:
        self.feed_scheduled = False
        data, self.unparsed = self.unparsed, None
        if data is None or self.closed:
            return
        if not self._feed(data, self.unparsed_from, whole_if_room=False):
            self.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connection_closed(self)
        for exchange in (self.active, self.parsing, *self.queue):
            if exchange is not None:
                exchange.cancel()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        active = self.active
        if active is not None and active.upstream is not None:
            active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        active = self.active
        if active is not None and active.upstream is not None:
            active.upstream.resume_reading()
        self.resume_reading()

    # httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head_pending = 0
        self.heads_begun += 1
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.host = None
        self.host_count = 0
        self.chunked = False
        self.content_length = False
        self.connection_tokens = None
        self.expect_continue = False
        self.max_retries = self.retry_on = None
        self.transfer_codings = []
        self.in_trailers = False
        if self.head_since is None:
            self.head_since = self.listener.now

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.listener.max_header_bytes:
            raise _RejectRequestError(DownstreamProtocolError("request target too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_trailers:
            return
        name = name.lower()
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.listener.max_header_bytes or len(self.headers) >= self.listener.max_header_count:
            raise _RejectRequestError(HeadersTooLargeError())
        if b"\0" in value:
            raise _RejectRequestError(DownstreamProtocolError("NUL in a header value"))
        if name == h.HOST:
            self.host = value
            self.host_count += 1
        elif name == h.TRANSFER_ENCODING:
            self.chunked = True  # llhttp insists that chunked is the final coding; on_headers_complete that it is the only one
            self.transfer_codings.append(value)
        elif name == h.CONTENT_LENGTH:
            self.content_length = True
        elif name == h.CONNECTION:
            tokens = codec.connection_tokens(value)
            self.connection_tokens = tokens if self.connection_tokens is None else self.connection_tokens | tokens
        elif name == h.EXPECT:
            self.expect_continue = value.lower() == b"100-continue"
        elif name == h.X_ENVOY_MAX_RETRIES:
            self.max_retries = value
        elif name == h.X_ENVOY_RETRY_ON:
            self.retry_on = value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_trailers = True
        self.head_pending = -1
        parser = self.parser
        method = parser.get_method()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _RejectRequestError(DownstreamProtocolError(f"HTTP version {version} is not supported"))
        minor = 1 if version == "1.1" else 0
        if self.chunked:
            codings = [token.strip() for token in b",".join(self.transfer_codings).lower().split(b",")]
            if minor == 0 or codings != [b"chunked"]:
                # RFC 9112 6.1: Transfer-Encoding from HTTP/1.0, or a coding other than chunked, is faulty framing.
                raise _RejectRequestError(DownstreamProtocolError("unsupported Transfer-Encoding"))
        if self.host_count > 1:
            raise _RejectRequestError(DownstreamProtocolError("more than one Host header"))
        if minor == 1 and self.host is None and not self.url.startswith(b"http://"):
            raise _RejectRequestError(DownstreamProtocolError("HTTP/1.1 request without a Host header"))
        if method == b"CONNECT" and not egress.accepts_connect(self.listener):
            raise _RejectRequestError(DownstreamProtocolError("CONNECT is not supported"))
        upgrade = parser.should_upgrade()  # llhttp sets it before this callback; the exception comes after
        if upgrade and (self.chunked or self.content_length):
            # llhttp stops at the head of an upgrade: a body would never be read, yet announced upstream.
            raise _RejectRequestError(DownstreamProtocolError("upgrade request with a body"))
        self.head_since = None
        listener = self.listener
        retry = listener.retry_policy
        if (self.max_retries is not None or self.retry_on is not None) and listener.trust_envoy_headers:
            retry = retry.with_overrides(self.max_retries, self.retry_on)
        exchange = Exchange(
            self, method, self.url, minor, self.headers, self.host,
            minor == 1 and parser.should_keep_alive() and not upgrade,  # draining is decided per response
            self.chunked, self.chunked or self.content_length, self.connection_tokens,
            self.expect_continue and minor == 1, retry,
        )
        if upgrade:  # tunnels: CONNECT, or an upgrade this proxy tunnels (websocket); None strips it (h2c)
            exchange.upgrade = b"CONNECT" if method == b"CONNECT" else tunnel.upgrade_token(
                codec.header_value(self.headers, h.UPGRADE), self.listener.settings.upgrade_types)
        self.parsing = exchange
        if self.active is None:
            self.active = exchange
            self.to_begin = exchange
        else:
            self.queue.append(exchange)
            if len(self.queue) >= self.listener.max_pipelined:
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.on_request_body(body)

    def on_message_complete(self) -> None:
        exchange, self.parsing = self.parsing, None
        if exchange is not None:
            exchange.on_request_complete()

    # DownstreamStream: called by the active exchange ----------------------------------------------

    def send_continue(self) -> None:
        self.write(_CONTINUE)

    def send_head(self, exchange: Exchange, status: int, reason: bytes, headers: Sequence[tuple[bytes, bytes]],
                  overrides: dict[bytes, bytes]) -> None:
        parts = [b"HTTP/1.1 %d " % status, reason or codec.reason_phrase(status), codec.CRLF]
        has_length = codec.write_response_headers(parts, headers, overrides, exchange.listener.response_dropped)
        head_only = exchange.method == b"HEAD" or status in _NO_BODY_STATUS
        self.response_chunked = False
        if not has_length and not head_only:
            if exchange.http_minor >= 1:
                self.response_chunked = True
                parts.append(_CHUNKED)
            else:
                exchange.keep_alive = False  # HTTP/1.0 client: the end of the body is the end of the connection
        if not exchange.keep_alive or self.closes_after_this_response():
            exchange.keep_alive = False
            parts.append(_CLOSE)
        parts.append(codec.CRLF)
        self.pending_head = b"".join(parts)

    def send_data(self, data: bytes) -> None:
        head, self.pending_head = self.pending_head, None
        if self.response_chunked:
            parts = codec.chunk(data)
            if head is not None:
                parts.insert(0, head)
            self.writelines(parts)
        elif head is not None:
            self.writelines([head, data])
        else:
            self.write(data)

    def flush_head(self) -> None:
        head, self.pending_head = self.pending_head, None
        if head is not None:
            self.write(head)

    def send_trailers(self, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        """An HTTP/1.1 client gets no trailers (Envoy's default): the last chunk ends the body."""

    def end(self) -> None:
        head, self.pending_head = self.pending_head, None
        if self.response_chunked:
            self.write(codec.LAST_CHUNK if head is None else head + codec.LAST_CHUNK)
        elif head is not None:
            self.write(head)

    def send_local_reply(self, exchange: Exchange, reply: local_reply.LocalReply) -> None:
        close = not exchange.keep_alive or self.closes_after_this_response()
        self.write(local_reply.http1(reply, close=close))
        exchange.keep_alive = not close

    def reset(self) -> None:
        self.abort()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if not self.closed and self.transport is not None:
            self.transport.writelines(parts)

    def exchange_done(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        self.upstream_full = False  # that was the active exchange's upstream socket
        if self.deferred_reply is not None:
            self.write(self.deferred_reply)
            self.close()
            return
        if not exchange.keep_alive:
            self.close()
            return
        if self.queue:
            following = self.queue.popleft()
            self.active = following
            following.begin()
        self.resume_reading()

    def hold(self, size: int) -> None:
        """An exchange keeps `size` body bytes it cannot forward yet: past the buffer limit, stop reading."""
        self.buffered += size
        if self.buffered > self.listener.buffer_limit:
            self.pause_reading()

    def release(self, size: int) -> None:
        """Held body bytes went upstream or were dropped."""
        self.buffered -= size
        if self.reading_paused and self.buffered <= self.listener.buffer_limit:
            self.resume_reading()

    def upstream_backpressure(self, full: bool) -> None:
        """The active exchange's upstream socket stopped (or started again) taking request bytes."""
        self.upstream_full = full
        if full:
            self.pause_reading()
        else:
            self.resume_reading()

    def _may_read(self) -> bool:
        listener = self.listener
        return not (self.closed or self.input_done or self.upstream_full or self.writing_paused
                    or self.buffered > listener.buffer_limit or len(self.queue) >= listener.max_pipelined)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again, once no reason to stop is left; bytes kept from an earlier read are parsed first."""
        if not self.reading_paused or self.transport is None or not self._may_read():
            return
        if self.unparsed is not None:
            if not self.feed_scheduled:  # not from inside a callback of the parser that will be fed
                self.feed_scheduled = True
                self.listener.loop.call_soon(self._feed_unparsed)
            return
        self.reading_paused = False
        self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection (RST, not FIN): a close-delimited body cut short must not look complete."""
        if self.transport is not None:
            self.closed = True
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass  # already gone; abort() below is all that is left to do
            self.transport.abort()

    @property
    def idle(self) -> bool:
        """No request of this client is in flight: nothing received since its last response (not even part of a head)."""
        return (self.active is None and self.parsing is None and self.head_pending < 0 and self.unparsed is None
                and not self.sniffed)

    def closes_after_this_response(self) -> bool:
        """Draining, and no further request of this client has begun to arrive: the response being written says
        `Connection: close`. Pipelined requests already received are answered first, the last one closing."""
        return self.draining and not self.queue and self.head_pending < 0 and self.unparsed is None

    def drain(self, *, close_idle: bool = True) -> None:
        """Stop keeping this connection alive: the next response says `Connection: close` and the connection
        closes after it. With `close_idle`, a connection with no request in flight closes now; without it,
        it stays open for the request its client may be sending this very moment (a SIGTERM drain closes
        idle connections only once its minimum is over: callers pick pooled connections at any time)."""
        self.draining = True
        if close_idle and self.idle:
            self.close()

    def check_timeouts(self, now: float, headers_timeout: float, idle_timeout: float, stream_idle: float) -> None:
        """Called by the listener's sweeper about four times a second; timeouts of 0 are off."""
        if self.closed:
            return
        active = self.active
        if active is None:
            if headers_timeout and self.head_since is not None and now - self.head_since > headers_timeout:
                self._reject(RequestTimeoutError("request headers timeout"))
            elif idle_timeout and self.parsing is None and now - self.last_activity > idle_timeout:
                self.close()
        elif active.deadline and now >= active.deadline:
            active.on_timeout()
        elif stream_idle and now - active.last_activity > stream_idle and now - self.last_activity > stream_idle:
            active.on_stream_idle()

    # errors -----------------------------------------------------------------------------------

    def _reject(self, error: LocalReplyError) -> None:
        """A request we cannot parse or accept: answer it (after any response in flight) and close."""
        self.listener.stats.cx_protocol_error += 1
        self.parser = httptools.HttpRequestParser(self)
        self.input_done, self.unparsed = True, None  # never feed the broken stream again
        broken, self.parsing = self.parsing, None
        waiting, self.to_begin = self.to_begin, None
        reply = local_reply.http1(local_reply.build(error, date=self.listener.dates.value(),
                                                    server=self.listener.server_name), close=True)
        for exchange in self.queue:
            exchange.cancel()
        self.queue.clear()
        active = self.active
        if active is not None and not active.finished:
            if active is not broken or active.response_started:
                # An earlier request is still being answered: do not interleave; answer after it, then close.
                if active.keep_alive:  # (bytes after a request that asked to close are simply dropped)
                    self.deferred_reply = reply
                active.keep_alive = False
                self.pause_reading()
                if waiting is active:
                    active.begin()  # a complete request that arrived with the broken bytes is still answered
                return
            # The broken request is the one in flight and nothing was answered yet: drop its upstream side.
            self.active = None
            active.error, active.response_status = error, error.status
            active.cancel()
        self.write(reply)
        self.close()
