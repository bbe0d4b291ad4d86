"""The local full-chain demo: the seed scenario on 127.0.0.1 with real processes, no Kubernetes.

Owns the demo topology: a gateway; mocka, mockb and mockc v1 in the base lane; mocka and mockc v2
in the canary lane (the canary lane has no mockb); each app with its own sidecar (inbound and
outbound listeners), the app's egress going through its sidecar by HTTP_PROXY. It writes the
endpoints file for the ports it picked, uses the seed's swimlane manifests shipped in the package
(`laneproxy/manifests/`, which `config/swimlanes.yaml` links to), and stops every process it
started. Tests use DemoCluster too, so the demo cannot rot.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

# Package data, not a path beside the sources: the demo must work from an installed wheel or the image.
SEED_SWIMLANES = resources.files("laneproxy") / "manifests" / "swimlanes.yaml"

# (app, version, lane tag, upstream app)
TOPOLOGY = (
    ("mocka", "v1", "base", "mockb"),
    ("mockb", "v1", "base", "mockc"),
    ("mockc", "v1", "base", None),
    ("mocka", "v2", "canary", "mockb"),
    ("mockc", "v2", "canary", None),
)
SERVICE_PORT = 8000


# Ports the demo hands to the processes it starts are drawn from here: below the kernel's ephemeral range (the
# kernel never picks these for an outgoing connection by itself) and below Kubernetes' NodePort range.
PICKED_PORTS_LOW, PICKED_PORTS_HIGH = 20000, 30000
_handed_out: set[int] = set()


def _ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default when the range cannot be read


def free_port() -> int:
    """A loopback TCP port free now, for a process started next to bind.

    The port is released before its process binds it. A port from the ephemeral range (bind to port 0) can be
    taken in that gap by any outgoing connection of any process on the machine (a mock in the suite once failed
    to start that way), so the draw is from a range the kernel never assigns by itself; each draw is checked by
    binding it, and this process never hands out the same port twice. Only where the machine's ephemeral range
    leaves no such room does it fall back to the kernel's choice."""
    high = min(PICKED_PORTS_HIGH, _ephemeral_low())
    if high - PICKED_PORTS_LOW < 1000:
        return _kernel_port()
    for _ in range(200):
        port = random.randrange(PICKED_PORTS_LOW, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    return _kernel_port()


def _kernel_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@dataclass
class Pod:
    app: str
    version: str
    lane: str
    upstream: str | None
    app_port: int = field(default_factory=free_port)
    inbound_port: int = field(default_factory=free_port)
    outbound_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)  # used when the demo serves metrics
    processes: list[subprocess.Popen] = field(default_factory=list, compare=False, repr=False)  # sidecar, then app

    @property
    def service(self) -> str:
        return f"default/{self.app}"

    @property
    def workload(self) -> str:
        """The Deployment this pod would belong to (the seed names them `<app>-<version>`)."""
        return f"{self.app}-{self.version}"


