"""The cluster tier itself: a Deployment of the project's image becomes Ready on the real node and answers through
its Service's ClusterIP (kube-proxy's rules) from the host, and a pod resolves a Service by its cluster DNS name.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.request

from tests.cluster.node import CLUSTER_RANGE, Cluster


def mock_deployment(namespace: str, image: str, app: str, version: str, upstream: str = "") -> str:
    env = [{"name": "app", "value": app}, {"name": "version", "value": version}]
    if upstream:
        env.append({"name": "upstream_url", "value": upstream})
    objects = [
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": f"{app}-{version}", "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": app, "version": version}},
                "template": {
                    "metadata": {"labels": {"app": app, "version": version}},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{
                            "name": "app", "image": image, "imagePullPolicy": "Never",
                            "args": ["mock", "--listen", "0.0.0.0:8000"], "env": env,
                            "ports": [{"containerPort": 8000}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8000}, "periodSeconds": 1},
                        }],
                    },
                },
            },
        },
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": app, "namespace": namespace},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 8000}]},
        },
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})


def wait_available(cluster: Cluster, namespace: str, deployment: str, timeout: float = 120) -> None:
    cluster.kubectl("rollout", "status", f"deployment/{deployment}", "-n", namespace, f"--timeout={int(timeout)}s",
                    timeout=timeout + 10)


def get_until_answered(url: str, timeout: float = 30) -> str:
    """kube-proxy writes a Service's rules within about a second of its endpoints; poll until then."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError as exc:
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s: {last}")


def test_a_deployment_of_the_image_becomes_ready_and_answers_through_its_cluster_ip_from_the_host(
        cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=mock_deployment(namespace, cluster.image, "mocka", "v1"))
    wait_available(cluster, namespace, "mocka-v1")

    service = cluster.get_json("service", "mocka", "-n", namespace)
    cluster_ip = service["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in ipaddress.ip_network(CLUSTER_RANGE)
    pod = cluster.get_json("pods", "-n", namespace, "-l", "app=mocka")["items"][0]
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(CLUSTER_RANGE)

    body = get_until_answered(f"http://{cluster_ip}:8000/")
    assert body.startswith("mocka(version: v1, ip: "), body


def test_a_pod_reaches_another_service_by_its_cluster_dns_name(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=mock_deployment(namespace, cluster.image, "mockb", "v1"))
    cluster.kubectl("apply", "-f", "-", stdin=mock_deployment(namespace, cluster.image, "mocka", "v1",
                                                               upstream="http://mockb:8000/"))
    wait_available(cluster, namespace, "mockb-v1")
    wait_available(cluster, namespace, "mocka-v1")

    cluster_ip = cluster.get_json("service", "mocka", "-n", namespace)["spec"]["clusterIP"]
    deadline = time.monotonic() + 30
    body = ""
    while time.monotonic() < deadline:
        body = get_until_answered(f"http://{cluster_ip}:8000/")
        if "mockb(version: v1" in body:
            break
        time.sleep(1)  # the DNS sync rewrites dnsmasq's hosts once a second
    assert body.startswith("mocka(version: v1, ip: ") and "-> mockb(version: v1, ip: " in body, body
