"""The Kubernetes source against a real kube-apiserver (tests/kube): the seed's Kruise Rollout flow, faults, RBAC.

Every test runs the watcher with the token of the `laneproxy` ServiceAccount, bound by the manifests in
deploy/rbac exactly as they are, and reads lane membership from the store it publishes to (one test runs
a real `laneproxy run --source kubernetes` gateway in front of mock apps instead). No kubelet runs, so a
test plays the kubelet's part by writing pod status (podIP, Ready) through the pods/status subresource,
and Kruise Rollout's part by creating and deleting pods labelled as `patchPodTemplateMetadata` labels them.

Faults are real too: a TCP relay between watcher and API server cuts every connection (a killed watch
stream) or refuses them (the server is away), and a second kube-apiserver on the same etcd is stopped for
LANEPROXY_OUTAGE_SECONDS (30) and started again. Waits poll the store against a deadline; nothing sleeps
a fixed time to let something happen.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # `tests.kube` imports with a bare `pytest` too
    sys.path.insert(0, str(_REPO))

from laneproxy.control.kubernetes import (  # noqa: E402
    PODS,
    SWIMLANE_GROUPS,
    ApiStatusError,
    ApiTransport,
    Backoff,
    KubernetesSource,
    Reflector,
    ResourceExpiredError,
)
from laneproxy.core.build import build_skipping  # noqa: E402
from laneproxy.core.model import RouteTable  # noqa: E402
from laneproxy.core.store import RouteTableStore  # noqa: E402
from tests.kube.apiserver import WATCHER_USER, KubeApiServer  # noqa: E402
from tests.kube.fixtures import kube_apiserver  # noqa: E402, F401

DEPLOY = _REPO / "deploy"
SWIMLANES = _REPO / "config" / "swimlanes.yaml"
NAMESPACE = "default"
SWIMLANE_API_GROUP, SWIMLANE_VERSION = "istio.alibabacloud.com", "v1"
PLURALS = {"ASMSwimLaneGroup": "asmswimlanegroups", "ASMSwimLane": "asmswimlanes"}
TEST_LABEL = ("laneproxy-test", "kubernetes-source")
OUTAGE_SECONDS = float(os.environ.get("LANEPROXY_OUTAGE_SECONDS", "30"))


# ---------------------------------------------------------------------------------------------
# Manifests


def yaml_documents(*paths: Path) -> list[dict]:
    documents = []
    for path in paths:
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for file in files:
            documents.extend(doc for doc in yaml.safe_load_all(file.read_text()) if doc and doc.get("kind") != "Kustomization")
    return documents


def seed_services(target_port: int | str | None = None) -> list[dict]:
    """The seed's Services for mocka, mockb and mockc; `target_port` only where pods share one IP."""
    port: dict[str, Any] = {"port": 8000, "name": "http"}
    if target_port is not None:
        port["targetPort"] = target_port
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": app, "namespace": NAMESPACE, "labels": {"app": app, "service": app, TEST_LABEL[0]: TEST_LABEL[1]}},
         "spec": {"ports": [dict(port)], "selector": {"app": app}}}
        for app in ("mocka", "mockb", "mockc")
    ]


# ---------------------------------------------------------------------------------------------
# The cluster, driven as an administrator (and as the kubelet and Kruise would drive it)


class Cluster:
    def __init__(self, api: client.ApiClient, kube: KubeApiServer) -> None:
        self.api, self.kube = api, kube
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.ext = client.ApiextensionsV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)

    async def apply(self, doc: dict) -> None:
        """Create, or replace what is there (the session's cluster is shared with other tests)."""
        kind, meta = doc["kind"], doc["metadata"]
        name, namespace = meta["name"], meta.get("namespace", NAMESPACE)
        if kind in PLURALS:
            args = (SWIMLANE_API_GROUP, SWIMLANE_VERSION, PLURALS[kind])
            create = lambda: self.custom.create_cluster_custom_object(*args, doc)  # noqa: E731
            read = lambda: self.custom.get_cluster_custom_object(*args, name)  # noqa: E731
            replace = lambda body: self.custom.replace_cluster_custom_object(*args, name, body)  # noqa: E731
        else:
            create, read, replace = {
                "CustomResourceDefinition": (lambda: self.ext.create_custom_resource_definition(doc),
                                             lambda: self.ext.read_custom_resource_definition(name),
                                             lambda body: self.ext.replace_custom_resource_definition(name, body)),
                "ClusterRole": (lambda: self.rbac.create_cluster_role(doc), lambda: self.rbac.read_cluster_role(name),
                                lambda body: self.rbac.replace_cluster_role(name, body)),
                "ClusterRoleBinding": (lambda: self.rbac.create_cluster_role_binding(doc),
                                       lambda: self.rbac.read_cluster_role_binding(name),
                                       lambda body: self.rbac.replace_cluster_role_binding(name, body)),
                "ServiceAccount": (lambda: self.core.create_namespaced_service_account(namespace, doc),
                                   lambda: self.core.read_namespaced_service_account(name, namespace),
                                   lambda body: self.core.replace_namespaced_service_account(name, namespace, body)),
                "Service": (lambda: self.core.create_namespaced_service(namespace, doc),
                            lambda: self.core.read_namespaced_service(name, namespace),
                            lambda body: self.core.replace_namespaced_service(name, namespace, body)),
            }[kind]
        try:
            await create()
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = await read()
            version = current["metadata"]["resourceVersion"] if isinstance(current, dict) else current.metadata.resource_version
            body = json.loads(json.dumps(doc))
            body["metadata"]["resourceVersion"] = version
            if kind == "Service":  # clusterIP is immutable once allocated
                body["spec"]["clusterIP"] = current.spec.cluster_ip
            await replace(body)

    async def apply_all(self, docs: list[dict]) -> None:
        for doc in docs:
            await self.apply(doc)

    async def install_deploy_manifests(self) -> None:
        await self.apply_all(yaml_documents(DEPLOY / "crds", DEPLOY / "rbac"))
        for plural in PLURALS.values():
            name = f"{plural}.{SWIMLANE_API_GROUP}"
            await eventually(lambda: self._established(name), what=f"CRD {name} established")

    async def _established(self, name: str) -> bool:
        crd = await self.ext.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    async def reset(self) -> None:
        """Remove every swimlane object (cluster-scoped: the watcher reads all of them) and this module's objects."""
        for plural in PLURALS.values():
            await self.custom.delete_collection_cluster_custom_object(SWIMLANE_API_GROUP, SWIMLANE_VERSION, plural)
        for namespace in (NAMESPACE, "team-d"):
            selector = f"{TEST_LABEL[0]}={TEST_LABEL[1]}"
            await self.core.delete_collection_namespaced_pod(namespace, label_selector=selector, grace_period_seconds=0)
            for service in (await self.core.list_namespaced_service(namespace, label_selector=selector)).items:
                await self.core.delete_namespaced_service(service.metadata.name, namespace)

    async def create_pod(self, name: str, *, app: str, tag: str, version: str = "v1", ip: str | None = None,
                         ready: bool = False, port: int = 8000, namespace: str = NAMESPACE) -> None:
        """A pod as the seed's Deployment (or Kruise's canary Deployment) makes it; no kubelet will run it."""
        labels = {"app": app, "version": version, "ASM_TRAFFIC_TAG": tag, TEST_LABEL[0]: TEST_LABEL[1]}
        await self.core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "default", "image": f"go-http-sample:{version}",
                                     "ports": [{"name": "http", "containerPort": port}]}]},
        })
        if ip is not None:
            await self.set_status(name, ip=ip, ready=ready, namespace=namespace)

    async def set_status(self, name: str, *, ip: str, ready: bool, namespace: str = NAMESPACE) -> None:
        """The kubelet's part: pod IP and the Ready condition, through the pods/status subresource."""
        await self.core.patch_namespaced_pod_status(name, namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }})

    async def delete_pod(self, name: str, namespace: str = NAMESPACE) -> None:
        await self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)

    async def service_account_kubeconfig(self, path: Path, server: str, name: str = "laneproxy") -> Path:
        """A kubeconfig holding a fresh token of the ServiceAccount (TokenRequest API)."""
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
        answer = await self.core.create_namespaced_service_account_token(name, NAMESPACE, request)
        return write_kubeconfig(path, server, self.kube.ca_path, answer.status.token)


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "laneproxy",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "laneproxy", "user": {"token": token}}],
        "contexts": [{"name": "laneproxy", "context": {"cluster": "test", "user": "laneproxy"}}],
    }))
    return path


@pytest.fixture
async def cluster(kube_apiserver: KubeApiServer) -> AsyncIterator[Cluster]:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kube_apiserver.kubeconfig_path), client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        admin = Cluster(api, kube_apiserver)
        await admin.install_deploy_manifests()
        await admin.reset()
        yield admin
        await admin.reset()


@pytest.fixture
async def kubeconfig(cluster: Cluster, kube_apiserver: KubeApiServer, tmp_path: Path) -> Path:
    """The watcher's credentials: the deploy/rbac ServiceAccount's token, nothing else."""
    return await cluster.service_account_kubeconfig(tmp_path / "laneproxy.json", kube_apiserver.url)


