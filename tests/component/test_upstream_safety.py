"""Untrusted upstream responses at the wire: a raw-socket origin sends exactly the bytes a test scripts.

A pooled upstream connection carries many clients' requests in turn, so every test here asks two
things: what the client in flight got, and whether anything the upstream sent out of turn could
reach the next client. The origin records which connection carried each request, so "the
connection was dropped" is checked as "the next request arrived on a new connection", and what
the proxy did to the bad connection (closed it) as the origin saw it. Memory is read from /proc.
Never through an HTTP client: clients normalise exactly the bytes under test.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from proxyrig import (
    SWIMLANES,
    ProxyProcess,
    ScriptedOrigin,
    endpoints_file,
    exchange_ending,
    responses,
    rss_bytes,
)

ROUTE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def origin():
    server = ScriptedOrigin()
    yield server
    server.close()


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upstream-safety") / "access.log"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, origin, access_log):
    endpoints = endpoints_file(tmp_path_factory.mktemp("upstream-safety") / "endpoints.yaml",
                               {"default/mockb": {"base": [origin.port]}})
    process = ProxyProcess(SWIMLANES, endpoints, outbound=True,
                           extra=("--route-timeout", str(ROUTE_TIMEOUT), "--access-log", str(access_log))).start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def fresh_origin(origin):
    origin.reset()
    origin.script = own_response
    yield


def own_response(head: bytes, connection: int) -> bytes:
    """A well-framed answer whose body is the request's target: whoever gets it can tell whose it is."""
    target = head.split(b" ", 2)[1]
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(target), target)


def unique(name: str) -> bytes:
    return b"/%s-%d" % (name.encode(), time.monotonic_ns())


def get(target: bytes, version: bytes = b"1.1") -> bytes:
    return b"GET " + target + b" HTTP/" + version + b"\r\nHost: mockb\r\nConnection: close\r\n\r\n"


def only_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """The one complete response in `data`; fails if there is none, or anything after it."""
    found, rest = responses(data)
    assert len(found) == 1, f"not exactly one complete response: {data!r}"
    assert rest == b"", f"bytes after the response: {rest!r}"
    return found[0]


def log_flags(access_log: Path, target: bytes) -> list[str]:
    """(status and) response flags of the access-log lines for `target`, e.g. ["502 UPE"]."""
    time.sleep(0.1)  # lines are written at the end of the proxy's event-loop turn
    needle = f' {target.decode()} HTTP/1.1" '
    return [line.split(needle, 1)[1].split(" ")[0] + " " + line.split(needle, 1)[1].split(" ")[1]
            for line in access_log.read_text().splitlines() if needle in line]


# -- defect 2: one client never receives another client's bytes -----------------------------------

FIRST_RESPONSE = {
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
    "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n",
}

EXTRA_BYTES = {
    "a-second-response": b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nset-cookie: session=EVIL\r\n\r\nEVIL",
    "a-head-waiting-for-its-body": b"HTTP/1.1 200 OK\r\nset-cookie: session=EVIL\r\ncontent-length: 30\r\n\r\n",
    "a-set-cookie-line": b"Set-Cookie: session=EVIL\r\n",
    "half-a-status-line": b"HTTP/1.1 2",
    "garbage": b"EVIL\x00\xff\r\n",
}


@pytest.mark.parametrize("first", FIRST_RESPONSE.values(), ids=FIRST_RESPONSE.keys())
@pytest.mark.parametrize("extra", EXTRA_BYTES.values(), ids=EXTRA_BYTES.keys())
async def test_bytes_after_a_complete_response_in_the_same_read_never_reach_the_next_client(proxy, origin, first, extra):
    first_target, second_target = unique("first"), unique("second")
    origin.script = lambda head, connection: first + extra if head.startswith(b"GET " + first_target + b" ") \
        else own_response(head, connection)
    data, _ = await exchange_ending(proxy.outbound_port, get(first_target))
    status, _, body = only_response(data)
    assert (status, body) == (200, b"first"), "the exchange in flight must get its complete response"
    await asyncio.sleep(0.1)
    data, _ = await exchange_ending(proxy.outbound_port, get(second_target))
    assert b"EVIL" not in data
    status, headers, body = only_response(data)
    assert (status, body) == (200, second_target)
    assert origin.connection_of(second_target)[0] not in origin.connection_of(first_target), \
        "the connection that sent extra bytes was reused"
    assert origin.connection_of(first_target)[0] in origin.closed_by_peer