class DemoCluster:
    """Starts and stops the demo's processes; usable as a context manager."""

    def __init__(self, *, gateway_port: int = 0, swimlanes: Path | None = None, workdir: Path | None = None,
                 log_level: str = "warning", own_apps: frozenset[tuple[str, str]] = frozenset(),
                 metrics: bool = False, proxy_args: tuple[str, ...] = (),
                 app_env: dict[tuple[str, str], dict[str, str]] | None = None) -> None:
        """`own_apps`: (app, version) pairs whose application the caller serves itself on the pod's
        `app_port` (a test's app that holds a request); the demo starts only their sidecars.
        `metrics`: every proxy also serves its read-only metrics listener (the pod's `metrics_port`, the
        gateway's `gateway_metrics_port`). `proxy_args`: more `run` options for every proxy.
        `app_env`: more environment for the mock app of an (app, version), e.g. {"fail_share": "0.1"}."""
        self._resources = contextlib.ExitStack()
        self.swimlanes = swimlanes or self._resources.enter_context(resources.as_file(SEED_SWIMLANES))
        if not self.swimlanes.exists():
            raise FileNotFoundError(f"swimlane manifests not found at {self.swimlanes}")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="laneproxy-demo-")
        self.workdir = workdir or Path(self._tmp.name)
        self.endpoints_file = self.workdir / "endpoints.yaml"
        if gateway_port:
            _handed_out.add(gateway_port)  # never drawn again for another process of this demo
        self.gateway_port = gateway_port or free_port()
        self.gateway_admin_port = free_port()
        self.gateway_metrics_port = free_port()
        self.metrics = metrics
        self.proxy_args = proxy_args
        self.app_env = app_env or {}
        self.pods = [Pod(*spec) for spec in TOPOLOGY]
        self.log_level = log_level
        self.own_apps = own_apps
        self.processes: list[subprocess.Popen] = []

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def gateway_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_admin_port}"

    def endpoints_document(self, pods: list[Pod] | None = None) -> dict:
        services: dict[str, dict] = {}
        for pod in pods if pods is not None else self.pods:
            entry = services.setdefault(f"default/{pod.app}", {"port": SERVICE_PORT, "lanes": {}})
            entry["lanes"].setdefault(pod.lane, []).append(f"127.0.0.1:{pod.inbound_port}")
        return {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": services}

    def write_endpoints(self, pods: list[Pod] | None = None) -> None:
        """Atomically replace the endpoints file, as a ConfigMap update would."""
        staged = self.endpoints_file.with_suffix(".tmp")
        staged.write_text(yaml.safe_dump(self.endpoints_document(pods), sort_keys=False))
        os.replace(staged, self.endpoints_file)

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        environment = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        environment.update(env or {})
        command = [sys.executable, "-m", "laneproxy", "--log-level", self.log_level, *args]
        # A session of their own: Ctrl-C reaches the demo, which then stops them in order, not all at once.
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    @property
    def _config_args(self) -> list[str]:
        return ["--config", str(self.swimlanes), "--config", str(self.endpoints_file), *self.proxy_args]

    def _metrics_args(self, port: int) -> list[str]:
        return ["--metrics", f"127.0.0.1:{port}"] if self.metrics else []

    def start(self, timeout: float = 30.0) -> None:
        self.write_endpoints()
        # Named as Istio names its ingress gateway's workload, in a namespace of its own.
        self._spawn("run", "--gateway", f"127.0.0.1:{self.gateway_port}",
                    "--admin", f"127.0.0.1:{self.gateway_admin_port}", "--workload", "laneproxy-gateway",
                    "--workload-namespace", "laneproxy-system", "--workload-app", "laneproxy-gateway",
                    *self._metrics_args(self.gateway_metrics_port), *self._config_args)
        for pod in self.pods:
            self._spawn_pod(pod)
        try:
            self._wait_ready(timeout, self.pods, gateway=True)
        except BaseException:
            self.stop()
            raise

    def _spawn_pod(self, pod: Pod) -> None:
        # A short minimum drain: a replaced pod's sidecar is stopped only once every proxy serves the new
        # membership, so it only finishes what is in flight (a caller that picked it just before is
        # refused and retries elsewhere, whatever the method).
        pod.processes.append(self._spawn(
            "run", "--inbound", f"127.0.0.1:{pod.inbound_port}", "--app", f"127.0.0.1:{pod.app_port}",
            "--outbound", f"127.0.0.1:{pod.outbound_port}", "--admin", f"127.0.0.1:{pod.admin_port}",
            "--lane", pod.lane, "--drain-seconds", "0.5", "--workload", pod.workload, "--workload-app", pod.app,
            "--workload-version", pod.version, *self._metrics_args(pod.metrics_port), *self._config_args))
        if (pod.app, pod.version) in self.own_apps:
            return  # the caller serves this pod's application itself
        upstream = f"http://{pod.upstream}:{SERVICE_PORT}/" if pod.upstream else ""
        pod.processes.append(self._spawn(
            "mock", "--listen", f"127.0.0.1:{pod.app_port}",
            env={"app": pod.app, "version": pod.version, "upstream_url": upstream,
                 "HTTP_PROXY": f"http://127.0.0.1:{pod.outbound_port}", **self.app_env.get((pod.app, pod.version), {})}))

    def start_pod(self, pod: Pod, timeout: float = 30.0) -> None:
        """Start one more pod (its sidecar and app) and wait until both are ready; it is not published yet."""
        self._spawn_pod(pod)
        try:
            self._wait_ready(timeout, [pod], gateway=False)
        except BaseException:
            self.stop_pod(pod)
            raise

    def stop_pod(self, pod: Pod) -> None:
        """Stop a pod as the kubelet does: its sidecar first (it drains), then the app once nothing reaches it."""
        for process in pod.processes:
            # Out of the watched list first: run_demo stops everything when a watched process exits.
            if process in self.processes:
                self.processes.remove(process)
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pod.processes.clear()

    def _wait_ready(self, timeout: float, pods: list[Pod], *, gateway: bool) -> None:
        deadline = time.monotonic() + timeout
        admin_ports = [self.gateway_admin_port] if gateway else []
        admin_ports += [pod.admin_port for pod in pods]
        app_ports = [pod.app_port for pod in pods]
        pending = [("admin", port) for port in admin_ports] + [("app", port) for port in app_ports]
        while pending:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"demo process {process.args} exited with {process.returncode}")
            kind, port = pending[0]
            if _answers(kind, port):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo {kind} on port {port} not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        for pod in self.pods:
            pod.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._resources.close()

    def __enter__(self) -> DemoCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _answers(kind: str, port: int) -> bool:
    if kind == "admin":
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def run_demo(gateway_port: int, state_file: Path | None = None) -> int:
    from laneproxy.rollout import ControlServer, DemoRollout, default_state_file, write_state

    state_file = state_file or default_state_file()
    cluster = DemoCluster(gateway_port=gateway_port, log_level="warning")
    cluster.start()
    control = ControlServer(DemoRollout(cluster)).start()
    write_state(state_file, cluster, control.url)
    gw = cluster.gateway_url
    print(f"gateway: {gw}")
    print(f"gateway admin: {cluster.gateway_admin_url}  (try /lanes and /stats)")
    print(f"control: {control.url}  (state in {state_file})")
    print("try:")
    print(f"  curl {gw}/mock -H 'x-asm-prefer-tag: base' -H 'my-request-id: 10001'    # v1 -> v1 -> v1")
    print(f"  curl {gw}/mock -H 'x-asm-prefer-tag: canary' -H 'my-request-id: 10002'  # v2 -> v1 -> v2")
    print(f"  curl {gw}/mock -H 'my-request-id: 10003'                                # v1 -> v1 -> v1")
    print(f"  curl {gw}/mock -H 'x-asm-prefer-tag: canary'                          # v2 -> v1 -> v2: the gateway sets the id")
    print("and from another terminal, the seed's release steps:")
    print("  laneproxy demo release mockb v2    # a canary mockb v2 joins the canary lane")
    print("  laneproxy demo approve mockb       # the base lane's mockb becomes v2")
    print("  laneproxy demo undo mocka          # the canary mocka goes away")
    print("  laneproxy demo status              # each service's versions per lane")
    print("press Ctrl-C to stop", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(0.5)
            # A copy: the control thread adds and removes pods' processes meanwhile.
            if any(p.poll() is not None for p in list(cluster.processes)):
                print("a demo process exited; stopping", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        control.stop()
        with contextlib.suppress(OSError):
            state_file.unlink()
        cluster.stop()
    return 0
