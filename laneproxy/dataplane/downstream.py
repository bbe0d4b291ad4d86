"""A client connection to one of laneproxy's listeners: HTTP/1.1 request parsing and response ordering.

Owns the downstream side of the wire: strict parsing with httptools (llhttp rejects conflicting
framing, bad chunk sizes, obs-fold and whitespace before colons), header limits, Host checks,
pipelined requests answered in order with a bounded queue, keep-alive and closing, and the
backpressure between this socket and the exchange's upstream socket.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING

import httptools

from laneproxy.core import headers as h
from laneproxy.core.errors import DownstreamProtocolError, HeadersTooLargeError, LocalReplyError, RequestTimeoutError
from laneproxy.dataplane import codec
from laneproxy.dataplane.exchange import Exchange

if TYPE_CHECKING:
    from laneproxy.dataplane.listener import Listener


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


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
        "transfer_codings", "in_trailers", "to_begin", "deferred_reply",
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

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.listener.now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            error = cause.error if isinstance(cause, _RejectRequestError) else DownstreamProtocolError(str(exc))
            self._reject(error)
            return
        except httptools.HttpParserUpgrade:
            self._reject(DownstreamProtocolError("protocol upgrade is not supported"))
            return
        except httptools.HttpParserError as exc:
            self._reject(DownstreamProtocolError(str(exc)))
            return
        # Nothing goes upstream before the bytes that arrived with the head have parsed: a broken chunk
        # right behind a good head must not leave a half-forwarded request behind.
        exchange, self.to_begin = self.to_begin, None
        if exchange is not None and not exchange.finished:
            exchange.begin()

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
        if active is not None and active.upstream is not None and active.upstream.transport is not None:
            active.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        active = self.active
        if active is not None and active.upstream is not None and active.upstream.transport is not None:
            active.upstream.transport.resume_reading()

    # httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
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
        if method == b"CONNECT":
            raise _RejectRequestError(DownstreamProtocolError("CONNECT is not supported"))
        self.head_since = None
        listener = self.listener
        retry = listener.retry_policy
        if (self.max_retries is not None or self.retry_on is not None) and listener.trust_envoy_headers:
            retry = retry.with_overrides(self.max_retries, self.retry_on)
        exchange = Exchange(
            self, method, self.url, minor, self.headers, self.host,
            minor == 1 and parser.should_keep_alive() and not self.draining,
            self.chunked, self.chunked or self.content_length, self.connection_tokens,
            self.expect_continue and minor == 1, retry,
        )
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

    # called by exchanges ------------------------------------------------------------------------

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
        if self.deferred_reply is not None:
            self.write(self.deferred_reply)
            self.close()
            return
        if not exchange.keep_alive:
            self.close()
            return
        if self.reading_paused and not self.writing_paused:
            self.resume_reading()
        if self.queue:
            following = self.queue.popleft()
            self.active = following
            following.begin()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
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

    def drain(self) -> None:
        """Stop keeping this connection alive: close now if idle, else after the response in flight."""
        self.draining = True
        if self.active is None and self.parsing is None:
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
        self.parser = httptools.HttpRequestParser(self)  # never feed the broken stream again
        broken, self.parsing = self.parsing, None
        waiting, self.to_begin = self.to_begin, None
        reply = codec.local_reply(error.status, error.body.encode(), date=self.listener.dates.value(),
                                  server=self.listener.server_name, close=True)
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