@asynccontextmanager
async def running_source(kubeconfig: Path, **options: Any) -> AsyncIterator[tuple[RouteTableStore, KubernetesSource]]:
    store = RouteTableStore()
    options = {"backoff_initial": 0.1, "backoff_cap": 1.0, **options}
    source = KubernetesSource(store, namespace=NAMESPACE, kubeconfig=str(kubeconfig), **options)
    await source.start()
    try:
        yield store, source
    finally:
        await source.stop()


# ---------------------------------------------------------------------------------------------
# Waiting and reading the table


async def eventually(predicate: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition") -> float:
    """Poll `predicate` (sync or async) until it is truthy; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.01)


def route(table: RouteTable, service: str, lane: str) -> tuple[str | None, list[str]]:
    """(lane the route really uses, its endpoint addresses) for a request of `lane` to `service`."""
    return route_in(table, f"{NAMESPACE}/{service}", lane)


def route_in(table: RouteTable, key: str, lane: str) -> tuple[str | None, list[str]]:
    routes = table.routes.get(key)
    chosen = routes.by_lane.get(lane.encode()) if routes else None
    if chosen is None:
        return None, []
    return chosen.lane_used, sorted(endpoint.address for endpoint in chosen.endpoints)


async def takes_effect(store: RouteTableStore, change: str, expected: dict[tuple[str, str], tuple[str, list[str]]],
                       timeout: float = 15.0) -> float:
    """Wait until every (service, lane) routes as expected; record how long the change took to take effect."""
    def holds() -> bool:
        return all(route(store.current, service, lane) == want for (service, lane), want in expected.items())

    try:
        elapsed = await eventually(holds, timeout=timeout, what=change)
    except AssertionError:
        actual = {key: route(store.current, *key) for key in expected}
        raise AssertionError(f"{change}: expected {expected}, table {store.current.version!r} has {actual}") from None
    print(f"{change}: took effect after {elapsed * 1000:.0f} ms")
    return elapsed


def built_from_current_cache(store: RouteTableStore, source: KubernetesSource) -> bool:
    """The served table was built from every object the watcher holds right now."""
    return store.current.version == source.documents()[1]


async def start_seed(cluster: Cluster, base_ips: dict[str, str]) -> None:
    await cluster.apply_all(yaml_documents(SWIMLANES) + seed_services())
    for app, ip in base_ips.items():
        await cluster.create_pod(f"{app}-v1-base", app=app, tag="base", version="v1", ip=ip, ready=True)


BASE = {"mocka": "10.1.0.1", "mockb": "10.1.0.2", "mockc": "10.1.0.3"}


# ---------------------------------------------------------------------------------------------
# Manifests and RBAC


async def test_deploy_crds_accept_the_seed_swimlane_manifests_as_they_are(cluster: Cluster) -> None:
    seed = yaml_documents(SWIMLANES)
    await cluster.apply_all(seed)
    for doc in seed:
        stored = await cluster.custom.get_cluster_custom_object(
            SWIMLANE_API_GROUP, SWIMLANE_VERSION, PLURALS[doc["kind"]], doc["metadata"]["name"])
        assert stored["spec"] == doc["spec"]
        assert stored["metadata"].get("labels") == doc["metadata"].get("labels")


async def test_the_deploy_rbac_token_can_do_what_the_watcher_needs_and_nothing_else(
        cluster: Cluster, kube_apiserver: KubeApiServer, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    async with running_source(kubeconfig) as (store, source):
        await eventually(lambda: store.ready, what="watcher with the ServiceAccount token ready")
        assert route(store.current, "mocka", "base") == ("base", ["10.1.0.1:8000"])
        assert store.rejected == 0

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        core = client.CoreV1Api(api)
        assert (await core.list_namespaced_pod(NAMESPACE)).items
        for forbidden in (core.list_namespaced_secret(NAMESPACE), core.list_namespaced_config_map(NAMESPACE),
                          core.list_node(), core.list_namespaced_endpoints(NAMESPACE),
                          core.delete_namespaced_pod("mocka-v1-base", NAMESPACE),
                          core.patch_namespaced_pod_status("mocka-v1-base", NAMESPACE, {"status": {"phase": "Failed"}}),
                          client.CustomObjectsApi(api).delete_cluster_custom_object(
                              SWIMLANE_API_GROUP, SWIMLANE_VERSION, "asmswimlanes", "canary")):
            with pytest.raises(ApiException) as refused:
                await forbidden
            assert refused.value.status == 403

    # What the token may do, as `kubectl auth can-i --list` shows it (SelfSubjectRulesReview).
    listing = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "auth", "can-i", "--list", "-n", NAMESPACE],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    print(listing)
    granted = {}
    for line in listing.splitlines()[1:]:
        if line and not line[0].isspace():  # resource rows; indented rows are non-resource URLs (/api/*...)
            granted[line.split()[0]] = line[line.rindex("["):]
    assert granted == {
        "asmswimlanegroups.istio.alibabacloud.com": "[get list watch]",
        "asmswimlanes.istio.alibabacloud.com": "[get list watch]",
        # The one write: why an object was left out of the route table, in its status.
        "asmswimlanegroups.istio.alibabacloud.com/status": "[get patch]",
        "asmswimlanes.istio.alibabacloud.com/status": "[get patch]",
        "endpointslices.discovery.k8s.io": "[get list watch]",
        "pods": "[get list watch]",
        "services": "[get list watch]",
        # Every authenticated user gets these from the built-in system:basic-user role.
        "selfsubjectaccessreviews.authorization.k8s.io": "[create]",
        "selfsubjectrulesreviews.authorization.k8s.io": "[create]",
    }


async def test_a_user_without_the_deploy_rbac_never_becomes_ready(cluster: Cluster, kube_apiserver: KubeApiServer) -> None:
    await start_seed(cluster, BASE)
    async with running_source(kube_apiserver.kubeconfig_for(WATCHER_USER)) as (store, source):
        groups = source.reflectors[(SWIMLANE_GROUPS.kind, None)]
        await eventually(lambda: groups.failures >= 2, what="watcher refused twice")
        assert isinstance(groups.last_error, ApiStatusError) and groups.last_error.status == 403
        assert not store.ready and store.current.version == ""


async def test_a_rotated_token_is_read_again_after_401(cluster: Cluster, kubeconfig: Path, tmp_path: Path) -> None:
    await start_seed(cluster, BASE)
    good = kubeconfig.read_text()
    rotating = tmp_path / "rotating.json"
    rotating.write_text(good.replace(json.loads(good)["users"][0]["user"]["token"], "not-a-valid-token"))
    async with running_source(rotating) as (store, source):
        groups = source.reflectors[(SWIMLANE_GROUPS.kind, None)]
        await eventually(lambda: groups.failures >= 1, what="first attempt refused")
        assert isinstance(groups.last_error, ApiStatusError) and groups.last_error.status == 401
        rotating.write_text(good)  # as a kubelet rotates a projected service-account token
        await eventually(lambda: store.ready, what="ready with the rotated token")


# ---------------------------------------------------------------------------------------------
# The seed's rollout, step by step


async def test_seed_rollout_canary_promotion_and_rollback_move_lane_membership(cluster: Cluster, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    async with running_source(kubeconfig) as (store, source):
        await eventually(lambda: store.ready, what="first complete sync")
        print(f"first complete sync after {source.synced_after * 1000:.0f} ms; namespaces {source.namespaces}")
        assert source.namespaces == [NAMESPACE]
        assert set(store.current.groups) == {"rollout"}
        await takes_effect(store, "base pods ready", {
            ("mocka", "base"): ("base", ["10.1.0.1:8000"]), ("mockb", "base"): ("base", ["10.1.0.2:8000"]),
            ("mockc", "base"): ("base", ["10.1.0.3:8000"]),
            ("mocka", "canary"): ("base", ["10.1.0.1:8000"]), ("mockb", "canary"): ("base", ["10.1.0.2:8000"]),
        })

        # Kruise creates the canary Deployment's pod; until the kubelet reports it Ready it is no endpoint.
        await cluster.create_pod("mocka-canary", app="mocka", tag="canary", version="v2", ip="10.1.0.11", ready=False)
        pods = source.reflectors[(PODS.kind, NAMESPACE)]
        await eventually(lambda: "mocka-canary" in pods.objects and pods.objects["mocka-canary"].get("status", {}).get("podIP")
                         and built_from_current_cache(store, source), what="table built with the not-ready canary pod")
        assert route(store.current, "mocka", "canary") == ("base", ["10.1.0.1:8000"])

        await cluster.set_status("mocka-canary", ip="10.1.0.11", ready=True)
        await takes_effect(store, "mocka canary pod ready", {
            ("mocka", "canary"): ("canary", ["10.1.0.11:8000"]), ("mocka", "base"): ("base", ["10.1.0.1:8000"]),
            ("mockb", "canary"): ("base", ["10.1.0.2:8000"]),
        })

        await cluster.set_status("mocka-canary", ip="10.1.0.11", ready=False)
        await takes_effect(store, "mocka canary pod not ready any more", {("mocka", "canary"): ("base", ["10.1.0.1:8000"])})
        await cluster.set_status("mocka-canary", ip="10.1.0.11", ready=True)
        await takes_effect(store, "mocka canary pod ready again", {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])})

        for app, ip in (("mockb", "10.1.0.12"), ("mockc", "10.1.0.13")):
            await cluster.create_pod(f"{app}-canary", app=app, tag="canary", version="v2", ip=ip, ready=True)
            await takes_effect(store, f"{app} canary pod ready", {
                (app, "canary"): ("canary", [f"{ip}:8000"]), (app, "base"): ("base", [f"{BASE[app]}:8000"])})

        # Approve: the base Deployments run v2 (new pods, still labelled base), the canary pods go away.
        for index, app in enumerate(("mocka", "mockb", "mockc")):
            await cluster.create_pod(f"{app}-v2-base", app=app, tag="base", version="v2", ip=f"10.1.0.2{index + 1}", ready=True)
        for app in ("mocka", "mockb", "mockc"):
            await cluster.delete_pod(f"{app}-v1-base")
            await cluster.delete_pod(f"{app}-canary")
        await takes_effect(store, "approve: v2 is the base, canary pods deleted", {
            (app, lane): ("base", [f"10.1.0.2{index + 1}:8000"])
            for index, app in enumerate(("mocka", "mockb", "mockc")) for lane in ("base", "canary")
        })

        # A second canary, then undo: the canary pod is deleted and canary requests fall back to base.
        await cluster.create_pod("mocka-canary-2", app="mocka", tag="canary", version="v3", ip="10.1.0.31", ready=True)
        await takes_effect(store, "second mocka canary ready", {("mocka", "canary"): ("canary", ["10.1.0.31:8000"])})
        await cluster.delete_pod("mocka-canary-2")
        await takes_effect(store, "undo: canary falls back to base", {("mocka", "canary"): ("base", ["10.1.0.21:8000"])})
        assert store.rejected == 0
        # Pod changes replaced only their services' routes; the table is still what a full build makes of the cache.
        await eventually(lambda: built_from_current_cache(store, source), what="table built from the whole cache")
        documents, version = source.documents()
        assert store.current == build_skipping(documents, version=version, namespace=NAMESPACE).table
        print(f"{source.incremental_updates} of {source.rebuilds} updates applied incrementally")
        assert source.incremental_updates > 0


async def test_a_burst_of_pod_events_is_coalesced_into_few_rebuilds(cluster: Cluster, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    async with running_source(kubeconfig, debounce=0.1, max_delay=1.0) as (store, source):
        await eventually(lambda: store.ready, what="first complete sync")
        before, accepted = source.rebuilds, store.accepted
        count = 30
        await asyncio.gather(*(cluster.create_pod(f"mocka-burst-{i}", app="mocka", tag="canary", ip=f"10.2.0.{i + 1}", ready=True)
                               for i in range(count)))
        expected = sorted(f"10.2.0.{i + 1}:8000" for i in range(count))
        await takes_effect(store, f"{count} canary pods created at once", {("mocka", "canary"): ("canary", expected)})
        # 30 creations and 30 status writes are 60 events; every one of them rebuilding would be 60 tables.
        print(f"{2 * count} events -> {source.rebuilds - before} rebuilds, {store.accepted - accepted} tables published")
        assert source.rebuilds - before <= 10


async def swimlane_status(cluster: Cluster, kind: str, name: str) -> dict:
    stored = await cluster.custom.get_cluster_custom_object(SWIMLANE_API_GROUP, SWIMLANE_VERSION, PLURALS[kind], name)
    return stored.get("status") or {}


async def test_a_broken_lane_created_mid_stream_is_left_out_told_why_and_counted_while_the_rest_updates(
        cluster: Cluster, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    async with running_source(kubeconfig) as (store, source):
        await eventually(lambda: store.ready, what="first complete sync")
        canary = next(doc for doc in yaml_documents(SWIMLANES) if doc["metadata"]["name"] == "canary")
        orphan = json.loads(json.dumps(canary))
        orphan["metadata"] = {"name": "orphan", "labels": {"swimlane-group": "no-such-group"}}
        orphan["spec"]["labelSelector"] = {"ASM_TRAFFIC_TAG": "orphan"}
        await cluster.apply(orphan)
        await eventually(lambda: "kubernetes:ASMSwimLane/orphan" in store.skipped, what="orphan lane left out")
        assert store.objects_rejected == 1 and store.rejected == 0

        # Its status says why, written through the status subresource with the deploy/rbac token.
        async def told() -> bool:
            return "no-such-group" in (await swimlane_status(cluster, "ASMSwimLane", "orphan")).get("error", "")
        await eventually(told, what="status.error on the orphan lane")
        status = await swimlane_status(cluster, "ASMSwimLane", "orphan")
        assert status["validationMessage"] == (
            "ASMSwimLane(orphan).metadata.labels.swimlane-group: no ASMSwimLaneGroup named 'no-such-group'")
        assert await swimlane_status(cluster, "ASMSwimLane", "canary") == {}  # a valid object gets no status

        # Every other change still takes effect, however many times the orphan is rebuilt along.
        await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
        await takes_effect(store, "canary pod with a broken lane beside it",
                           {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])})
        assert store.objects_rejected == 1  # counted once, not once per rebuild

        # Fixed: back in the table, and its status cleared.
        orphan["metadata"]["labels"]["swimlane-group"] = "rollout"
        await cluster.apply(orphan)
        await eventually(lambda: store.current.lane("orphan") is not None and not store.skipped,
                         what="fixed lane back in the table")
        await eventually(lambda: _no_error(cluster, "orphan"), what="status cleared")


async def test_a_bad_edit_of_a_lane_in_use_keeps_its_last_good_version_and_says_so(
        cluster: Cluster, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
    async with running_source(kubeconfig) as (store, source):
        await takes_effect(store, "canary lane in use", {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])})
        canary = next(doc for doc in yaml_documents(SWIMLANES) if doc["metadata"]["name"] == "canary")
        edited = json.loads(json.dumps(canary))
        edited["spec"]["ingressRules"][0]["match"]["uri"] = {"regex": "/mock("}
        await cluster.apply(edited)
        await eventually(lambda: "kubernetes:ASMSwimLane/canary" in store.skipped, what="the bad edit noticed")

        async def told() -> bool:
            return "keeps its last good version" in (await swimlane_status(cluster, "ASMSwimLane", "canary")).get(
                "error", "")
        await eventually(told, what="status.error on the canary lane")
        assert route(store.current, "mocka", "canary") == ("canary", ["10.1.0.11:8000"])  # the lane still serves
        (rule,) = store.current.lane("canary").ingress_rules
        assert rule.match.uri.value == "/mock"  # as it was before the edit
        await cluster.create_pod("mockb-canary", app="mockb", tag="canary", ip="10.1.0.12", ready=True)
        await takes_effect(store, "another change beside the kept lane", {("mockb", "canary"): ("canary", ["10.1.0.12:8000"])})


async def _no_error(cluster: Cluster, name: str) -> bool:
    return "error" not in await swimlane_status(cluster, "ASMSwimLane", name)


async def test_a_namespace_the_sidecar_may_not_read_counts_as_empty_and_holds_back_no_other_update(
        cluster: Cluster, kube_apiserver: KubeApiServer, tmp_path: Path) -> None:
    """A watcher allowed to read `default` only (a RoleBinding there), while a group names team-d too."""
    await start_seed(cluster, BASE)
    with contextlib.suppress(ApiException):
        await cluster.core.create_namespace({"metadata": {"name": "team-d"}})
    await cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": "laneproxy-narrow", "namespace": NAMESPACE}})
    swimlanes_only = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                      "metadata": {"name": "laneproxy-swimlanes-only"},
                      "rules": [{"apiGroups": [SWIMLANE_API_GROUP], "resources": list(PLURALS.values()),
                                 "verbs": ["get", "list", "watch"]}]}
    await cluster.apply(swimlanes_only)
    subject = [{"kind": "ServiceAccount", "name": "laneproxy-narrow", "namespace": NAMESPACE}]
    await cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                         "metadata": {"name": "laneproxy-narrow"}, "subjects": subject,
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                     "name": "laneproxy-swimlanes-only"}})
    with contextlib.suppress(ApiException):
        await client.RbacAuthorizationV1Api(cluster.api).create_namespaced_role_binding(NAMESPACE, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "laneproxy-narrow"}, "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "laneproxy"}})
    group = next(doc for doc in yaml_documents(SWIMLANES) if doc["kind"] == "ASMSwimLaneGroup")
    wider = json.loads(json.dumps(group))
    wider["spec"]["services"].append({"name": "mockd", "namespace": "team-d"})
    await cluster.apply(wider)
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "narrow.json", kube_apiserver.url,
                                                          name="laneproxy-narrow")
    async with running_source(kubeconfig) as (store, source):
        await eventually(lambda: store.ready, what="ready although team-d is forbidden")
        assert source.reflectors[("Pod", "team-d")].forbidden
        assert route_in(store.current, "team-d/mockd", "base") == ("base", [])  # empty, as told
        assert ("Pod.team-d", "forbidden") in source.health().resources
        await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
        await takes_effect(store, "canary pod while team-d stays forbidden",
                           {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])})


async def test_a_403_after_a_namespace_was_read_keeps_its_objects_until_reading_is_allowed_again(
        cluster: Cluster, kube_apiserver: KubeApiServer, tmp_path: Path) -> None:
    """A kube-apiserver that has just started answers 403 until its RBAC cache is warm (the cluster tier's API
    outage showed it: a watcher that emptied the namespace then took every endpoint out for seconds). Reproduced
    on demand: the watcher's RoleBinding is taken away while it is cut off, so its reconnect is refused with 403."""
    await start_seed(cluster, BASE)
    await cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": "laneproxy-revoked", "namespace": NAMESPACE}})
    subject = [{"kind": "ServiceAccount", "name": "laneproxy-revoked", "namespace": NAMESPACE}]
    await cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                         "metadata": {"name": "laneproxy-swimlanes-only"},
                         "rules": [{"apiGroups": [SWIMLANE_API_GROUP], "resources": list(PLURALS.values()),
                                    "verbs": ["get", "list", "watch"]}]})
    await cluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                         "metadata": {"name": "laneproxy-revoked"}, "subjects": subject,
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                     "name": "laneproxy-swimlanes-only"}})
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "laneproxy-revoked"}, "subjects": subject,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "laneproxy"}}
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    with contextlib.suppress(ApiException):
        await rbac.create_namespaced_role_binding(NAMESPACE, binding)
    relay = await TcpRelay(kube_apiserver.port).open()
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "revoked.json", relay.url,
                                                          name="laneproxy-revoked")
    try:
        async with running_source(kubeconfig) as (store, source):
            await eventually(lambda: store.ready, what="first complete sync")
            served = store.current
            assert route(served, "mocka", "base") == ("base", ["10.1.0.1:8000"])
            await relay.close()  # every open connection cut too: the watches must reconnect
            await rbac.delete_namespaced_role_binding("laneproxy-revoked", NAMESPACE)
            await relay.open()
            pods = source.reflectors[(PODS.kind, NAMESPACE)]
            await eventually(lambda: isinstance(pods.last_error, ApiStatusError) and pods.last_error.status == 403
                             and ("Pod.default", "forbidden") in source.health().resources,
                             what="the reconnect refused with 403")
            assert store.current is served  # nothing emptied: the table is the one served before
            assert route(store.current, "mocka", "base") == ("base", ["10.1.0.1:8000"])
            await rbac.create_namespaced_role_binding(NAMESPACE, binding)
            await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
            await takes_effect(store, "a change once reading is allowed again", {
                ("mocka", "canary"): ("canary", ["10.1.0.11:8000"]), ("mocka", "base"): ("base", ["10.1.0.1:8000"])},
                timeout=60)
    finally:
        await relay.close()
        with contextlib.suppress(ApiException):
            await rbac.delete_namespaced_role_binding("laneproxy-revoked", NAMESPACE)


