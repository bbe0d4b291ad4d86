"""Service semantics as kube-proxy has them, on the real node, from inside an injected pod of the seed.

In the swimlane group's namespace, next to the seed: a multi-port Service, a selector-less Service with
manual Endpoints and an ExternalName Service naming the first, none in any group, answer from mocka's app
(captured by its sidecar) exactly as from a pod without a sidecar; a call to mockb by its ClusterIP keeps its
lane (a canary of mockb answers canary requests, the base answers the rest). A broken lane is in the seed
story (tests/cluster/test_seed.py), created while it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.cluster.node import Cluster
from tests.cluster.test_churn import NAMESPACE, pods, ready, seed, wait_for, wait_rollout  # noqa: F401

CALL = r"""
import json, sys, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = []
for url, headers in json.loads(sys.argv[1]):
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            out.append([r.status, r.read().decode()])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode()[:200]])
    except Exception as e:
        out.append([0, type(e).__name__])
print(json.dumps(out))
"""


def mock_container(name: str, app: str, version: str, port: int, image: str) -> dict:
    return {"name": name, "image": image, "imagePullPolicy": "Never", "args": ["mock", "--listen", f"0.0.0.0:{port}"],
            "env": [{"name": "app", "value": app}, {"name": "version", "value": version}],
            "ports": [{"containerPort": port}]}


def objects(image: str) -> list[dict]:
    plain_labels = {"app": "plain", "laneproxy-injection": "disabled"}
    canary_labels = {"app": "mockb", "version": "v2", "ASM_TRAFFIC_TAG": "canary", "laneproxy-injection": "enabled"}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "plain", "namespace": NAMESPACE},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "plain"}},
                  "template": {"metadata": {"labels": plain_labels}, "spec": {"containers": [
                      mock_container("web", "plain-web", "v1", 8000, image),
                      mock_container("metrics", "plain-metrics", "v1", 9090, image)]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "multi", "namespace": NAMESPACE},
         "spec": {"selector": {"app": "plain"}, "ports": [{"name": "http", "port": 8000, "targetPort": 8000},
                                                          {"name": "metrics", "port": 9090, "targetPort": 9090}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual", "namespace": NAMESPACE},
         "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 9090}]}},
        # Another name for `multi` (DNS only: kube-proxy has no rule for it, the tier's DNS answers multi's address).
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "alias", "namespace": NAMESPACE},
         "spec": {"type": "ExternalName", "externalName": f"multi.{NAMESPACE}.svc.cluster.local",
                  "ports": [{"name": "http", "port": 8000}]}},
        # mockb's canary: the canary lane's mockb, reached by its ClusterIP with the lane header.
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mockb-canary", "namespace": NAMESPACE},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "mockb", "version": "v2"}},
                  "template": {"metadata": {"labels": canary_labels}, "spec": {
                      "serviceAccountName": "laneproxy",
                      "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
                      "containers": [mock_container("default", "mockb", "v2", 8000, image)]}}}},
    ]


@pytest.fixture(scope="module")
def services(seed: Cluster) -> Iterator[Cluster]:
    cluster = seed
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                           "items": objects(cluster.image)}))
    try:
        wait_rollout(cluster, NAMESPACE, "plain")
        wait_rollout(cluster, NAMESPACE, "mockb-canary")
        (plain,) = pods(cluster, NAMESPACE, "app=plain")
        endpoints = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "manual", "namespace": NAMESPACE},
                     "subsets": [{"addresses": [{"ip": plain["status"]["podIP"]}],
                                  "ports": [{"name": "http", "port": 9090}]}]}
        cluster.kubectl("apply", "-f", "-", stdin=json.dumps(endpoints))
        wait_for(lambda: all(ready(p) for p in pods(cluster, NAMESPACE, "app=mocka")), 120, "mocka ready")
        time.sleep(3)  # kube-proxy and dnsmasq pick the new Services up within about a second each
    except (AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.fail(f"{exc}\n{cluster.diagnose(NAMESPACE)}")
    yield cluster
    cluster.kubectl("delete", "deployment/plain", "deployment/mockb-canary", "service/multi", "service/manual",
                    "service/alias", "-n", NAMESPACE, "--wait=false", check=False)


def call(cluster: Cluster, pod: str, container: str, calls: list[tuple[str, dict]]) -> list[list]:
    out = cluster.kubectl("exec", "-n", NAMESPACE, pod, "-c", container, "--", "python3", "-c", CALL,
                          json.dumps(calls), timeout=60).stdout
    return json.loads(out)


def test_services_of_no_group_answer_from_an_injected_pod_exactly_as_from_a_plain_one(services: Cluster):
    cluster = services
    (mocka,) = [p for p in pods(cluster, NAMESPACE, "app=mocka") if ready(p)][:1]
    (plain,) = pods(cluster, NAMESPACE, "app=plain")
    calls = [("http://multi:8000/", {}), ("http://multi:9090/", {}), ("http://manual:8000/", {}),
             ("http://alias:8000/", {}), ("http://alias:9090/", {})]
    injected = call(cluster, mocka["metadata"]["name"], "default", calls)
    bare = call(cluster, plain["metadata"]["name"], "web", calls)
    sys.stderr.write(f"\n[services] from mocka (injected): {injected}\n[services] from plain: {bare}\n")
    assert injected == bare
    assert [status for status, _ in injected] == [200] * 5
    assert injected[0][1].startswith("plain-web(") and injected[1][1].startswith("plain-metrics(")
    assert injected[2][1].startswith("plain-metrics(")
    assert injected[3][1].startswith("plain-web(") and injected[4][1].startswith("plain-metrics(")


def test_a_call_to_mockb_by_its_cluster_ip_keeps_its_lane(services: Cluster):
    cluster = services
    (mocka,) = [p for p in pods(cluster, NAMESPACE, "app=mocka") if ready(p)][:1]
    cluster_ip = cluster.get_json("service", "mockb", "-n", NAMESPACE)["spec"]["clusterIP"]
    calls = []
    for n in range(6):
        calls.append((f"http://{cluster_ip}:8000/", {"x-asm-prefer-tag": "canary", "my-request-id": f"9100{n}"}))
        calls.append((f"http://{cluster_ip}:8000/", {"x-asm-prefer-tag": "base", "my-request-id": f"9200{n}"}))
    answers = call(cluster, mocka["metadata"]["name"], "default", calls)
    sys.stderr.write(f"\n[services] mockb by ClusterIP {cluster_ip}: {answers}\n")
    for (url, headers), (status, body) in zip(calls, answers):
        expected = "v2" if headers["x-asm-prefer-tag"] == "canary" else "v1"
        assert status == 200 and body.startswith(f"mockb(version: {expected}"), (headers, status, body)
