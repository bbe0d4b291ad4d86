"""The admin listeners' own HTTP/1.1 server: asyncio + httptools, a path router, and the request and responses
the admin handlers use (a small subset of aiohttp.web's shapes, so each handler reads as before).

Why not aiohttp: its import alone is about 11 MiB of a sidecar's resident memory, and the admin, the metrics
listener and the lifecycle port need one request at a time per connection and a handful of routes.

Owns the framing and the bounds every admin-side listener shares, as the data plane's are stated:
a request head (request line and headers) of at most MAX_HEAD_BYTES and MAX_HEADERS headers (else 431), a
body of at most MAX_BODY_BYTES (else 413), a request that must arrive whole within REQUEST_TIMEOUT of its
first byte (else 408 and the connection closes: a slowloris holds nothing for long), an idle keep-alive
connection closed after KEEPALIVE_TIMEOUT, at most MAX_PIPELINED requests parsed ahead of the one being
answered (then parsing stops and reading pauses), and 400 for anything httptools cannot parse. Answers go out in request
order; a handler that waits (the kubelet's /wait-for-stop) holds only its own connection. A request whose
client has closed the connection (or half-closed it) is cancelled. On stop: no new connections, idle ones closed, in-flight answers get
`shutdown_grace` seconds, then are cancelled.

It never interprets a route's meaning (handlers do) and never serves proxy traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools

log = logging.getLogger("laneproxy.admin.web")

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_BODY_BYTES = 64 * 1024  # admin POSTs carry their arguments in the query; a body is read and bounded
MAX_PIPELINED = 4
REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its last
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection is kept (aiohttp's default)
LINGER_SECONDS = 2.0  # after a refusal, what the client still sends is read and dropped for this long

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class Query(Mapping[str, str]):
    """A query string's parameters in order; `get`/`[]` give a name's first value, `getall` every value."""

    __slots__ = ("_pairs", "_first")

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = list(pairs)
        self._first: dict[str, str] = {}
        for name, value in self._pairs:
            self._first.setdefault(name, value)

    def __getitem__(self, name: str) -> str:
        return self._first[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)

    def getall(self, name: str, default: list[str] | None = None) -> list[str]:
        values = [value for key, value in self._pairs if key == name]
        if not values and default is not None:
            return default
        if not values:
            raise KeyError(name)
        return values

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        """Every (name, value) pair, repeated names included, in the order sent."""
        return list(self._pairs)


class Request:
    """One parsed request: method, path (percent-decoded), query, headers (names lower-cased), body."""

    __slots__ = ("method", "path", "path_qs", "query", "headers", "body", "version", "keep_alive", "app", "_connection")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes, version: str,
                 keep_alive: bool, app: Router | None = None) -> None:
        url = httptools.parse_url(target.encode("latin-1"))
        path = (url.path or b"/").decode("latin-1")
        query = (url.query or b"").decode("latin-1")
        self.method = method
        self.path = unquote(path)
        self.path_qs = path + ("?" + query if query else "")
        self.query = Query(parse_qsl(query, keep_blank_values=True))
        self.headers = headers
        self.body = body
        self.version = version
        self.keep_alive = keep_alive
        self.app = app
        self._connection: _Connection | None = None

    async def read(self) -> bytes:
        return self.body


class StreamResponse:
    """A response written as it is produced (chunked on HTTP/1.1): `prepare`, `write`..., `write_eof`."""

    def __init__(self, *, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers: dict[str, str] = {name.lower(): value for name, value in (headers or {}).items()}
        self.content_type = "application/octet-stream"
        self.charset: str | None = None
        self._connection: _Connection | None = None
        self._chunked = False
        self._head_only = False
        self._eof = False

    @property
    def prepared(self) -> bool:
        return self._connection is not None

    def _content_type_header(self) -> str:
        return self.content_type + (f"; charset={self.charset}" if self.charset else "")

    async def prepare(self, request: Request) -> None:
        connection = request._connection
        if connection is None:
            raise RuntimeError("prepare() needs a request read by this server")
        self._connection = connection
        self._head_only = request.method == "HEAD"
        self._chunked = request.version == "1.1"
        if not self._chunked:
            connection.close_after = True  # an HTTP/1.0 client reads the body until the connection closes
        headers = {**connection.server.router.default_headers, **self.headers}
        headers["content-type"] = self._content_type_header()
        if self._chunked:
            headers["transfer-encoding"] = "chunked"
        connection.write_head(self.status, headers)

    async def write(self, data: bytes) -> None:
        connection = self._connection
        if connection is None:
            raise RuntimeError("write() before prepare()")
        if data and not self._head_only:
            connection.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        await connection.drain()

    async def write_eof(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._connection is not None and self._chunked and not self._head_only:
            self._connection.write(b"0\r\n\r\n")


class Response(StreamResponse):
    """A whole response: `text` (encoded with `charset`, default utf-8) or `body` bytes."""

    def __init__(self, *, status: int = 200, text: str | None = None, body: bytes | None = None,
                 content_type: str | None = None, charset: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status=status, headers=headers)
        if text is not None:
            self.charset = charset or "utf-8"
            self.content_type = content_type or "text/plain"
            self.body = text.encode(self.charset)
        else:
            self.charset = charset
            self.content_type = content_type or "application/octet-stream"
            self.body = body or b""

    async def send(self, request: Request) -> None:
        connection = request._connection
        assert connection is not None
        self._connection = connection
        self._eof = True
        headers = {**connection.server.router.default_headers, **self.headers}
        headers["content-type"] = self._content_type_header()
        headers["content-length"] = str(len(self.body))
        connection.write_head(self.status, headers, b"" if request.method == "HEAD" else self.body)


def json_response(data: Any, *, status: int = 200) -> Response:
    return Response(status=status, text=json.dumps(data), content_type="application/json")


def plain(status: int, detail: str = "") -> Response:
    """The server's own answers: `404: Not Found` and the like, as aiohttp worded them."""
    return Response(status=status, text=f"{status}: {_REASONS.get(status, 'Error')}" + (f" ({detail})" if detail else ""))