async def test_a_group_naming_another_namespace_makes_the_watcher_follow_it_and_let_go_again(
        cluster: Cluster, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    with contextlib.suppress(ApiException):
        await cluster.core.create_namespace({"metadata": {"name": "team-d"}})
    mockd = {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "mockd", "namespace": "team-d", "labels": {TEST_LABEL[0]: TEST_LABEL[1]}},
             "spec": {"ports": [{"port": 8000, "name": "http"}], "selector": {"app": "mockd"}}}
    await cluster.apply(mockd)
    await cluster.create_pod("mockd-base", app="mockd", tag="base", ip="10.3.0.1", ready=True, namespace="team-d")
    async with running_source(kubeconfig) as (store, source):
        await eventually(lambda: store.ready, what="first complete sync")
        assert source.namespaces == [NAMESPACE] and "team-d/mockd" not in store.current.routes

        group = next(doc for doc in yaml_documents(SWIMLANES) if doc["kind"] == "ASMSwimLaneGroup")
        wider = json.loads(json.dumps(group))
        wider["spec"]["services"].append({"name": "mockd", "namespace": "team-d"})
        await cluster.apply(wider)
        await eventually(lambda: route_in(store.current, "team-d/mockd", "base")[1], what="team-d/mockd in the group")
        assert source.namespaces == [NAMESPACE, "team-d"]
        assert route_in(store.current, "team-d/mockd", "base") == ("base", ["10.3.0.1:8000"])

        await cluster.apply(group)
        await eventually(lambda: source.namespaces == [NAMESPACE] and "team-d/mockd" not in store.current.routes,
                         what="team-d dropped")


