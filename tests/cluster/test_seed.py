"""The seed scenario on the real node: deploy/examples/seed-local applied as a user applies it (deploy/apply.sh,
the injector's certs.sh, a restart of the mocks), the gateway reached from the host on its NodePort, and the
seed's steps 5-7 for mocka, mockb and mockc (a new version as a Kruise canary, approve, undo) driven through the
Rollout stand-in under continuous GET and POST traffic from the host in the base, canary and untagged lanes,
each request with its own trace id, every chain checked with the load test's lane-leak oracle
(loadtests/expectations.py) against the gateway's /lanes over time.

Every sidecar and both gateways take their tables from `laneproxy controller` over xDS (deploy/base/controller,
two replicas) and hold no API token. Mid-story, once the canaries are up: the controller replica holding the most
proxy streams is killed (SIGKILL, its pod force-deleted), and every proxy must resume from the other replica, as
its stats and the survivor's show; then kube-apiserver is stopped for 30 s under the same traffic, and once it is
back the tables must follow the story's next change (every proxy's endpoints of mocka's base lane).

Lane leaks must be 0, and failed requests 0 (the whole story, and the windows of the kill and of the outage).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from loadtests.expectations import Expectations, MembershipError, MembershipHistory, expected_chains, judge
from tests.cluster.node import NODE_IP, REPO, Cluster
from tests.cluster.rollout_standin import ROLLOUT_CRD, RolloutStandIn, update_template
from tests.image.hosttools import kubectl as host_kubectl

GATEWAY_PORT = 30080
SERVICES = ("mocka", "mockb", "mockc")
NAMESPACE = "default"


# Created mid-story: a lane of another swimlane group, one that does not exist (any more). It must be left out and
# say why on itself, and hold back no update of the story's group.
BROKEN_LANE = {"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLane",
               "metadata": {"name": "orphan-mid-story", "labels": {"swimlane-group": "retired"}},
               "spec": {"labelSelector": {"ASM_TRAFFIC_TAG": "orphan"}, "services": []}}


CONTROLLER_NAMESPACE = "laneproxy-system"
CONTROLLER_SELECTOR = "app.kubernetes.io/component=controller"
CONTROLLER_ADMIN_PORT = 15014  # read-only: /ready, /stats
PROXY_ADMIN_PORT = 15000
API_OUTAGE_SECONDS = 30
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def stats_of(cluster: Cluster, namespace: str, pod: str, container: str, port: int) -> dict[str, str]:
    """An admin's /stats (`name: value` lines), read inside its pod."""
    script = ("import urllib.request,sys;print(urllib.request.urlopen('http://127.0.0.1:'+sys.argv[1]+'/stats',"
              "timeout=5).read().decode())")
    out = cluster.kubectl("exec", "-n", namespace, pod, "-c", container, "--", "python3", "-c", script, str(port),
                          timeout=30)
    return {key: value.strip().strip('"') for key, _, value in (line.partition(": ") for line in out.stdout.splitlines())
            if value}


def proxies_of(cluster: Cluster, gateways: list[str]) -> list[tuple[str, str, str]]:
    """(namespace, pod, container) of both gateways and every sidecar of the chain's pods now."""
    return [("istio-system", gateway, "gateway") for gateway in gateways] + \
        [(NAMESPACE, p["metadata"]["name"], "laneproxy") for s in SERVICES for p in pods(cluster, NAMESPACE, f"app={s}")]


def controller_stats(cluster: Cluster) -> dict[str, dict[str, str]]:
    return {p["metadata"]["name"]: stats_of(cluster, CONTROLLER_NAMESPACE, p["metadata"]["name"], "controller",
                                            CONTROLLER_ADMIN_PORT)
            for p in pods(cluster, CONTROLLER_NAMESPACE, CONTROLLER_SELECTOR)}


