"""The swimlane trace id at the edge: the gateway chooses it, so no client can move another user's trace.

The sidecars remember a trace's lane by its trace header value (`my-request-id`). Two rigs:
a real gateway process in front of recording upstreams (what the gateway sends, byte for byte), and
the demo's full chain with one app replaced by a test app that holds a request, so that an attacker's
request can arrive while the victim's is in the middle of the chain.
"""

from __future__ import annotations

import threading
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from laneproxy.demo import DemoCluster
from proxyrig import SWIMLANES, ProxyProcess, RecordingUpstream, endpoints_file, exchange

BASE_CHAIN = "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v1, ip: 127.0.0.1)"
CANARY_CHAIN = "mocka(version: v2, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v2, ip: 127.0.0.1)"
TRACE_ID = b"4bf92f3577b34da6a3ce929d0e0e4736"
VALID_PARENT = b"00-" + TRACE_ID + b"-00f067aa0ba902b7-01"


def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode()


def is_uuid4(value: bytes | None) -> bool:
    try:
        return value is not None and uuid.UUID(value.decode()).version == 4
    except ValueError:
        return False


# --- a gateway in front of recording upstreams --------------------------------------------------------

@pytest.fixture
async def upstreams():
    base, canary = await RecordingUpstream().start(), await RecordingUpstream().start()
    yield base, canary
    await base.stop()
    await canary.stop()


def gateway(tmp_path: Path, upstreams, *, swimlanes: Path = SWIMLANES, extra: tuple[str, ...] = ()) -> ProxyProcess:
    base, canary = upstreams
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mocka": {"base": [base.port],
                                                                                "canary": [canary.port]}})
    return ProxyProcess(swimlanes, endpoints, gateway=True, extra=extra).start()


def request(*headers: bytes) -> bytes:
    return b"GET /mock HTTP/1.1\r\nHost: a\r\n" + b"".join(h + b"\r\n" for h in headers) + b"Connection: close\r\n\r\n"


def trace_values(received, name: bytes = b"my-request-id") -> list[bytes]:
    return [value for key, value in received.headers() if key.lower() == name]


async def test_the_gateway_gives_every_request_a_fresh_trace_id_whatever_the_client_sent(tmp_path, upstreams):
    base, canary = upstreams
    proxy = gateway(tmp_path, upstreams)
    try:
        for headers in ([b"x-asm-prefer-tag: canary", b"my-request-id: 10002"],
                        [b"x-asm-prefer-tag: canary", b"my-request-id: 10002"],
                        [b"x-asm-prefer-tag: canary"],
                        [b"x-asm-prefer-tag: canary", b"my-request-id: 10002", b"my-request-id: 10003"]):
            assert (await exchange(proxy.gateway_port, request(*headers))).startswith(b"HTTP/1.1 200")
    finally:
        proxy.stop()
    sent = [trace_values(received) for received in canary.received]
    assert len(sent) == 4 and base.received == []
    assert all(len(values) == 1 and is_uuid4(values[0]) for values in sent), sent
    assert len({values[0] for values in sent}) == 4  # unique per request, never the client's 10002


@pytest.mark.parametrize("how", ["option", "environment"])
async def test_a_gateway_told_to_trust_clients_passes_their_trace_id_through(tmp_path, upstreams, monkeypatch, how):
    _, canary = upstreams
    extra = ("--trust-client-trace-id",) if how == "option" else ()
    if how == "environment":
        monkeypatch.setenv("LANEPROXY_TRUST_CLIENT_TRACE_ID", "true")
    proxy = gateway(tmp_path, upstreams, extra=extra)
    try:
        await exchange(proxy.gateway_port, request(b"x-asm-prefer-tag: canary", b"my-request-id: 10002"))
        await exchange(proxy.gateway_port, request(b"x-asm-prefer-tag: canary"))
    finally:
        proxy.stop()
    kept, added = (trace_values(received) for received in canary.received)
    assert kept == [b"10002"]
    assert len(added) == 1 and is_uuid4(added[0])


async def test_a_traceparent_trace_header_keeps_a_valid_client_context_and_replaces_an_invalid_one(tmp_path, upstreams):
    _, canary = upstreams
    swimlanes = tmp_path / "traceparent.yaml"
    swimlanes.write_text(SWIMLANES.read_text().replace("traceHeader: my-request-id", "traceHeader: traceparent"))
    proxy = gateway(tmp_path, upstreams, swimlanes=swimlanes)
    all_zero = b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01"
    try:
        for value in (VALID_PARENT, all_zero, b"10002"):
            await exchange(proxy.gateway_port, request(b"x-asm-prefer-tag: canary", b"traceparent: " + value))
    finally:
        proxy.stop()
    kept, *replaced = (trace_values(received, b"traceparent") for received in canary.received)
    assert kept == [VALID_PARENT]
    for values in replaced:
        assert len(values) == 1
        version, trace_id, parent_id, flags = values[0].split(b"-")
        assert (version, len(trace_id), len(parent_id), flags) == (b"00", 32, 16, b"01")
        assert int(trace_id, 16) != 0 and trace_id != TRACE_ID
    assert replaced[0] != replaced[1]


# --- the demo's chain, with a mockb that holds the first request it gets -------------------------------

class HeldApp:
    """mockb v1 of the demo, answering as the mock service does, but holding the first request it
    receives until the test releases it.

    A stand-in by necessity: the real mock answers at once, and the attack needs the victim's request
    to be inside the chain (past mockb's inbound sidecar, before mockb's outbound call) when the
    attacker's arrives. Like the mock, it forwards only `my-request-id`, through its sidecar's outbound
    listener (HTTP_PROXY).
    """

    def __init__(self, port: int, outbound_port: int) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.held_trace: str | None = None
        self._first = threading.Lock()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{outbound_port}"}))
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                trace = self.headers.get("my-request-id")
                if app._first.acquire(blocking=False):
                    app.held_trace = trace
                    app.arrived.set()
                    app.release.wait(30)
                upstream = urllib.request.Request("http://mockc:8000/", headers={"my-request-id": trace} if trace else {})
                with opener.open(upstream, timeout=10) as response:
                    body = f"mockb(version: v1, ip: 127.0.0.1)-> {response.read().decode()}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_chain():
    cluster = DemoCluster(log_level="warning", own_apps=frozenset({("mockb", "v1")}))
    mockb = next(pod for pod in cluster.pods if pod.app == "mockb")
    app = HeldApp(mockb.app_port, mockb.outbound_port)
    try:
        with cluster:
            yield cluster, app
    finally:
        app.stop()


def test_an_attackers_request_with_the_victims_id_and_the_canary_tag_does_not_move_the_victims_later_hops(held_chain):
    cluster, app = held_chain
    url = cluster.gateway_url + "/mock"
    with ThreadPoolExecutor(max_workers=1) as pool:
        victim = pool.submit(get, url, {"x-asm-prefer-tag": "base", "my-request-id": "10001"})
        assert app.arrived.wait(20), "the victim's request never reached mockb"
        # The victim is between mockb's inbound sidecar and mockb's call to mockc: the moment a trace
        # table keyed by the client's id would let the attacker's request overwrite the victim's lane.
        attacker = get(url, {"x-asm-prefer-tag": "canary", "my-request-id": "10001"})
        app.release.set()
        assert attacker == (200, CANARY_CHAIN)
        assert victim.result(timeout=30) == (200, BASE_CHAIN)
    assert app.held_trace != "10001" and is_uuid4(app.held_trace.encode())