async def test_services_are_read_as_kube_proxy_serves_them(cluster: Cluster, kubeconfig: Path) -> None:
    """Multi-port with named target ports, ClusterIP:port, EndpointSlices (v1beta1 on this 1.20 server, written
    here as the EndpointSlice controllers would: no controller-manager runs), selector-less and ExternalName."""
    await start_seed(cluster, BASE)
    labels = {TEST_LABEL[0]: TEST_LABEL[1]}
    await cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mocka", "namespace": NAMESPACE,
                                                                             "labels": labels},
                         "spec": {"selector": {"app": "mocka"}, "ports": [
                             {"name": "http", "port": 8000, "targetPort": "http"},
                             {"name": "metrics", "port": 9090, "targetPort": "metrics"}]}})
    containers = [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080},
                                                             {"name": "metrics", "containerPort": 9100}]},
                  {"name": "sidecar", "image": "proxy", "ports": [{"name": "metrics", "containerPort": 15090}]}]
    await cluster.core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": "mocka-canary", "labels": {
        "app": "mocka", "ASM_TRAFFIC_TAG": "canary", **labels}}, "spec": {"containers": containers}})
    await cluster.set_status("mocka-canary", ip="10.1.0.11", ready=True)
    await cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "legacy", "namespace": NAMESPACE,
                                                                             "labels": labels},
                         "spec": {"ports": [{"port": 5432}]}})
    await cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "external", "namespace": NAMESPACE,
                                                                             "labels": labels},
                         "spec": {"type": "ExternalName", "externalName": "db.example.test", "ports": [{"port": 443}]}})
    slices = f"/apis/discovery.k8s.io/v1beta1/namespaces/{NAMESPACE}/endpointslices"  # no typed client for v1beta1

    async def create_slice(body: dict) -> None:
        await cluster.api.call_api(slices, "POST", body=body, auth_settings=["BearerToken"],
                                   header_params={"Content-Type": "application/json", "Accept": "application/json"},
                                   response_types_map={"201": "object"})

    endpoint_slice = {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
                      "metadata": {"name": "legacy-mirrored", "labels": {"kubernetes.io/service-name": "legacy"}},
                      "ports": [{"name": "", "port": 5432, "protocol": "TCP"}],
                      "endpoints": [{"addresses": ["10.50.0.1"], "conditions": {"ready": True}}]}
    await create_slice(endpoint_slice)
    try:
        async with running_source(kubeconfig) as (store, source):
            await eventually(lambda: store.ready and b"mocka:9090" in store.current.hosts, what="both ports of mocka")
            assert source.reflectors[("EndpointSlice", NAMESPACE)].kind.api_version == "discovery.k8s.io/v1beta1"
            table = store.current
            lanes = {host: (routes.route_for(b"canary").lane_used,
                            sorted(e.address for e in routes.route_for(b"canary").endpoints))
                     for host, routes in table.hosts.items() if host in (b"mocka:8000", b"mocka:9090")}
            assert lanes == {b"mocka:8000": ("canary", ["10.1.0.11:8080"]), b"mocka:9090": ("canary", ["10.1.0.11:9100"])}
            cluster_ip = (await cluster.core.read_namespaced_service("mocka", NAMESPACE)).spec.cluster_ip
            assert table.hosts[f"{cluster_ip}:9090".encode()] is table.hosts[b"mocka:9090"]
            legacy, external = table.hosts[b"legacy:5432"], table.hosts[b"external:443"]
            assert legacy.passthrough and [e.address for e in legacy.default.endpoints] == ["10.50.0.1:5432"]
            assert external.passthrough and [e.address for e in external.default.endpoints] == ["db.example.test:443"]
            assert not table.hosts[b"mocka:8000"].passthrough

            # Once mocka has slices they are what counts, not the pods: the canary pod is Ready, but its slice
            # endpoint is not (1.20 drops serving/terminating with its alpha gate off; tests/unit has them).
            mocka_slice = {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
                           "metadata": {"name": "mocka-slice", "labels": {"kubernetes.io/service-name": "mocka"}},
                           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                           "endpoints": [{"addresses": ["10.1.0.11"], "targetRef": {"kind": "Pod", "name": "mocka-canary"},
                                          "conditions": {"ready": False, "serving": True, "terminating": True}},
                                         {"addresses": ["10.1.0.12"], "conditions": {"ready": True}}]}
            await create_slice(mocka_slice)
            await eventually(lambda: [e.address for e in store.current.hosts[b"mocka:8000"].route_for(b"canary").endpoints]
                             == [], what="the terminating canary endpoint out while another is ready")
    finally:
        await cluster.api.call_api(slices, "DELETE", auth_settings=["BearerToken"],
                                   header_params={"Accept": "application/json"}, response_types_map={"200": "object"})


# ---------------------------------------------------------------------------------------------
# Pods read as metadata only (the controller's mode)

SLICES_PATH = f"/apis/discovery.k8s.io/v1beta1/namespaces/{NAMESPACE}/endpointslices"  # this 1.20 server: v1beta1