def kill_controller_replica(cluster: Cluster, gateways: list[str]) -> dict:
    """SIGKILL the controller replica with the most proxy streams (and force-delete its pod, so the replacement
    starts elsewhere): every proxy must resume, and the ones it served from the other replica."""
    before = controller_stats(cluster)
    assert len(before) == 2, f"expected two controller replicas: {sorted(before)}"
    victim = max(before, key=lambda name: int(before[name]["controller.xds.streams_connected"]))
    (survivor,) = set(before) - {victim}
    proxies = proxies_of(cluster, gateways)
    proxies_before = {pod: stats_of(cluster, ns, pod, container, PROXY_ADMIN_PORT) for ns, pod, container in proxies}
    status = cluster.get_json("pod", victim, "-n", CONTROLLER_NAMESPACE)["status"]
    container_id = next(c["containerID"] for c in status["containerStatuses"] if c["name"] == "controller")
    killed_at = time.monotonic()
    cluster.kubectl("delete", "pod", victim, "-n", CONTROLLER_NAMESPACE, "--grace-period=0", "--force", "--wait=false")
    cluster.ctr("tasks", "kill", "--signal", "SIGKILL", container_id.split("://", 1)[1], check=False)
    moved = int(before[victim]["controller.xds.streams_connected"])
    after: dict[str, dict[str, str]] = {}

    def resumed() -> bool:
        after.clear()
        after.update({pod: stats_of(cluster, ns, pod, container, PROXY_ADMIN_PORT) for ns, pod, container in proxies})
        reconnects = sum(int(after[p].get("laneproxy.config.xds.reconnects", 0))
                         - int(proxies_before[p].get("laneproxy.config.xds.reconnects", 0)) for p in after)
        return all(stats.get("laneproxy.config.xds.connected") == "1" for stats in after.values()) and reconnects >= moved

    took = wait_for(resumed, 90, "every proxy connected again after the controller replica was killed")
    survivor_after = stats_of(cluster, CONTROLLER_NAMESPACE, survivor, "controller", CONTROLLER_ADMIN_PORT)
    keys = ("laneproxy.config.xds.connected", "laneproxy.config.xds.reconnects", "laneproxy.config.sync.xds.controller",
            "laneproxy.config.version")
    return {
        "victim": victim, "survivor": survivor, "killed_at": killed_at, "resumed_s": round(took, 1),
        "victim_streams_before": moved,
        "survivor_streams_before": int(before[survivor]["controller.xds.streams_connected"]),
        "survivor_streams_after": int(survivor_after["controller.xds.streams_connected"]),
        "survivor_streams_total_gain": int(survivor_after["controller.xds.streams_total"])
        - int(before[survivor]["controller.xds.streams_total"]),
        "proxies_before": {p: {k: v.get(k) for k in keys} for p, v in proxies_before.items()},
        "proxies_after": {p: {k: v.get(k) for k in keys} for p, v in after.items()},
    }


def stop_the_api_server(cluster: Cluster, seconds: float) -> dict:
    """kube-apiserver stopped for `seconds` under the story's traffic, then started again, serving."""
    stopped = time.monotonic()
    cluster.stop_apiserver()
    refused = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=30)
    time.sleep(max(0.0, seconds - (time.monotonic() - stopped)))
    restarted = time.monotonic()
    cluster.start_apiserver()
    serving = time.monotonic()
    return {"stopped": stopped, "restarted": restarted, "serving": serving, "down_s": round(serving - stopped, 1),
            "kubectl_while_down": (refused.returncode, refused.stderr.strip()[-120:])}


