"""HTTP/2 beside HTTP/1.1 on one listener, with curl (nghttp2) as the client and a recording HTTP/1.1 origin.

An h2c client (prior knowledge) to a service whose port says http1 is forwarded as HTTP/1.1 with Host
from `:authority`; an HTTP/1.1 client asking `Upgrade: h2c` is answered in HTTP/1.1, as by Envoy.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import yaml

from proxyrig import SWIMLANES, ProxyProcess, RecordingUpstream


@pytest.fixture
async def origin():
    upstream = await RecordingUpstream().start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def sidecar(tmp_path: Path, origin):
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(yaml.safe_dump({
        "apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
        "services": {"default/mockb": {"port": 8000, "protocol": "http1",
                                       "lanes": {"base": [f"127.0.0.1:{origin.port}"]}}},
    }))
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=origin.port).start()
    yield proxy
    proxy.stop()


async def curl(*args: str) -> str:
    done = await asyncio.to_thread(subprocess.run, ["curl", "-s", "-m", "10", *args], capture_output=True, text=True,
                                   timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_an_h2c_request_to_an_http1_port_goes_upstream_as_http11_with_host_from_authority(sidecar, origin):
    out = await curl("--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}", "-H", "x-asm-prefer-tag: canary",
                     "--data-binary", "hello", f"http://127.0.0.1:{sidecar.outbound_port}/p?q=1", "-H", "Host: mockb")
    assert out.splitlines()[-1] == "2 200"
    [request] = origin.received
    assert request.request_line == b"POST /p?q=1 HTTP/1.1"
    assert (request.header(b"host"), request.header(b"x-asm-prefer-tag"), request.body) == (b"mockb", b"canary",
                                                                                            b"hello")
    assert sidecar.stat("http.outbound.downstream_rq_http2_total") == 1


async def test_upgrade_h2c_is_ignored_and_answered_over_http11(sidecar, origin):
    out = await curl("--http2", "-w", "\n%{http_version} %{http_code}", f"http://127.0.0.1:{sidecar.outbound_port}/u",
                     "-H", "Host: mockb")
    assert out.splitlines()[-1] == "1.1 200"
    [request] = origin.received
    assert request.header(b"upgrade") is None and request.header(b"http2-settings") is None
    assert sidecar.stat("http.outbound.downstream_cx_http2_total") == 0