class SliceWriter:
    """Writes a Service's EndpointSlice as the endpointslice controller would (no controller-manager runs here):
    one slice per Service, an endpoint per pod with its address, Ready condition and targetRef."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def _call(self, path: str, method: str, body: dict | None = None) -> Any:
        return await self.cluster.api.call_api(
            path, method, body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            response_types_map={"200": "object", "201": "object"})

    async def write(self, service: str, pods: list[tuple[str, str, bool]]) -> None:
        """`pods`: (pod name, pod IP, ready)."""
        name = f"{service}-abcde"
        body = {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {
                    "kubernetes.io/service-name": service, TEST_LABEL[0]: TEST_LABEL[1],
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": ready},
                               "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod}}
                              for pod, ip, ready in pods]}
        response = await self.cluster.api.call_api(f"{SLICES_PATH}/{name}", "GET", auth_settings=["BearerToken"],
                                                   header_params={"Accept": "application/json"}, _preload_content=False)
        current = json.loads(await response.read())
        if response.status == 404:
            await self._call(SLICES_PATH, "POST", body)
            return
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await self._call(f"{SLICES_PATH}/{name}", "PUT", body)

    async def delete_all(self) -> None:
        await self.cluster.api.call_api(
            SLICES_PATH, "DELETE", query_params=[("labelSelector", f"{TEST_LABEL[0]}={TEST_LABEL[1]}")],
            auth_settings=["BearerToken"], header_params={"Accept": "application/json"},
            response_types_map={"200": "object"})


def lane_view(table: RouteTable) -> Any:
    """Every field of the table but its version, endpoint labels and fallback chains included (equality skips them)."""
    from tests.unit.test_incremental import canonical

    return canonical(dataclasses.replace(table, version=""))


async def test_pods_read_as_metadata_only_give_the_table_whole_pods_give(cluster: Cluster, kubeconfig: Path) -> None:
    """The same objects, two sources side by side: whole Pods, and the metadata of the lane-labelled pods with the
    EndpointSlices' endpoints. After each step of a rollout both serve a table equal in every field."""
    await start_seed(cluster, BASE)
    slices = SliceWriter(cluster)
    ready = {"mocka": [("mocka-v1-base", BASE["mocka"], True)], "mockb": [("mockb-v1-base", BASE["mockb"], True)],
             "mockc": [("mockc-v1-base", BASE["mockc"], True)]}
    await cluster.create_pod("mocka-canary", app="mocka", tag="canary", version="v2", ip="10.1.0.11", ready=True)
    await cluster.create_pod("mockb-canary", app="mockb", tag="canary", version="v2", ip="10.1.0.12", ready=False)
    ready["mocka"].append(("mocka-canary", "10.1.0.11", True))
    ready["mockb"].append(("mockb-canary", "10.1.0.12", False))
    # A pod with no lane label (a Job's, say) that no Service selects: the metadata source never caches it.
    await cluster.core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": "migrate-db", "labels": {
        "app": "migrate", TEST_LABEL[0]: TEST_LABEL[1]}}, "spec": {"containers": [{"name": "job", "image": "job"}]}})
    await cluster.set_status("migrate-db", ip="10.1.0.99", ready=True)
    for service, pods in ready.items():
        await slices.write(service, pods)
    asked: list[tuple[str, dict, str]] = []
    try:
        async with running_source(kubeconfig, pods="full", watch_timeout=100) as (full, full_source), \
                running_source(kubeconfig, pods="metadata", watch_timeout=100) as (meta, meta_source):
            transport = meta_source._transport
            real_get, real_stream = transport.get_json, transport.stream

            def get_json(path: str, params: dict, **kw: Any) -> Any:
                asked.append((path, dict(params), kw.get("accept", "application/json")))
                return real_get(path, params, **kw)

            def stream(path: str, params: dict, **kw: Any) -> Any:
                asked.append((path, dict(params), kw.get("accept", "application/json")))
                return real_stream(path, params, **kw)

            transport.get_json, transport.stream = get_json, stream

            async def agree(what: str, expected: dict[tuple[str, str], tuple[str, list[str]]]) -> None:
                def holds() -> bool:
                    return (full.ready and meta.ready and built_from_current_cache(full, full_source)
                            and built_from_current_cache(meta, meta_source)
                            and all(route(store.current, *key) == want for key, want in expected.items()
                                    for store in (full, meta)))

                try:
                    await eventually(holds, what=what)
                except AssertionError:
                    actual = {name: {key: route(store.current, *key) for key in expected}
                              for name, store in (("full", full), ("metadata", meta))}
                    raise AssertionError(f"{what}: expected {expected}, tables have {actual}") from None
                assert lane_view(meta.current) == lane_view(full.current), what

            await agree("first tables", {
                ("mocka", "canary"): ("canary", ["10.1.0.11:8000"]), ("mocka", "base"): ("base", ["10.1.0.1:8000"]),
                ("mockb", "canary"): ("base", ["10.1.0.2:8000"]), ("mockc", "canary"): ("base", ["10.1.0.3:8000"])})
            labels = [dict(e.labels) for e in meta.current.routes[f"{NAMESPACE}/mocka"].by_lane[b"canary"].endpoints]
            assert labels and labels[0]["ASM_TRAFFIC_TAG"] == "canary" and labels[0]["version"] == "v2"
            cached = meta_source.reflectors[("Pod", NAMESPACE)].objects
            assert "migrate-db" not in cached and "mocka-canary" in cached
            assert all(set(body) == {"apiVersion", "kind", "metadata"} for body in cached.values())
            assert "migrate-db" in full_source.reflectors[("Pod", NAMESPACE)].objects

            # The kubelet reports mockb's canary Ready; the endpointslice controller follows.
            await cluster.set_status("mockb-canary", ip="10.1.0.12", ready=True)
            ready["mockb"][1] = ("mockb-canary", "10.1.0.12", True)
            await slices.write("mockb", ready["mockb"])
            await agree("mockb canary ready", {("mockb", "canary"): ("canary", ["10.1.0.12:8000"])})

            # Kruise relabels mocka's canary pod into base (a promotion in place): only its metadata changes.
            await cluster.core.patch_namespaced_pod("mocka-canary", NAMESPACE,
                                                     {"metadata": {"labels": {"ASM_TRAFFIC_TAG": "base"}}})
            await agree("mocka canary relabelled base", {
                ("mocka", "canary"): ("base", ["10.1.0.11:8000", "10.1.0.1:8000"]),
                ("mocka", "base"): ("base", ["10.1.0.11:8000", "10.1.0.1:8000"])})

            # Undo: the canary pod is deleted and leaves its slice.
            await cluster.delete_pod("mockb-canary")
            await slices.write("mockb", ready["mockb"][:1])
            await agree("mockb canary deleted", {("mockb", "canary"): ("base", ["10.1.0.2:8000"])})
            assert meta.rejected == 0 and full.rejected == 0
            assert meta_source.incremental_updates > 0
    finally:
        await slices.delete_all()
    pod_lists = [(params, accept) for path, params, accept in asked if path.endswith("/pods") and "watch" not in params]
    pod_watches = [(params, accept) for path, params, accept in asked if path.endswith("/pods") and "watch" in params]
    assert pod_lists and pod_watches
    for params, accept in pod_lists:
        assert params["labelSelector"] == "ASM_TRAFFIC_TAG" and params.get("resourceVersion") == "0"
        assert accept == "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
    for params, accept in pod_watches:
        assert params["labelSelector"] == "ASM_TRAFFIC_TAG" and 100 <= int(params["timeoutSeconds"]) < 200
        assert accept == "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
    others = [accept for path, params, accept in asked if not path.endswith("/pods")]
    assert others and set(others) == {"application/json"}


async def test_a_service_ports_app_protocol_and_name_select_its_upstream_protocol(cluster: Cluster, kubeconfig: Path) -> None:
    """appProtocol and port names as the API server stores them reach the table: HTTP/2 ports, the rest auto."""
    await start_seed(cluster, BASE)
    labels = {TEST_LABEL[0]: TEST_LABEL[1]}
    await cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rpc", "namespace": NAMESPACE,
                                                                             "labels": labels},
                         "spec": {"selector": {"app": "rpc"}, "ports": [
                             {"name": "http", "port": 8000},
                             {"name": "grpc-api", "port": 9000},
                             {"name": "web", "port": 9001, "appProtocol": "kubernetes.io/h2c"},
                             {"name": "grpc-legacy", "port": 9002, "appProtocol": "http"}]}})
    async with running_source(kubeconfig) as (store, _):
        await eventually(lambda: store.ready and b"rpc:9002" in store.current.hosts, what="every port of rpc")
        protocols = {port: store.current.hosts[b"rpc:%d" % port].service.protocol.value for port in (8000, 9000, 9001, 9002)}
    assert protocols == {8000: "auto", 9000: "http2", 9001: "http2", 9002: "auto"}


# ---------------------------------------------------------------------------------------------
# Faults


