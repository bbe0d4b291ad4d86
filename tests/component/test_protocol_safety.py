"""Protocol safety at the wire: raw bytes in, raw bytes out, and a recording upstream that counts what it got.

Every hostile or ambiguous request is answered 400 (431 for oversized heads) and the connection
closed, and nothing reaches the upstream: not the request, not a smuggled follower, not even a
connection. Untrusted upstream responses give the client 502 and cost the proxy that upstream
connection; an upstream that dies mid-body leaves the client a visibly broken response.
Never through an HTTP client: clients normalise exactly the bytes under test.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import h11
import pytest

from proxyrig import (
    SWIMLANES,
    ProxyProcess,
    UpstreamThread,
    default_response,
    endpoints_file,
    exchange_ending,
    exchange_until_close,
    read_response,
    status_lines,
)

# Appended to every rejected request: if the proxy resynchronised on it, it would be a smuggled request.
FOLLOWER = b"GET /smuggled HTTP/1.1\r\nHost: mockb\r\n\r\n"


@pytest.fixture(scope="module")
def upstream():
    with UpstreamThread() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream):
    endpoints = endpoints_file(tmp_path_factory.mktemp("protocol") / "endpoints.yaml",
                               {"default/mockb": {"base": [upstream.port]}})
    process = ProxyProcess(SWIMLANES, endpoints, outbound=True).start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def fresh_upstream(upstream):
    upstream.reset()
    upstream.respond = None
    upstream.delay = None
    yield


def post(*header_lines: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST /upload HTTP/" + version + b"\r\nHost: mockb\r\n" + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n" + body


def get(*header_lines: bytes, request_line: bytes = b"GET / HTTP/1.1") -> bytes:
    return request_line + b"\r\n" + b"".join(line + b"\r\n" for line in header_lines) + b"\r\n"


HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"

REJECTED = {
    # framing: Content-Length with Transfer-Encoding, in both orders and with a zero length
    "cl-then-te": post(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=HELLO_CHUNKED),
    "te-then-cl": post(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=HELLO_CHUNKED),
    "cl-zero-with-te": post(b"Content-Length: 0", b"Transfer-Encoding: chunked", body=HELLO_CHUNKED),
    # duplicate or invalid Content-Length
    "duplicate-cl-different": post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"),
    "duplicate-cl-same": post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
    "cl-list": post(b"Content-Length: 5, 6", body=b"hello!"),
    "cl-negative": post(b"Content-Length: -1", body=b"hello"),
    "cl-two-numbers": post(b"Content-Length: 1 2", body=b"hello"),
    "cl-hex": post(b"Content-Length: 0x10", body=b"0123456789abcdef"),
    "cl-plus-sign": post(b"Content-Length: +5", body=b"hello"),
    "cl-empty": post(b"Content-Length: ", body=b"hello"),
    "cl-trailing-letter": post(b"Content-Length: 5a", body=b"hello"),
    "cl-overflow": post(b"Content-Length: 99999999999999999999999", body=b"hello"),
    # obfuscated Transfer-Encoding: chunked must be the one and final coding of a request
    "te-chunked-identity": post(b"Transfer-Encoding: chunked, identity", body=HELLO_CHUNKED),
    "te-xchunked": post(b"Transfer-Encoding: xchunked", body=HELLO_CHUNKED),
    "te-chunked-twice": post(b"Transfer-Encoding: chunked, chunked", body=HELLO_CHUNKED),
    "te-second-line-identity": post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", body=HELLO_CHUNKED),
    "te-unknown-coding-then-chunked": post(b"Transfer-Encoding: xchunked, chunked", body=HELLO_CHUNKED),
    "te-unknown-line-then-chunked-line": post(b"Transfer-Encoding: xchunked", b"Transfer-Encoding: chunked", body=HELLO_CHUNKED),
    "te-gzip-only": post(b"Transfer-Encoding: gzip", body=b"hello"),
    "te-quoted": post(b'Transfer-Encoding: "chunked"', body=HELLO_CHUNKED),
    "te-vertical-tab": post(b"Transfer-Encoding:\x0bchunked", body=HELLO_CHUNKED),
    "te-inner-space": post(b"Transfer-Encoding: chun ked", body=HELLO_CHUNKED),
    "te-in-http10": post(b"Transfer-Encoding: chunked", body=HELLO_CHUNKED, version=b"1.0"),
    "te-and-cl-in-http10": post(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=HELLO_CHUNKED, version=b"1.0"),
    # bare LF or CR in the head
    "bare-lf-after-request-line": b"GET / HTTP/1.1\nHost: mockb\r\n\r\n",
    "bare-lf-between-headers": b"GET / HTTP/1.1\r\nHost: mockb\nX-A: 1\r\n\r\n",
    "bare-lf-everywhere": b"GET / HTTP/1.1\nHost: mockb\n\n",
    "bare-cr-between-headers": b"GET / HTTP/1.1\r\nHost: mockb\rX-A: 1\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: mockb\r\nX-A: a\rb\r\n\r\n",
    "bare-cr-in-request-line": b"GET /\r HTTP/1.1\r\nHost: mockb\r\n\r\n",
    "bare-cr-ending-head": b"GET / HTTP/1.1\r\nHost: mockb\r\n\r",
    # obs-fold
    "obs-fold-space": get(b"Host: mockb", b"X-A: a", b" b"),
    "obs-fold-tab": get(b"Host: mockb", b"X-A: a", b"\tb"),
    "obs-fold-transfer-encoding": post(b"Transfer-Encoding:", b" chunked", body=HELLO_CHUNKED),
    "space-before-first-header": get(b" Host: mockb"),
    # whitespace before the colon
    "space-before-colon": get(b"Host: mockb", b"X-A : 1"),
    "tab-before-colon": get(b"Host: mockb", b"X-A\t: 1"),
    "space-before-colon-in-cl": post(b"Content-Length : 5", body=b"hello"),
    "space-before-colon-in-te": post(b"Transfer-Encoding : chunked", body=HELLO_CHUNKED),
    # NUL
    "nul-in-value": get(b"Host: mockb", b"X-A: a\x00b"),
    "nul-in-name": get(b"Host: mockb", b"X-\x00A: 1"),
    "nul-in-target": get(b"Host: mockb", request_line=b"GET /a\x00b HTTP/1.1"),
    # invalid chunk sizes
    "chunk-size-letters": post(b"Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(b"Transfer-Encoding: chunked", body=b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-negative": post(b"Transfer-Encoding: chunked", body=b"-1\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-hex-prefix": post(b"Transfer-Encoding: chunked", body=b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-empty": post(b"Transfer-Encoding: chunked", body=b"\r\nhello\r\n0\r\n\r\n"),
    "chunk-data-longer-than-size": post(b"Transfer-Encoding: chunked", body=b"5\r\nhelloXX\r\n0\r\n\r\n"),
    # request line
    "request-line-without-version": b"GET /\r\nHost: mockb\r\n\r\n",
    "request-line-version-glued-to-target": b"GET /a?q=0HTTP/1.1\r\nHost: mockb\r\n\r\n",
    # Host
    "duplicate-host-different": get(b"Host: mockb", b"Host: mockc"),
    "duplicate-host-same": get(b"Host: mockb", b"Host: mockb"),
}


@pytest.mark.parametrize("raw", REJECTED.values(), ids=REJECTED.keys())
async def test_ambiguous_or_malformed_request_gets_400_closes_and_reaches_no_upstream(proxy, upstream, raw):
    response, closed = await exchange_until_close(proxy.outbound_port, raw + FOLLOWER, timeout=3)
    await asyncio.sleep(0.1)  # anything the proxy forwarded has had time to arrive
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]
    assert len(status_lines(response)) == 1, response  # the follower was never answered
    assert closed, "the proxy kept the connection open after a 400"
    assert b"\r\nconnection: close\r\n" in response.lower()
    assert (upstream.received, upstream.connections) == ([], 0)


ACCEPTED = {
    # RFC 9110 5.6.3: OWS around a field value is SP or HTAB and is not part of the value
    "te-tab-after-colon": (post(b"Transfer-Encoding:\tchunked", body=HELLO_CHUNKED), b"hello"),
    "te-trailing-space": (post(b"Transfer-Encoding: chunked ", body=HELLO_CHUNKED), b"hello"),
    "te-uppercase": (post(b"Transfer-Encoding: CHUNKED", body=HELLO_CHUNKED), b"hello"),
    "cl-tab-after-colon": (post(b"Content-Length:\t5", body=b"hello"), b"hello"),
    "cl-trailing-space": (post(b"Content-Length: 5 ", body=b"hello"), b"hello"),
    "cl-leading-zeros": (post(b"Content-Length: 005", body=b"hello"), b"hello"),
    "chunk-extension": (post(b"Transfer-Encoding: chunked", body=b"5;name=value\r\nhello\r\n0\r\n\r\n"), b"hello"),
    "chunked-trailer": (post(b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), b"hello"),
    "chunk-size-uppercase-hex": (post(b"Transfer-Encoding: chunked", body=b"A\r\nhelloworld\r\n0\r\n\r\n"), b"helloworld"),
}


@pytest.mark.parametrize(("raw", "body"), ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_valid_framing_variants_are_accepted_and_the_upstream_gets_exactly_the_body(proxy, upstream, raw, body):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(raw)
    async with asyncio.timeout(5):
        status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200
    assert [r.body for r in upstream.received] == [body]


@pytest.mark.parametrize("pipelined_behind", [False, True], ids=["alone", "pipelined-behind-a-get"])
async def test_chunked_trailer_fields_never_become_request_headers_upstream(proxy, upstream, pipelined_behind):
    """Found by the fuzz test: trailers parsed before the upstream head was written were sent as headers."""
    raw = (b"POST /t HTTP/1.1\r\nHost: mockb\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n0\r\nHost: evil\r\nx-trailer-only: 1\r\n\r\n")
    if pipelined_behind:
        raw = b"GET /first HTTP/1.1\r\nHost: mockb\r\n\r\n" + raw
    await exchange_until_close(proxy.outbound_port, raw, timeout=5)
    posts = [r for r in upstream.received if r.request_line.startswith(b"POST /t ")]
    assert len(posts) <= 1
    for request in posts:
        names = [name.lower() for name, _ in request.headers()]
        assert names.count(b"host") == 1 and request.header(b"host") == b"mockb", request.head
        assert b"x-trailer-only" not in names, request.head


# -- limits --------------------------------------------------------------------------------------


def head_with(count: int, total_bytes: int) -> bytes:
    """A GET with Host plus `count - 1` headers whose names and values add up to about `total_bytes`."""
    extra = count - 1
    names = [b"x-h%03d" % i for i in range(extra)]
    budget = total_bytes - len(b"host") - len(b"mockb") - sum(len(n) for n in names)
    values = [b"v" * (budget // extra + (1 if i < budget % extra else 0)) for i in range(extra)]
    lines = [b"Host: mockb"] + [n + b": " + v for n, v in zip(names, values)] + [b"Connection: close"]
    return get(*lines)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (head_with(10, 59 * 1024), 200),
        (head_with(10, 61 * 1024), 431),
        (head_with(1 + 1, 59 * 1024), 200),
        (head_with(1 + 1, 61 * 1024), 431),
        (head_with(99, 4000), 200),  # 99 + Connection = 100 headers
        (head_with(100, 4000), 431),  # 101 headers
    ],
    ids=["59KiB-in-10", "61KiB-in-10", "59KiB-in-one", "61KiB-in-one", "100-headers", "101-headers"],
)
async def test_request_heads_are_limited_to_60_kib_and_100_headers_by_default(proxy, upstream, raw, status):
    response, closed = await exchange_until_close(proxy.outbound_port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 %d " % status), response[:200]
    assert closed
    if status == 431:
        assert (upstream.received, upstream.connections) == ([], 0)
    else:
        assert len(upstream.received) == 1


async def test_header_limits_are_configurable(tmp_path: Path, upstream):
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True,
                         extra=("--max-request-headers-kb", "4", "--max-request-headers", "20")).start()
    try:
        outcomes = [
            (await exchange_until_close(proxy.outbound_port, raw, timeout=5))[0][:12]
            for raw in (head_with(10, 3 * 1024), head_with(10, 5 * 1024), head_with(19, 200), head_with(20, 200))
        ]
    finally:
        proxy.stop()
    assert outcomes == [b"HTTP/1.1 200", b"HTTP/1.1 431", b"HTTP/1.1 200", b"HTTP/1.1 431"]


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"], ids=["plain", "asking-keep-alive"])
async def test_http10_client_gets_connection_close_and_the_connection_ends(proxy, upstream, connection):
    raw = b"GET / HTTP/1.0\r\nHost: mockb\r\n" + connection + b"\r\n"
    response, closed = await exchange_until_close(proxy.outbound_port, raw, timeout=3)
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert response.startswith(b"HTTP/1.1 200") or response.startswith(b"HTTP/1.0 200")
    assert b"\r\nconnection: close" in head
    assert b"transfer-encoding" not in head  # never chunked toward an HTTP/1.0 client
    assert closed


@pytest.mark.parametrize("upstream_sends_100", [False, True], ids=["proxy-answers", "upstream-also-sends-100"])
async def test_expect_100_continue_is_answered_exactly_once(proxy, upstream, upstream_sends_100):
    if upstream_sends_100:
        upstream.respond = lambda request: b"HTTP/1.1 100 Continue\r\n\r\n" + default_response(request)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: mockb\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(3):  # a client that waits for 100 before sending the body must get one
        interim = await reader.readuntil(b"\r\n\r\n")
    writer.write(b"hello")
    writer.write(b"GET /next HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        responses = [await read_response(reader), await read_response(reader)]
        trailing = await reader.read()
    writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert [(status, body) for status, _, body in responses] == [(200, b"POST /upload HTTP/1.1"), (200, b"GET /next HTTP/1.1")]
    assert trailing == b""
    assert [r.body for r in upstream.received] == [b"hello", b""]


async def test_pipelined_requests_are_answered_in_order(proxy, upstream):
    # The first is slowest: a proxy that forwarded them in parallel would answer out of order.
    upstream.delay = lambda request: {b"/1": 0.6, b"/2": 0.3}.get(request.request_line.split()[1], 0)
    raw = b"".join(b"GET /%d HTTP/1.1\r\nHost: mockb\r\n\r\n" % i for i in (1, 2, 3))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(raw)
    bodies = []
    async with asyncio.timeout(5):
        for _ in range(3):
            status, _, body = await read_response(reader)
            bodies.append((status, body))
    writer.close()
    assert bodies == [(200, b"GET /1 HTTP/1.1"), (200, b"GET /2 HTTP/1.1"), (200, b"GET /3 HTTP/1.1")]


def test_pipelined_requests_are_read_only_as_far_as_the_bounded_queue_allows(proxy, upstream):
    """While the first response is held, the proxy stops reading: the client cannot push 40 MB of requests."""
    upstream.delay = lambda request: 2.0 if request.request_line.startswith(b"GET /0 ") else 0
    padding = b"x-pad: " + b"p" * 4000
    count = 10_000  # about 40 MB of heads, several times what the socket buffers on both sides hold
    payload = b"".join(b"GET /%d HTTP/1.1\r\nHost: mockb\r\n%s\r\n\r\n" % (i, padding) for i in range(count))
    sock = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    sent = [0]

    def send_all() -> None:
        view = memoryview(payload)
        while sent[0] < len(payload):
            sent[0] += sock.send(view[sent[0]:sent[0] + 65536])

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    time.sleep(1.5)
    held = sent[0]
    assert held < len(payload) // 2, f"the proxy took {held} bytes of pipelined requests while one was in flight"
    # Once the held response goes out, everything is answered, in order.
    sock.settimeout(30)
    buffer = b""
    deadline = time.monotonic() + 90
    for index in range(count):
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(1 << 20)
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")).split(b":")[1])
        while len(buffer) < length:
            buffer += sock.recv(1 << 20)
        body, buffer = buffer[:length], buffer[length:]
        assert (head[:12], body) == (b"HTTP/1.1 200", b"GET /%d HTTP/1.1" % index)
        assert time.monotonic() < deadline
    sender.join(timeout=10)
    sock.close()


# -- untrusted upstream responses ----------------------------------------------------------------

BAD_RESPONSES = {
    "status-not-a-number": b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n",
    "status-missing": b"HTTP/1.1 OK\r\ncontent-length: 0\r\n\r\n",
    "status-two-digits": b"HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n",
    "not-http": b"garbage\r\n\r\n",
    "unknown-protocol": b"ICY 200 OK\r\ncontent-length: 0\r\n\r\n",
    "cl-and-te": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two-different-cl": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    "negative-cl": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nhello",
    "nul-in-header-value": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: a\x00b\r\n\r\nhello",
    "nul-in-header-name": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-\x00a: 1\r\n\r\nhello",
    "space-before-colon": b"HTTP/1.1 200 OK\r\ncontent-length : 5\r\n\r\nhello",
}


@pytest.mark.parametrize("bad", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
async def test_malformed_upstream_response_gives_502_and_the_proxy_drops_that_upstream_connection(proxy, upstream, bad):
    upstream.respond = lambda request: bad if request.request_line.startswith(b"GET /bad ") else default_response(request)
    first, _ = await exchange_until_close(proxy.outbound_port, b"GET /bad HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n")
    # Ask more times than the pool can hold idle connections from earlier tests: the bad one must never serve again.
    following = [await exchange_until_close(proxy.outbound_port, b"GET /good HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n")
                 for _ in range(3)]
    assert first.startswith(b"HTTP/1.1 502 "), first[:200]
    assert b"hello" not in first and b"\x00" not in first
    for second, _ in following:
        assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"GET /good HTTP/1.1")
    bad = [r.connection for r in upstream.received if r.request_line.startswith(b"GET /bad ")]
    good = [r.connection for r in upstream.received if r.request_line.startswith(b"GET /good ")]
    assert len(bad) == 1, "a malformed response is answered 502 once, not retried"
    assert bad[0] not in good, "the connection that carried a malformed response was reused"


def complete_response(data: bytes) -> tuple[int, bytes] | None:
    """(status, body) if `data` followed by EOF is one complete, well-framed response (h11 decides); else None."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "mockb")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    status, body = None, b""
    try:
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
            elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                return None
    except h11.RemoteProtocolError:
        return None


