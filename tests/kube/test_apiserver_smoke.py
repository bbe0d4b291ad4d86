"""Smoke tests for the real kube-apiserver test harness (tests/kube/apiserver.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.rest import ApiException

from tests.kube.apiserver import K8S_VERSION, WATCHER_USER, KubeApiServer

SWIMLANE_GROUP = "istio.alibabacloud.com"
SWIMLANE_VERSION = "v1"


@asynccontextmanager
async def api_client(kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(kubeconfig), client_configuration=configuration
    )
    async with client.ApiClient(configuration=configuration) as api:
        yield api


def _crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{SWIMLANE_GROUP}"},
        "spec": {
            "group": SWIMLANE_GROUP,
            # The swimlane seed manifests carry no namespace: cluster-scoped.
            "scope": "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
            },
            "versions": [
                {
                    "name": SWIMLANE_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def _pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "smoke"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


async def _wait_established(ext: client.ApiextensionsV1Api, name: str) -> None:
    for _ in range(100):
        crd = await ext.read_custom_resource_definition(name)
        conditions = crd.status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"CRD {name} never became Established")


def test_raw_json_request(kube_apiserver: KubeApiServer) -> None:
    """A plain JSON request works (the vendored reflect2 crash is patched)."""
    request = urllib.request.Request(
        f"{kube_apiserver.url}/api/v1/namespaces",
        headers={
            "Authorization": f"Bearer {kube_apiserver.token}",
            "Accept": "application/json",
        },
    )
    with urllib.request.urlopen(
        request, timeout=10, context=kube_apiserver.ssl_context()
    ) as resp:
        body = json.load(resp)
    assert body["kind"] == "NamespaceList"
    assert "default" in {item["metadata"]["name"] for item in body["items"]}


@pytest.mark.asyncio
async def test_core_objects_crds_and_watch(kube_apiserver: KubeApiServer) -> None:
    ns = f"smoke-{uuid.uuid4().hex[:8]}"
    async with api_client(kube_apiserver.kubeconfig_path) as api:
        version = await client.VersionApi(api).get_code()
        assert version.git_version == f"v{K8S_VERSION}"

        core = client.CoreV1Api(api)
        await core.create_namespace({"metadata": {"name": ns}})
        await core.create_namespaced_service(
            ns,
            {
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "smoke"}, "ports": [{"port": 80}]},
            },
        )
        await core.create_namespaced_pod(ns, _pod("web-0"))

        services = await core.list_namespaced_service(ns)
        assert [s.metadata.name for s in services.items] == ["web"]
        assert services.items[0].spec.cluster_ip.startswith("10.0.0.")
        pods = await core.list_namespaced_pod(ns)
        assert [p.metadata.name for p in pods.items] == ["web-0"]
        assert pods.items[0].status.phase == "Pending"

        # Swimlane CRDs, then one object of each kind.
        ext = client.ApiextensionsV1Api(api)
        kinds = {"ASMSwimLaneGroup": "asmswimlanegroups", "ASMSwimLane": "asmswimlanes"}
        for kind, plural in kinds.items():
            await ext.create_custom_resource_definition(_crd(kind, plural))
        for plural in kinds.values():
            await _wait_established(ext, f"{plural}.{SWIMLANE_GROUP}")

        custom = client.CustomObjectsApi(api)
        for kind, plural in kinds.items():
            body = {
                "apiVersion": f"{SWIMLANE_GROUP}/{SWIMLANE_VERSION}",
                "kind": kind,
                "metadata": {"name": f"{ns}-{kind.lower()}"},
                "spec": {"example": {"nested": [1, 2, 3]}},
            }
            await custom.create_cluster_custom_object(
                SWIMLANE_GROUP, SWIMLANE_VERSION, plural, body
            )
            listed = await custom.list_cluster_custom_object(
                SWIMLANE_GROUP, SWIMLANE_VERSION, plural
            )
            items = {i["metadata"]["name"]: i for i in listed["items"]}
            assert items[f"{ns}-{kind.lower()}"]["spec"] == body["spec"]
            assert "namespace" not in items[f"{ns}-{kind.lower()}"]["metadata"]

        # Watch from the list's resourceVersion, then create a pod: ADDED.
        start_rv = (await core.list_namespaced_pod(ns)).metadata.resource_version
        w = watch.Watch()
        events: list[tuple[str, str]] = []

        async def collect() -> None:
            async for event in w.stream(
                core.list_namespaced_pod,
                ns,
                resource_version=start_rv,
                timeout_seconds=30,
            ):
                events.append((event["type"], event["object"].metadata.name))
                if events[-1] == ("ADDED", "web-1"):
                    w.stop()

        watcher = asyncio.create_task(collect())
        await core.create_namespaced_pod(ns, _pod("web-1"))
        await asyncio.wait_for(watcher, timeout=30)
        assert ("ADDED", "web-1") in events
        assert ("ADDED", "web-0") not in events

        await core.delete_namespace(ns)


@pytest.mark.asyncio
async def test_watcher_user_gets_only_rbac_granted_access(
    kube_apiserver: KubeApiServer,
) -> None:
    ns = f"rbac-{uuid.uuid4().hex[:8]}"
    async with api_client(kube_apiserver.kubeconfig_path) as admin:
        await client.CoreV1Api(admin).create_namespace({"metadata": {"name": ns}})

        async with api_client(kube_apiserver.kubeconfig_for(WATCHER_USER)) as api:
            core = client.CoreV1Api(api)
            with pytest.raises(ApiException) as denied:
                await core.list_namespaced_pod(ns)
            assert denied.value.status == 403

            rbac = client.RbacAuthorizationV1Api(admin)
            await rbac.create_namespaced_role(
                ns,
                {
                    "metadata": {"name": "pod-reader"},
                    "rules": [
                        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}
                    ],
                },
            )
            await rbac.create_namespaced_role_binding(
                ns,
                {
                    "metadata": {"name": "watcher-pod-reader"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": "pod-reader",
                    },
                    "subjects": [
                        {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "User",
                            "name": WATCHER_USER,
                        }
                    ],
                },
            )
            # RBAC changes propagate through an informer: poll briefly.
            for _ in range(50):
                try:
                    pods = await core.list_namespaced_pod(ns)
                    break
                except ApiException as exc:
                    assert exc.status == 403
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("RoleBinding never took effect")
            assert pods.items == []

            # Still least privilege: other namespaces and resources stay denied.
            for call in (
                core.list_namespaced_pod("default"),
                core.list_namespaced_service(ns),
            ):
                with pytest.raises(ApiException) as denied:
                    await call
                assert denied.value.status == 403

        await client.CoreV1Api(admin).delete_namespace(ns)


def test_a_stopped_api_server_refuses_connections_and_serves_what_etcd_kept_once_started_again() -> None:
    """The cluster tier stops kube-apiserver mid-traffic; its own server here, so no other test sees it stop."""
    with KubeApiServer() as kube:
        headers = {"Authorization": f"Bearer {kube.token}"}
        context = kube.ssl_context()
        body = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kept"},
                           "data": {"k": "v"}}).encode()
        request = urllib.request.Request(f"{kube.url}/api/v1/namespaces/default/configmaps", data=body,
                                         headers={**headers, "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert response.status == 201
        port = kube.port
        kube.stop_apiserver()
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{kube.url}/readyz", headers=headers), timeout=5,
                                   context=context)
        assert isinstance(refused.value.reason, ConnectionRefusedError)
        kube.start_apiserver_again()
        assert kube.port == port
        request = urllib.request.Request(f"{kube.url}/api/v1/namespaces/default/configmaps/kept", headers=headers)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert json.load(response)["data"] == {"k": "v"}