async def test_bytes_sent_while_a_connection_sits_idle_close_it(proxy, origin):
    first_target, second_target = unique("first"), unique("second")

    def answer_then_speak_later(sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        time.sleep(0.3)  # idle in the proxy's pool by now
        sock.sendall(b"HTTP/1.1 200 OK\r\nset-cookie: session=EVIL\r\ncontent-length: 4\r\n\r\nEVIL")
        return True

    origin.script = lambda head, connection: answer_then_speak_later if head.startswith(b"GET " + first_target + b" ") \
        else own_response(head, connection)
    data, _ = await exchange_ending(proxy.outbound_port, get(first_target))
    assert only_response(data)[2] == b"first"
    await asyncio.sleep(0.6)
    data, _ = await exchange_ending(proxy.outbound_port, get(second_target))
    assert b"EVIL" not in data
    assert only_response(data)[2] == second_target
    assert origin.connection_of(second_target)[0] != origin.connection_of(first_target)[0]
    assert origin.connection_of(first_target)[0] in origin.closed_by_peer


# -- defect 3: limits on response heads --------------------------------------------------------------


def response_with(count: int, total_bytes: int) -> bytes:
    """A 200 with content-length plus `count - 1` headers whose names and values add up to about `total_bytes`."""
    extra = count - 1
    names = [b"x-h%03d" % i for i in range(extra)]
    budget = total_bytes - len(b"content-length") - 1 - sum(len(n) for n in names)
    values = [b"v" * (budget // extra + (1 if i < budget % extra else 0)) for i in range(extra)]
    lines = [b"content-length: 2"] + [n + b": " + v for n, v in zip(names, values)]
    return b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\nok"


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (response_with(10, 79 * 1024), 200),
        (response_with(10, 81 * 1024), 502),
        (response_with(2, 79 * 1024), 200),
        (response_with(2, 81 * 1024), 502),
        (response_with(100, 4000), 200),
        (response_with(101, 4000), 502),
    ],
    ids=["79KiB-in-10", "81KiB-in-10", "79KiB-in-one", "81KiB-in-one", "100-headers", "101-headers"],
)
async def test_response_heads_are_limited_to_80_kib_and_100_headers_by_default_as_in_envoy(proxy, origin, access_log, response, status):
    target, after = unique("limit"), unique("after")
    origin.script = lambda head, connection: response if head.startswith(b"GET " + target + b" ") \
        else own_response(head, connection)
    data, _ = await exchange_ending(proxy.outbound_port, get(target))
    got, _, body = only_response(data)
    assert got == status
    data, _ = await exchange_ending(proxy.outbound_port, get(after))
    assert only_response(data)[2] == after
    if status == 502:
        assert b"upstream connect error or disconnect/reset before headers. reset reason: protocol error" == body
        assert log_flags(access_log, target) == ["502 UPE"]
        assert len(origin.connection_of(target)) == 1, "an oversized head is answered once, not retried"
        assert origin.connection_of(target)[0] in origin.closed_by_peer
        assert origin.connection_of(after)[0] != origin.connection_of(target)[0]
    else:
        assert body == b"ok"


async def test_response_head_limits_are_configurable(tmp_path: Path, origin):
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [origin.port]}})
    small = ProxyProcess(SWIMLANES, endpoints, outbound=True,
                         extra=("--max-response-headers-kb", "4", "--max-response-headers", "20")).start()
    cases = {b"/a": response_with(10, 3 * 1024), b"/b": response_with(10, 5 * 1024),
             b"/c": response_with(20, 200), b"/d": response_with(21, 200)}
    origin.script = lambda head, connection: cases[head.split(b" ", 2)[1]]
    try:
        outcomes = [(await exchange_ending(small.outbound_port, get(target)))[0][:12] for target in cases]
    finally:
        small.stop()
    assert outcomes == [b"HTTP/1.1 200", b"HTTP/1.1 502", b"HTTP/1.1 200", b"HTTP/1.1 502"]


