"""The Kubernetes source on the real node: a watch whose packets are dropped (no FIN, no RST) is noticed within
about a minute and resumed from its resourceVersion, so a pod that became Ready meanwhile is not lost.

The source runs in this process with the cluster's admin kubeconfig, watching a swimlane group of this test's
namespace; the pods are real (a Deployment of the project's image, Ready by its probe). The drop is iptables in
INPUT for exactly the source's open API connections (the node address is on `lo`, so both directions pass INPUT),
with the source's default timeouts (keepalive 15 s + 6 x 5 s, read timeout 60 s): new connections are not
touched, as when a middlebox forgets one connection. The rules carry a comment and are removed in any case.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

from laneproxy.control.kubernetes import KubernetesSource
from laneproxy.core.store import RouteTableStore
from tests.cluster.node import NODE_IP, REPO, Cluster

COMMENT = "laneproxy-test-watch-blackhole"


def lane_deployment(namespace: str, image: str, lane: str) -> dict:
    labels = {"app": "mocka", "ASM_TRAFFIC_TAG": lane}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"mocka-{lane}", "namespace": namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "app", "image": image, "imagePullPolicy": "Never",
                "args": ["mock", "--listen", "0.0.0.0:8000"], "env": [{"name": "app", "value": "mocka"}],
                "ports": [{"name": "http", "containerPort": 8000}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8000}, "periodSeconds": 1}}]}}},
    }


def swimlanes(namespace: str) -> list[dict]:
    api = "istio.alibabacloud.com/v1"
    group = f"g-{namespace}"
    return [
        {"apiVersion": api, "kind": "ASMSwimLaneGroup", "metadata": {"name": group},
         "spec": {"isPermissive": True, "services": [{"name": "mocka", "namespace": namespace}],
                  "permissiveModeConfiguration": {"routeHeader": "x-asm-prefer-tag", "fallbackTarget": f"base-{namespace}"}}},
        *({"apiVersion": api, "kind": "ASMSwimLane", "metadata": {"name": f"{lane}-{namespace}",
                                                                 "labels": {"swimlane-group": group}},
           "spec": {"labelSelector": {"ASM_TRAFFIC_TAG": lane}, "services": [{"name": "mocka", "namespace": namespace}]}}
          for lane in ("base", "canary")),
    ]


def own_api_connections(api_port: int) -> list[int]:
    """Local ports of this process's established connections to the API server."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{api_port} )"],
                         capture_output=True, text=True, check=True).stdout
    ports = []
    for line in out.splitlines():
        if f"pid={os.getpid()}," in line:
            local = line.split()[2]
            ports.append(int(local.rsplit(":", 1)[1]))
    return ports


def drop_rules(api_port: int, local_ports: list[int]) -> list[list[str]]:
    rules = []
    for port in local_ports:
        for source, sport, dport in ((NODE_IP, api_port, port), (NODE_IP, port, api_port)):
            rules.append(["INPUT", "-p", "tcp", "-s", source, "-d", NODE_IP, "--sport", str(sport), "--dport", str(dport),
                          "-m", "comment", "--comment", COMMENT, "-j", "DROP"])
    return rules


def test_a_watch_whose_packets_are_dropped_is_noticed_within_a_minute_and_no_update_is_lost(
        cluster: Cluster, namespace: str) -> None:
    for crd in ("asmswimlanegroups.yaml", "asmswimlanes.yaml"):  # the directory's kustomization is not an object
        cluster.kubectl("apply", "-f", str(REPO / "deploy" / "crds" / crd))
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s",
                    "crd/asmswimlanegroups.istio.alibabacloud.com", "crd/asmswimlanes.istio.alibabacloud.com")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mocka", "namespace": namespace},
               "spec": {"selector": {"app": "mocka"}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}}
    objects = [service, lane_deployment(namespace, cluster.image, "base"), *swimlanes(namespace)]
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    cluster.kubectl("rollout", "status", "deployment/mocka-base", "-n", namespace, "--timeout=120s", timeout=130)
    api_port = cluster.api.port
    inserted: list[list[str]] = []

    def canary_endpoints(store: RouteTableStore) -> list[str]:
        routes = store.current.routes.get(f"{namespace}/mocka")
        route = routes.by_lane.get(f"canary-{namespace}".encode()) if routes else None
        return [e.address for e in route.endpoints] if route and route.lane_used == f"canary-{namespace}" else []

    async def scenario() -> None:
        store = RouteTableStore()
        source = KubernetesSource(store, namespace=namespace, kubeconfig=str(cluster.kubeconfig))
        await source.start()
        try:
            deadline = time.monotonic() + 60
            while not (store.ready and all(r.state == "watching" for r in source.reflectors.values())):
                assert time.monotonic() < deadline, "the source did not sync and watch"
                await asyncio.sleep(0.2)
            lists = {key: r.lists for key, r in source.reflectors.items()}
            ended = {key: r.silent_watches + r.failures for key, r in source.reflectors.items()}
            ports = own_api_connections(api_port)
            assert len(ports) >= len(source.reflectors), ports
            for rule in drop_rules(api_port, ports):
                subprocess.run(["iptables", "-I", *rule], check=True)
                inserted.append(rule)
            blackholed = time.monotonic()
            # A real pod becomes Ready while every watch the source has is a black hole.
            await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-",
                                    stdin=json.dumps(lane_deployment(namespace, cluster.image, "canary")))
            while not canary_endpoints(store):
                assert time.monotonic() - blackholed < 150, "the canary pod never reached the table"
                await asyncio.sleep(0.5)
            caught_up = time.monotonic() - blackholed
            pods = source.reflectors[("Pod", namespace)]
            print(f"\n[watch-health] canary pod in the table {caught_up:.1f}s after the watches were black-holed "
                  f"(Pod watch: {pods.silent_watches} silent, {pods.failures} broken, lists {pods.lists})")
            assert pods.silent_watches + pods.failures > ended[("Pod", namespace)]  # noticed, not just lucky
            assert {key: r.lists for key, r in source.reflectors.items()} == lists  # resumed, nothing relisted
        finally:
            await source.stop()

    try:
        asyncio.run(scenario())
    finally:
        for rule in inserted:
            subprocess.run(["iptables", "-D", *rule], check=False)
        for lane in ("base", "canary"):
            cluster.kubectl("delete", "asmswimlane", f"{lane}-{namespace}", check=False)
        cluster.kubectl("delete", "asmswimlanegroup", f"g-{namespace}", check=False)