CUT_RESPONSES = {
    "content-length-100-sends-10": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n0123456789",
    "chunked-cut-between-chunks": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n",
    "chunked-cut-inside-a-chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\na\r\nhello",
}


@pytest.mark.parametrize("cut", CUT_RESPONSES.values(), ids=CUT_RESPONSES.keys())
async def test_upstream_closing_mid_response_leaves_the_client_a_visibly_broken_response(proxy, upstream, cut):
    upstream.respond = lambda request: cut
    response, ending = await exchange_ending(proxy.outbound_port, b"GET /cut HTTP/1.1\r\nHost: mockb\r\n\r\n", timeout=5)
    assert ending != "timeout", "the client was left waiting for the rest of a body that will never come"
    parsed = complete_response(response)
    assert parsed is None or parsed[0] != 200, f"a clean, complete 200 from a cut upstream: {response!r}"


@pytest.mark.parametrize("cut", CUT_RESPONSES.values(), ids=CUT_RESPONSES.keys())
async def test_upstream_closing_mid_response_to_an_http10_client_is_not_a_clean_close(proxy, upstream, cut):
    """HTTP/1.0 has no chunked framing: a body without a length ends at close, so a cut must be a reset."""
    upstream.respond = lambda request: cut
    response, ending = await exchange_ending(proxy.outbound_port, b"GET /cut HTTP/1.0\r\nHost: mockb\r\n\r\n", timeout=5)
    assert ending != "timeout"
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    clean_200 = response[9:12] == b"200" and ending == "eof" and b"content-length: " not in head
    assert not clean_200, f"a cut body toward HTTP/1.0 ended with a clean FIN: {response!r}"
    if b"content-length: " in head and response[9:12] == b"200":
        assert complete_response(response.replace(b"HTTP/1.0", b"HTTP/1.1", 1)) is None
