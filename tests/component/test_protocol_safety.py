"""Protocol safety at the wire: raw bytes in, raw bytes out, and a recording upstream that counts what it got.

Every hostile or ambiguous request is answered 400 (431 for oversized heads) and the connection
closed, and nothing reaches the upstream: not the request, not a smuggled follower, not even a
connection. Untrusted upstream responses give the client 502 and cost the proxy that upstream
connection; an upstream that dies mid-body leaves the client a visibly broken response.
Never through an HTTP client: clients normalise exactly the bytes under test.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from pathlib import Path

import h11
import pytest

from proxyrig import (
    SWIMLANES,
    ProxyProcess,
    RssWatch,
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
    """An outbound listener (Host mockb) and a gateway (/mock goes to mocka), both in front of `upstream`."""
    endpoints = endpoints_file(tmp_path_factory.mktemp("protocol") / "endpoints.yaml",
                               {"default/mockb": {"base": [upstream.port]}, "default/mocka": {"base": [upstream.port]}})
    process = ProxyProcess(SWIMLANES, endpoints, outbound=True, gateway=True).start()
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
    # an upgrade stops the parser at the head: a body would be announced upstream and never sent
    "upgrade-with-a-body": post(b"Connection: upgrade", b"Upgrade: websocket", b"Content-Length: 5", body=b"hello"),
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


# -- Connection cannot remove framing or Host -----------------------------------------------------

# The issue's reproducer, byte for byte: with its Content-Length dropped as "hop-by-hop", the upstream
# read the body as a second request that no rule, lane or access log had seen.
SMUGGLING_REPRODUCER = (b'POST /mock HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 39\r\n\r\n'
                        b'GET /smuggled HTTP/1.1\r\nHost: mockb\r\n\r\n')


async def test_the_issues_connection_content_length_reproducer_reaches_the_upstream_as_one_framed_post(proxy, upstream):
    assert len(FOLLOWER) == 39  # the reproducer's body is exactly the follower request
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.gateway_port)
    writer.write(SMUGGLING_REPRODUCER)
    async with asyncio.timeout(5):
        status, _, body = await read_response(reader)
    await asyncio.sleep(0.2)  # a smuggled request would have reached the upstream by now
    writer.close()
    assert (status, body) == (200, b"POST /mock HTTP/1.1")
    assert [(r.request_line, r.header(b"content-length"), r.body) for r in upstream.received] == [
        (b"POST /mock HTTP/1.1", b"39", FOLLOWER)]


CONNECTION_NAMING_FRAMING = {
    "content-length": (b"Connection: content-length", b"Content-Length: 39"),
    "keep-alive-then-content-length": (b"Connection: keep-alive, Content-Length", b"Content-Length: 39"),
    "uppercase": (b"Connection: CONTENT-LENGTH", b"Content-Length: 39"),
    "second-connection-line": (b"Connection: keep-alive\r\nConnection: content-length", b"Content-Length: 39"),
    "content-length-before-connection": (b"Content-Length: 39", b"Connection: content-length"),
    "transfer-encoding": (b"Connection: transfer-encoding", b"Transfer-Encoding: chunked"),
}


@pytest.mark.parametrize(("first", "second"), CONNECTION_NAMING_FRAMING.values(), ids=CONNECTION_NAMING_FRAMING.keys())
async def test_a_framing_header_named_in_connection_is_ignored_and_the_body_stays_a_body(proxy, upstream, first, second):
    body = b"27\r\n" + FOLLOWER + b"\r\n0\r\n\r\n" if second.startswith(b"Transfer") else FOLLOWER
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(post(first, second, body=body) + b"GET /next HTTP/1.1\r\nHost: mockb\r\n\r\n")
    async with asyncio.timeout(5):
        answers = [await read_response(reader), await read_response(reader)]
    await asyncio.sleep(0.2)
    writer.close()
    assert [(status, body) for status, _, body in answers] == [(200, b"POST /upload HTTP/1.1"), (200, b"GET /next HTTP/1.1")]
    assert [(r.request_line, r.body) for r in upstream.received] == [(b"POST /upload HTTP/1.1", FOLLOWER),
                                                                     (b"GET /next HTTP/1.1", b"")]
    framing = upstream.received[0].header(b"content-length") or upstream.received[0].header(b"transfer-encoding")
    assert framing in (b"39", b"chunked")


async def test_host_named_in_connection_is_kept_while_other_named_headers_are_removed(proxy, upstream):
    raw = get(b"Host: mockb", b"Connection: host, x-hop", b"X-Hop: 1", b"X-End: 2", request_line=b"GET /h HTTP/1.1")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(raw)
    async with asyncio.timeout(5):
        status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200
    (received,) = upstream.received
    names = [name.lower() for name, _ in received.headers()]
    assert (received.header(b"host"), names.count(b"host")) == (b"mockb", 1)
    assert b"x-hop" not in names and received.header(b"x-end") == b"2"


@pytest.mark.parametrize("connection", [b"content-length", b"keep-alive, Content-Length"])
async def test_an_upstream_response_naming_content_length_in_connection_stays_framed_on_a_kept_alive_connection(
        proxy, upstream, connection):
    def respond(request):
        if request.request_line.startswith(b"GET /named "):
            return b"HTTP/1.1 200 OK\r\nconnection: " + connection + b"\r\ncontent-length: 5\r\n\r\nhello"
        return default_response(request)

    upstream.respond = respond
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(b"GET /named HTTP/1.1\r\nHost: mockb\r\n\r\n")
    async with asyncio.timeout(5):
        first = await read_response(reader)
        writer.write(b"GET /after HTTP/1.1\r\nHost: mockb\r\n\r\n")
        second = await read_response(reader)
    writer.close()
    assert (first[0], first[1].get(b"content-length"), first[2]) == (200, b"5", b"hello")
    assert (second[0], second[2]) == (200, b"GET /after HTTP/1.1")


# -- upgrades --------------------------------------------------------------------------------------

WEBSOCKET_UPGRADE = get(b"Host: mockb", b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", request_line=b"GET /ws HTTP/1.1")
H2C_UPGRADE = get(b"Host: mockb", b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA", request_line=b"GET /ws HTTP/1.1")


async def test_an_h2c_upgrade_is_answered_exactly_once_without_the_upgrade_and_the_connection_closes(proxy, upstream):
    # Envoy ignores `Upgrade: h2c`; what a client sends after asking (a frame, then a request) is dropped, never parsed.
    response, closed = await exchange_until_close(proxy.outbound_port, H2C_UPGRADE + b"\x81\x85frame" + FOLLOWER,
                                                  timeout=5)
    await asyncio.sleep(0.1)
    assert status_lines(response) == [b"HTTP/1.1 200 OK"], response
    assert response.endswith(b"GET /ws HTTP/1.1") and closed
    assert b"\r\nconnection: close\r\n" in response.lower()
    (received,) = upstream.received
    names = {name.lower() for name, _ in received.headers()}
    assert received.request_line == b"GET /ws HTTP/1.1"
    assert not names & {b"upgrade", b"connection", b"http2-settings"}, received.head


async def test_a_websocket_upgrade_answered_without_101_is_an_ordinary_response_and_what_followed_never_goes_up(
        proxy, upstream):
    # The h2c-smuggling trap: bytes after the upgrade head wait for a 101; a 200 means they were never meant for it.
    response, closed = await exchange_until_close(proxy.outbound_port, WEBSOCKET_UPGRADE + b"\x81\x85frame" + FOLLOWER,
                                                  timeout=5)
    await asyncio.sleep(0.1)
    assert status_lines(response) == [b"HTTP/1.1 200 OK"], response
    assert response.endswith(b"GET /ws HTTP/1.1") and closed
    (received,) = upstream.received  # the follower was neither parsed nor sent
    assert received.request_line == b"GET /ws HTTP/1.1"
    assert (received.header(b"upgrade"), received.header(b"connection")) == (b"websocket", b"upgrade")
    assert b"frame" not in received.head and b"smuggled" not in received.head


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


ENDLESS = {
    # (what is sent first, the byte repeated after it, the status): the head never ends
    "header-value": (b"GET / HTTP/1.1\r\nHost: mockb\r\nX-Long: ", b"v", 431),
    "header-name": (b"GET / HTTP/1.1\r\nHost: mockb\r\nX-", b"n", 431),
    "request-target": (b"GET /", b"t", 400),
}
HEAD_LIMIT = 60 * 1024
# The stated bound: an incomplete head is cut off once the bytes received for it pass the limit, counted
# per read; a head that begins after another request in the same read counts from the next read, so
# the proxy holds at most the limit plus two reads of 256 KiB. What the client manages to send before
# the answer also includes what the kernel buffers: allowed for below, far under what was offered.
OFFERED = 8 << 20


def send_endless_head(port: int, prefix: bytes, filler: bytes) -> tuple[int, bytes]:
    """Send an endless head in 16 KiB pieces until the proxy answers; (bytes sent, what came back)."""
    piece = filler * 16384
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(prefix)
        sent = len(prefix)
        while sent < OFFERED and not select.select([sock], [], [], 0.01)[0]:
            try:
                sent += sock.send(piece)
            except (BlockingIOError, TimeoutError):
                continue
            except ConnectionError:
                break
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except (ConnectionError, TimeoutError):
            pass
    return sent, answer


@pytest.mark.parametrize(("prefix", "filler", "status"), ENDLESS.values(), ids=ENDLESS.keys())
def test_a_head_that_never_ends_is_refused_soon_after_the_limit_and_reaches_no_upstream(proxy, upstream, prefix,
                                                                                          filler, status):
    sent, answer = send_endless_head(proxy.outbound_port, prefix, filler)
    assert answer.startswith(b"HTTP/1.1 %d " % status), (sent, answer[:200])
    assert sent < HEAD_LIMIT + (2 << 20), f"the proxy took {sent} bytes of one head before refusing it"
    assert (upstream.received, upstream.connections) == ([], 0)


async def test_a_head_just_under_the_limits_sent_in_small_pieces_is_accepted(proxy, upstream):
    """Counting a head while it arrives must not refuse what the complete-head limits accept."""
    # 54 KiB of headers and an 8,000-byte target: over 60 KiB on the wire, each part within its limit (and the
    # whole within what the recording upstream reads in one head).
    raw = head_with(10, 54 * 1024).replace(b"GET / ", b"GET /" + b"t" * 8_000 + b" ", 1)
    assert len(raw) > 61 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for offset in range(0, len(raw), 1024):
        writer.write(raw[offset:offset + 1024])
        await writer.drain()
        await asyncio.sleep(0.002)  # separate reads on the proxy's side
    async with asyncio.timeout(5):
        status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200
    assert len(upstream.received) == 1


def test_endless_header_values_on_eight_connections_leave_the_proxys_memory_bounded(proxy, upstream):
    """On the unbounded parser, 8 MiB each (what this test offers) cost over 64 MiB and quadratic CPU."""
    watch = RssWatch(proxy.process.pid)
    baseline = watch.peak
    results: list[tuple[int, bytes]] = []
    senders = [threading.Thread(target=lambda: results.append(send_endless_head(
        proxy.outbound_port, ENDLESS["header-value"][0], b"v"))) for _ in range(8)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=60)
    growth = watch.stop() - baseline
    assert [answer[:12] for _, answer in results] == [b"HTTP/1.1 431"] * 8
    # Stated bound: 8 x (limit + two reads) is under 5 MiB; allocator slack and buffers make it 24 MiB.
    assert growth < 24 << 20, f"RSS grew by {growth >> 20} MiB"


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


def read_in_order(sock: socket.socket, count: int, body_of, deadline: float) -> None:
    """Read `count` Content-Length responses from a blocking socket; each must be 200 with body_of(index)."""
    buffer = b""
    for index in range(count):
        while b"\r\n\r\n" not in buffer:
            assert time.monotonic() < deadline, f"only {index} of {count} responses arrived"
            data = sock.recv(1 << 20)
            assert data, f"the proxy closed after {index} of {count} responses"
            buffer += data
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")).split(b":")[1])
        while len(buffer) < length:
            buffer += sock.recv(1 << 20)
        body, buffer = buffer[:length], buffer[length:]
        assert (head[:12], body) == (b"HTTP/1.1 200", body_of(index))


def test_twenty_thousand_pipelined_requests_in_one_send_never_exceed_the_pipelining_limit(proxy, upstream):
    """httptools parses a whole read before pausing takes effect: 20,000 requests once made 3,396 exchanges."""
    upstream.delay = lambda request: 1.5 if request.request_line.startswith(b"GET /0 ") else 0
    count = 20_000
    payload = b"".join(b"GET /%d HTTP/1.1\r\nHost: mockb\r\n\r\n" % i for i in range(count))
    sock = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    active = []
    sampling_until = time.monotonic() + 1.2  # while /0 is held, the queue fills to its bound and stays there
    while time.monotonic() < sampling_until:
        active.append(proxy.stat("http.outbound.downstream_rq_active"))
        time.sleep(0.02)
    # Stated bound: the request in flight, the 16 queued (--max-pipelined-requests) and one more, when the
    # terminator of a head straddles two reads.
    assert max(active) <= 1 + 16 + 1, f"up to {max(active)} requests in flight on one connection"
    assert max(active) >= 16  # the queue did fill: the bound was exercised
    sock.settimeout(30)
    read_in_order(sock, count, lambda index: b"GET /%d HTTP/1.1" % index, time.monotonic() + 120)
    sender.join(timeout=10)
    sock.close()
    assert len(upstream.received) == count


def test_a_body_pipelined_behind_a_slow_request_is_buffered_only_to_the_connection_buffer_limit(proxy, upstream):
    """Once, a 256 MiB POST behind a slow GET raised the proxy's RSS from 51 to 307 MiB."""
    upstream.delay = lambda request: 2.0 if request.request_line.startswith(b"GET /slow ") else 0
    size = 64 << 20
    body = bytes(range(256)) * (size // 256)
    head = (b"GET /slow HTTP/1.1\r\nHost: mockb\r\n\r\n"
            b"POST /big HTTP/1.1\r\nHost: mockb\r\nContent-Length: %d\r\n\r\n" % size)
    watch = RssWatch(proxy.process.pid)
    baseline = watch.peak
    sock = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    sent = [0]

    def send_all() -> None:
        view = memoryview(head + body)
        while sent[0] < len(view):
            sent[0] += sock.send(view[sent[0]:sent[0] + 65536])

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    time.sleep(1.5)
    held, growth = sent[0], watch.peak - baseline
    # Stated bound: 1 MiB (--per-connection-buffer-limit-bytes) plus one read in the proxy; the rest of what
    # the client could send sits in the kernel's socket buffers (several MiB on loopback).
    assert held < 24 << 20, f"the proxy took {held >> 20} MiB of a body it could not forward yet"
    assert growth < 16 << 20, f"RSS grew by {growth >> 20} MiB while the body waited"
    sock.settimeout(30)
    read_in_order(sock, 2, lambda index: [b"GET /slow HTTP/1.1", b"POST /big HTTP/1.1"][index], time.monotonic() + 60)
    sender.join(timeout=10)
    sock.close()
    watch.stop()
    assert [(r.request_line, len(r.body)) for r in upstream.received] == [(b"GET /slow HTTP/1.1", 0),
                                                                          (b"POST /big HTTP/1.1", size)]
    assert upstream.received[1].body == body


def test_a_body_waiting_for_an_upstream_connection_is_buffered_only_to_the_connection_buffer_limit(tmp_path: Path):
    """The active request's body waits in the proxy while its upstream connection is being opened."""
    # An endpoint whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = [socket.create_connection(blackhole.getsockname(), timeout=1)]  # backlog 0 holds one
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [blackhole.getsockname()[1]]}})
    # No retries: a connect timeout sent nothing, so even this POST would be retried, twice, 4 s each.
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=("--connect-timeout", "4", "--max-retries", "0")).start()
    size = 64 << 20
    sock = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    sent = [0]

    def send_all() -> None:
        view = memoryview(b"POST /big HTTP/1.1\r\nHost: mockb\r\nContent-Length: %d\r\n\r\n" % size + b"b" * size)
        try:
            while sent[0] < len(view):
                sent[0] += sock.send(view[sent[0]:sent[0] + 65536])
        except OSError:
            pass  # the proxy answered and closed

    try:
        watch = RssWatch(proxy.process.pid)
        baseline = watch.peak
        threading.Thread(target=send_all, daemon=True).start()
        time.sleep(1.5)
        held, growth = sent[0], watch.stop() - baseline
        sock.settimeout(10)
        answer = sock.recv(65536)
    finally:
        sock.close()
        proxy.stop()
        for filler in fillers:
            filler.close()
        blackhole.close()
    assert held < 24 << 20, f"the proxy took {held >> 20} MiB of a body with no upstream connection yet"
    assert growth < 16 << 20, f"RSS grew by {growth >> 20} MiB while the body waited"
    assert answer.startswith(b"HTTP/1.1 503 ")  # the connect timeout, then the client is told


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
