"""Pod churn on the real node, under continuous GET and POST traffic through the gateway and the sidecars: the
lifecycle issue's acceptance ("Zero lost requests through pod churn").

The seed (deploy/examples/seed-local, applied as a user applies it) with every Deployment at two replicas, the
gateway's included: deleting any pod and a rolling update of each Deployment lose no request and leak none.
With the seed's one replica, deleting mockb's only pod fails requests only while mockb has no ready pod, and
no endpoint of another service is ejected for it. An injected app that calls another service in its first
second and opens a plain TCP connection at start succeeds (the proxy is ready before the app), neither the app
nor its sidecar (on the controller's xDS source) has an API token, and an injected Job completes (its sidecar
keeps the direct source and a token: it reads its own pod to exit with the app).

Traffic is bounded (a few threads, one request at a time each, at most `limit` requests) and goes from the host
to the gateway's NodePort on the node address only. No version changes here, so the lane oracle is simple: every
hop of every answer must be v1 (the canary lane has no canary pods and falls back to base at each hop); the
seed story with its canaries is tests/cluster/test_seed.py.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.cluster.node import NODE_IP, REPO, Cluster
from tests.image.hosttools import kubectl as host_kubectl

GATEWAY_PORT = 30080
SERVICES = ("mocka", "mockb", "mockc")
NAMESPACE = "default"
CHAIN = re.compile(r"^mocka\(version: (v\d+), ip: [\d.]+\)-> mockb\(version: (v\d+), ip: [\d.]+\)-> "
                   r"mockc\(version: (v\d+), ip: [\d.]+\)$")


@dataclass
class Outcome:
    started: float
    finished: float
    method: str
    lane: str
    status: int
    body: str


@dataclass
class Traffic:
    """GETs and POSTs (never retried by the client) across base, canary and untagged, each with its own trace id."""

    workers: int = 3
    limit: int = 30000
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(500000))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Traffic:
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, args=(n,), name=f"churn-traffic-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self, n: int) -> None:
        rng = random.Random(n)
        connection = http.client.HTTPConnection(NODE_IP, GATEWAY_PORT, timeout=15)
        while not self._stop.is_set():
            with self._lock:
                if len(self.outcomes) >= self.limit:
                    return
                trace = next(self._ids)
            lane = ("base", "canary", "untagged")[trace % 3]
            method = "POST" if (trace // 3) % 2 else "GET"
            headers = {"my-request-id": str(trace)}
            if lane != "untagged":
                headers["x-asm-prefer-tag"] = lane
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
                connection = http.client.HTTPConnection(NODE_IP, GATEWAY_PORT, timeout=15)
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), method, lane, status, text))
            time.sleep(rng.uniform(0.0, 0.02))

    def judge(self, since: float = 0.0) -> dict:
        with self._lock:
            outcomes = [o for o in self.outcomes if o.started >= since]
        failures = [o for o in outcomes if o.status != 200]
        leaks = [o for o in outcomes if o.status == 200 and (not CHAIN.match(o.body)
                                                              or set(CHAIN.match(o.body).groups()) != {"v1"})]
        return {"requests": len(outcomes), "gets": sum(o.method == "GET" for o in outcomes),
                "posts": sum(o.method == "POST" for o in outcomes), "failures": len(failures), "leaks": len(leaks),
                "failure_samples": [f"{o.method} {o.lane} {o.status} {o.body[:160]}" for o in failures[:8]],
                "leak_samples": [f"{o.method} {o.lane} {o.body[:160]}" for o in leaks[:8]],
                "failed_at": [o.finished for o in failures]}


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict]:
    return [p for p in cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
            if p["metadata"].get("deletionTimestamp") is None]


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def wait_rollout(cluster: Cluster, namespace: str, deployment: str, timeout: int = 180) -> None:
    cluster.kubectl("rollout", "status", f"deployment/{deployment}", "-n", namespace, f"--timeout={timeout}s",
                    timeout=timeout + 10)


def wait_for(probe, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if probe():
                return time.monotonic() - began
        except (subprocess.SubprocessError, RuntimeError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


DEPLOYMENTS = [(NAMESPACE, f"{s}-v1", f"app={s}") for s in SERVICES] + \
    [("istio-system", "ingressgateway", "app=ingressgateway")]


def scale(cluster: Cluster, replicas: int) -> None:
    for namespace, deployment, _ in DEPLOYMENTS:
        cluster.kubectl("scale", f"deployment/{deployment}", "-n", namespace, f"--replicas={replicas}")
    for namespace, deployment, selector in DEPLOYMENTS:
        wait_rollout(cluster, namespace, deployment)
        wait_for(lambda n=namespace, s=selector: len([p for p in pods(cluster, n, s) if ready(p)]) == replicas
                 and len(pods(cluster, n, s)) == replicas, 180, f"{deployment} at {replicas} ready pods")


def sidecar_log(cluster: Cluster, pod: str) -> str:
    result = cluster.kubectl("logs", pod, "-c", "laneproxy", "-n", NAMESPACE, check=False, timeout=30)
    return result.stdout if result.returncode == 0 else ""


def admin_get(cluster: Cluster, namespace: str, pod: str, container: str, path: str) -> str:
    script = ("import urllib.request,sys;print(urllib.request.urlopen('http://127.0.0.1:15000'+sys.argv[1],"
              "timeout=5).read().decode())")
    return cluster.kubectl("exec", "-n", namespace, pod, "-c", container, "--", "python3", "-c", script, path,
                           timeout=30).stdout


def ejections(cluster: Cluster) -> dict[str, list[str]]:
    """Per proxy of the seed: its outlier ejection count and the hosts it has ejected now, from /clusters
    (an ejection lasts 30 s, so one made during a test is still listed right after it)."""
    found: dict[str, list[str]] = {}
    proxies = [("istio-system", p["metadata"]["name"], "gateway") for p in pods(cluster, "istio-system",
                                                                                 "app=ingressgateway")]
    proxies += [(NAMESPACE, p["metadata"]["name"], "laneproxy") for s in SERVICES
                for p in pods(cluster, NAMESPACE, f"app={s}")]
    for namespace, pod, container in proxies:
        ejected = [line.split("::health_flags::")[0] for line in admin_get(cluster, namespace, pod, container,
                                                                           "/clusters").splitlines()
                   if "::health_flags::" in line and "failed_outlier_check" in line]
        count = [line for line in admin_get(cluster, namespace, pod, container, "/stats").splitlines()
                 if line.startswith("laneproxy.outlier.ejections: ")]
        found[pod] = [*count, *ejected]
    return found


@pytest.fixture(scope="module")
def seed(cluster: Cluster) -> Iterator[Cluster]:
    """The seed applied as the README says for a local cluster, every pod with its sidecar."""
    began = time.monotonic()
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    env = {**os.environ, "PATH": f"{os.path.dirname(host_kubectl())}:{os.environ['PATH']}", "KUBECTL": host_kubectl()}
    try:
        for argv in ([str(REPO / "deploy" / "apply.sh"), str(REPO / "deploy" / "examples" / "seed-local"), kubeconfig],
                     [str(REPO / "deploy" / "base" / "webhook" / "certs.sh"), kubeconfig]):
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
        wait_rollout(cluster, "laneproxy-system", "laneproxy-webhook")
        cluster.kubectl("rollout", "restart", "-n", NAMESPACE, *(f"deployment/{s}-v1" for s in SERVICES))
        for namespace, deployment, _ in DEPLOYMENTS:
            wait_rollout(cluster, namespace, deployment)
        for service in SERVICES:
            wait_for(lambda s=service: len(pods(cluster, NAMESPACE, f"app={s}")) == 1, 120, f"one pod of {service}")
            (pod,) = pods(cluster, NAMESPACE, f"app={service}")
            assert [c["name"] for c in pod["spec"]["containers"]][0] == "laneproxy", f"{service}: no sidecar first"
    except (AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.fail(f"{exc}\n{cluster.diagnose(NAMESPACE, 'istio-system', 'laneproxy-system')}")
    deadline = time.monotonic() + 90
    while True:
        try:
            connection = http.client.HTTPConnection(NODE_IP, GATEWAY_PORT, timeout=10)
            connection.request("GET", "/mock", headers={"x-asm-prefer-tag": "base", "my-request-id": "1"})
            response = connection.getresponse()
            if response.status == 200 and CHAIN.match(response.read().decode()):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the seed never answered\n{cluster.diagnose(NAMESPACE, 'istio-system')}")
        time.sleep(1)
    sys.stderr.write(f"\n[churn] seed deployed and answering in {time.monotonic() - began:.1f}s\n")
    yield cluster


def report(what: str, counts: dict, **extra: object) -> None:
    shown = {k: v for k, v in counts.items() if k != "failed_at"}
    sys.stderr.write(f"\n[churn] {what}: {json.dumps({**shown, **extra}, indent=1)}\n")


def test_with_two_replicas_deleting_any_pod_and_rolling_each_deployment_loses_and_leaks_no_request(seed: Cluster):
    cluster = seed
    scale(cluster, 2)
    traffic = Traffic().start()
    began = time.monotonic()
    steps: dict[str, float] = {}
    stops: dict[str, list[str]] = {}
    try:
        time.sleep(3)
        for namespace, deployment, selector in DEPLOYMENTS:
            victim = pods(cluster, namespace, selector)[0]["metadata"]["name"]
            step = time.monotonic()
            cluster.kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")
            if namespace == NAMESPACE:
                # The kubelet's preStop reached the sidecar and it waited (the app first): read while the pod lasts.
                wait_for(lambda v=victim: "app_stopped_s" in sidecar_log(cluster, v), 45, f"{victim}'s preStop report")
                stops[victim] = [line.split("preStop: done ", 1)[1] for line in sidecar_log(cluster, victim)
                                 .splitlines() if "preStop: done " in line]
            wait_for(lambda n=namespace, s=selector: len([p for p in pods(cluster, n, s) if ready(p)]) == 2
                     and victim not in [p["metadata"]["name"] for p in pods(cluster, n, s)], 180,
                     f"{deployment} back at two ready pods")
            wait_for(lambda n=namespace, v=victim: v not in cluster.kubectl("get", "pods", "-n", n, "-o", "name")
                     .stdout, 120, f"{victim} gone")
            steps[f"delete {victim} at {step - began:.1f}s"] = round(time.monotonic() - step, 1)
        for namespace, deployment, _ in DEPLOYMENTS:
            step = time.monotonic()
            cluster.kubectl("rollout", "restart", f"deployment/{deployment}", "-n", namespace)
            wait_rollout(cluster, namespace, deployment)
            steps[f"rollout {deployment} at {step - began:.1f}s"] = round(time.monotonic() - step, 1)
        time.sleep(3)
    finally:
        traffic.stop()
    counts = traffic.judge()
    report("two replicas: delete every Deployment's pod, roll every Deployment", counts,
           seconds=round(time.monotonic() - began, 1), steps_s=steps, prestop_reports=stops,
           failures_at_s=[round(t - began, 1) for t in counts["failed_at"]])
    assert counts["requests"] > 200
    sys.stderr.write(f"\n[churn] two replicas: failed requests {counts['failures']} of {counts['requests']}, "
                     f"lane leaks {counts['leaks']}\n")
    assert counts["leaks"] == 0, counts["leak_samples"]
    assert counts["failures"] == 0, counts["failure_samples"]


def test_with_one_replica_deleting_mockbs_only_pod_fails_requests_only_while_it_has_no_ready_pod(seed: Cluster):
    cluster = seed
    scale(cluster, 1)
    before = ejections(cluster)
    traffic = Traffic().start()
    unready: list[tuple[float, float]] = []  # (from, to): mockb had no ready pod
    try:
        time.sleep(3)
        (victim,) = pods(cluster, NAMESPACE, "app=mockb")
        cluster.kubectl("delete", "pod", victim["metadata"]["name"], "-n", NAMESPACE, "--wait=false")
        # The endpoint controller's view of mockb: the window with no ready address, sampled every 0.2 s.
        deadline = time.monotonic() + 120
        gap_began: float | None = None
        recovered = False
        while time.monotonic() < deadline and not recovered:
            sampled = time.monotonic()
            subsets = cluster.get_json("endpoints", "mockb", "-n", NAMESPACE).get("subsets") or []
            has_ready = any(subset.get("addresses") for subset in subsets)
            if not has_ready and gap_began is None:
                gap_began = sampled
            elif has_ready and gap_began is not None:
                unready.append((gap_began, time.monotonic()))
                gap_began = None
                recovered = True
            time.sleep(0.2)
        time.sleep(5)
    finally:
        traffic.stop()
    counts = traffic.judge()
    after = ejections(cluster)
    # Half a second either side of each window: the endpoints object and the proxies' tables are read apart.
    outside = [t for t in counts["failed_at"] if not any(a - 0.5 <= t <= b + 1.5 for a, b in unready)]
    report("one replica: mockb's only pod deleted", counts,
           mockb_without_ready_pod_s=[round(b - a, 2) for a, b in unready], failures_outside_that_window=len(outside),
           ejections_before=before, ejections_after=after)
    assert counts["leaks"] == 0, counts["leak_samples"]
    assert not outside, counts["failure_samples"]
    ejected_elsewhere = {pod: [host for host in hosts if "::" in host and "mockb" not in host]
                         for pod, hosts in after.items()}
    assert not any(ejected_elsewhere.values()), ejected_elsewhere


EARLY_APP = r"""
import socket, sys, time, urllib.request
began = time.monotonic()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(urllib.request.Request("http://mockb:8000/", headers={"my-request-id": "777"}), timeout=10) as r:
        print("first-call", r.status, round(time.monotonic() - began, 3), r.read().decode(), flush=True)