class TcpRelay:
    """Real bytes between watcher and API server, with three switches: `cut` every connection (a killed
    watch stream), `close` the listener (the server is away: connection refused) until `open`, and
    `black_hole` the open connections: from then on their bytes are dropped in both directions and never
    a FIN or RST is sent, as when a firewall drops a connection's packets (a half-open watch). The relay
    still acknowledges at the TCP level, so only the watcher's read timeout can notice, not keepalive:
    the cluster tier drops the packets themselves (iptables) for that."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._holes: set[asyncio.StreamWriter] = set()

    def black_hole(self) -> None:
        self._holes.update(self._writers)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def open(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._holes.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, upstream_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if sink in self._holes:
                        continue  # swallowed: the other side sees silence, never a close
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._writers.difference_update((writer, upstream_writer))


@pytest.fixture
async def relay(kube_apiserver: KubeApiServer) -> AsyncIterator[TcpRelay]:
    relay = await TcpRelay(kube_apiserver.port).open()
    yield relay
    await relay.close()


async def test_not_ready_before_the_first_complete_sync(cluster: Cluster, relay: TcpRelay, tmp_path: Path) -> None:
    await start_seed(cluster, BASE)
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "relay.json", relay.url)
    await relay.close()  # the API server is unreachable when the proxy starts
    async with running_source(kubeconfig) as (store, source):
        groups = source.reflectors[(SWIMLANE_GROUPS.kind, None)]
        await eventually(lambda: groups.failures >= 3, what="three refused connections")
        assert not store.ready and store.current.version == "" and not source.synced
        await relay.open()
        elapsed = await eventually(lambda: store.ready, what="ready once the server answers")
        print(f"ready {elapsed * 1000:.0f} ms after the API server became reachable")
        assert route(store.current, "mocka", "canary") == ("base", ["10.1.0.1:8000"])


async def test_a_killed_watch_stream_resumes_from_its_resource_version(cluster: Cluster, relay: TcpRelay, tmp_path: Path) -> None:
    await start_seed(cluster, BASE)
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "relay.json", relay.url)
    async with running_source(kubeconfig) as (store, source):
        await eventually(lambda: store.ready, what="first complete sync")
        lists = {key: r.lists for key, r in source.reflectors.items()}
        watches = {key: r.watches for key, r in source.reflectors.items()}
        relay.cut()
        await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
        await takes_effect(store, "canary pod after a killed stream", {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])})
        await eventually(lambda: all(r.watches > watches[key] for key, r in source.reflectors.items()),
                         what="every watch restarted")
        assert {key: r.lists for key, r in source.reflectors.items()} == lists  # resumed, not relisted


async def test_the_table_turns_stale_while_the_api_server_is_away_and_current_once_it_is_back(
        cluster: Cluster, relay: TcpRelay, tmp_path: Path) -> None:
    await start_seed(cluster, BASE)
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "relay.json", relay.url)
    async with running_source(kubeconfig, stale_after=2.0) as (store, source):
        await eventually(lambda: store.ready, what="first complete sync")
        await eventually(lambda: all(state == "watching" for _, state in source.health().resources), what="all watching")
        health = source.health()
        assert not health.stale and health.table_age_seconds == 0
        await relay.close()  # every watch is cut and every reconnect refused
        await eventually(lambda: source.health().stale, what="the stale gauge red while the API is away")
        assert all(state == "retrying" for _, state in source.health().resources)
        assert store.ready  # still serving, and still ready: see README, "Table age"
        await relay.open()
        await eventually(lambda: not source.health().stale and source.health().table_age_seconds == 0,
                         what="current again")


@pytest.mark.parametrize("pods", ["full", "metadata"])
async def test_a_watch_gone_silent_without_a_fin_is_noticed_and_resumed_with_no_update_lost(
        cluster: Cluster, relay: TcpRelay, tmp_path: Path, pods: str) -> None:
    """Before: the read timeout was the watch timeout + 30 s, so a half-open watch went unnoticed for 330 s.
    Pods read as metadata are watched with the same read timeout (their endpoints come from the slices)."""
    await start_seed(cluster, BASE)
    slices = SliceWriter(cluster)
    if pods == "metadata":
        for app, ip in BASE.items():
            await slices.write(app, [(f"{app}-v1-base", ip, True)])
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "relay.json", relay.url)
    read_timeout = 3.0
    try:
        async with running_source(kubeconfig, watch_read_timeout=read_timeout, pods=pods) as (store, source):
            await eventually(lambda: store.ready, what="first complete sync")
            await eventually(lambda: all(r.state == "watching" for r in source.reflectors.values()), what="all watching")
            lists = {key: r.lists for key, r in source.reflectors.items()}
            silent = {key: r.silent_watches for key, r in source.reflectors.items()}
            relay.black_hole()  # every open watch goes silent: no byte, no FIN, no RST
            # Made while nobody hears: the pod events are on streams that will never deliver them.
            await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
            if pods == "metadata":
                await slices.write("mocka", [("mocka-v1-base", BASE["mocka"], True), ("mocka-canary", "10.1.0.11", True)])
            elapsed = await takes_effect(store, "canary pod created behind a black-holed watch",
                                         {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])}, timeout=60)
            print(f"noticed and caught up after {elapsed:.1f}s with a read timeout of {read_timeout:.0f}s")
            pod_watch = source.reflectors[("Pod", NAMESPACE)]
            assert pod_watch.kind.metadata_only == (pods == "metadata")
            assert pod_watch.silent_watches > silent[("Pod", NAMESPACE)]
            assert {key: r.lists for key, r in source.reflectors.items()} == lists  # resumed from its resourceVersion
    finally:
        await slices.delete_all()


async def test_lists_come_from_the_watch_cache_and_watch_timeouts_are_spread(cluster: Cluster, kubeconfig: Path) -> None:
    """The query of every request, recorded on the real transport (it travels inside TLS, out of a relay's sight)."""
    await start_seed(cluster, BASE)
    asked: list[tuple[str, dict]] = []
    store = RouteTableStore()
    source = KubernetesSource(store, namespace=NAMESPACE, kubeconfig=str(kubeconfig), watch_timeout=100)
    await source.start()  # the watch tasks are created, and run from the next await on
    transport = source._transport
    real_get, real_stream = transport.get_json, transport.stream
    transport.get_json = lambda path, params, **kw: (asked.append((path, dict(params))), real_get(path, params, **kw))[1]
    transport.stream = lambda path, params, **kw: (asked.append((path, dict(params))), real_stream(path, params, **kw))[1]
    try:
        await eventually(lambda: store.ready, what="first complete sync")
        timeouts = [reflector.watch_seconds() for reflector in source.reflectors.values() for _ in range(20)]
    finally:
        await source.stop()
    lists = [params for path, params in asked if "watch" not in params]
    watches = [params for path, params in asked if "watch" in params]
    assert lists and all(params.get("resourceVersion") == "0" for params in lists)
    assert watches and all(100 <= int(params["timeoutSeconds"]) < 200 for params in watches)
    assert all(100 <= t < 200 for t in timeouts) and len(set(timeouts)) > 10  # not in lockstep


def _apiserver_command(kube: KubeApiServer) -> list[str]:
    """The fixture's kube-apiserver command line, read from /proc: a second server needs the same flags."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [part.decode() for part in (entry / "cmdline").read_bytes().split(b"\0") if part]
        except OSError:
            continue
        if f"--secure-port={kube.port}" in argv and f"--etcd-servers={kube.etcd_url}" in argv:
            return argv
    raise AssertionError("the fixture's kube-apiserver process was not found")


class SecondApiServer:
    """Another kube-apiserver on the fixture's etcd (as in an HA control plane) that a test may stop and start."""

    def __init__(self, kube: KubeApiServer, workdir: Path, *extra_args: str) -> None:
        self.kube, self.workdir = kube, workdir
        self.port = _free_port()
        self.argv = [arg for arg in _apiserver_command(kube) if not arg.startswith(("--secure-port=", "--cert-dir="))]
        self.argv += [f"--secure-port={self.port}", f"--cert-dir={workdir / 'certs'}", *extra_args]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> float:
        started = time.monotonic()
        log = open(self.workdir / "kube-apiserver-2.log", "ab")
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        context = self.kube.ssl_context()
        while time.monotonic() - started < timeout:
            assert self.process.poll() is None, f"second kube-apiserver exited; see {self.workdir}/kube-apiserver-2.log"
            request = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.kube.token}"})
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(request, timeout=2, context=context) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"second kube-apiserver not ready after {timeout}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _free_port() -> int:
    """A free port below the ephemeral range: a port the kernel hands out for outgoing connections (there are
    thousands here) may be taken again before the process that was given it binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def compact_etcd(kube: KubeApiServer) -> int:
    """Compact etcd's history up to now (the API server does this every 5 minutes); returns the revision."""
    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(kube.etcd_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    revision = int(post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
    post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
    return revision


@pytest.fixture(scope="module")
def second_apiserver(kube_apiserver: KubeApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondApiServer]:
    """Without a watch cache, so that a watch from a compacted revision is answered 410 Gone at once (with the
    cache, the server answers 410 once the revision has left the cache's window: minutes, or after a restart)."""
    server = SecondApiServer(kube_apiserver, tmp_path_factory.mktemp("apiserver-2"), "--watch-cache=false")
    started = server.start()
    print(f"second kube-apiserver ready after {started:.1f}s")
    yield server
    server.stop()


async def test_a_watch_from_a_compacted_resource_version_gets_410_gone(
        cluster: Cluster, kube_apiserver: KubeApiServer, second_apiserver: SecondApiServer, tmp_path: Path) -> None:
    """The real server's answer, at the step level: the typed error that makes the reconnect loop relist."""
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "second.json", second_apiserver.url)
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        transport = ApiTransport(api, request_timeout=30, connect_timeout=5)
        reflector = Reflector(transport, PODS, NAMESPACE, on_change=lambda _: None,
                              backoff=Backoff(0.1, 1, random.Random(0)), watch_timeout=30)
        await reflector.list()
        listed = int(reflector.resource_version)
        for index in range(2):
            await cluster.create_pod(f"mocka-compacted-{index}", app="mocka", tag="base")
        assert compact_etcd(kube_apiserver) > listed + 1
        with pytest.raises(ResourceExpiredError) as expired:
            await reflector.watch()
        assert expired.value.status == 410
        print(f"410 from the real server: {expired.value}")


async def test_410_gone_on_reconnect_relists_without_dropping_the_served_table(
        cluster: Cluster, kube_apiserver: KubeApiServer, second_apiserver: SecondApiServer, tmp_path: Path) -> None:
    await start_seed(cluster, BASE)
    relay = await TcpRelay(second_apiserver.port).open()
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "relay.json", relay.url)
    try:
        async with running_source(kubeconfig) as (store, source):
            await eventually(lambda: store.ready, what="first complete sync")
            served = store.current
            await relay.close()
            # While the watcher is cut off: changes, then etcd compacts the history it would resume from.
            await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
            await cluster.delete_pod("mockb-v1-base")
            compact_etcd(kube_apiserver)
            pods = source.reflectors[(PODS.kind, NAMESPACE)]
            failures = pods.failures
            await eventually(lambda: pods.failures >= failures + 2, what="reconnects refused")
            assert store.current is served
            await relay.open()
            await takes_effect(store, "changes made while cut off, after 410 and relist", {
                ("mocka", "canary"): ("canary", ["10.1.0.11:8000"]), ("mockb", "base"): ("base", [])})
            # Every stream resumes from a compacted revision, so each relists exactly once (some may still be
            # in their backoff when the pod changes are in).
            await eventually(lambda: all(r.relists_after_expiry for r in source.reflectors.values()),
                             what="every stream relisted")
            assert {r.name: r.relists_after_expiry for r in source.reflectors.values()} == {
                r.name: 1 for r in source.reflectors.values()}
            assert store.current is not served and store.rejected == 0
    finally:
        await relay.close()


