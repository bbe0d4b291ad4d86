"""core.incremental: an update replaces only the changed services and equals a full build of the same documents.

A world of Kubernetes objects, each its own source as the Kubernetes source names them, or kept in four files
that a change rewrites whole as the file source sees them, goes through random sequences of changes: pods added, removed, relabelled, made ready or not; Services whose ports or selector
change; EndpointSlices; a LaneEndpoints file; lanes and groups added, changed or broken. After each change the
table the incremental path gives (or the full build it falls back to) is compared, every field including
the ones equality skips (endpoint labels, fallback chains), with `build_skipping` of the same documents.
"""

from __future__ import annotations

import dataclasses
import re
from enum import Enum
from typing import Any, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laneproxy.core.build import Built, ConfigDocument, build_skipping
from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.incremental import IncrementalTable

NAMESPACE = "default"
SERVICES = ("mocka", "mockb", "mockc", "other")  # `other` is in no group: passed through
LANES = ("base", "canary", "dev")


def canonical(value: Any) -> Any:
    """Every field of a table, including those dataclass equality skips, as plain comparable data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,
                tuple((f.name, canonical(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if isinstance(value, Mapping):
        return sorted(((repr(k), canonical(v)) for k, v in value.items()), key=lambda item: item[0])
    if isinstance(value, (tuple, list)):
        return [canonical(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(repr(item) for item in value)
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, Enum):
        return value.value
    return value


def _meta(name: str, **extra: Any) -> dict:
    return {"name": name, "namespace": NAMESPACE, "resourceVersion": "1", **extra}


def group(services: tuple[str, ...], fallback: str = "base") -> dict:
    return {"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLaneGroup", "metadata": {"name": "g"},
            "spec": {"isPermissive": True, "autoUpdate": True,
                     "permissiveModeConfiguration": {"routeHeader": "x-asm-prefer-tag", "fallbackTarget": fallback},
                     "services": [{"name": name, "namespace": NAMESPACE} for name in services]}}


def lane(name: str, tag: str | None = None, *, broken: bool = False) -> dict:
    spec: dict = {"labelSelector": {"ASM_TRAFFIC_TAG": tag or name}, "services": []}
    if broken:
        spec["labelSelektor"] = {"x": "y"}  # an unknown field: the lane is left out, and only the lane
    return {"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLane",
            "metadata": {"name": name, "labels": {"swimlane-group": "g"}}, "spec": spec}


def service(name: str, ports: tuple[tuple[str, int], ...], *, selector: str | None = None,
            cluster_ip: str | None = None, broken: bool = False) -> dict:
    spec: dict = {"selector": {"app": selector or name},
                  "ports": [{"name": port_name, "port": number, "targetPort": "http" if index == 0 else number + 1}
                            for index, (port_name, number) in enumerate(ports)]}
    if broken:
        spec["ports"][0]["targetPort"] = 70000  # out of range: the Service is left out (or kept at its last good)
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name), "spec": spec}


def pod(name: str, app: str, tag: str, ip: str, ready: bool) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _meta(name, labels={"app": app, "ASM_TRAFFIC_TAG": tag}),
            "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def endpoint_slice(name: str, service_name: str, pods: tuple[tuple[str, str, bool], ...]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": _meta(name, labels={"kubernetes.io/service-name": service_name}),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod_name}}
                          for pod_name, ip, ready in pods]}


def lane_endpoints(entries: tuple[tuple[str, str, str], ...], protocol: str | None) -> dict:
    services: dict = {}
    for name, tag, address in entries:
        spec = services.setdefault(f"{NAMESPACE}/{name}", {"port": 8000, "lanes": {}})
        if protocol:
            spec["protocol"] = protocol
        spec["lanes"].setdefault(tag, [])
        if address not in spec["lanes"][tag] and all(address not in listed for listed in spec["lanes"].values()):
            spec["lanes"][tag].append(address)
    return {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": services}


def source_of(body: dict) -> str:
    meta = body.get("metadata") or {}
    kind = body["kind"]
    if kind == "LaneEndpoints":
        return "file:endpoints.yaml"
    return f"kubernetes:{kind}/{meta['namespace']}/{meta['name']}" if "namespace" in meta else f"kubernetes:{kind}/{meta['name']}"


FILES = ("swimlanes.yaml", "services.yaml", "pods.yaml", "endpoints.yaml")
FILE_OF_KIND = {"ASMSwimLaneGroup": FILES[0], "ASMSwimLane": FILES[0], "Service": FILES[1], "EndpointSlice": FILES[1],
                "Pod": FILES[2]}


class World:
    """What a source does with a change: the incremental path, else the full build it falls back to.

    Kubernetes-shaped (`files` false): every object is its own source. File-shaped: objects live in four
    files, a change rewrites its file, and the file is the source (as the file source sees it).
    """

    def __init__(self, bodies: list[dict], *, files: bool = False) -> None:
        self.files = files
        self.bodies: dict[str, dict] = {source_of(body): body for body in bodies}
        self.last_good: dict[str, tuple[ConfigDocument, ...]] = {}
        self.incremental: IncrementalTable | None = None
        self.served: Built | None = None
        self.version = 0
        self.applied = self.full_builds = 0
        self._full()

    def source(self, key: str) -> str:
        if not self.files:
            return key
        return FILES[3] if key.startswith("file:") else FILE_OF_KIND[key.split(":")[1].split("/")[0]]

    def rank(self, source: str) -> Any:
        return FILES.index(source) if self.files else source

    def docs(self, source: str) -> tuple[ConfigDocument, ...]:
        return tuple(ConfigDocument(source, self.bodies[key]) for key in sorted(self.bodies) if self.source(key) == source)

    def ordered(self) -> list[ConfigDocument]:
        sources = sorted({self.source(key) for key in self.bodies}, key=self.rank)
        return [doc for source in sources for doc in self.docs(source)]

    def reference(self) -> Built | None:
        documents = self.ordered()
        last_good = {source: docs for source, docs in self.last_good.items() if any(d.source == source for d in documents)}
        try:
            return build_skipping(documents, version=str(self.version), namespace=NAMESPACE, last_good=last_good)
        except ConfigInvalidError:
            return None

    def _full(self) -> None:
        self.full_builds += 1
        built = self.reference()
        self.incremental = None
        if built is None:
            return  # the last good table keeps serving
        self.served = built
        # As the sources keep it: an input kept at its last good version keeps that version.
        kept = {source: self.last_good[source] for source in built.kept_last_good}
        sources = {doc.source for doc in self.ordered()} - set(built.skipped)
        self.last_good = {source: self.docs(source) for source in sources} | kept
        self.incremental = IncrementalTable(built, namespace=NAMESPACE, rank=self.rank,
                                            sources=FILES if self.files else ())

    def change(self, body: dict | None, key: str) -> None:
        self.version += 1
        if body is None:
            self.bodies.pop(key, None)
        else:
            self.bodies[key] = body
        source = self.source(key)
        documents = self.docs(source)
        built = None
        if self.incremental is not None:
            built = self.incremental.apply({source: documents}, version=str(self.version))
        if built is None:
            self._full()
            return
        self.applied += 1
        self.served = built
        if documents:
            self.last_good[source] = documents
        else:
            self.last_good.pop(source, None)


IPS = [f"10.0.0.{n}" for n in range(1, 7)]
pods_st = st.builds(lambda n, app, tag, ip, ready: pod(f"p{n}", app, tag, ip, ready),
                    st.integers(0, 5), st.sampled_from(SERVICES), st.sampled_from((*LANES, "other")),
                    st.sampled_from(IPS), st.booleans())
ports_st = st.lists(st.tuples(st.sampled_from(("http", "grpc-api", "http2", "web")), st.sampled_from((80, 8000, 9090))),
                    min_size=1, max_size=3, unique_by=lambda item: item[1]).map(tuple)
services_st = st.builds(lambda name, ports, selector, ip, broken: service(name, ports, selector=selector, cluster_ip=ip,
                                                                        broken=broken),
                        st.sampled_from(SERVICES), ports_st, st.sampled_from((None, "mocka", "mockb")),
                        st.sampled_from((None, "10.96.0.1", "10.96.0.2")), st.booleans())
slices_st = st.builds(lambda n, svc, pods: endpoint_slice(f"{svc}-{n}", svc, pods),
                      st.integers(0, 1), st.sampled_from(SERVICES),
                      st.lists(st.tuples(st.sampled_from([f"p{n}" for n in range(6)]), st.sampled_from(IPS), st.booleans()),
                               max_size=3).map(tuple))
endpoints_st = st.builds(lane_endpoints,
                         st.lists(st.tuples(st.sampled_from(SERVICES), st.sampled_from(LANES),
                                            st.sampled_from(["127.0.0.1:1", "127.0.0.2:2", "10.0.0.1:8080"])),
                                  max_size=4).map(tuple),
                         st.sampled_from((None, "http2", "http1")))
swimlane_st = st.one_of(
    st.builds(group, st.lists(st.sampled_from(SERVICES[:3] + ("mockd",)), min_size=1, max_size=4, unique=True).map(tuple),
              st.sampled_from(("base", "canary"))),
    st.builds(lane, st.sampled_from(LANES + ("extra",)), st.sampled_from((None, "canary", "other")),
              broken=st.booleans()),
)
# (body, or None to delete the source named by the second item)
change_st = st.one_of(
    pods_st.map(lambda body: (body, source_of(body))),
    pods_st.map(lambda body: (None, source_of(body))),
    services_st.map(lambda body: (body, source_of(body))),
    services_st.map(lambda body: (None, source_of(body))),
    slices_st.map(lambda body: (body, source_of(body))),
    slices_st.map(lambda body: (None, source_of(body))),
    endpoints_st.map(lambda body: (body, source_of(body))),
    swimlane_st.map(lambda body: (body, source_of(body))),
    swimlane_st.map(lambda body: (None, source_of(body))),
)


def seed_world(*, files: bool = False) -> World:
    return World([group(SERVICES[:3]), lane("base"), lane("canary"), lane("dev"),
                  service("mocka", (("http", 8000),)), service("mockb", (("http", 8000), ("grpc", 9090))),
                  service("other", (("web", 80),), cluster_ip="10.96.0.9"),
                  pod("p0", "mocka", "base", "10.0.0.1", True), pod("p1", "mocka", "canary", "10.0.0.2", True),
                  pod("p2", "mockb", "base", "10.0.0.3", True)], files=files)


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(change_st, min_size=1, max_size=12), st.booleans())
def test_every_sequence_of_changes_gives_the_table_a_full_build_of_the_same_documents_gives(changes, files) -> None:
    world = seed_world(files=files)
    for body, source in changes:
        world.change(body, source)
        reference = world.reference()
        if reference is None:
            continue  # no table builds from these documents: the world serves its last good one, as a source does
        assert world.served is not None
        assert canonical(world.served.table) == canonical(reference.table)
        assert dict(world.served.skipped) == dict(reference.skipped)
        assert list(world.served.table.routes) == sorted(world.served.table.routes)


@pytest.mark.parametrize("body,source", [
    (pod("p9", "mocka", "canary", "10.0.0.9", True), "kubernetes:Pod/default/p9"),  # pod added
    (None, "kubernetes:Pod/default/p1"),  # pod removed
    (pod("p1", "mocka", "dev", "10.0.0.2", True), "kubernetes:Pod/default/p1"),  # relabelled
    (pod("p1", "mocka", "canary", "10.0.0.2", False), "kubernetes:Pod/default/p1"),  # not ready any more
    (service("mocka", (("http", 8000), ("grpc-api", 9090))), "kubernetes:Service/default/mocka"),  # ports changed
    (service("mockd", (("http", 8000),)), "kubernetes:Service/default/mockd"),  # a new Service
    (None, "kubernetes:Service/default/other"),  # a Service deleted
    (endpoint_slice("mocka-0", "mocka", (("p0", "10.0.0.1", True),)), "kubernetes:EndpointSlice/default/mocka-0"),
])
@pytest.mark.parametrize("files", [False, True], ids=["objects", "files"])
def test_a_change_to_one_service_is_applied_without_a_full_build(body, source, files) -> None:
    world = seed_world(files=files)
    before = world.served.table
    world.change(body, source)
    assert canonical(world.served.table) == canonical(world.reference().table)
    if files and "EndpointSlice" in source:
        # The first EndpointSlice in services.yaml: a file gaining a kind may change its notices, a full build's to say.
        assert (world.applied, world.full_builds) == (0, 2)
        return
    assert (world.applied, world.full_builds) == (1, 1)
    # A service no declaration of which changed keeps its routes object (a file rewrite redeclares them all).
    assert world.served.table.routes["default/mockc"] is before.routes["default/mockc"]


@pytest.mark.parametrize("body,source", [
    (lane("canary", "other"), "kubernetes:ASMSwimLane/canary"),  # a lane changed
    (lane("extra"), "kubernetes:ASMSwimLane/extra"),  # a lane added
    (lane("dev", broken=True), "kubernetes:ASMSwimLane/dev"),  # a lane broken: left out by the full build
    (group(SERVICES[:2]), "kubernetes:ASMSwimLaneGroup/g"),  # a group changed
    (service("mocka", (("http", 8000),), broken=True), "kubernetes:Service/default/mocka"),  # a bad Service
])
def test_a_change_to_a_lane_a_group_or_a_bad_object_goes_through_the_full_build(body, source) -> None:
    world = seed_world()
    world.change(body, source)
    assert (world.applied, world.full_builds) == (0, 2)
    assert canonical(world.served.table) == canonical(world.reference().table)


def test_a_pod_change_shares_every_other_service_and_the_groups_with_the_old_table() -> None:
    names = [f"svc{n:03d}" for n in range(200)]
    bodies = [group(tuple(names)), lane("base"), lane("canary")]
    for index, name in enumerate(names):
        bodies += [service(name, (("http", 8000),)), pod(f"{name}-0", name, "base", f"10.1.{index // 250}.{index % 250}", True)]
    world = World(bodies)
    before = world.served.table
    world.change(pod("svc007-1", "svc007", "canary", "10.9.0.1", True), "kubernetes:Pod/default/svc007-1")
    after = world.served.table
    assert world.applied == 1
    assert after.groups is before.groups and after.ingress_rules is before.ingress_rules
    changed = [key for key in before.routes if after.routes[key] is not before.routes[key]]
    assert changed == ["default/svc007"]
    assert all(after.services[key] is before.services[key] for key in before.services if key != "default/svc007")
    canary = after.routes["default/svc007"].route_for(b"canary")
    assert [e.address for e in canary.endpoints] == ["10.9.0.1:8080"] and canary.lane_used == "canary"
    assert after.hosts[b"svc007:8000"] is after.routes["default/svc007"]
    assert after.hosts[b"svc008:8000"] is before.hosts[b"svc008:8000"]
    assert canonical(after) == canonical(world.reference().table)