except Exception as exc:
    print("first-call failed", type(exc).__name__, exc, round(time.monotonic() - began, 3), flush=True)
try:
    s = socket.create_connection(("mockc", 8000), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: mockc:8000\r\nConnection: close\r\n\r\n")
    print("tcp", s.recv(200).split(b"\r\n")[0].decode(), flush=True)
except Exception as exc:
    print("tcp failed", type(exc).__name__, exc, flush=True)
import os
print("token", os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"), flush=True)
if len(sys.argv) < 2:
    time.sleep(3600)
"""


def injected_pod(name: str, *, job: bool = False) -> dict:
    spec = {
        "serviceAccountName": "laneproxy",
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
        "containers": [{"name": "app", "image": "localhost/laneproxy:0.1.0", "imagePullPolicy": "Never",
                        "command": ["python3", "-c", EARLY_APP, *(["once"] if job else [])],
                        "ports": [{"containerPort": 8080}]}],
    }
    metadata = {"labels": {"app": name, "laneproxy-injection": "enabled"}}
    if job:
        spec["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"backoffLimit": 0, "template": {"metadata": metadata, "spec": spec}}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE, **metadata},
            "spec": spec}


def test_an_app_calling_out_at_once_succeeds_and_has_no_token_and_an_injected_job_completes(seed: Cluster):
    cluster = seed
    image = cluster.image
    early, job = injected_pod("early-caller"), injected_pod("early-job", job=True)
    for item in (early, job):
        item_spec = item["spec"] if item["kind"] == "Pod" else item["spec"]["template"]["spec"]
        item_spec["containers"][0]["image"] = image
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [early, job]}))
    try:
        wait_for(lambda: "first-call" in cluster.kubectl("logs", "early-caller", "-c", "app", "-n", NAMESPACE,
                                                         check=False).stdout
                 and "token" in cluster.kubectl("logs", "early-caller", "-c", "app", "-n", NAMESPACE,
                                                check=False).stdout, 120, "the early caller's report")
        log = cluster.kubectl("logs", "early-caller", "-c", "app", "-n", NAMESPACE).stdout
        stored = cluster.get_json("pod", "early-caller", "-n", NAMESPACE)
        sidecar_token = cluster.kubectl("exec", "early-caller", "-c", "laneproxy", "-n", NAMESPACE, "--", "python3",
                                        "-c", "import os;print(os.path.exists("
                                              "'/var/run/secrets/kubernetes.io/serviceaccount/token'))").stdout
        took = wait_for(lambda: cluster.get_json("job", "early-job", "-n", NAMESPACE).get("status", {})
                        .get("succeeded") == 1, 180, "the injected Job to complete")
        job_pods = cluster.get_json("pods", "-n", NAMESPACE, "-l", "job-name=early-job")["items"]
        sys.stderr.write(f"\n[churn] early caller:\n{log}\n[churn] job completed in {took:.1f}s\n")
        assert [c["name"] for c in stored["spec"]["containers"]] == ["laneproxy", "app"]
        assert "first-call 200" in log and "mockb(version: v1" in log, log
        assert "tcp HTTP/1.1 200 OK" in log, log
        assert "token False" in log, log
        assert sidecar_token.strip() == "False"  # on the xDS source: no credentials in the pod at all
        job_sidecar = next(c for c in job_pods[0]["spec"]["containers"] if c["name"] == "laneproxy")
        assert {"name": "LANEPROXY_SOURCE", "value": "kubernetes"} in job_sidecar["env"]
        assert job_pods and all(p["status"]["phase"] == "Succeeded" for p in job_pods), \
            [p["status"] for p in job_pods]
    except (AssertionError, RuntimeError, subprocess.SubprocessError):
        sys.stderr.write(cluster.diagnose(NAMESPACE))
        raise
    finally:
        cluster.kubectl("delete", "pod/early-caller", "job/early-job", "-n", NAMESPACE, "--wait=false", check=False)