async def test_api_server_stopped_and_started_again_keeps_the_last_table_and_catches_up(
        cluster: Cluster, second_apiserver: SecondApiServer, tmp_path: Path) -> None:
    server = second_apiserver
    try:
        await start_seed(cluster, BASE)
        kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "second.json", server.url)
        async with running_source(kubeconfig, backoff_cap=2.0) as (store, source):
            await eventually(lambda: store.ready, what="first complete sync")
            await cluster.create_pod("mocka-canary", app="mocka", tag="canary", ip="10.1.0.11", ready=True)
            await takes_effect(store, "canary before the outage", {("mocka", "canary"): ("canary", ["10.1.0.11:8000"])})
            served = store.current

            await asyncio.to_thread(server.stop)
            stopped = time.monotonic()
            # Changes made through the other API server while this one is down.
            await cluster.delete_pod("mocka-canary")
            await cluster.create_pod("mockb-canary", app="mockb", tag="canary", ip="10.1.0.12", ready=True)
            pods = source.reflectors[(PODS.kind, NAMESPACE)]
            failures = pods.failures
            while time.monotonic() - stopped < OUTAGE_SECONDS:
                assert store.current is served  # the last good table keeps serving all along
                await asyncio.sleep(0.1)
            assert pods.failures > failures, "the watcher should have kept trying to reconnect"

            restart = await asyncio.to_thread(server.start)
            caught_up = await takes_effect(store, f"after a {OUTAGE_SECONDS:.0f}s outage", {
                ("mocka", "canary"): ("base", ["10.1.0.1:8000"]), ("mockb", "canary"): ("canary", ["10.1.0.12:8000"])},
                timeout=30)
            relists = {r.name: r.relists_after_expiry for r in source.reflectors.values()}
            print(f"second API server restarted in {restart:.1f}s; watcher caught up "
                  f"{caught_up:.2f}s after it was ready; relists after 410: {relists}")
    finally:
        if server.process is None or server.process.poll() is not None:
            await asyncio.to_thread(server.start)  # the module's other tests need it


# ---------------------------------------------------------------------------------------------
# The real process: `laneproxy run --source kubernetes` as a gateway in front of mock apps


OUTAGE_WITH_TRAFFIC_SECONDS = 5.0


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def answers(url: str, expected: tuple[int, str], headers: dict[str, str] | None = None) -> bool:
    """Off the event loop: the relay that carries the proxy's watch runs on it."""
    return await asyncio.to_thread(_get, url, headers) == expected


async def test_laneproxy_run_with_the_kubernetes_source_routes_canary_requests_as_pods_change(
        cluster: Cluster, relay: TcpRelay, tmp_path: Path) -> None:
    # Every "pod" here is a mock app on 127.0.0.1, so each declares its own port and the Services target it by name.
    ports = {name: _free_port() for name in ("mocka-v1", "mocka-v2", "admin", "gateway")}
    await cluster.apply_all(yaml_documents(SWIMLANES) + seed_services(target_port="http"))
    await cluster.create_pod("mocka-v1-base", app="mocka", tag="base", version="v1", port=ports["mocka-v1"],
                             ip="127.0.0.1", ready=True)
    kubeconfig = await cluster.service_account_kubeconfig(tmp_path / "relay.json", relay.url)
    await relay.close()
    python = [sys.executable, "-m", "laneproxy"]
    processes = [
        subprocess.Popen([*python, "mock", "--listen", f"127.0.0.1:{ports[f'mocka-{v}']}", "--app", "mocka",
                          "--version", v], stdin=subprocess.DEVNULL)
        for v in ("v1", "v2")
    ]
    processes.append(subprocess.Popen(
        [*python, "--log-level", "info", "run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
         "--namespace", NAMESPACE, "--drain-seconds", "0", "--gateway", f"127.0.0.1:{ports['gateway']}", "--admin", f"127.0.0.1:{ports['admin']}"],
        stdin=subprocess.DEVNULL))
    admin, gateway = f"http://127.0.0.1:{ports['admin']}", f"http://127.0.0.1:{ports['gateway']}/mock"
    canary = {"x-asm-prefer-tag": "canary", "my-request-id": "10002"}
    V1, V2 = (200, "mocka(version: v1, ip: 127.0.0.1)"), (200, "mocka(version: v2, ip: 127.0.0.1)")  # noqa: N806
    try:
        # The API server is unreachable: the admin answers, the proxy is not ready.
        await eventually(lambda: answers(admin + "/ready", (503, "PRE_INITIALIZING\n")), what="admin up, not ready")
        await relay.open()
        await eventually(lambda: answers(admin + "/ready", (200, "LIVE\n")), what="ready after the first sync")
        assert await answers(gateway, V1, canary)

        await cluster.create_pod("mocka-canary", app="mocka", tag="canary", version="v2", port=ports["mocka-v2"],
                                 ip="127.0.0.1", ready=True)
        elapsed = await eventually(lambda: answers(gateway, V2, canary), what="canary requests reach the canary pod")
        print(f"canary pod reached through the gateway {elapsed * 1000:.0f} ms after it was ready")
        assert await answers(gateway, V1, {"x-asm-prefer-tag": "base"})
        lanes = json.loads((await asyncio.to_thread(_get, admin + "/lanes"))[1])
        assert lanes["services"]["default/mocka"]["lanes"]["canary"]["endpoints"] == [f"127.0.0.1:{ports['mocka-v2']}"]

        # An API outage with traffic: the watch streams are cut and the API cannot be reached. Requests keep
        # flowing on the last table; a rollback made meanwhile appears once the API is back.
        await relay.close()
        await cluster.delete_pod("mocka-canary")
        outage_ends, served = time.monotonic() + OUTAGE_WITH_TRAFFIC_SECONDS, 0
        while time.monotonic() < outage_ends:
            assert await answers(gateway, V2, canary), "the last table must keep serving during the outage"
            served += 1
            await asyncio.sleep(0.05)
        await relay.open()
        elapsed = await eventually(lambda: answers(gateway, V1, canary), what="rollback seen after the outage")
        print(f"{served} canary requests served on the last table during a {OUTAGE_WITH_TRAFFIC_SECONDS:.0f}s outage; "
              f"the rollback made meanwhile took effect {elapsed * 1000:.0f} ms after the API came back")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------------
# The rollout story under continuous traffic: a gateway and app+sidecar pairs, all on the Kubernetes source

UPSTREAM = {"mocka": "mockb", "mockb": "mockc", "mockc": None}
HOP = re.compile(r"(\w+)\(version: (\w+), ip: [^)]*\)")


