"""The benchmark cannot rot: its smoke variant runs every case end to end, and `--workers` adds its stats up.

No speed is asserted here (speed is the benchmark's business, as ratios): only that every case answers
without errors, the reports are written, and the sidecar really took the trace-table path. nginx-light
and wrk are installed by loadtests/bench/install.sh, the installer `make bench` uses; `make test`
runs it first (the `test: bench-deps` line of the Makefile), and this module runs it too when
the tools are missing, so a bare `pytest` works the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from laneproxy.demo import free_port

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "loadtests" / "bench"


@pytest.fixture(scope="module")
def bench_tools() -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not (Path(nginx).exists() and shutil.which("wrk") and shutil.which("taskset") and shutil.which("h2load")
            and importlib.util.find_spec("websockets") is not None):
        subprocess.run([str(BENCH / "install.sh"), sys.executable], check=True, timeout=900)


def test_benchmark_smoke_variant_runs_every_case_and_writes_json_markdown_and_chart(tmp_path, bench_tools):
    done = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--smoke", "--workers", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    data = json.loads((tmp_path / "latest.json").read_text())
    cases = {(run["kind"], run["case"]) for run in data["runs"]}
    for case in ("direct", "nginx", "envoy", "laneproxy", "laneproxy --workers 2"):
        assert ("throughput", case) in cases
    for case in ("direct", "nginx", "envoy", "laneproxy"):
        assert ("latency-1cx", case) in cases
    assert {kind for kind, _ in cases} >= {"table", "swap", "demo"}
    # h2c and WebSocket rows: the peers always; laneproxy measured once it speaks the protocol, else skipped saying why.
    for kind, why in (("h2c", "does not answer the h2c preface"), ("websocket", "does not pass WebSocket upgrades yet")):
        for case in ("direct", "nginx", "envoy"):
            assert (kind, case) in cases
        assert ((kind, "laneproxy") in cases) != (why in data["skipped"].get(f"{kind} laneproxy", "")), data["skipped"]
    for run in data["runs"]:
        assert run["requests"] > 0, run
        assert sum(run["errors"].values()) == 0, run
        assert run["cpu_us_per_request"] and run["cpu_us_per_request"] > 0, run
    assert all(swap["swap_s"] is not None for swap in data["runs"] if swap["kind"] == "swap"), "the new table never served"
    assert data["sidecar_counters"].get("laneproxy.lane_source.trace-table", 0) > 0
    assert all(held["connections"] == data["meta"]["hold_connections"] for held in data["hold"].values())
    assert {t["target"] for t in data["summary"]["targets"]}  # computed, not judged
    markdown = (tmp_path / "latest.md").read_text()
    assert "| laneproxy |" in markdown and "vs Envoy" in markdown
    assert "### h2c (HTTP/2 with prior knowledge)" in markdown and "### WebSocket echo" in markdown
    assert (tmp_path / "latest.png").stat().st_size > 10_000


def test_the_http1_cases_alone_measure_the_hop_against_both_peers_and_both_builds_and_nothing_else(tmp_path, bench_tools):
    done = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--smoke", "--cases", "http1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    data = json.loads((tmp_path / "latest.json").read_text())
    cases = {(run["kind"], run["case"]) for run in data["runs"]}
    expected = {"direct", "nginx", "envoy", "laneproxy", "laneproxy (pure Python)"}
    assert cases == {(kind, case) for kind in ("throughput", "latency-1cx") for case in expected}
    for run in data["runs"]:
        assert run["requests"] > 0 and sum(run["errors"].values()) == 0, run
    assert data["builds"]["laneproxy (pure Python)"]["compiled"] is False
    assert data["sidecar_counters"].get("laneproxy.lane_source.trace-table", 0) > 0
    summary = data["summary"]["throughput"]["laneproxy"]
    assert summary["vs_nginx"] is not None and summary["vs_envoy"] is not None


# --workers N: belongs with the benchmark because its purpose is throughput; it checks behaviour only.


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _stat(stats: dict, name: str) -> int:
    return next((row["value"] for row in stats["stats"] if row["name"] == name), 0)


def test_workers_share_the_ports_and_the_admin_adds_their_stats_up(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import tables
    finally:
        sys.path.remove(str(BENCH))
    upstream = subprocess.Popen([sys.executable, "-m", "laneproxy", "mock", "--listen", f"127.0.0.1:{free_port()}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app_port = int(upstream.args[-1].rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", app_port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the mock app never listened"
            time.sleep(0.05)
    swimlanes, endpoints, services = tables.write_table(tmp_path, "w", 3, app_port)
    endpoints.write_text(tables.endpoints_text(services, app_port, lanes=("base",)))  # canary falls back to base
    inbound, outbound, admin = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "laneproxy", "--log-level", "warning", "run", "--workers", "2",
         "--inbound", f"127.0.0.1:{inbound}", "--app", f"127.0.0.1:{app_port}", "--outbound", f"127.0.0.1:{outbound}",
         "--admin", f"127.0.0.1:{admin}", "--config", str(swimlanes), "--config", str(endpoints), "--drain-seconds", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"http://127.0.0.1:{admin}/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert proxy.poll() is None, proxy.stdout.read()
            assert time.monotonic() < deadline, "the workers never became ready"
            time.sleep(0.1)

        # Traces learned on one worker's inbound listener are known to every worker's outbound listener.
        for index in range(20):
            status, _ = _get(f"http://127.0.0.1:{inbound}/", {"x-asm-prefer-tag": "canary", "my-request-id": f"t{index}"})
            assert status == 200
        time.sleep(0.2)
        for index in range(20):  # a new connection each: SO_REUSEPORT spreads them over both workers
            status, _ = _get(f"http://127.0.0.1:{outbound}/", {"Host": "bench", "my-request-id": f"t{index}"})
            assert status == 200

        total = json.loads(_get(f"http://127.0.0.1:{admin}/stats?format=json")[1])
        per_worker = [json.loads(_get(f"http://127.0.0.1:{admin}/stats?format=json&worker={i}")[1]) for i in range(2)]
        assert _stat(total, "server.concurrency") == 2
        assert _stat(total, "http.outbound.downstream_rq_total") == 20
        assert sum(_stat(w, "http.outbound.downstream_rq_total") for w in per_worker) == 20
        assert all(_stat(w, "http.outbound.downstream_rq_total") > 0 for w in per_worker), "one worker took everything"
        assert _stat(total, "laneproxy.lane_source.trace-table") == 20, "a worker missed a trace its sibling learned"
        text = _get(f"http://127.0.0.1:{admin}/stats")[1]
        assert "http.outbound.downstream_rq_total: 20\n" in text
        status, lanes = _get(f"http://127.0.0.1:{admin}/lanes")
        assert status == 200 and "bench" in lanes
    finally:
        proxy.terminate()
        try:
            proxy.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        upstream.terminate()
        upstream.wait(timeout=10)
    assert proxy.returncode == 0


def test_scale_benchmark_smoke_variant_pushes_every_change_to_every_stream_and_reports_both_sources(tmp_path):
    """loadtests/bench/xds_scale.py --smoke against a real kube-apiserver: no speed asserted, only that every
    stream received every readiness change, both ends were measured, and the direct source's rows are there."""
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(BENCH / "xds_scale.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads(out.read_text())
    xds = data["xds"]
    assert xds["changes"] == 3 and xds["missed"] == 0 and xds["push_p99_ms"] is not None
    assert xds["controller_rss"] > 0 and xds["sidecar_rss"] > 0
    assert set(data["direct"]) == {"full", "metadata"}
    assert "sidecar RSS with that table" in done.stdout and "| metadata |" in done.stdout
