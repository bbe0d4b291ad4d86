"""Pods read as metadata only (PartialObjectMetadata, the controller's mode) build the table whole Pods build.

The Kubernetes source in `pods="metadata"` mode holds, per pod carrying ASM_TRAFFIC_TAG, only its name,
namespace, labels and resourceVersion; addresses and readiness come from EndpointSlices alone. These cases
build the same cluster state both ways and compare every field of the two tables, endpoint labels included.
tests/component/test_kubernetes_source.py does the same against a real kube-apiserver.
"""

from __future__ import annotations

import json

import pytest

from laneproxy.core.build import ConfigDocument, build_skipping
from laneproxy.core.incremental import IncrementalTable
from tests.unit.test_incremental import NAMESPACE, canonical, endpoint_slice, group, lane, pod, service

KEPT = ("name", "namespace", "labels", "resourceVersion", "deletionTimestamp", "uid")


def as_metadata(body: dict) -> dict:
    """A Pod as the metadata source caches it (control/kubernetes.py keeps the same fields)."""
    meta = {key: value for key, value in body["metadata"].items() if key in KEPT}
    return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": meta}


def terminating(body: dict) -> dict:
    return {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-11-30T12:00:00Z"}}


def documents(bodies: list[dict], *, metadata: bool) -> list[ConfigDocument]:
    docs = []
    for body in bodies:
        if body["kind"] == "Pod" and metadata:
            if "ASM_TRAFFIC_TAG" not in body["metadata"].get("labels", {}):
                continue  # the label selector: never listed
            body = as_metadata(body)
        meta = body["metadata"]
        kind = "Pod" if body["kind"] == "PartialObjectMetadata" else body["kind"]
        where = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        docs.append(ConfigDocument(f"kubernetes:{kind}/{where}", body))
    return sorted(docs, key=lambda doc: doc.source)


SWIMLANES = [group(("mocka", "mockb", "mockc")), lane("base"), lane("canary")]
SERVICES = [service("mocka", (("http", 8000),)), service("mockb", (("http", 8000), ("grpc", 9090))),
            service("mockc", (("http", 8000),))]
CASES = {
    "canary ready, another not": [
        pod("a0", "mocka", "base", "10.0.0.1", True), pod("a1", "mocka", "canary", "10.0.0.2", True),
        pod("b0", "mockb", "base", "10.0.0.3", True), pod("b1", "mockb", "canary", "10.0.0.4", False),
        endpoint_slice("mocka-x", "mocka", (("a0", "10.0.0.1", True), ("a1", "10.0.0.2", True))),
        endpoint_slice("mockb-x", "mockb", (("b0", "10.0.0.3", True), ("b1", "10.0.0.4", False))),
    ],
    "a Service's pods in two slices": [
        pod("a0", "mocka", "base", "10.0.0.1", True), pod("a1", "mocka", "canary", "10.0.0.2", True),
        endpoint_slice("mocka-x", "mocka", (("a0", "10.0.0.1", True),)),
        endpoint_slice("mocka-y", "mocka", (("a1", "10.0.0.2", True),)),
    ],
    "a terminating pod still serving": [
        pod("a0", "mocka", "base", "10.0.0.1", False), terminating(pod("a1", "mocka", "canary", "10.0.0.2", False)),
        {**endpoint_slice("mocka-x", "mocka", (("a0", "10.0.0.1", False),)), "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": False}, "targetRef": {"kind": "Pod", "name": "a0"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True},
             "targetRef": {"kind": "Pod", "name": "a1"}}]},
    ],
    "a pending pod and a pod of no lane no slice names": [
        pod("a0", "mocka", "base", "10.0.0.1", True), {**pod("a9", "mocka", "canary", "", False), "status": {}},
        {**pod("job", "tools", "base", "10.0.0.9", True),
         "metadata": {"name": "job", "namespace": NAMESPACE, "resourceVersion": "1", "labels": {"app": "tools"}}},
        endpoint_slice("mocka-x", "mocka", (("a0", "10.0.0.1", True),)),
    ],
}


@pytest.mark.parametrize("pods", CASES.values(), ids=CASES.keys())
def test_metadata_of_lane_labelled_pods_with_endpoint_slices_builds_the_table_whole_pods_build(pods) -> None:
    bodies = SWIMLANES + SERVICES + pods
    full = build_skipping(documents(bodies, metadata=False), version="v", namespace=NAMESPACE)
    meta = build_skipping(documents(bodies, metadata=True), version="v", namespace=NAMESPACE)
    assert canonical(meta.table) == canonical(full.table)
    assert any(service.endpoints for service in full.table.services.values())


def test_a_relabelled_pods_metadata_is_applied_incrementally_as_a_full_build_would() -> None:
    pods = CASES["canary ready, another not"]
    built = build_skipping(documents(SWIMLANES + SERVICES + pods, metadata=True), version="1", namespace=NAMESPACE)
    incremental = IncrementalTable(built, namespace=NAMESPACE, rank=lambda source: source)
    relabelled = pod("a1", "mocka", "base", "10.0.0.2", True)
    updated = incremental.apply({"kubernetes:Pod/default/a1": (ConfigDocument("kubernetes:Pod/default/a1",
                                                                              as_metadata(relabelled)),)}, version="2")
    assert updated is not None  # no full build
    reference = build_skipping(documents(SWIMLANES + SERVICES + pods[:1] + [relabelled] + pods[2:], metadata=False),
                               version="2", namespace=NAMESPACE)
    assert canonical(updated.table) == canonical(reference.table)
    canary = updated.table.routes["default/mocka"].by_lane[b"canary"]
    assert canary.lane_used == "base" and sorted(e.host for e in canary.endpoints) == ["10.0.0.1", "10.0.0.2"]


def test_pod_metadata_alone_makes_no_endpoint_where_a_service_has_no_endpoint_slice() -> None:
    """Metadata has no address and no readiness: without EndpointSlices (a cluster lacking the API) no endpoint."""
    bodies = SWIMLANES + SERVICES + [pod("a0", "mocka", "base", "10.0.0.1", True)]
    full = build_skipping(documents(bodies, metadata=False), version="v", namespace=NAMESPACE)
    meta = build_skipping(documents(bodies, metadata=True), version="v", namespace=NAMESPACE)
    assert [e.host for e in full.table.routes["default/mocka"].default.endpoints] == ["10.0.0.1"]
    assert meta.table.routes["default/mocka"].default.endpoints == ()


def test_a_list_parsed_for_metadata_loses_managed_fields_annotations_and_owners_but_no_label() -> None:
    """The source drops what it never reads while a list is parsed (so the parse never holds a page of it);
    a label that happens to be named like one of them is a string and stays."""
    from laneproxy.control.kubernetes import POD_METADATA, PODS, _parser

    page = json.dumps({"metadata": {"resourceVersion": "7"}, "items": [{"metadata": {
        "name": "a0", "labels": {"annotations": "kept", "ASM_TRAFFIC_TAG": "canary"},
        "annotations": {"sidecar.istio.io/status": "x" * 1000}, "ownerReferences": [{"kind": "ReplicaSet"}],
        "managedFields": [{"manager": "kubelet"}]}}]}).encode()
    meta = _parser(POD_METADATA.dropped)(page)["items"][0]["metadata"]
    assert meta == {"name": "a0", "labels": {"annotations": "kept", "ASM_TRAFFIC_TAG": "canary"}}
    full = _parser(PODS.dropped)(page)["items"][0]["metadata"]
    assert "managedFields" not in full and full["annotations"] and full["ownerReferences"]
