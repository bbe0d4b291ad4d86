"""What a sidecar's `laneproxy run` process (one worker) imports, read from the real process with
`python -X importtime`: its admin API, metrics listener and lifecycle port carry no aiohttp (about 11 MiB of
resident memory) and its Prometheus answers no prometheus_client (about 1.4 MiB); aiohttp's client is
imported only once `--app-metrics` asks to merge the app's metrics."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from proxyrig import SWIMLANES, UpstreamThread, endpoints_file, free_port, stop_process

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", re.MULTILINE)


def fetch(port: int, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
        return response.status


def run_sidecar(tmp_path: Path, app_port: int, extra: tuple[str, ...] = ()) -> tuple[set[str], dict[str, int]]:
    """Start an injected-sidecar-shaped proxy, ask each of its listeners something, stop it; what it imported."""
    ports = {name: free_port() for name in ("admin", "inbound", "outbound", "metrics", "lifecycle")}
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [app_port]}})
    stderr = tmp_path / "stderr.txt"
    args = [sys.executable, "-X", "importtime", "-m", "laneproxy", "--log-level", "warning", "run",
            "--config", str(SWIMLANES), "--config", str(endpoints), "--drain-seconds", "0",
            "--admin", f"127.0.0.1:{ports['admin']}", "--inbound", f"127.0.0.1:{ports['inbound']}",
            "--app", f"127.0.0.1:{app_port}", "--outbound", f"127.0.0.1:{ports['outbound']}",
            "--metrics", f"127.0.0.1:{ports['metrics']}", "--lifecycle", f"127.0.0.1:{ports['lifecycle']}", *extra]
    with stderr.open("wb") as sink:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, stderr.read_text()[-2000:]
            try:
                if fetch(ports["admin"], "/ready") == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the sidecar did not get ready"
                time.sleep(0.05)
        statuses = {path: fetch(ports["admin"], path) for path in
                    ("/", "/stats", "/stats?format=json", "/stats/prometheus", "/clusters", "/config_dump", "/lanes",
                     "/route?host=mockb", "/server_info", "/listeners")}
        statuses["POST /logging"] = fetch(ports["admin"], "/logging", "POST")
        statuses["metrics /metrics"] = fetch(ports["metrics"], "/metrics")
        statuses["lifecycle /ready"] = fetch(ports["lifecycle"], "/ready")
    finally:
        stop_process(process)
    return set(_IMPORTED.findall(stderr.read_text())), statuses


def test_an_idle_sidecars_listeners_answer_without_importing_aiohttp_or_prometheus_client(tmp_path):
    with UpstreamThread() as app:
        imported, statuses = run_sidecar(tmp_path, app.port)
    assert set(statuses.values()) == {200}, statuses
    assert "laneproxy.admin.web" in imported and "laneproxy.admin.pod_hooks" in imported  # the probe sees them
    assert sorted(name for name in imported if name.split(".")[0] in ("aiohttp", "yarl", "prometheus_client")) == []


def test_merging_the_apps_own_metrics_is_what_brings_aiohttp_in(tmp_path):
    """The same probe, with the one feature that still uses aiohttp's client: the probe can see an import."""
    with UpstreamThread() as app:
        imported, statuses = run_sidecar(tmp_path, app.port,
                                         ("--app-metrics", f"http://127.0.0.1:{app.port}/metrics"))
    assert statuses["metrics /metrics"] == 200
    assert "aiohttp" in imported
