"""Resilience of a real proxy process: slow and hostile clients, huge bodies, hung and failing upstreams, rollouts.

Slowloris connections are closed by the request-headers timeout while normal traffic flows; 1 GiB
each way streams with bounded memory; a hung upstream gives 504 in the configured time; SIGTERM with
200 requests in flight loses none; retries follow Envoy's defaults and the trusted-caller headers;
5 consecutive 5xx eject an endpoint, and an ejected or unreachable lane falls back to base.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import zlib
from pathlib import Path

import pytest

from proxyrig import (
    SWIMLANES,
    ProxyProcess,
    RssWatch,
    ThreadedOrigin,
    UpstreamThread,
    endpoints_file,
    exchange,
    free_port,
    read_response,
    rss_bytes,
)

GIB = 1 << 30
MIB = 1 << 20


def proxy_for(tmp_path: Path, services: dict, *extra: str, outbound: bool = True, gateway: bool = False) -> ProxyProcess:
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", services)
    return ProxyProcess(SWIMLANES, endpoints, outbound=outbound, gateway=gateway, extra=tuple(extra)).start()


async def get_status(port: int, raw: bytes, timeout: float = 10) -> tuple[int, dict[bytes, bytes], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        async with asyncio.timeout(timeout):
            return await read_response(reader)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


# -- slowloris ---------------------------------------------------------------------------------


async def test_a_thousand_slowloris_connections_are_closed_by_the_header_timeout_while_requests_succeed(tmp_path):
    with UpstreamThread() as upstream:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [upstream.port]}}, "--request-headers-timeout", "2")
        try:
            slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            first_byte: list[float] = []  # when each connection sent its first header bytes
            for _ in range(10):  # 1,000 connections in batches, each with a partial head
                batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", proxy.outbound_port) for _ in range(100)))
                for _, writer in batch:
                    writer.write(b"GET /slow HTTP/1.1\r\nHost: mockb\r\n")
                    first_byte.append(time.monotonic())
                slow += batch
            opened = time.monotonic()
            closed_at: dict[int, float] = {}  # seconds from a connection's first byte to its close
            answered: list[bytes] = []

            async def trickle(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                """One header byte every 0.5 s, while watching for the proxy to give up on us."""
                try:
                    async with asyncio.timeout(15):
                        for byte in b"X-Slow: " + b"s" * 100:
                            writer.write(bytes([byte]))
                            try:
                                data = await asyncio.wait_for(reader.read(65536), 0.5)
                            except TimeoutError:
                                continue
                            if data:
                                answered.append(data)
                                continue
                            break  # EOF: closed by the proxy
                except (ConnectionError, TimeoutError):
                    pass
                closed_at[index] = time.monotonic() - first_byte[index]
                writer.close()

            tricklers = [asyncio.create_task(trickle(i, r, w)) for i, (r, w) in enumerate(slow)]
            normal_statuses, normal_latencies = [], []
            while not all(task.done() for task in tricklers) and time.monotonic() - opened < 16:
                started = time.monotonic()
                response = await exchange(proxy.outbound_port, b"GET /normal HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n",
                                          read_timeout=5)
                normal_statuses.append(status_of(response))
                normal_latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.1)
            await asyncio.gather(*tricklers)
        finally:
            proxy.stop()
    assert len(closed_at) == 1000
    late = sorted(closed_at.values())
    assert late[-1] < 2 + 3, f"slowloris connections lived {late[-1]:.1f}s with a 2 s header timeout"
    assert late[0] >= 1.5, f"a connection was closed after {late[0]:.1f}s, before the 2 s header timeout"
    assert all(not data.startswith(b"HTTP/1.1 200") for data in answered)  # at most a 408, never a request served
    assert [r for r in upstream.received if r.request_line.startswith(b"GET /slow")] == []
    assert len(normal_statuses) >= 10 and set(normal_statuses) == {200}, normal_statuses
    assert max(normal_latencies) < 1.0


# -- 1 GiB each way with bounded memory -------------------------------------------------------



async def test_a_half_sent_head_gets_408_under_several_workers(tmp_path):
    """Workers once bound their listeners without the timeout sweeper: no per-connection timeout ever fired."""
    with UpstreamThread() as upstream:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [upstream.port]}}, "--workers", "2",
                          "--request-headers-timeout", "1")
        try:
            # Several connections, so that the kernel's SO_REUSEPORT spread puts some on each worker.
            answers = await asyncio.gather(*(exchange(proxy.outbound_port, b"GET /half HTTP/1.1\r\nHost: mockb\r\n",
                                                      read_timeout=10) for _ in range(8)))
        finally:
            proxy.stop()
    assert [status_of(answer) for answer in answers] == [408] * 8
    assert upstream.received == []

class StreamingOrigin(ThreadedOrigin):
    """A blocking-socket origin on a thread: PUT discards the body and answers its size and CRC32;
    GET /download sends 1 GiB (a 1 MiB block repeated) with a Content-Length."""

    def __init__(self, block: bytes) -> None:
        self.block = block
        self.start_serving()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        buffer = bytearray(MIB)
        try:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                head, rest = head.split(b"\r\n\r\n", 1)
                lines = head.lower().split(b"\r\n")
                length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
                if lines[0].startswith(b"put"):
                    crc, got = zlib.crc32(rest), len(rest)
                    view = memoryview(buffer)
                    while got < length:
                        n = conn.recv_into(view, min(len(buffer), length - got))
                        if not n:
                            return
                        crc = zlib.crc32(view[:n], crc)
                        got += n
                    body = b"%d %d" % (got, crc)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % GIB)
                    for _ in range(GIB // len(self.block)):
                        conn.sendall(self.block)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def streaming_proxy(tmp_path):
    block = bytes(range(256)) * 4096  # 1 MiB
    origin = StreamingOrigin(block)
    proxy = proxy_for(tmp_path, {"default/mockb": {"base": [origin.port]}}, "--route-timeout", "120")
    # Warm up: one small request of each kind, so the baseline includes everything a request allocates once.
    with socket.create_connection(("127.0.0.1", proxy.outbound_port)) as sock:
        sock.sendall(b"PUT /warm HTTP/1.1\r\nHost: mockb\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        while sock.recv(65536):
            pass
    yield proxy, block
    proxy.stop()
    origin.close()


def test_a_1_gib_upload_streams_through_with_rss_growth_below_64_mb(streaming_proxy):
    proxy, block = streaming_proxy
    baseline = rss_bytes(proxy.process.pid)
    watch = RssWatch(proxy.process.pid)
    started = time.monotonic()
    expected_crc = 0
    with socket.create_connection(("127.0.0.1", proxy.outbound_port), timeout=30) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: mockb\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % GIB)
        for _ in range(GIB // len(block)):
            sock.sendall(block)
            expected_crc = zlib.crc32(block, expected_crc)
            assert time.monotonic() - started < 120, "upload too slow"
        response = b""
        while data := sock.recv(65536):
            response += data
    peak = watch.stop()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.split(b"\r\n\r\n", 1)[1] == b"%d %d" % (GIB, expected_crc)
    assert peak - baseline < 64 * MIB, f"RSS grew {(peak - baseline) / MIB:.0f} MiB during a 1 GiB upload"


def test_a_1_gib_download_streams_through_with_rss_growth_below_64_mb(streaming_proxy):
    proxy, block = streaming_proxy
    baseline = rss_bytes(proxy.process.pid)
    watch = RssWatch(proxy.process.pid)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.outbound_port), timeout=30) as sock:
        sock.sendall(b"GET /download HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        head, body_start = head.split(b"\r\n\r\n", 1)
        received, crc = len(body_start), zlib.crc32(body_start)
        buffer = bytearray(MIB)
        view = memoryview(buffer)
        while n := sock.recv_into(view):
            received += n
            crc = zlib.crc32(view[:n], crc)
            assert time.monotonic() - started < 120, "download too slow"
    peak = watch.stop()
    expected_crc = 0
    for _ in range(GIB // len(block)):
        expected_crc = zlib.crc32(block, expected_crc)
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: %d" % GIB in head.lower()
    assert (received, crc) == (GIB, expected_crc)
    assert peak - baseline < 64 * MIB, f"RSS grew {(peak - baseline) / MIB:.0f} MiB during a 1 GiB download"


# -- timeouts ----------------------------------------------------------------------------------


async def test_an_upstream_that_never_answers_gives_504_in_the_route_timeout(tmp_path):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: [accepted.append(hung.accept()[0]) for _ in range(4)], daemon=True).start()
    proxy = proxy_for(tmp_path, {"default/mockb": {"base": [hung.getsockname()[1]]}}, "--route-timeout", "1")
    try:
        results = []
        for raw in (b"GET /hang HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n",
                    b"POST /hang HTTP/1.1\r\nHost: mockb\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"):
            started = time.monotonic()
            response = await exchange(proxy.outbound_port, raw, read_timeout=10)
            results.append((response, time.monotonic() - started))
    finally:
        proxy.stop()
    for response, elapsed in results:
        assert response.startswith(b"HTTP/1.1 504 Gateway Timeout"), response
        assert response.endswith(b"upstream request timeout")
        assert 0.9 <= elapsed <= 2.0, f"504 after {elapsed:.2f}s with a 1 s route timeout"
    # The proxy gave the hung connections up: the origin sees them closed.
    for conn in accepted:
        conn.settimeout(2)
        while conn.recv(65536):
            pass
    hung.close()


async def test_a_client_that_disconnects_cancels_the_upstream_request_and_releases_its_connection(tmp_path):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(4)
    proxy = proxy_for(tmp_path, {"default/mockb": {"base": [hung.getsockname()[1]]}})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: mockb\r\n\r\n")
        await writer.drain()
        upstream_side, _ = await asyncio.to_thread(hung.accept)
        upstream_side.settimeout(5)
        request = await asyncio.to_thread(upstream_side.recv, 65536)
        writer.close()
        left = time.monotonic()
        rest = await asyncio.to_thread(upstream_side.recv, 65536)  # b"" once the proxy closes its side
        released_after = time.monotonic() - left
    finally:
        proxy.stop()
        hung.close()
    assert request.startswith(b"GET /slow HTTP/1.1")
    assert rest == b"" and released_after < 1.0, f"the upstream request lived {released_after:.1f}s after the client left"


# -- graceful drain ----------------------------------------------------------------------------


async def test_sigterm_with_200_requests_in_flight_loses_none_and_exits_0_within_the_drain_period(tmp_path):
    # Each answer waits 3 s: on a loaded machine the 200 requests take up to 2 s to reach the upstream, and
    # every answer must still be on its way back when SIGTERM lands.
    with UpstreamThread(delay=lambda request: 3.0) as upstream:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [upstream.port]}}, "--drain-seconds", "5")
        try:
            async def one(index: int):
                return await get_status(proxy.outbound_port, b"GET /r%d HTTP/1.1\r\nHost: mockb\r\n\r\n" % index, timeout=10)

            in_flight = [asyncio.create_task(one(i)) for i in range(200)]
            for _ in range(100):
                if len(upstream.received) >= 200:
                    break
                await asyncio.sleep(0.02)
            assert len(upstream.received) == 200, "not all 200 requests reached the upstream before SIGTERM"
            signalled = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            late = await get_status(proxy.outbound_port, b"GET /late HTTP/1.1\r\nHost: mockb\r\n\r\n", timeout=10)
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            code = await asyncio.to_thread(proxy.process.wait, 10)
            exited = time.monotonic() - signalled
        finally:
            proxy.stop()
    failures = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    assert failures == [], f"{len(failures)} of 200 in-flight requests lost: {failures[:3]}"
    assert [r[2] for r in results] == [b"GET /r%d HTTP/1.1" % i for i in range(200)]
    assert all(r[1].get(b"connection") == b"close" for r in results), "responses during drain must say Connection: close"
    assert late[0] == 200 and late[1].get(b"connection") == b"close", "a new request during the drain period was not served"
    assert code == 0
    # It serves the whole 5 s minimum, then goes as nothing is in flight: well before its 25 s drain limit.
    assert 5 <= exited < 12, f"exited {exited:.1f}s after SIGTERM with a 5 s minimum drain"


# -- retries -----------------------------------------------------------------------------------


def scripted(statuses: list[int]):
    """Answer the n-th request with statuses[n] (the last one repeats); the body is the request line."""
    count = [0]

    def respond(request):
        status = statuses[min(count[0], len(statuses) - 1)]
        count[0] += 1
        if status == 0:
            return None  # reset: close without answering
        body = request.request_line
        return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)

    return respond


RETRY_CASES = [
    # (request, upstream statuses, attempts the upstream sees, final status)
    ("GET", [], [503, 503, 200], 3, 200),
    ("GET", [], [503], 3, 503),  # 1 + 2 retries by default
    ("GET", [], [0, 200], 2, 200),  # reset before any response byte
    ("GET", [], [500, 200], 1, 500),  # 500 is not retried by default
    ("PUT", [], [503, 200], 2, 200),  # PUT is idempotent
    ("DELETE", [], [503, 200], 2, 200),
    ("POST", [], [503, 200], 1, 503),  # POST is not
    ("POST", [], [0, 200], 1, 503),
    ("GET", [b"x-envoy-max-retries: 0"], [503], 1, 503),
    ("GET", [b"x-envoy-max-retries: 4"], [503], 5, 503),
    ("GET", [b"x-envoy-retry-on: 5xx"], [500, 500, 200], 3, 200),
]


@pytest.mark.parametrize(("method", "headers", "statuses", "attempts", "final"), RETRY_CASES,
                         ids=["503-twice-then-ok", "503-always", "reset-then-ok", "500-not-retried", "put", "delete",
                              "post-503", "post-reset", "max-retries-0", "max-retries-4", "retry-on-5xx"])
async def test_idempotent_requests_are_retried_on_reset_and_503_with_the_attempt_count(
    tmp_path, method, headers, statuses, attempts, final
):
    with UpstreamThread(respond=scripted(statuses)) as upstream:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [upstream.port]}})
        try:
            body = b"hello" if method == "POST" else b""
            raw = (b"%s /r HTTP/1.1\r\nHost: mockb\r\n" % method.encode() + b"".join(h + b"\r\n" for h in headers)
                   + (b"Content-Length: 5\r\n" if body else b"") + b"Connection: close\r\n\r\n" + body)
            response = await exchange(proxy.outbound_port, raw, read_timeout=10)
        finally:
            proxy.stop()
    assert status_of(response) == final, response
    assert len(upstream.received) == attempts
    assert [r.header(b"x-envoy-attempt-count") for r in upstream.received] == [b"%d" % n for n in range(1, attempts + 1)]
    if body:
        assert {r.body for r in upstream.received} == {b"hello"}


async def test_the_gateway_ignores_retry_headers_from_outside(tmp_path):
    with UpstreamThread(respond=scripted([503])) as upstream:
        proxy = proxy_for(tmp_path, {"default/mocka": {"base": [upstream.port]}}, outbound=False, gateway=True)
        try:
            raw = (b"GET /mock HTTP/1.1\r\nHost: example.com\r\nx-envoy-max-retries: 6\r\nx-envoy-retry-on: 5xx\r\n"
                   b"x-envoy-attempt-count: 9\r\nConnection: close\r\n\r\n")
            response = await exchange(proxy.gateway_port, raw, read_timeout=10)
        finally:
            proxy.stop()
    assert status_of(response) == 503
    assert len(upstream.received) == 3, "an external caller set the gateway's retry budget"
    assert [r.header(b"x-envoy-attempt-count") for r in upstream.received] == [b"1", b"2", b"3"]
    assert all(r.header(b"x-envoy-max-retries") is None for r in upstream.received)


async def test_connect_failures_are_retried_so_a_dead_endpoint_rarely_reaches_the_client(tmp_path):
    """Half the endpoints refuse connections: without retries about 30 of 60 requests fail; with 2 retries a few."""
    with UpstreamThread() as upstream:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [free_port(), upstream.port]}})
        try:
            statuses = [status_of(await exchange(proxy.outbound_port,
                                                 b"GET /%d HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n" % i))
                        for i in range(60)]
        finally:
            proxy.stop()
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) <= 20, f"{statuses.count(503)} of 60 requests failed on a connect failure"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_post_whose_connection_failed_before_anything_was_sent_is_retried_with_its_whole_body(
        tmp_path, framing):
    """Half the endpoints refuse connections. A refused connect never reached the upstream, so POSTs are
    retried as GETs are, each with its whole 2 MiB body (twice the per-connection buffer limit: the
    part held while connecting stays within the limit, and reading resumes once the retry connects).
    The first refusal ejects the refusing endpoint, so the retry meets the live one."""
    body = bytes(range(256)) * (8 * 1024)  # 2 MiB
    with UpstreamThread() as upstream:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [free_port(), upstream.port]}},
                          "--outlier-consecutive-5xx", "1")
        try:
            statuses = []
            for index in range(20):
                if framing == "chunked":
                    framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                                      for part in (body[i:i + 65536] for i in range(0, len(body), 65536)))
                    head = b"Transfer-Encoding: chunked\r\n"
                    framed += b"0\r\n\r\n"
                else:
                    framed, head = body, b"Content-Length: %d\r\n" % len(body)
                raw = b"POST /p%d HTTP/1.1\r\nHost: mockb\r\n%sConnection: close\r\n\r\n%s" % (index, head, framed)
                statuses.append(status_of(await exchange(proxy.outbound_port, raw, read_timeout=15)))
            stats = (line.partition(": ") for line in proxy.admin("/stats").decode().splitlines())
            refused = sum(int(value) for key, _, value in stats
                          if key.startswith("cluster.") and key.endswith(".upstream_cx_connect_fail"))
        finally:
            proxy.stop()
    assert refused >= 1, "no POST met the refusing endpoint: the test proved nothing"
    assert statuses == [200] * 20, f"{statuses.count(503)} of 20 POSTs failed on a refused connection"
    assert len(upstream.received) == 20
    assert all(request.body == body for request in upstream.received), "a retried POST lost part of its body"


def stat_sum(proxy: ProxyProcess, suffix: str) -> int:
    pairs = (line.partition(": ") for line in proxy.admin("/stats").decode().splitlines())
    return sum(int(value) for key, _, value in pairs if key.endswith(suffix))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_post_the_next_sidecar_could_not_hand_to_its_app_is_sent_to_another_endpoint_with_its_body(
        tmp_path, framing):
    """One of mockb's two pods has lost its app (its sidecar's connect to the app is refused, as while a pod
    stops): that sidecar answers 503 marked x-laneproxy-not-forwarded, and the caller sends the POST, body
    and all, to the other pod. The first such 503 ejects the broken pod, so the retry meets the live one."""
    body = bytes(range(256)) * 40  # 10 KiB: within what is kept for a replay
    with UpstreamThread() as app:
        broken = ProxyProcess(SWIMLANES, inbound_app=free_port()).start()
        live = ProxyProcess(SWIMLANES, inbound_app=app.port).start()
        caller = None
        try:
            caller = proxy_for(tmp_path, {"default/mockb": {"base": [broken.inbound_port, live.inbound_port]}},
                               "--outlier-consecutive-5xx", "1")
            statuses = []
            for index in range(20):
                if framing == "chunked":
                    head, framed = b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                else:
                    head, framed = b"Content-Length: %d\r\n" % len(body), body
                raw = b"POST /p%d HTTP/1.1\r\nHost: mockb\r\n%sConnection: close\r\n\r\n%s" % (index, head, framed)
                statuses.append(status_of(await exchange(caller.outbound_port, raw, read_timeout=15)))
            refused = stat_sum(broken, ".downstream_rq_5xx")
        finally:
            for proxy in (caller, broken, live):
                if proxy is not None:
                    proxy.stop()
    assert refused >= 1, "no POST met the pod without its app: the test proved nothing"
    assert statuses == [200] * 20, f"{statuses.count(503)} of 20 POSTs failed on a pod without its app"
    assert len(app.received) == 20
    assert all(request.body == body for request in app.received), "a POST sent again lost part of its body"


async def test_a_retry_never_goes_back_to_the_pod_that_could_not_take_the_post_while_it_is_still_listed(tmp_path):
    """As while a pod stops and callers' tables still list it: one of mockb's two pods has lost its app and
    outlier detection is too slow to matter (1000 in a row). Each retry avoids the endpoints already tried
    (Envoy's previous_hosts predicate, Istio's default), so every POST reaches the live pod. Picking at random
    instead, a POST that met the broken pod first fails after both retries one time in four: about 15 of the 30
    POSTs meet it first, so that would pass this test about once in 80 runs; the predicate's own miss (six
    draws in a row of the tried pod, on both retries: it goes back one retry in 64, as Envoy's does) fails a
    POST about once in 4,000 that meet the broken pod."""
    body = b"x" * 2048
    with UpstreamThread() as app:
        broken = ProxyProcess(SWIMLANES, inbound_app=free_port()).start()
        live = ProxyProcess(SWIMLANES, inbound_app=app.port).start()
        caller = None
        try:
            caller = proxy_for(tmp_path, {"default/mockb": {"base": [broken.inbound_port, live.inbound_port]}},
                               "--outlier-consecutive-5xx", "1000")
            statuses = []
            for index in range(30):
                raw = (b"POST /p%d HTTP/1.1\r\nHost: mockb\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                       % (index, len(body), body))
                statuses.append(status_of(await exchange(caller.outbound_port, raw, read_timeout=15)))
            refused = stat_sum(broken, ".downstream_rq_5xx")
        finally:
            for proxy in (caller, broken, live):
                if proxy is not None:
                    proxy.stop()
    assert refused >= 1, "no POST met the pod without its app: the test proved nothing"
    assert statuses == [200] * 30, f"{statuses.count(503)} of 30 POSTs failed on a pod without its app"
    assert len(app.received) == 30


async def test_a_not_forwarded_mark_an_app_copied_onto_its_own_503_never_makes_a_post_go_twice(tmp_path):
    """The app had the request, so its sidecar drops the mark the app copied from a call of its own."""
    def respond(request):
        return (b"HTTP/1.1 503 Service Unavailable\r\nx-laneproxy-not-forwarded: UH\r\ncontent-length: 4\r\n"
                b"\r\ndown")

    with UpstreamThread(respond=respond) as app:
        sidecar = ProxyProcess(SWIMLANES, inbound_app=app.port).start()
        caller = None
        try:
            caller = proxy_for(tmp_path, {"default/mockb": {"base": [sidecar.inbound_port]}})
            raw = b"POST /once HTTP/1.1\r\nHost: mockb\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            response = await exchange(caller.outbound_port, raw, read_timeout=10)
        finally:
            for proxy in (caller, sidecar):
                if proxy is not None:
                    proxy.stop()
    assert len(app.received) == 1, "a POST the app had answered was sent again"
    assert status_of(response) == 503
    assert b"x-laneproxy-not-forwarded" not in response.lower()


# -- outlier detection -------------------------------------------------------------------------


async def test_five_consecutive_5xx_eject_an_endpoint(tmp_path):
    failing = UpstreamThread(respond=scripted([500]))
    healthy = UpstreamThread()
    with failing, healthy:
        proxy = proxy_for(tmp_path, {"default/mockb": {"base": [failing.port, healthy.port]}})
        try:
            statuses = []
            for index in range(80):
                statuses.append(status_of(await exchange(
                    proxy.outbound_port, b"GET /%d HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n" % index)))
                if len(failing.received) >= 5:
                    break
            assert len(failing.received) == 5, "the failing endpoint never reached 5 consecutive 5xx"
            after = [status_of(await exchange(
                proxy.outbound_port, b"GET /after%d HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n" % i))
                for i in range(30)]
        finally:
            proxy.stop()
    assert len(failing.received) == 5, "an ejected endpoint still got requests within its 30 s ejection"
    assert after == [200] * 30


@pytest.mark.parametrize("canary_kind", ["failing", "unreachable"])
async def test_an_ejected_or_unreachable_canary_endpoint_set_falls_back_to_base(tmp_path, canary_kind):
    base = UpstreamThread()
    canary = UpstreamThread(respond=scripted([500]))
    with base, canary:
        canary_port = canary.port if canary_kind == "failing" else free_port()
        proxy = proxy_for(tmp_path, {"default/mockc": {"base": [base.port], "canary": [canary_port]}})
        try:
            raw = b"GET /c HTTP/1.1\r\nHost: mockc\r\nx-asm-prefer-tag: canary\r\nConnection: close\r\n\r\n"
            statuses = [status_of(await exchange(proxy.outbound_port, raw)) for _ in range(15)]
        finally:
            proxy.stop()
    assert statuses[-10:] == [200] * 10, statuses
    assert len(canary.received) <= 5
    assert len(base.received) >= 10
    assert {r.header(b"x-asm-prefer-tag") for r in base.received} == {b"canary"}  # the lane travels on