def tables_follow(cluster: Cluster, gateways: list[str], service: str, lane: str, timeout: float = 60) -> dict:
    """Seconds until every proxy's endpoints of `service` in `lane` are the addresses of its ready pods in that lane."""
    wanted = {p["status"]["podIP"] for p in pods(cluster, NAMESPACE, f"app={service},ASM_TRAFFIC_TAG={lane}")
              if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
    key = f"{NAMESPACE}/{service}"
    seen: dict[str, list[str]] = {}

    def followed() -> bool:
        for namespace, pod, container in proxies_of(cluster, gateways):
            try:
                endpoints = lanes_of(cluster, namespace, pod, container)["services"][key]["lanes"][lane]["endpoints"]
            except (RuntimeError, KeyError, ValueError, subprocess.SubprocessError) as exc:
                seen[pod] = [repr(exc)]
                return False
            seen[pod] = sorted(endpoints)
            if {address.rsplit(":", 1)[0] for address in endpoints} != wanted:
                return False
        return True

    took = wait_for(followed, timeout, f"every proxy's {service}/{lane} endpoints to be {sorted(wanted)}: {seen}")
    return {"seconds": round(took, 1), "addresses": sorted(wanted), "proxies": len(seen)}


def lanes_of(cluster: Cluster, namespace: str, pod: str, container: str) -> dict:
    """A proxy's /lanes, read inside its pod (the admin listens on the pod's loopback only)."""
    script = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:15000/lanes',timeout=3).read().decode())"
    out = cluster.kubectl("exec", "-n", namespace, pod, "-c", container, "--", "python3", "-c", script, timeout=30)
    return json.loads(out.stdout)


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict]:
    return [p for p in cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
            if p["metadata"].get("deletionTimestamp") is None]


def wait_rollout(cluster: Cluster, namespace: str, deployment: str, timeout: int = 120) -> None:
    cluster.kubectl("rollout", "status", f"deployment/{deployment}", "-n", namespace, f"--timeout={timeout}s",
                    timeout=timeout + 10)


@dataclass
class Truth:
    """The versions the Deployments run per lane: what the oracle expects, independent of the proxies' tables.
    During a change both the old and the new truth are allowed."""

    current: list[Expectations] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, *possible: Expectations) -> None:
        with self.lock:
            self.current = list(possible)

    def get(self) -> list[Expectations]:
        with self.lock:
            return list(self.current)


def expectations(versions: dict[str, dict[str, str]]) -> Expectations:
    return Expectations.from_document({
        "chain": [f"{NAMESPACE}/{s}" for s in SERVICES],
        "versions": {f"{NAMESPACE}/{s}": lanes for s, lanes in versions.items()},
    })


