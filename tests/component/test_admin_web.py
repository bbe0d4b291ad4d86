"""admin.web, the HTTP/1.1 server under the admin API, the metrics listener and the lifecycle port, on real
sockets (127.0.0.1, port 0) and uvloop, as the sidecar runs it: what a hostile or careless client gets."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from laneproxy.admin import web


def make_router(calls: list[str] | None = None) -> web.Router:
    calls = [] if calls is None else calls
    released = asyncio.Event()

    async def hello(request: web.Request) -> web.StreamResponse:
        calls.append(f"{request.method} {request.path_qs}")
        return web.Response(text=f"hello {request.query.get('name', 'nobody')}\n")

    async def echo(request: web.Request) -> web.StreamResponse:
        calls.append(f"{request.method} {request.path}")
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    async def held(request: web.Request) -> web.StreamResponse:
        calls.append("held")
        try:
            await released.wait()
        except asyncio.CancelledError:
            calls.append("held cancelled")
            raise
        return web.Response(text="released\n")

    async def release(request: web.Request) -> web.StreamResponse:
        released.set()
        return web.Response(text="OK\n")

    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"x-kind": "stream"})
        response.content_type, response.charset = "text/plain", "UTF-8"
        await response.prepare(request)
        for part in (b"one\n", b"two\n"):
            await response.write(part)
        await response.write_eof()
        return response

    async def broken(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a handler's bug")

    async def depth(request: web.Request) -> web.StreamResponse:
        """How many requests were parsed and waiting behind this one when it was answered."""
        assert request._connection is not None
        return web.Response(text=f"{len(request._connection.queue)}\n")

    router = web.Router(default_headers={"server": "test"})
    router.add_get("/depth", depth)
    router.add_get("/hello", hello)
    router.add("/echo", echo, ("POST",))
    router.add_get("/held", held)
    router.add_get("/release", release)
    router.add_get("/stream", streamed)
    router.add_get("/broken", broken)
    return router


async def start(router: web.Router, **options) -> tuple[web.Server, int]:
    server = web.Server(router, **options)
    return server, await server.start("127.0.0.1", 0)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response off the wire: status, headers, body (by content-length, chunked, or to EOF)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    return status, headers, await reader.read()


def run(scenario):
    return uvloop.run(scenario())


def test_a_request_line_httptools_cannot_parse_is_answered_400_and_reaches_no_handler():
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello HTTP/1.1 extra\r\nHost: a\r\n\r\n")
        status, headers, _ = await read_response(reader)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await server.stop()
        return status, headers.get("connection"), closed

    assert run(scenario) == (400, "close", True)
    assert calls == []


def test_a_request_head_over_the_bound_is_refused_431_without_reading_it_all():
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n")
        for _ in range(web.MAX_HEAD_BYTES // 1000 + 2):
            writer.write(b"x-filler: " + b"a" * 1000 + b"\r\n")
        status, _, body = await read_response(reader)
        writer.close()
        await server.stop()
        return status, body

    status, body = run(scenario)
    assert status == 431 and str(web.MAX_HEAD_BYTES).encode() in body
    assert calls == []


def test_more_headers_than_the_bound_are_refused_431():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello HTTP/1.1\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(web.MAX_HEADERS + 1))
                     + b"\r\n")
        status, _, _ = await read_response(reader)
        writer.close()
        await server.stop()
        return status

    assert run(scenario) == 431


def test_a_body_over_the_bound_is_refused_413_and_reaches_no_handler():
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = web.MAX_BODY_BYTES + 1
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size)
        status, _, _ = await read_response(reader)
        writer.close()
        await server.stop()
        return status

    assert run(scenario) == 413
    assert calls == []


def test_a_body_within_the_bound_reaches_the_handler_whole():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = bytes(range(256)) * 16
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = await read_response(reader)
        writer.close()
        await server.stop()
        return answer[0], answer[2] == body

    assert run(scenario) == (200, True)


def test_a_slowloris_head_is_answered_408_and_closed_after_the_request_timeout():
    async def scenario():
        server, port = await start(make_router(), request_timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\nx-slow: ")
        for _ in range(3):  # keeps trickling, which must not extend the deadline
            await asyncio.sleep(0.1)
            writer.write(b"a")
        status, _, _ = await read_response(reader)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await server.stop()
        return status, closed

    assert run(scenario) == (408, True)


def test_pipelined_requests_are_answered_in_order_on_one_connection():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        names = [f"n{i}" for i in range(web.MAX_PIPELINED * 3)]
        writer.write(b"".join(b"GET /hello?name=%s HTTP/1.1\r\nHost: a\r\n\r\n" % n.encode() for n in names))
        bodies = [(await read_response(reader))[2] for _ in names]
        writer.close()
        await server.stop()
        return bodies

    assert run(scenario) == [f"hello n{i}\n".encode() for i in range(web.MAX_PIPELINED * 3)]


def test_a_thousand_requests_in_one_write_are_all_answered_with_at_most_the_bound_parsed_ahead():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /depth HTTP/1.1\r\nHost: a\r\n\r\n" * 1000)
        depths = [int((await read_response(reader))[2]) for _ in range(1000)]
        writer.close()
        await server.stop()
        return depths

    depths = run(scenario)
    assert len(depths) == 1000 and max(depths) <= web.MAX_PIPELINED


def test_sequential_keep_alive_requests_share_a_connection_and_connection_close_ends_it():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for name in ("a", "b"):
            writer.write(b"GET /hello?name=%s HTTP/1.1\r\nHost: a\r\n\r\n" % name.encode())
            answers.append((await read_response(reader))[2])
        writer.write(b"GET /hello?name=c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        status, headers, body = await read_response(reader)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await server.stop()
        return answers + [body], headers.get("connection"), closed

    assert run(scenario) == ([b"hello a\n", b"hello b\n", b"hello c\n"], "close", True)


def test_a_held_request_does_not_hold_up_other_connections():
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls))
        held_reader, held_writer = await asyncio.open_connection("127.0.0.1", port)
        held_writer.write(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", port)
        other_writer.write(b"GET /hello?name=other HTTP/1.1\r\nHost: a\r\n\r\n")
        other = await read_response(other_reader)
        other_writer.write(b"GET /release HTTP/1.1\r\nHost: a\r\n\r\n")
        await read_response(other_reader)
        held = await read_response(held_reader)
        for writer in (held_writer, other_writer):
            writer.close()
        await server.stop()
        return other[2], held[2]

    assert run(scenario) == (b"hello other\n", b"released\n")


def test_unknown_paths_and_methods_answer_404_and_405_with_allow_as_aiohttp_did():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\nDELETE /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        missing, refused = await read_response(reader), await read_response(reader)
        writer.close()
        await server.stop()
        return missing, refused

    missing, refused = run(scenario)
    assert (missing[0], missing[2], missing[1]["content-type"]) == (404, b"404: Not Found", "text/plain; charset=utf-8")
    assert (refused[0], refused[2], refused[1]["allow"]) == (405, b"405: Method Not Allowed", "GET,HEAD")
    assert missing[1]["server"] == refused[1]["server"] == "test"  # the router's headers on the server's answers too


def test_head_gets_the_length_of_the_get_answer_and_no_body():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /hello?name=x HTTP/1.1\r\nHost: a\r\n\r\nGET /hello?name=y HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        after = await read_response(reader)  # the next answer starts right after the head: no body was sent
        writer.close()
        await server.stop()
        return head, after[2]

    head, after = run(scenario)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 8\r\n" in head
    assert after == b"hello y\n"


def test_a_streamed_answer_is_chunked_and_complete():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        streamed, after = await read_response(reader), await read_response(reader)
        writer.close()
        await server.stop()
        return streamed, after[2]

    (status, headers, body), after = run(scenario)
    assert (status, body, headers["content-type"], headers["x-kind"]) == (200, b"one\ntwo\n", "text/plain; charset=UTF-8",
                                                                          "stream")
    assert after == b"hello nobody\n"


def test_a_handlers_exception_answers_500_and_the_connection_keeps_serving(caplog):
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /broken HTTP/1.1\r\nHost: a\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        broken, after = await read_response(reader), await read_response(reader)
        writer.close()
        await server.stop()
        return broken[0], after[2]

    assert run(scenario) == (500, b"hello nobody\n")
    assert "a handler's bug" in caplog.text


def test_a_client_that_leaves_cancels_its_held_request():
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls))
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        while "held" not in calls:
            await asyncio.sleep(0.01)
        writer.transport.abort()
        for _ in range(500):
            if "held cancelled" in calls:
                break
            await asyncio.sleep(0.01)
        before_stop = list(calls)
        await server.stop()
        return before_stop

    assert run(scenario) == ["held", "held cancelled"]


def test_stop_closes_idle_connections_and_cancels_a_held_request_after_the_grace():
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls), shutdown_grace=0.2)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        await read_response(idle_reader)
        held_reader, held_writer = await asyncio.open_connection("127.0.0.1", port)
        held_writer.write(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
        while "held" not in calls:
            await asyncio.sleep(0.01)
        await server.stop()
        idle_end = await asyncio.wait_for(idle_reader.read(), 5)
        held_end = await asyncio.wait_for(held_reader.read(), 5)
        try:
            await asyncio.open_connection("127.0.0.1", port)
            refused = False
        except OSError:
            refused = True
        return idle_end, held_end, refused

    assert run(scenario) == (b"", b"", True)
    assert calls[-1] == "held cancelled"


@pytest.mark.parametrize("target, expected", [
    ("/hello?name=a+b", b"hello a b\n"),
    ("/hello?name=%C3%A9", "hello \u00e9\n".encode()),
    ("/hell%6F?name=x&name=y", b"hello x\n"),
    ("http://admin.local/hello?name=abs", b"hello abs\n"),
])
def test_query_and_path_are_decoded_as_aiohttp_decoded_them(target, expected):
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target.encode())
        answer = await read_response(reader)
        writer.close()
        await server.stop()
        return answer[2]

    assert run(scenario) == expected


def test_query_keeps_repeated_names_and_blank_flags():
    query = web.Query([("header", "a:1"), ("usedonly", ""), ("header", "b:2")])
    assert (query.getall("header"), query.get("usedonly"), "usedonly" in query, dict(query)) == (
        ["a:1", "b:2"], "", True, {"header": "a:1", "usedonly": ""})
    assert query.items() == [("header", "a:1"), ("usedonly", ""), ("header", "b:2")]
    assert query.getall("missing", []) == []


def test_a_body_announced_with_expect_100_continue_is_invited_then_answered():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"abc")
        answer = await read_response(reader)
        writer.close()
        await server.stop()
        return interim, answer[0], answer[2]

    assert run(scenario) == (b"HTTP/1.1 100 Continue\r\n\r\n", 200, b"abc")


@pytest.mark.parametrize("raw", [
    pytest.param(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="length-and-chunked"),
    pytest.param(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", id="connect"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-client-hello"),
])
def test_requests_that_could_be_read_two_ways_or_are_not_http_get_400_and_reach_no_handler(raw):
    calls: list[str] = []

    async def scenario():
        server, port = await start(make_router(calls))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        status, headers, _ = await read_response(reader)
        closed = await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await server.stop()
        return status, closed

    assert run(scenario) == (400, True)
    assert calls == []


def test_a_chunked_request_body_reaches_the_handler_whole():
    async def scenario():
        server, port = await start(make_router())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        answer = await read_response(reader)
        writer.close()
        await server.stop()
        return answer[0], answer[2]

    assert run(scenario) == (200, b"abcde")
