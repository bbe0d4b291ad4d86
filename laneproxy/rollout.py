"""The local demo's release lifecycle: Kruise Rollout's release, approve and undo, on a running DemoCluster.

Owns the three gestures of the seed's steps 5-7 without a cluster, each applied as Kruise and the
kubelet would and without a failed request: start the new pod and wait until it is ready, publish
the new endpoints file (every proxy's file source reloads it), wait until the gateway and every
sidecar serve the new membership (their admin `/lanes`), and only then stop the old pod, sidecar
first (it drains) and then the app. It also owns the demo's control channel: a small HTTP endpoint
on 127.0.0.1 that `laneproxy demo release|approve|undo|status` reach through a state file holding
its address. One change at a time: a second command waits for the first.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from laneproxy.demo import DemoCluster, Pod

BASE, CANARY = "base", "canary"
LANES = (BASE, CANARY)
# Every address here is 127.0.0.1: an HTTP_PROXY in the user's environment must not take these requests.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RolloutError(Exception):
    """A gesture that does not apply to the demo as it stands (no such service, no canary to approve)."""


def default_state_file() -> Path:
    """Where a running demo writes its control address: one per user, in the temporary directory."""
    return Path(tempfile.gettempdir()) / f"laneproxy-demo-{os.getuid()}.json"


class DemoRollout:
    """Release, approve, undo and status on a DemoCluster; each change waits until every proxy serves it."""

    def __init__(self, cluster: DemoCluster, *, publish_timeout: float = 20.0) -> None:
        self.cluster = cluster
        self.publish_timeout = publish_timeout
        self._lock = threading.Lock()

    # the gestures ----------------------------------------------------------------------------

    def release(self, app: str, version: str) -> str:
        """A canary pod of `app` at `version` joins the canary lane (Kruise's extra canary Deployment)."""
        with self._lock:
            base = self._pod(app, BASE)
            old = self._find(app, CANARY)
            canary = Pod(app, version, CANARY, base.upstream)
            self._replace(added=[canary], removed=[old] if old else [])
            replaced = f" (replacing {old.version})" if old else ""
            return f"released {app} {version} into the {CANARY} lane{replaced}"

    def approve(self, app: str) -> str:
        """The base lane's pod of `app` becomes the canary's version; the canary pod goes away."""
        with self._lock:
            canary = self._find(app, CANARY)
            if canary is None:
                raise RolloutError(f"{app} has no canary to approve (release one first)")
            base = self._pod(app, BASE)
            promoted = Pod(app, canary.version, BASE, base.upstream)
            self._replace(added=[promoted], removed=[base, canary])
            return f"approved {app}: {BASE} is now {canary.version}, the {CANARY} pod is gone"

    def undo(self, app: str) -> str:
        """The canary pod of `app` goes away; canary requests fall back to the base lane for that hop."""
        with self._lock:
            canary = self._find(app, CANARY)
            if canary is None:
                raise RolloutError(f"{app} has no canary to undo")
            self._replace(added=[], removed=[canary])
            return f"rolled back {app}: the {CANARY} pod ({canary.version}) is gone, {CANARY} requests use {BASE}"

    def status(self) -> dict:
        """Each service's versions per lane as the gateway's /lanes sees them (a fallback says where it goes)."""
        with self._lock:
            lanes = fetch_lanes(self.cluster.gateway_admin_url)
            version_of = {f"127.0.0.1:{pod.inbound_port}": pod.version for pod in self.cluster.pods}
            services = {}
            for key, service in sorted(lanes["services"].items()):
                row = {}
                for lane in LANES:
                    entry = service["lanes"].get(lane)
                    if entry is None:
                        continue
                    versions = sorted({version_of.get(address, "?") for address in entry["endpoints"]})
                    row[lane] = {"lane_used": entry["lane_used"], "versions": versions}
                services[key.split("/", 1)[1]] = row
            return {"version": lanes["version"], "services": services}

    # the mechanics ---------------------------------------------------------------------------

    def _find(self, app: str, lane: str) -> Pod | None:
        return next((pod for pod in self.cluster.pods if pod.app == app and pod.lane == lane), None)

    def _pod(self, app: str, lane: str) -> Pod:
        pod = self._find(app, lane)
        if pod is None:
            known = sorted({pod.app for pod in self.cluster.pods})
            raise RolloutError(f"no service {app!r} in the demo (services: {', '.join(known)})")
        return pod

    def _replace(self, *, added: list[Pod], removed: list[Pod]) -> None:
        cluster = self.cluster
        started: list[Pod] = []
        try:
            for pod in added:
                cluster.start_pod(pod)
                started.append(pod)
        except BaseException:
            for pod in started:
                cluster.stop_pod(pod)
            raise
        pods = [pod for pod in cluster.pods if pod not in removed] + added
        cluster.write_endpoints(pods)
        # The new pods are proxies too: they must serve the new table before traffic can reach them through it.
        admins = [cluster.gateway_admin_url, *(f"http://127.0.0.1:{pod.admin_port}" for pod in [*cluster.pods, *added])]
        wait_until_served(admins, membership(pods), self.publish_timeout)
        cluster.pods[:] = pods
        for pod in removed:
            cluster.stop_pod(pod)


def membership(pods: list[Pod]) -> dict[str, dict[str, list[str]]]:
    """service key -> lane -> sorted inbound addresses: what every proxy's /lanes must show."""
    expected: dict[str, dict[str, list[str]]] = {}
    for pod in pods:
        expected.setdefault(pod.service, {lane: [] for lane in LANES})[pod.lane].append(f"127.0.0.1:{pod.inbound_port}")
    return {key: {lane: sorted(addresses) for lane, addresses in lanes.items()} for key, lanes in expected.items()}


def served_membership(lanes_document: dict) -> dict[str, dict[str, list[str]]]:
    """The same shape read from a /lanes document: a lane's own endpoints, none where it falls back."""
    served = {}
    for key, service in lanes_document["services"].items():
        served[key] = {lane: sorted(entry["endpoints"]) if entry["lane_used"] == lane else []
                       for lane, entry in service["lanes"].items() if lane in LANES}
    return served


def fetch_lanes(admin_url: str) -> dict:
    with _DIRECT.open(admin_url + "/lanes", timeout=2) as response:
        return json.load(response)


def wait_until_served(admin_urls: list[str], expected: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(admin_urls)
    while pending:
        try:
            if all(served_membership(fetch_lanes(pending[0])).get(key) == lanes for key, lanes in expected.items()):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pending[0]} did not serve the new endpoints within {timeout}s")
        time.sleep(0.05)


def status_text(status: dict) -> str:
    """`laneproxy demo status` as a table: a lane without its own pod shows where its requests go."""
    lines = [f"{'service':<8} {'base':<14} canary"]
    for app, row in status["services"].items():
        cells = []
        for lane in LANES:
            entry = row.get(lane)
            if entry is None:
                cells.append("-")
                continue
            versions = ",".join(entry["versions"]) or "none"
            cells.append(versions if entry["lane_used"] == lane else f"-> {entry['lane_used']} ({versions})")
        lines.append(f"{app:<8} {cells[0]:<14} {cells[1]}")
    return "\n".join(lines)


# the control channel -----------------------------------------------------------------------------


class ControlServer:
    """POST /release?service=&version=, /approve?service=, /undo?service=; GET /status. 127.0.0.1 only."""

    def __init__(self, rollout: DemoRollout, port: int = 0) -> None:
        self.rollout = rollout
        handler = type("Handler", (_ControlHandler,), {"rollout": rollout})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="demo-control", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> ControlServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ControlHandler(BaseHTTPRequestHandler):
    rollout: DemoRollout

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the stdlib's name)
        pass  # the demo's terminal shows the gestures themselves, not an access log

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/status":
            self._reply(404, {"error": "GET /status, or POST /release, /approve, /undo"})
            return
        self._run(self.rollout.status)

    def do_POST(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        gestures = {"/release": lambda: self.rollout.release(query["service"], query["version"]),
                    "/approve": lambda: self.rollout.approve(query["service"]),
                    "/undo": lambda: self.rollout.undo(query["service"])}
        gesture = gestures.get(parts.path)
        if gesture is None:
            self._reply(404, {"error": f"no gesture {parts.path}"})
            return
        self._run(lambda: {"message": gesture()})

    def _run(self, action) -> None:
        try:
            answer = action()
        except KeyError as exc:
            self._reply(400, {"error": f"missing parameter {exc}"})
        except RolloutError as exc:
            self._reply(409, {"error": str(exc)})
        except (TimeoutError, RuntimeError, OSError) as exc:
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
        else:
            if "message" in answer:
                print(answer["message"], flush=True)
            self._reply(200, answer)

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def write_state(path: Path, cluster: DemoCluster, control_url: str) -> None:
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps({"pid": os.getpid(), "control": control_url, "gateway": cluster.gateway_url,
                                  "gateway_admin": cluster.gateway_admin_url}))
    os.replace(staged, path)


class ControlClientError(Exception):
    """No demo is running at the state file's address, or it refused the gesture."""


def control_request(state_file: Path, method: str, path: str, **query: str) -> dict:
    """Send one gesture to the running demo named by `state_file`."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise ControlClientError(f"no running demo found ({state_file}: {exc}); start one with `laneproxy demo`") from exc
    url = state["control"] + path + ("?" + urllib.parse.urlencode(query) if query else "")
    request = urllib.request.Request(url, method=method)
    try:
        with _DIRECT.open(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ControlClientError(json.load(exc).get("error", str(exc))) from exc
    except OSError as exc:
        raise ControlClientError(f"the demo at {state['control']} does not answer ({exc}); is it still running?") from exc