def test_an_endless_response_header_is_cut_at_the_limit_and_costs_bounded_memory(proxy, origin, access_log):
    """Without a limit while the head arrives, httptools buffers the unfinished value with no bound.

    The origin sends an unterminated header value as fast as the proxy reads it, up to 256 MiB.
    The proxy must answer 502 (not the route timeout's 504: the limit, not the clock, ends it),
    close the connection long before the origin runs out, and grow by less than 32 MiB.
    """
    target = unique("endless")
    sent = [0]

    def endless_header(sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nx-endless: ")
        piece = b"a" * 65536
        try:
            while sent[0] < 256 << 20:
                sock.sendall(piece)
                sent[0] += len(piece)
        except OSError:
            pass
        return False

    origin.script = lambda head, connection: endless_header if head.startswith(b"GET " + target + b" ") \
        else own_response(head, connection)
    pid = proxy.process.pid
    before = rss_bytes(pid)
    with socket.create_connection(("127.0.0.1", proxy.outbound_port), timeout=ROUTE_TIMEOUT + 10) as client:
        client.sendall(get(target))
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    grown = rss_bytes(pid) - before
    assert only_response(data)[0] == 502
    assert log_flags(access_log, target) == ["502 UPE"]
    assert sent[0] < 64 << 20, f"the proxy kept reading the endless head: {sent[0] >> 20} MiB"
    assert grown < 32 << 20, f"the proxy grew by {grown >> 20} MiB"


def test_a_response_head_dribbled_under_the_limit_is_cut_by_the_route_timeout(proxy, origin, access_log):
    """A head that never ends but stays small: only the route timeout can end it, and it must (504 UT)."""
    target = unique("dribble")
    stopped = []

    def dribble(sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nx-slow: ")
        try:
            for _ in range(int((ROUTE_TIMEOUT + 10) / 0.05)):  # 20 bytes a second, for longer than the timeout
                sock.sendall(b"a")
                time.sleep(0.05)
        except OSError:
            stopped.append(True)
        return False

    origin.script = lambda head, connection: dribble if head.startswith(b"GET " + target + b" ") \
        else own_response(head, connection)
    pid = proxy.process.pid
    before = rss_bytes(pid)
    data = asyncio.run(exchange_ending(proxy.outbound_port, get(target), timeout=ROUTE_TIMEOUT + 5))[0]
    assert only_response(data)[0] == 504
    assert log_flags(access_log, target) == ["504 UT"]
    time.sleep(0.3)
    assert stopped, "the proxy kept the dribbling connection open after the timeout"
    assert rss_bytes(pid) - before < 8 << 20


# -- defect 5: 101 nobody asked for, and close-delimited bodies -------------------------------------


async def test_an_unsolicited_101_gets_502_once_without_retry_and_drops_the_connection(proxy, origin, access_log):
    target, after = unique("switch"), unique("after")
    origin.script = lambda head, connection: (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nEVIL-after-101"
        if head.startswith(b"GET " + target + b" ") else own_response(head, connection))
    data, _ = await exchange_ending(proxy.outbound_port, get(target))
    status, _, body = only_response(data)
    assert status == 502 and b"EVIL" not in data
    assert log_flags(access_log, target) == ["502 UPE"]
    assert len(origin.connection_of(target)) == 1, "the request was replayed"
    data, _ = await exchange_ending(proxy.outbound_port, get(after))
    assert only_response(data)[2] == after
    assert origin.connection_of(after)[0] != origin.connection_of(target)[0]
    assert origin.connection_of(target)[0] in origin.closed_by_peer


CLOSE_DELIMITED = {
    "no-length": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n",
    "transfer-encoding-identity": b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n",
    "http10-origin": b"HTTP/1.0 200 OK\r\n\r\n",
}


@pytest.mark.parametrize("head", CLOSE_DELIMITED.values(), ids=CLOSE_DELIMITED.keys())
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_a_close_delimited_response_reaches_the_client_complete(proxy, origin, head, version):
    target = unique("close-delimited")
    body = b"".join(b"line %d of a body that ends when the upstream closes\n" % i for i in range(2000))

    def send_then_close(sock: socket.socket) -> bool:
        sock.sendall(head + body[:1000])
        time.sleep(0.05)
        sock.sendall(body[1000:])
        return False  # the end of the connection is the end of the body

    origin.script = lambda request, connection: send_then_close
    data, ending = await exchange_ending(proxy.outbound_port, get(target, version))
    assert ending == "eof", "a complete close-delimited body must not end in a reset"
    response_head = data.split(b"\r\n\r\n", 1)[0].lower()
    if version == b"1.1":
        assert b"transfer-encoding: chunked" in response_head
        status, _, received = only_response(data)
        assert (status, received) == (200, body)
    else:
        assert b"transfer-encoding" not in response_head and b"connection: close" in response_head
        assert data.split(b"\r\n\r\n", 1)[1] == body