Handler = Callable[[Request], Awaitable[StreamResponse]]


class Router:
    """Exact paths to handlers; a route may be limited to some methods (GET also answers HEAD)."""

    def __init__(self, *, default_headers: Mapping[str, str] | None = None,
                 not_found: Handler | None = None) -> None:
        self.routes: dict[str, tuple[Handler, frozenset[str] | None]] = {}
        self.default_headers = {name.lower(): value for name, value in (default_headers or {}).items()}
        self.not_found = not_found
        self.state: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.state[key] = value

    def add(self, path: str, handler: Handler, methods: Iterable[str] | None = None) -> None:
        allowed = None
        if methods is not None:
            allowed = frozenset(methods) | ({"HEAD"} if "GET" in methods else set())
        self.routes[path] = (handler, allowed)

    def add_get(self, path: str, handler: Handler) -> None:
        self.add(path, handler, ("GET",))

    async def dispatch(self, request: Request) -> StreamResponse:
        route = self.routes.get(request.path)
        if route is None:
            return await self.not_found(request) if self.not_found is not None else plain(404)
        handler, allowed = route
        if allowed is not None and request.method not in allowed:
            response = plain(405)
            response.headers["allow"] = ",".join(sorted(allowed))
            return response
        return await handler(request)


class _Refusal:
    """A request the server answers itself and then closes the connection (malformed, too big, too slow)."""

    __slots__ = ("status", "detail")

    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