def test_a_namespace_the_watcher_may_not_read_counts_as_empty_and_holds_back_no_update(
        cluster: Cluster, namespace: str, tmp_path) -> None:
    """The group also names a Service in a namespace this watcher's service account may not read (403): the
    source becomes ready anyway, reports that namespace as forbidden (logged, and in the stats' sync state),
    and a pod that turns Ready meanwhile in the namespace it may read still reaches the table. RBAC as the
    README suggests for narrowing: the swimlane kinds cluster-wide, Pods, Services and EndpointSlices only
    through a RoleBinding in the namespace it may read."""
    for crd in ("asmswimlanegroups.yaml", "asmswimlanes.yaml"):
        cluster.kubectl("apply", "-f", str(REPO / "deploy" / "crds" / crd))
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s",
                    "crd/asmswimlanegroups.istio.alibabacloud.com", "crd/asmswimlanes.istio.alibabacloud.com")
    closed = f"{namespace}-closed"
    narrow = f"narrow-{namespace}"
    read = [{"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
    subject = [{"kind": "ServiceAccount", "name": "narrow", "namespace": namespace}]
    rbac = "rbac.authorization.k8s.io/v1"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mocka", "namespace": namespace},
               "spec": {"selector": {"app": "mocka"}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}}
    group, *lanes = swimlanes(namespace)
    group["spec"]["services"].append({"name": "mockd", "namespace": closed})
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": closed}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mockd", "namespace": closed},
         "spec": {"selector": {"app": "mockd"}, "ports": [{"port": 8000}]}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "narrow", "namespace": namespace}},
        {"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": narrow}, "rules": [
            {"apiGroups": ["istio.alibabacloud.com"], "resources": ["asmswimlanegroups", "asmswimlanes"],
             "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": narrow}, "subjects": subject,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": narrow}},
        {"apiVersion": rbac, "kind": "Role", "metadata": {"name": "narrow", "namespace": namespace}, "rules": read},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "narrow", "namespace": namespace},
         "subjects": subject, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "narrow"}},
        service, lane_deployment(namespace, cluster.image, "base"), group, *lanes,
    ]
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    try:
        cluster.kubectl("rollout", "status", "deployment/mocka-base", "-n", namespace, "--timeout=120s", timeout=130)
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
        answer = cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/serviceaccounts/narrow/token",
                                 "-f", "-", stdin=json.dumps(request))
        kubeconfig = tmp_path / "narrow.json"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "narrow",
            "clusters": [{"name": "node", "cluster": {"server": cluster.api.url,
                                                      "certificate-authority": str(cluster.api.ca_path)}}],
            "users": [{"name": "narrow", "user": {"token": json.loads(answer.stdout)["status"]["token"]}}],
            "contexts": [{"name": "narrow", "context": {"cluster": "node", "user": "narrow"}}]}))

        def canary_endpoints(store: RouteTableStore) -> list[str]:
            routes = store.current.routes.get(f"{namespace}/mocka")
            route = routes.by_lane.get(f"canary-{namespace}".encode()) if routes else None
            return [e.address for e in route.endpoints] if route and route.lane_used == f"canary-{namespace}" else []

        async def scenario() -> None:
            store = RouteTableStore()
            source = KubernetesSource(store, namespace=namespace, kubeconfig=str(kubeconfig))
            await source.start()
            try:
                deadline = time.monotonic() + 60
                while not store.ready:
                    assert time.monotonic() < deadline, f"not ready with {closed} forbidden: {source.health()}"
                    await asyncio.sleep(0.2)
                closed_pods = source.reflectors[("Pod", closed)]
                assert closed_pods.forbidden
                assert (f"Pod.{closed}", "forbidden") in source.health().resources
                began = time.monotonic()
                await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-",
                                        stdin=json.dumps(lane_deployment(namespace, cluster.image, "canary")))
                while not canary_endpoints(store):
                    assert time.monotonic() - began < 90, f"the canary pod never reached the table: {source.health()}"
                    await asyncio.sleep(0.3)
                print(f"\n[watch-health] {closed} forbidden, counted as empty; sync state "
                      f"{dict(source.health().resources)}; canary pod in the table after "
                      f"{time.monotonic() - began:.1f}s")
            finally:
                await source.stop()

        asyncio.run(scenario())
    finally:
        cluster.kubectl("delete", "clusterrolebinding", narrow, check=False)
        cluster.kubectl("delete", "clusterrole", narrow, check=False)
        for lane in ("base", "canary"):
            cluster.kubectl("delete", "asmswimlane", f"{lane}-{namespace}", check=False)
        cluster.kubectl("delete", "asmswimlanegroup", f"g-{namespace}", check=False)
        cluster.kubectl("delete", "namespace", closed, "--wait=false", check=False)
