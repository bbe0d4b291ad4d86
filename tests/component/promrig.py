"""A real Prometheus (Debian's `prometheus` package) on 127.0.0.1, scraping targets a test names.

Owns the server's configuration (one job per target group, a short scrape interval), its data
directory, its lifecycle, and small helpers over its HTTP API: instant queries at a chosen time, and
waiting until a query shows what the targets already counted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from laneproxy.demo import free_port

SCRAPE_INTERVAL = 0.5  # seconds


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer:
    """`prometheus` scraping `targets` ({job: ["127.0.0.1:port", ...]}) at `metrics_path` every SCRAPE_INTERVAL."""

    def __init__(self, targets: dict[str, list[str]], metrics_path: str = "/stats/prometheus") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="laneproxy-prometheus-")
        self.workdir = Path(self._tmp.name)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{int(SCRAPE_INTERVAL * 1000)}ms",
                       "scrape_timeout": f"{int(SCRAPE_INTERVAL * 1000)}ms"},
            "scrape_configs": [{"job_name": job, "metrics_path": metrics_path,
                                "static_configs": [{"targets": addresses}]}
                               for job, addresses in targets.items()],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        binary = prometheus_binary()
        assert binary is not None
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("prometheus not ready")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._tmp.cleanup()

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            document = json.loads(response.read())
        assert document["status"] == "success", document
        return document["data"]["result"]

    def value(self, promql: str, at: float | None = None) -> float | None:
        result = self.query(promql, at)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float, timeout: float = 30.0) -> None:
        """Until the query's value equals `expected` (the targets' own count, seen by Prometheus)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.value(promql)
            if seen == expected:
                return
            time.sleep(SCRAPE_INTERVAL / 2)
        raise AssertionError(f"{promql} stayed at {seen}, expected {expected}")

    def wait_scraped(self) -> None:
        """Two more scrape rounds: what the targets report now is in Prometheus, sampled at least twice."""
        time.sleep(2.2 * SCRAPE_INTERVAL)