class _Connection(asyncio.Protocol):
    """One client connection: httptools feeds requests into a queue that one task answers in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        assert server.loop is not None, "connections arrive only after start()"
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request | _Refusal] = deque()
        self.task: asyncio.Task[None] | None = None
        self.close_after = False
        self.reading_paused = False
        self.unparsed: bytes | None = None  # the rest of a read, parsed once the queue has room
        self.unparsed_from = 0
        self.input_done = False  # refused, upgraded or half-closed by the client: nothing more is read
        self.write_paused = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.head_sent = False
        # the request being read
        self.in_head = False
        self.in_message = False
        self.head_bytes = 0
        self.url = bytearray()
        self.header_list: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self.server.connections.add(self)
        self._arm(KEEPALIVE_TIMEOUT, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._disarm()
        if self.task is not None:
            self.task.cancel()  # the client has gone: nobody reads the answer of a held request
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_exception(ConnectionResetError("client closed the connection"))
        self.transport = None

    def eof_received(self) -> bool:
        # The client has closed its side: as nginx and aiohttp read it, the client is gone, so whatever it
        # asked is dropped and a held request (a preStop wait whose kubelet gave up) is cancelled.
        self.input_done = True
        return False

    def data_received(self, data: bytes) -> None:
        if not self.input_done:
            self._feed(data, 0)

    def _feed(self, data: bytes, start: int) -> None:
        """Parse one head at a time, so parsing stops where the queue fills: a read of a thousand pipelined
        requests holds MAX_PIPELINED of them and the unparsed rest of that one read, no more."""
        view = memoryview(data)
        end = len(data)
        while start < end and not self.input_done:
            if len(self.queue) >= MAX_PIPELINED:
                self.unparsed, self.unparsed_from = data, start
                if not self.reading_paused and self.transport is not None:
                    self.transport.pause_reading()
                    self.reading_paused = True
                return
            stop = data.find(b"\r\n\r\n", start)
            stop = end if stop < 0 else stop + 4
            self._parse(view[start:stop])
            start = stop

    def _feed_unparsed(self) -> None:
        data, self.unparsed = self.unparsed, None
        if data is None or self.transport is None:
            return
        self._feed(data, self.unparsed_from)
        if self.unparsed is None and self.reading_paused and not self.input_done:
            self.transport.resume_reading()
            self.reading_paused = False

    def _parse(self, data: memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A protocol switch (or CONNECT) the admin does not speak: answer what was read, then close.
            self.input_done = True
            self.close_after = True
            if self.in_message:
                self._refuse(400, "upgrade is not supported")
            return
        except httptools.HttpParserError as exc:
            if not self.input_done:
                self._refuse(400, str(exc) or "malformed request")
            return
        if self.in_head and not self.input_done:
            # httptools keeps an unfinished header in memory: the head is counted per slice fed, so bytes of
            # an earlier request's body in the same slice count too (conservative), and httptools never holds
            # more than the bound plus one read.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_waiter is not None and not self.write_waiter.done():
            self.write_waiter.set_result(None)
        self.write_waiter = None

    # httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = self.in_message = True
        self.head_bytes = 0
        self.url.clear()
        self.header_list = []
        self.body = bytearray()
        self._arm(self.server.request_timeout, self._request_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEAD_BYTES:
            self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
            raise httptools.HttpParserError("refused")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_list.append((name, value))
        if len(self.header_list) > MAX_HEADERS:
            self._refuse(431, f"more than {MAX_HEADERS} headers")
            raise httptools.HttpParserError("refused")

    def on_headers_complete(self) -> None:
        self.in_head = False
        # curl and others wait (a second, for curl) for `100 Continue` before sending a body they announced.
        # Sent only when no earlier answer is still due, so it can never land inside another response.
        if (self.task is None and not self.queue and self.transport is not None
                and any(name.lower() == b"expect" and value.lower() == b"100-continue"
                        for name, value in self.header_list)):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY_BYTES:
            self._refuse(413, f"request body over {MAX_BODY_BYTES} bytes")
            raise httptools.HttpParserError("refused")

    def on_message_complete(self) -> None:
        self.in_message = False
        self._disarm()
        parser = self.parser
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in self.header_list}
        try:
            request = Request(parser.get_method().decode("latin-1"), self.url.decode("latin-1"), headers,
                              bytes(self.body), parser.get_http_version(), parser.should_keep_alive(),
                              self.server.router)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "invalid request target")
            raise
        request._connection = self
        self._enqueue(request)

    # answering -------------------------------------------------------------------------------------

    def _refuse(self, status: int, detail: str) -> None:
        if self.input_done and self.queue and isinstance(self.queue[-1], _Refusal):
            return
        self.input_done = True
        self.in_message = self.in_head = False
        self._disarm()
        self._enqueue(_Refusal(status, detail))

    def _enqueue(self, item: Request | _Refusal) -> None:
        self.queue.append(item)
        if self.task is None:
            self._disarm()
            self.task = self.loop.create_task(self._answer_queue())

    async def _answer_queue(self) -> None:
        try:
            while self.queue and self.transport is not None:
                item = self.queue.popleft()
                if self.unparsed is not None:
                    self.loop.call_soon(self._feed_unparsed)
                if isinstance(item, _Refusal):
                    self._send_refusal(item)
                    return
                if not await self._answer(item):
                    self._close()
                    return
            if self.close_after or self.server.closing:
                self._close()
            elif not self.in_message:
                self._arm(KEEPALIVE_TIMEOUT, self._idle_timeout)
        finally:
            self.task = None

    async def _answer(self, request: Request) -> bool:
        """Answer one request; False when the connection must close after it."""
        response: StreamResponse
        self.head_sent = False
        try:
            response = await self.server.router.dispatch(request)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one handler's bug answers 500 and is logged, the server keeps serving
            log.exception("admin %s %s failed", request.method, request.path)
            if self.head_sent:
                return False  # a streamed answer cut short: closing without its last chunk tells the client
            response = plain(500)
        keep = request.keep_alive and not self.close_after and not self.server.closing
        if response.prepared:
            await response.write_eof()
            return keep and self.transport is not None
        if not keep:
            response.headers["connection"] = "close"
        assert isinstance(response, Response), "a StreamResponse must be prepared by its handler"
        await response.send(request)
        await self.drain()
        return keep

    def _send_refusal(self, refusal: _Refusal) -> None:
        response = plain(refusal.status, refusal.detail)
        response.headers["connection"] = "close"
        headers = {**self.server.router.default_headers, **response.headers,
                   "content-type": response._content_type_header(), "content-length": str(len(response.body))}
        self.write_head(refusal.status, headers, response.body)
        self._linger()

    def _linger(self) -> None:
        """Close after a refusal without a reset: send our side's FIN, read and drop what the client still
        sends for up to LINGER_SECONDS (closing with unread bytes would reset the connection, and a reset can
        discard the answer before the client reads it)."""
        transport = self.transport
        if transport is None:
            return
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        if self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False
        self._arm(LINGER_SECONDS, self._close)

    def write_head(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        self.head_sent = True
        if self.close_after or self.server.closing:
            headers = {**headers, "connection": "close"}
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n",
                 f"date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        self.write("".join(lines).encode("latin-1") + b"\r\n" + body)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("client closed the connection")
        if self.write_paused:
            self.write_waiter = self.loop.create_future()
            await self.write_waiter

    def _close(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.close()  # what was written still goes out

    # timers ----------------------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle_timeout(self) -> None:
        self.timer = None
        if self.task is None and not self.in_message:
            self._close()

    def _request_timeout(self) -> None:
        self.timer = None
        self._refuse(408, f"request not received whole within {self.server.request_timeout:g} s")


class Server:
    """One listening socket serving a Router."""

    def __init__(self, router: Router, *, request_timeout: float = REQUEST_TIMEOUT,
                 shutdown_grace: float = 2.0) -> None:
        self.router = router
        self.request_timeout = request_timeout
        self.shutdown_grace = shutdown_grace
        self.connections: set[_Connection] = set()
        self.closing = False
        self.listener: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the running loop, from start()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.loop = asyncio.get_running_loop()
        self.listener = await self.loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        self.port = self.listener.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop accepting, close idle connections, give answers in flight `shutdown_grace` s, then cancel them."""
        self.closing = True
        if self.listener is None or self.loop is None:
            return
        self.listener.close()
        for connection in list(self.connections):
            if connection.task is None:
                connection._close()
        deadline = self.loop.time() + self.shutdown_grace
        while any(c.task is not None for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        busy = [c.task for c in self.connections if c.task is not None]
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