@dataclass
class Traffic:
    """Bounded load from the host: `workers` threads, each sending one request at a time (no retries), until
    stopped or `limit` requests; GETs and POSTs alternate, lanes rotate, every request has its own trace id."""

    url_host: str
    port: int
    history: MembershipHistory
    truth: Truth
    workers: int = 3
    limit: int = 50000
    results: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(100000))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _responses: list[tuple] = field(default_factory=list)

    def start(self) -> Traffic:
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, args=(n,), name=f"traffic-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self, n: int) -> None:
        lanes = [("base", "base"), ("canary", "canary"), ("untagged", None)]
        rng = random.Random(n)
        connection = http.client.HTTPConnection(self.url_host, self.port, timeout=10)
        while not self._stop.is_set():
            with self._lock:
                if len(self._responses) >= self.limit:
                    return
                trace = next(self._ids)
            lane, tag = lanes[trace % 3]
            method = "POST" if (trace // 3) % 2 else "GET"
            headers = {"my-request-id": str(trace)}
            if tag:
                headers["x-asm-prefer-tag"] = tag
            body = json.dumps({"n": trace}).encode() if method == "POST" else None
            if body:
                headers["content-type"] = "application/json"
            started = time.monotonic()
            try:
                connection.request(method, "/mock", body=body, headers=headers)
                response = connection.getresponse()
                status, text = response.status, response.read().decode(errors="replace")
            except (OSError, http.client.HTTPException) as exc:
                status, text = 0, f"{type(exc).__name__}: {exc}"
                connection.close()
                connection = http.client.HTTPConnection(self.url_host, self.port, timeout=10)
            finished = time.monotonic()
            with self._lock:
                self._responses.append((lane, method, trace, started, finished, status, text))
            time.sleep(rng.uniform(0.0, 0.02))

    def judge_all(self) -> None:
        """Judge every response once the membership polls after the last one are in (judging while sending
        would hold each sender until the next poll)."""
        for response in self._responses:
            self._judge(*response)

    def _judge(self, lane: str, method: str, trace: int, started: float, finished: float, status: int,
               text: str) -> None:
        # The versions each hop may have come from the polls around the response (each poll recorded the truth
        # of its time); the expectations passed to judge() only name the chain's services.
        outcome, detail = "error", text[:200]
        try:
            accepted = self.history.accepted(lane, started, finished)
        except MembershipError as exc:
            detail = str(exc)
        else:
            verdict = judge(self.truth.get()[0], status, text, accepted.hops)
            outcome = verdict.outcome
            detail = repr(verdict.failure) if verdict.failure else ""
        with self._lock:
            self.results[outcome] += 1
            if outcome == "error":
                self.failures.append(f"{method} {lane} trace {trace}: {detail}")
            elif outcome == "leak":
                self.leaks.append(f"{method} {lane} trace {trace}: {detail}")


@dataclass
class MembershipPoller:
    """Polls the gateway's /lanes and records, per truth that may hold, the chains each lane must produce."""

    cluster: Cluster
    gateway_pod: str
    history: MembershipHistory
    truth: Truth
    changes: list[tuple[float, dict]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MembershipPoller:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def poll(self) -> None:
        begun = time.monotonic()
        lanes = lanes_of(self.cluster, "istio-system", self.gateway_pod, "gateway")
        ended = time.monotonic()
        states = [expected_chains(lanes, possible) for possible in self.truth.get()]
        if self.history.record(begun, ended, states):
            self.changes.append((ended, {lane: sorted(map(str, c)) for lane, c in self.history.latest.chains.items()}))

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.poll()
            except (subprocess.SubprocessError, ValueError, OSError, RuntimeError):
                continue


@pytest.fixture(scope="module")
def seed(cluster: Cluster) -> Iterator[Cluster]:
    """The seed applied as the README says, for a local cluster without Kruise and Istio."""
    try:
        kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
        env = {**os.environ, "KUBECTL": host_kubectl()}
        began = time.monotonic()
        for argv in ([str(REPO / "deploy" / "apply.sh"), str(REPO / "deploy" / "examples" / "seed-local"), kubeconfig],
                     [str(REPO / "deploy" / "base" / "webhook" / "certs.sh"), kubeconfig]):
            result = subprocess.run(argv, env={**env, "PATH": f"{os.path.dirname(host_kubectl())}:{env['PATH']}"},
                                    capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
        wait_rollout(cluster, "laneproxy-system", "laneproxy-webhook")
        cluster.kubectl("rollout", "restart", "-n", NAMESPACE, *(f"deployment/{s}-v1" for s in SERVICES))
        for service in SERVICES:
            wait_rollout(cluster, NAMESPACE, f"{service}-v1")
        wait_rollout(cluster, "istio-system", "ingressgateway")
        for service in SERVICES:
            (pod,) = pods(cluster, NAMESPACE, f"app={service}")
            names = [c["name"] for c in pod["spec"]["containers"]]
            assert "laneproxy" in names, f"{service} has no sidecar: {names}"
        # Every proxy of the story on the controller's xDS source.
        proxies = [(p, "laneproxy") for s in SERVICES for p in pods(cluster, NAMESPACE, f"app={s}")]
        proxies += [(p, "gateway") for p in pods(cluster, "istio-system", "app=ingressgateway")]
        for pod, container in proxies:
            env = {e["name"]: e.get("value") for c in pod["spec"]["containers"] if c["name"] == container
                   for e in c.get("env", [])}
            assert str(env.get("LANEPROXY_SOURCE")).startswith("xds://laneproxy-controller."), \
                (pod["metadata"]["name"], env.get("LANEPROXY_SOURCE"))
    except (AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.fail(f"{exc}\n{cluster.diagnose(NAMESPACE, 'istio-system', 'laneproxy-system')}")
    sys.stderr.write(f"\n[seed] deployed and injected in {time.monotonic() - began:.1f}s\n")
    yield cluster


def get(path: str, headers: dict[str, str]) -> tuple[int, str]:
    connection = http.client.HTTPConnection(NODE_IP, GATEWAY_PORT, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_the_seed_answers_through_the_gateway_node_port_with_each_pods_address(seed: Cluster) -> None:
    deadline = time.monotonic() + 60
    status, body = 0, ""
    while time.monotonic() < deadline:
        try:
            status, body = get("/mock", {"x-asm-prefer-tag": "base", "my-request-id": "10001"})
        except OSError as exc:
            body = str(exc)
        if status == 200:
            break
        time.sleep(1)
    pod_ips = {s: pods(seed, NAMESPACE, f"app={s}")[0]["status"]["podIP"] for s in SERVICES}
    expected = "-> ".join(f"{s}(version: v1, ip: {pod_ips[s]})" for s in SERVICES)
    assert (status, body) == (200, expected)


def patch_version(cluster: Cluster, deployment: str, version: str) -> None:
    """Step 5 of the seed: a new version of the app in the Deployment's template (admitted as Kruise admits it)."""
    update_template(cluster, NAMESPACE, deployment, {
        "metadata": {"labels": {"version": version}},
        "spec": {"containers": [{"name": "default", "env": [{"name": "version", "value": version}]}]}})


def rollout_status(cluster: Cluster, name: str) -> dict:
    return cluster.get_json("rollouts.rollouts.kruise.io", name, "-n", NAMESPACE).get("status", {})


def wait_for(probe, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if probe():
            return time.monotonic() - began
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def approve(name: str, kubeconfig: str) -> None:
    """`kubectl kruise rollout approve`: the step's state set to StepReady on the status subresource."""
    subprocess.run([host_kubectl(), kubeconfig, "patch", "rollouts.rollouts.kruise.io", name, "-n", NAMESPACE,
                    "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"canaryStatus": {"currentStepState": "StepReady"}}})],
                   check=True, capture_output=True, timeout=60)


def undo(cluster: Cluster, deployment: str) -> None:
    """`kubectl kruise rollout undo` during a canary (its fast rollback): the paused workload's template goes
    back to that of the ReplicaSet still running the stable pods. `kubectl rollout undo` refuses a paused
    Deployment."""
    uid = cluster.get_json("deployment", deployment, "-n", NAMESPACE)["metadata"]["uid"]
    owned = [rs for rs in cluster.get_json("replicasets", "-n", NAMESPACE)["items"]
             if any(ref["uid"] == uid for ref in rs["metadata"].get("ownerReferences", []))
             and rs["status"].get("readyReplicas", 0) > 0]
    assert len(owned) == 1, f"expected one ReplicaSet with ready pods under {deployment}, got {len(owned)}"
    template = owned[0]["spec"]["template"]
    template["metadata"]["labels"].pop("pod-template-hash", None)
    cluster.kubectl("patch", "deployment", deployment, "-n", NAMESPACE, "--type=json",
                    "-p", json.dumps([{"op": "replace", "path": "/spec/template", "value": template}]))


@pytest.fixture(scope="module")
def story(seed: Cluster) -> Iterator[dict]:
    """Steps 5-7 for the three services under traffic; yields the counts and the membership changes."""
    cluster = seed
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(ROLLOUT_CRD))
    cluster.kubectl("wait", "--for=condition=established", "crd/rollouts.rollouts.kruise.io", "--timeout=60s")
    cluster.kubectl("apply", "-f", str(REPO / "deploy" / "examples" / "seed" / "rollouts.yaml"))
    standin = RolloutStandIn(cluster, NAMESPACE).start()
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    for service in SERVICES:
        wait_for(lambda s=service: rollout_status(cluster, f"rollouts-{s}").get("phase") == "Healthy", 30,
                 f"rollouts-{service} Healthy")

    versions = {s: {"base": "v1"} for s in SERVICES}
    truth = Truth()
    truth.set(expectations(versions))
    history = MembershipHistory(grace=1.0)
    # Two gateway replicas (deploy/base/gateway): the oracle follows the first one's /lanes; the propagation
    # times below are measured on both.
    gateways = sorted(p["metadata"]["name"] for p in pods(cluster, "istio-system", "app=ingressgateway"))
    poller = MembershipPoller(cluster, gateways[0], history, truth).start()
    traffic = Traffic(NODE_IP, GATEWAY_PORT, history, truth).start()
    propagation: dict[str, float] = {}
    broken: dict = {"status": {}, "skipped_objects": {}}
    controller_kill: dict = {}
    outage: dict = {}
    followed: dict = {}
    began = time.monotonic()
    try:
        time.sleep(5)
        for service in SERVICES:  # step 5: a v2 of each service as a canary
            before = expectations(versions)
            versions[service]["canary"] = "v2"
            truth.set(before, expectations(versions))
            patch_version(cluster, f"{service}-v1", "v2")
            wait_for(lambda s=service: rollout_status(cluster, f"rollouts-{s}").get("canaryStatus", {})
                     .get("currentStepState") == "StepPaused", 180, f"the canary of {service}")
            propagation.update(propagation_times(cluster, gateways, service, "canary"))
            truth.set(expectations(versions))
            time.sleep(3)
        # The canaries are up: a controller replica dies, then the API server goes away for a while.
        controller_kill = kill_controller_replica(cluster, gateways)
        time.sleep(3)
        outage = stop_the_api_server(cluster, API_OUTAGE_SECONDS)
        wait_for(lambda: len([p for p in pods(cluster, CONTROLLER_NAMESPACE, CONTROLLER_SELECTOR)
                              if any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in p["status"].get("conditions", []))]) == 2, 180,
                 "both controller replicas ready after the API server returned")
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(BROKEN_LANE))  # the rest of the story goes on beside it
        for service in SERVICES:  # step 6: approve
            before = expectations(versions)
            versions[service] = {"base": "v2"}
            truth.set(before, expectations(versions))
            approve(f"rollouts-{service}", kubeconfig)
            wait_for(lambda s=service: rollout_status(cluster, f"rollouts-{s}").get("phase") == "Healthy"
                     and not rollout_status(cluster, f"rollouts-{s}").get("canaryStatus"), 180,
                     f"{service} promoted")
            wait_rollout(cluster, NAMESPACE, f"{service}-v1")
            if service == SERVICES[0]:  # the first change after the API server's return reaches every proxy
                followed = tables_follow(cluster, gateways, service, "base")
            time.sleep(3)
            truth.set(expectations(versions))
        # step 7: a v3 canary of mocka, then undo
        before = expectations(versions)
        versions["mocka"]["canary"] = "v3"
        truth.set(before, expectations(versions))
        patch_version(cluster, "mocka-v1", "v3")
        wait_for(lambda: rollout_status(cluster, "rollouts-mocka").get("canaryStatus", {})
                 .get("currentStepState") == "StepPaused", 180, "the v3 canary of mocka")
        time.sleep(3)
        undo(cluster, "mocka-v1")
        wait_for(lambda: not rollout_status(cluster, "rollouts-mocka").get("canaryStatus"), 120, "mocka undone")
        versions["mocka"] = {"base": "v2"}
        time.sleep(5)
        truth.set(expectations(versions))
        time.sleep(3)
        broken = {"status": cluster.get_json("asmswimlanes.istio.alibabacloud.com",
                                             BROKEN_LANE["metadata"]["name"]).get("status") or {},
                  # The controller is the one watcher: it leaves the object out, so its replicas count it (the
                  # proxies only ever receive the accepted groups).
                  "skipped_objects": {pod: int(stats["controller.config.skipped_objects"])
                                      for pod, stats in controller_stats(cluster).items()}}
    finally:
        cluster.kubectl("delete", "asmswimlanes.istio.alibabacloud.com", BROKEN_LANE["metadata"]["name"],
                        "--wait=false", check=False)
        traffic.stop()
        time.sleep(2)  # a membership poll that begins after the last response
        poller.stop()
        standin.stop()
        traffic.judge_all()
        sys.stderr.write(f"\n[seed story] {dict(traffic.results)} in {time.monotonic() - began:.0f}s; "
                         f"propagation {propagation}; stand-in errors {standin.errors[:5]}\n"
                         f"first leaks {traffic.leaks[:5]}\nfirst failures {traffic.failures[:5]}\n"
                         f"membership changes {poller.changes[:20]}\n")
    def window(began_at: float | None, ended_at: float | None) -> dict:
        """The story's requests that began in a window, and those that failed (any answer but 200)."""
        if began_at is None or ended_at is None:
            return {}
        inside = [r for r in traffic._responses if began_at <= r[3] <= ended_at]  # noqa: SLF001 - our own record
        return {"requests": len(inside), "failed": [f"{r[1]} {r[0]} {r[5]} {r[6][:120]}" for r in inside if r[5] != 200]}

    report = {
        "controller_kill": {**{k: v for k, v in controller_kill.items() if k != "killed_at"},
                            "traffic": window(controller_kill.get("killed_at"), controller_kill.get("killed_at", 0)
                                              + controller_kill.get("resumed_s", 0) + 5)},
        "api_outage": {**{k: v for k, v in outage.items() if k not in ("stopped", "restarted", "serving")},
                       "traffic": window(outage.get("stopped"), outage.get("serving"))},
        "followed_after_outage": followed,
        "requests": sum(traffic.results.values()), "ok": traffic.results["ok"], "failures": traffic.results["error"],
        "leaks": traffic.results["leak"], "seconds": round(time.monotonic() - began, 1),
        "propagation_s": {k: round(v, 2) for k, v in propagation.items()},
        "stand_in_errors": standin.errors[:5], "broken_lane": broken,
    }
    sys.stderr.write(f"\n[seed story] {json.dumps(report, indent=2)}\n"
                     f"first failures: {traffic.failures[:10]}\nfirst leaks: {traffic.leaks[:10]}\n")
    yield {**report, "failure_samples": traffic.failures[:20], "leak_samples": traffic.leaks[:20]}


def propagation_times(cluster: Cluster, gateway_pods: list[str], service: str, lane: str) -> dict[str, float]:
    """Seconds from the moment the new pods of `service` in `lane` are ready (the Rollout step reached) until the
    gateway and every sidecar route that lane of the service to its own pods, read from each one's /lanes."""
    began = time.monotonic()
    proxies = [("istio-system", gateway_pod, "gateway") for gateway_pod in gateway_pods]
    proxies += [(NAMESPACE, p["metadata"]["name"], "laneproxy") for s in SERVICES
                for p in pods(cluster, NAMESPACE, f"app={s}")]
    key = f"{NAMESPACE}/{service}"
    times: dict[str, float] = {}
    while len(times) < len(proxies) and time.monotonic() - began < 60:
        for namespace, pod, container in proxies:
            if pod in times:
                continue
            try:
                routes = lanes_of(cluster, namespace, pod, container)["services"][key]["lanes"]
            except (RuntimeError, KeyError, ValueError, subprocess.SubprocessError):
                continue
            if routes.get(lane, {}).get("lane_used") == lane:
                times[pod] = time.monotonic() - began
    missing = [pod for _, pod, _ in proxies if pod not in times]
    assert not missing, f"{service}'s {lane} pods never reached {missing}"
    return {f"{service}/{lane} -> {pod}": seconds for pod, seconds in times.items()}


def test_the_seed_story_keeps_every_request_in_its_lane(story: dict) -> None:
    assert story["requests"] > 100
    assert story["leaks"] == 0, story["leak_samples"]


def test_the_seed_story_loses_no_request(story: dict) -> None:
    """Canary creation, approve and undo of all three services replace pods under traffic: none may be lost."""
    sys.stderr.write(f"\n[seed story] failed requests: {story['failures']} of {story['requests']}; "
                     f"lane leaks: {story['leaks']}\n")
    assert story["requests"] > 100
    assert story["failures"] == 0, story["failure_samples"][:10]


def test_a_broken_lane_of_another_group_created_mid_story_is_left_out_says_why_and_is_counted(story: dict) -> None:
    """The story around it passes (the tests above); the object itself and every controller replica's stats say it
    was skipped."""
    status = story["broken_lane"]["status"]
    assert "retired" in f"{status.get('error', '')} {status.get('validationMessage', '')}", status
    skipped = story["broken_lane"]["skipped_objects"]
    assert skipped and all(count >= 1 for count in skipped.values()), skipped


def test_killing_a_controller_replica_mid_story_moves_its_proxies_to_the_other_replica(story: dict) -> None:
    kill = story["controller_kill"]
    sys.stderr.write(f"\n[seed story] controller replica killed: {json.dumps(kill, indent=1)}\n")
    assert kill["victim_streams_before"] >= 1, kill
    # Every proxy is connected again, and the survivor took at least the streams the killed replica held.
    assert all(stats["laneproxy.config.xds.connected"] == "1" for stats in kill["proxies_after"].values()), kill
    reconnects = {pod: int(kill["proxies_after"][pod]["laneproxy.config.xds.reconnects"])
                  - int(kill["proxies_before"][pod]["laneproxy.config.xds.reconnects"]) for pod in kill["proxies_after"]}
    assert sum(reconnects.values()) >= kill["victim_streams_before"], reconnects
    assert kill["survivor_streams_total_gain"] >= kill["victim_streams_before"], kill
    assert kill["traffic"]["requests"] > 10 and kill["traffic"]["failed"] == [], kill["traffic"]


def test_with_the_api_server_stopped_for_30_s_no_request_fails_and_the_tables_follow_once_it_returns(story: dict):
    outage = story["api_outage"]
    sys.stderr.write(f"\n[seed story] API server outage: {json.dumps(outage)}; then "
                     f"{json.dumps(story['followed_after_outage'])}\n")
    assert outage["down_s"] >= API_OUTAGE_SECONDS and outage["kubectl_while_down"][0] != 0, outage
    assert outage["traffic"]["requests"] > 30 and outage["traffic"]["failed"] == [], outage["traffic"]
    assert story["followed_after_outage"]["proxies"] >= 5, story["followed_after_outage"]


def test_a_sidecars_pod_holds_no_api_token_and_its_account_cannot_read_the_api(seed: Cluster) -> None:
    """`kubectl auth can-i` as each proxy's service account, and the token directory inside each container."""
    cluster = seed
    reads = [("list", "pods"), ("watch", "pods"), ("list", "services"), ("list", "endpointslices.discovery.k8s.io"),
             ("get", "asmswimlanegroups.istio.alibabacloud.com"), ("list", "asmswimlanes.istio.alibabacloud.com")]

    def can(account: str, verb: str, resource: str) -> str:
        return cluster.kubectl("auth", "can-i", verb, resource, "--all-namespaces",
                               f"--as=system:serviceaccount:{account}", check=False).stdout.strip()

    script = (f"import os;p={TOKEN_DIR!r};print(sorted(os.listdir(p)) if os.path.isdir(p) else 'absent')")
    found: dict[str, object] = {}
    checked = [(NAMESPACE, p) for s in SERVICES for p in pods(cluster, NAMESPACE, f"app={s}")]
    checked += [("istio-system", p) for p in pods(cluster, "istio-system", "app=ingressgateway")]
    for namespace, pod in checked:
        name = pod["metadata"]["name"]
        account = f"{namespace}:{pod['spec'].get('serviceAccountName', 'default')}"
        found[name] = {
            "automount": pod["spec"].get("automountServiceAccountToken"),
            "token_dirs": {c["name"]: cluster.kubectl("exec", "-n", namespace, name, "-c", c["name"], "--", "python3",
                                                      "-c", script, timeout=30).stdout.strip()
                           for c in pod["spec"]["containers"]},
            "can_i": {f"{verb} {resource}": can(account, verb, resource) for verb, resource in reads},
        }
    controller = {f"{verb} {resource}": can(f"{CONTROLLER_NAMESPACE}:laneproxy-controller", verb, resource)
                  for verb, resource in reads}
    sys.stderr.write(f"\n[seed] credentials: {json.dumps(found, indent=1)}\ncontroller can-i {controller}\n")
    for name, seen in found.items():
        assert seen["automount"] is False, (name, seen)
        # A sidecar's token path is an empty directory; the gateway and the app containers have none at all.
        listings = dict(seen["token_dirs"])
        assert listings.pop("laneproxy", "[]") == "[]", (name, seen)
        assert all(listing == "absent" for listing in listings.values()), (name, seen)
        assert set(seen["can_i"].values()) == {"no"}, (name, seen)
    assert set(controller.values()) == {"yes"}, controller  # the question is asked right: the reader can
