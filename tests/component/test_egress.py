"""Egress through the outbound listener, as apps with HTTP_PROXY / HTTPS_PROXY use it: curl and requests.

A plain-HTTP server and a TLS server (a throwaway CA from trustme) on 127.0.0.1 stand for hosts outside
the mesh. Under ALLOW_ANY (the default) a plain-HTTP request for a host no service names passes through
to it, and `CONNECT host:port` becomes a tunnel the client's own TLS runs through, checked against the
CA; under REGISTRY_ONLY both get a clear 502. Hostile CONNECTs (ports that are not ports, a destination
that refuses) get their local replies, and a tunnel whose peer stops reading holds the client back
without growing the proxy.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import trustme

from proxyrig import SWIMLANES, ProxyProcess, RssWatch, endpoints_file, exchange_until_close, rss_bytes

MIB = 1024 * 1024


class Greeter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        body = f"outside: {self.path} host={self.headers.get('Host')} tls={self.server.tls}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve(tls: ssl.SSLContext | None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Greeter)
    server.tls = tls is not None
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def origins(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    plain, secure = serve(None), serve(context)
    yield plain.server_address[1], secure.server_address[1]
    for server in (plain, secure):
        server.shutdown()
        server.server_close()


def start_proxy(tmp_path: Path, *extra: str) -> ProxyProcess:
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [9]}})
    return ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=extra).start()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    process = start_proxy(tmp_path_factory.mktemp("egress"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def closed_proxy(tmp_path_factory):
    process = start_proxy(tmp_path_factory.mktemp("registry-only"), "--outbound-traffic-policy", "REGISTRY_ONLY")
    yield process
    process.stop()


def curl(proxy: ProxyProcess, url: str, ca_file: Path) -> subprocess.CompletedProcess:
    address = f"http://127.0.0.1:{proxy.outbound_port}"
    env = {"PATH": os.environ["PATH"], "http_proxy": address, "HTTPS_PROXY": address, "NO_PROXY": ""}
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(ca_file), "-w", " %{http_code}", url],
                          capture_output=True, text=True, env=env, timeout=20, check=False)


def test_curl_reaches_a_plain_http_host_outside_the_mesh_through_http_proxy(proxy, origins, ca_file):
    plain, _ = origins
    before = proxy.stat("cluster.PassthroughCluster.upstream_rq_total") if b"PassthroughCluster" in proxy.admin("/stats") else 0
    result = curl(proxy, f"http://127.0.0.1:{plain}/plain?q=1", ca_file)
    assert result.stdout == f"outside: /plain?q=1 host=127.0.0.1:{plain} tls=False 200", result.stderr
    assert proxy.stat("cluster.PassthroughCluster.upstream_rq_total") == before + 1


def test_curl_reaches_a_tls_host_outside_the_mesh_through_https_proxy_connect(proxy, origins, ca_file):
    _, secure = origins
    result = curl(proxy, f"https://localhost:{secure}/secret", ca_file)
    assert result.stdout == f"outside: /secret host=localhost:{secure} tls=True 200", result.stderr


def test_requests_reaches_both_hosts_through_the_proxy_variables(proxy, origins, ca_file, monkeypatch):
    plain, secure = origins
    address = f"http://127.0.0.1:{proxy.outbound_port}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, address)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with requests.Session() as session:
        answer = session.get(f"http://127.0.0.1:{plain}/r", timeout=10)
        assert (answer.status_code, answer.text) == (200, f"outside: /r host=127.0.0.1:{plain} tls=False")
        answers = [session.get(f"https://localhost:{secure}/r{i}", timeout=10, verify=str(ca_file)) for i in range(3)]
    assert [(a.status_code, a.text) for a in answers] == [
        (200, f"outside: /r{i} host=localhost:{secure} tls=True") for i in range(3)]


def test_registry_only_answers_both_with_a_clear_502_and_opens_no_connection(closed_proxy, origins, ca_file):
    plain, secure = origins
    result = curl(closed_proxy, f"http://127.0.0.1:{plain}/x", ca_file)
    assert result.stdout.endswith(" 502") and "REGISTRY_ONLY" in result.stdout, result.stdout
    result = curl(closed_proxy, f"https://localhost:{secure}/x", ca_file)
    assert result.returncode != 0 and "502" in result.stderr, (result.stdout, result.stderr)
    assert b"PassthroughCluster.upstream_cx_total" not in closed_proxy.admin("/stats?usedonly")


@pytest.mark.parametrize("authority", [b"localhost:https", b"localhost:99999", b"localhost:0", b"localhost:",
                                       b"localhost:1" + b"0" * 40, b"localhost", b":443", b"local host:443",
                                       b"a..b:443", b"x" * 64 + b".example:443", b"[::1:443", b"[zz::1]:443",
                                       b"l\xc3\xb6cal:443", b"localhost:+443", b"localhost:4\xd9\xa33"])
async def test_a_connect_to_something_that_is_not_host_and_port_gets_400_and_opens_nothing(proxy, authority):
    raw = b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    response, closed = await exchange_until_close(proxy.outbound_port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 400 ") and closed, response


async def test_a_proxy_request_for_a_name_the_resolver_would_refuse_gets_400_and_opens_nothing(proxy):
    raw = b"GET http://a..b/ HTTP/1.1\r\nHost: a..b\r\nConnection: close\r\n\r\n"
    response, closed = await exchange_until_close(proxy.outbound_port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 400 ") and closed, response


async def test_a_connect_the_destination_refuses_gets_503_connection_failure(proxy):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: refused
        raw = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port)
        response, closed = await exchange_until_close(proxy.outbound_port, raw, timeout=10)
    assert response.startswith(b"HTTP/1.1 503 ") and b"connection failure" in response and closed, response


async def test_a_connect_to_the_listener_itself_is_refused_rather_than_looped(proxy):
    port = proxy.outbound_port
    raw = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port)
    response, closed = await exchange_until_close(port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 404 ") and closed, response


def test_a_tunnel_whose_destination_stops_reading_holds_the_client_back_and_the_proxy_stays_bounded(proxy):
    """The destination accepts and never reads; the client writes until its own send blocks. Bound: per
    direction a 256 KiB write buffer plus one 256 KiB read in the proxy (kernel buffers come on top)."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    port = sink.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(sink.accept()[0]), daemon=True).start()
    baseline = rss_bytes(proxy.process.pid)
    watch = RssWatch(proxy.process.pid)
    client = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    try:
        client.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
        assert client.recv(4096).startswith(b"HTTP/1.1 200 ")
        client.setblocking(False)
        chunk, written, deadline = b"y" * 65536, 0, time.monotonic() + 20
        stalled_since = None
        while time.monotonic() < deadline and written < 512 * MIB:
            try:
                written += client.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.5:
                    break
                time.sleep(0.01)
        peak = watch.stop()
    finally:
        client.close()
        sink.close()
        for conn in accepted:
            conn.close()
    print(f"client held back after {written / MIB:.1f} MiB; proxy RSS grew {(peak - baseline) / MIB:.1f} MiB")
    assert written < 128 * MIB, f"{written / MIB:.0f} MiB went into a tunnel nobody reads"
    assert peak - baseline < 16 * MIB, f"the proxy grew by {(peak - baseline) / MIB:.1f} MiB"


async def test_a_server_that_speaks_first_is_heard_through_a_connect_tunnel(proxy):
    """The greeting arrives while the tunnel is being set up: it must wait for the client, not be lost."""
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 greetings\r\n")
        line = await reader.readline()
        writer.write(b"250 " + line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
            writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readline(), 10) == b"220 greetings\r\n"
            writer.write(b"HELO\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b"250 HELO\r\n"
            writer.close()
    finally:
        server.close()


async def test_an_idle_tunnel_is_closed_after_the_tunnel_idle_timeout(tmp_path, origins):
    plain, _ = origins
    process = start_proxy(tmp_path, "--tunnel-idle-timeout", "1")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", process.outbound_port)
        writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % plain)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
        assert 0.9 < time.monotonic() - started < 8
        writer.close()
    finally:
        process.stop()