class StoryPod:
    """One pod of the story: a mock app and its laneproxy sidecar (inbound + outbound), both real processes.
    The Pod object names the sidecar's inbound port as its `http` port; its IP is 127.0.0.1."""

    def __init__(self, app: str, version: str, tag: str, index: int) -> None:
        self.app, self.version, self.tag = app, version, tag
        self.name = f"{app}-{version}-{tag}-{index}"
        self.app_port, self.inbound, self.outbound, self.admin = (_free_port() for _ in range(4))
        self.processes: list[subprocess.Popen] = []

    def start(self, kubeconfig: Path) -> None:
        self.processes.append(_laneproxy(
            "run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE,
            "--inbound", f"127.0.0.1:{self.inbound}", "--app", f"127.0.0.1:{self.app_port}",
            "--outbound", f"127.0.0.1:{self.outbound}", "--admin", f"127.0.0.1:{self.admin}",
            "--lane", self.tag, "--drain-seconds", "1"))
        upstream = f"http://{UPSTREAM[self.app]}:8000/" if UPSTREAM[self.app] else ""
        self.processes.append(_laneproxy("mock", "--listen", f"127.0.0.1:{self.app_port}", env={
            "app": self.app, "version": self.version, "upstream_url": upstream,
            "HTTP_PROXY": f"http://127.0.0.1:{self.outbound}"}))

    def stop(self) -> None:
        """Sidecar first (it drains what is in flight), then the app: a pod's graceful termination."""
        for process in self.processes:
            _terminate(process)


def _laneproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "laneproxy", "--log-level", "warning", *args],
                            env=environment, stdin=subprocess.DEVNULL)


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Story:
    """Pods in the API and their processes; the timeline of lane membership the traffic is checked against."""

    def __init__(self, cluster: Cluster, kubeconfig: Path, admin_ports: list[int]) -> None:
        self.cluster, self.kubeconfig = cluster, kubeconfig
        self.gateway_admin = admin_ports
        self.pods: list[StoryPod] = []
        self.ready: list[StoryPod] = []
        # (change began, change took effect everywhere, ready pods after it): what a request may have met.
        self.timeline: list[tuple[float, float, tuple[StoryPod, ...]]] = [(float("-inf"), float("-inf"), ())]
        self.effects: list[tuple[str, float]] = []
        self.created = 0

    def admins(self) -> list[int]:
        return [*self.gateway_admin, *(pod.admin for pod in self.pods)]

    def expected_lanes(self) -> dict[tuple[str, str], list[str]]:
        expected = {}
        for app in UPSTREAM:
            base = sorted(f"127.0.0.1:{p.inbound}" for p in self.ready if p.app == app and p.tag == "base")
            for lane in ("base", "canary"):
                own = sorted(f"127.0.0.1:{p.inbound}" for p in self.ready if p.app == app and p.tag == lane)
                expected[(app, lane)] = own or base
        return expected

    async def converged(self) -> bool:
        """Every proxy (gateway and sidecars) routes as the ready pods imply."""
        expected = self.expected_lanes()

        def check(port: int) -> bool:
            status, body = _get(f"http://127.0.0.1:{port}/lanes")
            if status != 200:
                return False
            services = json.loads(body)["services"]
            return all(sorted(services.get(f"{NAMESPACE}/{app}", {}).get("lanes", {}).get(lane, {}).get("endpoints", [])) == want
                       for (app, lane), want in expected.items())

        answers = await asyncio.gather(*(asyncio.to_thread(check, port) for port in self.admins()))
        return all(answers)

    async def _record(self, description: str, began: float) -> None:
        elapsed = await eventually(self.converged, timeout=30, what=description)
        self.timeline.append((began, time.monotonic(), tuple(self.ready)))
        self.effects.append((description, elapsed))

    async def add(self, app: str, version: str, tag: str) -> StoryPod:
        """Kruise creates the pod; the kubelet starts it and reports it Ready once the sidecar is ready."""
        self.created += 1
        pod = StoryPod(app, version, tag, self.created)
        await self.cluster.create_pod(pod.name, app=app, tag=tag, version=version, port=pod.inbound)
        self.pods.append(pod)
        pod.start(self.kubeconfig)
        await eventually(lambda: answers(f"http://127.0.0.1:{pod.admin}/ready", (200, "LIVE\n")), timeout=30,
                         what=f"{pod.name} sidecar ready")
        began = time.monotonic()
        await self.cluster.set_status(pod.name, ip="127.0.0.1", ready=True)
        self.ready.append(pod)
        await self._record(f"{pod.name} ready", began)
        return pod

    async def delete(self, pod: StoryPod) -> None:
        """Deleted in the API first; its processes stop once no proxy routes to it (preStop-style)."""
        began = time.monotonic()
        await self.cluster.delete_pod(pod.name)
        self.ready.remove(pod)
        await self._record(f"{pod.name} deleted", began)
        await asyncio.to_thread(pod.stop)
        self.pods.remove(pod)

    def allowed(self, started: float, ended: float) -> list[set[tuple[str, str]]]:
        """Per lane request, per hop: the (app, version) pairs any membership visible during the request implies."""
        visible = []
        for index, (began, _, ready) in enumerate(self.timeline):
            until = self.timeline[index + 1][1] if index + 1 < len(self.timeline) else float("inf")
            if began <= ended and started <= until:
                visible.append(ready)
        return visible

    def chain_ok(self, lane: str, body: str, started: float, ended: float) -> bool:
        hops = HOP.findall(body)
        if [app for app, _ in hops] != ["mocka", "mockb", "mockc"]:
            return False
        for app, version in hops:
            options = set()
            for ready in self.allowed(started, ended):
                own = {p.version for p in ready if p.app == app and p.tag == lane}
                options |= own or {p.version for p in ready if p.app == app and p.tag == "base"}
            if version not in options:
                return False
        return True

    def stop(self) -> None:
        for pod in self.pods:
            pod.stop()


async def test_rollout_story_under_continuous_traffic_every_request_succeeds_on_its_lane(
        cluster: Cluster, kubeconfig: Path) -> None:
    await cluster.apply_all(yaml_documents(SWIMLANES) + seed_services(target_port="http"))
    gateway_port, gateway_admin = _free_port(), _free_port()
    gateway = _laneproxy("run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE,
                         "--gateway", f"127.0.0.1:{gateway_port}", "--admin", f"127.0.0.1:{gateway_admin}",
                         "--drain-seconds", "0")
    story = Story(cluster, kubeconfig, [gateway_admin])
    records: list[tuple[str, float, float, int, str]] = []
    stop = asyncio.Event()

    async def traffic(session: aiohttp.ClientSession, worker: int) -> None:
        index = 0
        while not stop.is_set():
            lane = ("base", "canary", None)[(worker + index) % 3]
            headers = {"my-request-id": f"story-{worker}-{index}"}
            if lane:
                headers["x-asm-prefer-tag"] = lane
            started = time.monotonic()
            try:
                async with session.get(f"http://127.0.0.1:{gateway_port}/mock", headers=headers) as answer:
                    status, body = answer.status, await answer.text()
            except aiohttp.ClientError as exc:
                status, body = 0, repr(exc)
            records.append((lane or "base", started, time.monotonic(), status, body))
            index += 1

    try:
        await eventually(lambda: answers(f"http://127.0.0.1:{gateway_admin}/ready", (200, "LIVE\n")), timeout=30,
                         what="gateway ready")
        bases = {app: await story.add(app, "v1", "base") for app in UPSTREAM}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            workers = [asyncio.create_task(traffic(session, worker)) for worker in range(3)]
            try:
                await eventually(lambda: len(records) > 30, what="traffic flowing")
                canaries = {app: await story.add(app, "v2", "canary") for app in UPSTREAM}  # mocka, then mockb, mockc
                for app in UPSTREAM:  # approve: the base runs v2, the canary pods go
                    new_base = await story.add(app, "v2", "base")
                    await story.delete(bases[app])
                    bases[app] = new_base
                for app in UPSTREAM:
                    await story.delete(canaries[app])
                second = await story.add("mocka", "v3", "canary")  # a second canary, then undo
                await story.delete(second)
                settled = len(records)
                await eventually(lambda: len(records) > settled + 30, what="traffic after the story")
            finally:
                stop.set()
                await asyncio.gather(*workers)
    finally:
        await asyncio.to_thread(story.stop)
        await asyncio.to_thread(_terminate, gateway)

    failed = [r for r in records if r[3] != 200]
    wrong = [r for r in records if r[3] == 200 and not story.chain_ok(r[0], r[4], r[1], r[2])]
    lanes = {lane: sum(1 for r in records if r[0] == lane) for lane in ("base", "canary")}
    chains = collections.Counter((r[0], "->".join(v for _, v in HOP.findall(r[4]))) for r in records if r[3] == 200)
    print(f"{len(records)} requests ({lanes}), {len(failed)} not 200, {len(wrong)} on a chain their lane does not imply")
    print(f"  chains seen: {dict(sorted(chains.items()))}")
    for description, elapsed in story.effects:
        print(f"  {description}: every proxy routed accordingly after {elapsed * 1000:.0f} ms")
    assert not failed, failed[:5]
    assert not wrong, wrong[:5]
    # Each stage of the story was really travelled: canary requests reached each canary as it came and went.
    for lane, chain in [("base", "v1->v1->v1"), ("canary", "v1->v1->v1"), ("canary", "v2->v1->v1"), ("canary", "v2->v2->v1"),
                        ("canary", "v2->v2->v2"), ("base", "v2->v2->v2"), ("canary", "v3->v2->v2")]:
        assert chains[(lane, chain)], f"no {lane} request took {chain}"
