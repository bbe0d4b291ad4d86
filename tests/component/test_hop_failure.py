"""A blip one hop down must not become a lane outage: the issue's scenario with real processes.

gateway -> mocka sidecar (inbound, app, outbound; a base pod and a canary pod) -> mockb, whose only
endpoint leaves the endpoints for a few seconds while GETs and POSTs flow, canary and untagged. The
mocka apps answer 503 meanwhile (`no healthy upstream` from their own sidecar, passed on as apps do),
and their sidecars mark those answers `x-laneproxy-failed-hop`, so the gateway ejects neither mocka
endpoint; once mockb is back every request succeeds again and canary requests still reach mocka's
canary. Gateway and sidecars run the default outlier settings (5 consecutive 5xx, 30 s).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from proxyrig import SWIMLANES, ProxyProcess, UpstreamThread, endpoints_file, exchange, free_port, stop_process

OUTAGE_SECONDS = 3.0
MAX_REQUESTS = 2000


def mock_app(port: int, version: str, outbound_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "laneproxy", "--log-level", "warning", "mock", "--listen", f"127.0.0.1:{port}"],
        env={"app": "mocka", "version": version, "upstream_url": "http://mockb:8000/",
             "HTTP_PROXY": f"http://127.0.0.1:{outbound_port}", "PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL)


def wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


class Traffic:
    """Canary and untagged requests through the gateway, every other one a POST; outcomes kept in order."""

    def __init__(self, gateway_port: int) -> None:
        self.url = f"http://127.0.0.1:{gateway_port}/mock"
        self.count = 0
        self.outcomes: list[tuple[str, int, str]] = []  # (phase, lane asked, status, body)

    async def one(self, session: aiohttp.ClientSession, phase: str, lane: str | None) -> tuple[str, int, str]:
        self.count += 1
        headers = {"x-asm-prefer-tag": lane} if lane else {}
        method = "POST" if self.count % 2 else "GET"
        async with session.request(method, self.url, headers=headers,
                                   data=b"order %d" % self.count if method == "POST" else None) as response:
            outcome = (phase, lane or "-", response.status, await response.text())
        self.outcomes.append(outcome)
        return outcome

    async def run(self, session: aiohttp.ClientSession, phase: str, *, seconds: float = 0.0, count: int = 0) -> None:
        deadline = time.monotonic() + seconds

        async def client(lane: str | None) -> None:
            done = 0
            while (done < count or time.monotonic() < deadline) and self.count < MAX_REQUESTS:
                await self.one(session, phase, lane)
                done += 1
                await asyncio.sleep(0.005)  # a steady stream, not a flood

        await asyncio.gather(client("canary"), client(None), client("canary"), client(None))


def served_by(body: str) -> str:
    return body.split("(", 1)[0] + ("/canary" if body.startswith("mocka(version: v2") else "/base")


async def test_mockbs_only_endpoint_gone_for_seconds_ejects_no_mocka_endpoint_and_traffic_recovers_with_its_lanes(
        tmp_path: Path):
    processes: list[subprocess.Popen] = []
    proxies: list[ProxyProcess] = []
    with UpstreamThread() as mockb:
        endpoints = tmp_path / "endpoints.yaml"
        base_app, canary_app = free_port(), free_port()
        base = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=base_app)
        canary = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=canary_app)
        gateway = ProxyProcess(SWIMLANES, endpoints, gateway=True)

        def publish(mockb_ports: list[int]) -> None:
            endpoints_file(endpoints, {"default/mocka": {"base": [base.inbound_port], "canary": [canary.inbound_port]},
                                       "default/mockb": {"base": mockb_ports}})

        publish([mockb.port])
        try:
            for proxy in (base, canary, gateway):
                proxies.append(proxy.start())
            processes += [mock_app(base_app, "v1", base.outbound_port), mock_app(canary_app, "v2", canary.outbound_port)]
            for port in (base_app, canary_app):
                wait_listening(port)
            traffic = Traffic(gateway.gateway_port)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                await traffic.run(session, "before", count=10)
                publish([])  # mockb has no ready endpoint: its callers' sidecars answer `no healthy upstream`
                await traffic.run(session, "outage", seconds=OUTAGE_SECONDS)
                publish([mockb.port])
                back = time.monotonic() + 10
                while True:  # both mocka sidecars have read the endpoints again
                    answers = [await traffic.one(session, "recovering", lane) for lane in ("canary", None)]
                    if all(status == 200 for _, _, status, _ in answers):
                        break
                    assert time.monotonic() < back, f"mockb is back but requests still fail: {answers}"
                    await asyncio.sleep(0.1)
                await traffic.run(session, "after", count=10)
            stats = {key: value for key, _, value in
                     (line.partition(": ") for line in gateway.admin("/stats").decode().splitlines())}
            clusters = json.loads(gateway.admin("/clusters?format=json"))
        finally:
            for process in processes:
                stop_process(process)
            for proxy in proxies:
                proxy.stop()

    def phase(name: str) -> list[tuple[str, int, str]]:
        return [(lane, status, body) for seen, lane, status, body in traffic.outcomes if seen == name]

    outage = phase("outage")
    print(f"{traffic.count} requests; during the outage {len(outage)}, "
          f"{sum(status == 503 for _, status, _ in outage)} answered 503; gateway: "
          f"{stats.get('laneproxy.outlier.failed_hop_responses')} failed-hop 5xx not counted, "
          f"{stats.get('laneproxy.outlier.ejections')} ejections")
    assert any(status == 503 for _, status, _ in outage), "mockb's absence never showed: the test proved nothing"
    ejected = [host for cluster in clusters.get("cluster_statuses", []) for host in cluster.get("host_statuses", [])
               if host.get("health_status", {}).get("failed_outlier_check")]
    assert ejected == [], "the gateway ejected a mocka endpoint for mockb's absence"
    for name in ("before", "after"):
        seen = phase(name)
        assert len(seen) == 40
        assert [status for _, status, _ in seen] == [200] * len(seen), seen
        assert {(lane, served_by(body)) for lane, _, body in seen} == {("canary", "mocka/canary"), ("-", "mocka/base")}
    assert int(stats["laneproxy.outlier.failed_hop_responses"]) > 0, "no 503 reached the gateway marked"
    assert stats["laneproxy.outlier.ejections"] == "0"


MARKS = (b"x-laneproxy-failed-hop", b"x-laneproxy-not-forwarded")


def marks_in(response: bytes) -> list[bytes]:
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    return [mark for mark in MARKS if mark in head]


async def test_the_gateway_keeps_the_mesh_failure_marks_from_its_clients_while_still_acting_on_them(tmp_path: Path):
    """The marks are for callers inside the mesh. Through the gateway, over a raw socket: a mocka sidecar
    whose app is gone (its 503 is marked not-forwarded; the gateway retries it, then passes the 503 on), an
    app answering 503 marked as a later hop's failure and a 200 onto which it copied both marks, and the
    gateway's own connect failure: no response reaches the client with a mark, and the gateway still
    counted the failed-hop 503 against no endpoint."""

    def respond(request) -> bytes:
        marks = b"x-laneproxy-failed-hop: UH\r\n"
        if request.header(b"x-case") == b"copied":
            return (b"HTTP/1.1 200 OK\r\n" + marks + b"x-laneproxy-not-forwarded: UF\r\ncontent-length: 2\r\n\r\nok")
        return b"HTTP/1.1 503 Service Unavailable\r\n" + marks + b"content-length: 4\r\n\r\ndown"

    endpoints = tmp_path / "endpoints.yaml"
    get = b"GET /mock HTTP/1.1\r\nHost: gw\r\nx-asm-prefer-tag: base\r\nx-case: %s\r\nConnection: close\r\n\r\n"
    answers: dict[str, bytes] = {}
    with UpstreamThread(respond=respond) as app:
        sidecar = ProxyProcess(SWIMLANES, endpoints, inbound_app=free_port())  # its app has closed its port
        gateway = ProxyProcess(SWIMLANES, endpoints, gateway=True)
        proxies = []
        try:
            for name, port in (("not-forwarded", sidecar.inbound_port), ("failed-hop", app.port),
                               ("copied", app.port), ("connect-failure", free_port())):
                endpoints_file(endpoints, {"default/mocka": {"base": [port]}})
                if not proxies:
                    proxies += [sidecar.start(), gateway.start()]
                else:
                    await asyncio.sleep(1.0)  # the gateway reads the endpoints file again (every 0.2 s)
                answers[name] = await exchange(gateway.gateway_port, get % name.encode(), read_timeout=10)
                if name == "not-forwarded":
                    retried = sum(int(value) for key, _, value in (line.partition(": ") for line in gateway.admin(
                        "/stats").decode().splitlines()) if key.endswith(".upstream_rq_retry"))
            failed_hop_responses = gateway.stat("laneproxy.outlier.failed_hop_responses")
        finally:
            for proxy in proxies:
                proxy.stop()
    statuses = {name: response.split(b" ", 2)[1] for name, response in answers.items()}
    assert statuses == {"not-forwarded": b"503", "failed-hop": b"503", "copied": b"200", "connect-failure": b"503"}, answers
    assert {name: marks_in(response) for name, response in answers.items()} == {name: [] for name in answers}, answers
    assert b"connection failure" in answers["not-forwarded"] and b"connection failure" in answers["connect-failure"]
    assert retried == 2, "the gateway did not act on the not-forwarded mark (it retries such a 503)"
    assert failed_hop_responses >= 1, "the gateway dropped the failed-hop mark without reading it"
