"""core.xds_view: the controller's resources make, on the sidecar, the table a direct source makes.

A directly built table is encoded by the controller's own encoder (laneproxy.xds.resources), decoded from the
protobuf bytes as the sidecar's source decodes them (control.xds.decode_resource), and the view must give the
same table, every field compared (tests/unit/test_incremental.canonical).
Bad resources are refused with the resource and field named, and the view keeps what it had.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laneproxy.core.build import ConfigDocument, build, parse_yaml
from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.model import RouteTable
from laneproxy.xds.resources import diff, encode_table
from laneproxy.control.xds import decode_resource
from laneproxy.core.xds_view import (
    ASSIGNMENT_TYPE,
    CLUSTER_TYPE,
    GROUP_TYPE,
    Update,
    XdsAddressError,
    XdsResourceError,
    XdsView,
    decode_assignment,
    decode_cluster,
    decode_group,
    parse_source,
)
from tests.unit.test_incremental import (
    NAMESPACE,
    SERVICES,
    canonical,
    endpoints_st,
    group,
    lane,
    pod,
    pods_st,
    service,
    slices_st,
)


def _wire(value: dict) -> dict:
    """What a Struct carries: the value after a trip through protobuf (every number a double)."""
    struct = struct_pb2.Struct()
    struct.update(value)
    return json_format.MessageToDict(struct_pb2.Struct.FromString(struct.SerializeToString()))


def comparable(value: Any) -> Any:
    """canonical(), without the swimlane objects' `document` (kept as read: the controller serves it trimmed of
    metadata that says nothing about lanes, and equality skips it)."""
    if isinstance(value, (tuple, list)):
        kept = [comparable(item) for item in value
                if not (isinstance(item, tuple) and len(item) == 2 and item[0] == "document")]
        return type(value)(kept)
    return value


def same_table(a: RouteTable, b: RouteTable) -> bool:
    return comparable(canonical(a)) == comparable(canonical(b))


def view_of(table: RouteTable, *, namespace: str = NAMESPACE) -> XdsView:
    """The controller's encoding of `table` (laneproxy.xds.resources), decoded as the sidecar's source does it."""
    resources = encode_table(table)
    view = XdsView(namespace=namespace)
    for type_url in (CLUSTER_TYPE, GROUP_TYPE, ASSIGNMENT_TYPE):
        encoded = resources.by_type[type_url]
        names = view.service_clusters if type_url == ASSIGNMENT_TYPE else encoded  # the sidecar's subscriptions
        changed = {name: decode_resource(type_url, name, encoded[name].resource().resource.value) for name in names}
        view.apply(Update(type_url, changed), version=resources.version)
    assert not view.missing_assignments()
    return view


SEED = "config/swimlanes.yaml", "config/endpoints.example.yaml"


def seed_table() -> tuple[RouteTable, list[dict]]:
    documents = [doc for path in SEED for doc in parse_yaml(path, open(path, encoding="utf-8").read())]
    return build(documents, version="v1", namespace=NAMESPACE).table, [dict(doc.body) for doc in documents]


def test_the_seed_files_served_over_xds_make_the_table_the_file_source_makes() -> None:
    table, bodies = seed_table()
    view = view_of(table)
    assert view.built is not None
    assert same_table(view.built.table, table)
    canary = view.built.table.routes["default/mocka"].route_for(b"canary")
    assert [e.address for e in canary.endpoints] == ["127.0.0.1:16004"]
    # mockb has no canary: the lane falls back to base for that hop, as the file source says
    assert view.built.table.routes["default/mockb"].route_for(b"canary").lane_used == "base"


def _contract_order(ports: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """The contract marks a Service's first port but not the order of the others: they come by number."""
    return (ports[0], *sorted(ports[1:], key=lambda item: item[1]))


world_st = st.tuples(
    st.lists(pods_st, max_size=6),
    st.lists(st.builds(lambda name, ports, ip: service(name, ports, cluster_ip=ip), st.sampled_from(SERVICES),
                       st.lists(st.tuples(st.sampled_from(("http", "grpc-api", "http2", "web")),
                                          st.sampled_from((80, 8000, 9090))),
                                min_size=1, max_size=3, unique_by=(lambda item: item[0], lambda item: item[1])).map(_contract_order),
                       st.sampled_from((None, "10.96.0.1", "10.96.0.2"))),
             max_size=3, unique_by=lambda body: body["metadata"]["name"]),
    st.lists(slices_st, max_size=2, unique_by=lambda body: body["metadata"]["name"]),
    st.one_of(st.none(), endpoints_st),
    st.lists(st.sampled_from(("base", "canary", "dev")), min_size=1, max_size=3, unique=True),
    st.sampled_from(("base", "canary")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_st)
def test_any_table_served_as_the_contract_says_decodes_to_the_same_table_field_by_field(world) -> None:
    pods, services, slices, endpoints, lanes, fallback = world
    pods = list({body["metadata"]["name"]: body for body in pods}.values())
    # The controller serves a group's lanes by name: a table whose lanes came in another order lists its ingress
    # rules in that order, which the contract does not carry.
    bodies = [group(SERVICES[:3], fallback), *(lane(name) for name in sorted(lanes)), *services, *slices, *pods,
              *([endpoints] if endpoints else [])]
    documents = [ConfigDocument(f"s{index}", body) for index, body in enumerate(bodies)]
    try:
        table = build(documents, version="7", namespace=NAMESPACE).table
    except ConfigInvalidError:
        return  # nothing a controller would serve
    view = view_of(table)
    assert view.built is not None
    assert same_table(view.built.table, table)


def _seed_view() -> tuple[XdsView, RouteTable, list[dict]]:
    table, bodies = seed_table()
    return view_of(table), table, bodies


def test_an_assignment_change_is_applied_incrementally_and_shares_every_other_service() -> None:
    view, _, _ = _seed_view()
    before = view.built.table
    builds = view.full_builds
    name = "outbound|8000||mockb.default.svc.cluster.local"
    endpoints = decode_assignment(name, [("127.0.0.1", 16002, {"labels": {"ASM_TRAFFIC_TAG": "base"}}),
                                         ("127.0.0.1", 16009, {"labels": {"ASM_TRAFFIC_TAG": "canary"}})])
    after = view.apply(Update(ASSIGNMENT_TYPE, {name: endpoints}), version="v2").table
    assert view.full_builds == builds and view.incremental_updates >= 1
    assert after.version == "v2"
    canary = after.routes["default/mockb"].route_for(b"canary")
    assert (canary.lane_used, [e.address for e in canary.endpoints]) == ("canary", ["127.0.0.1:16009"])
    assert after.routes["default/mocka"] is before.routes["default/mocka"]
    assert after.routes["default/mockc"] is before.routes["default/mockc"]
    assert after.groups is before.groups


def test_one_assignment_change_in_a_large_table_rebuilds_that_service_only() -> None:
    names = [f"svc{n:04d}" for n in range(2000)]
    text = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
            "services": {f"default/{n}": {"port": 8000, "lanes": {"base": [f"10.1.{i // 250}.{i % 250}:8080"]}}
                         for i, n in enumerate(names)}}
    bodies = [group(tuple(names[:50])), lane("base"), lane("canary"), text]
    table = build([ConfigDocument("f", body) for body in bodies], version="1", namespace=NAMESPACE).table
    started = time.process_time()
    view = view_of(table)
    full = (time.process_time() - started) / max(1, view.full_builds)
    before = view.built.table
    counts = view.full_builds, view.incremental_updates
    name = "outbound|8000||svc0007.default.svc.cluster.local"
    started = time.process_time()
    view.apply(Update(ASSIGNMENT_TYPE, {name: decode_assignment(name, [("10.9.0.1", 8080, {"labels": {
        "ASM_TRAFFIC_TAG": "canary"}})])}), version="2")
    one = time.process_time() - started
    # Not a speed assertion: the work done. The incremental path builds one service; the full one 2,000.
    assert view.built.table.routes["default/svc0007"].route_for(b"canary").lane_used == "canary"
    print(f"full build {full * 1000:.1f} ms, one assignment {one * 1000:.2f} ms")
    assert (view.full_builds, view.incremental_updates) == (counts[0], counts[1] + 1)
    after = view.built.table
    assert [key for key in before.routes if after.routes[key] is not before.routes[key]] == ["default/svc0007"]


@pytest.mark.parametrize("name,meta,field", [
    ("outbound|8000||mocka.default.svc.cluster.local", None, "metadata.filter_metadata.laneproxy"),
    ("outbound|8000||mocka.default.svc.cluster.local",
     {"service": {"namespace": "default", "name": "mocka", "port": 8001.0, "protocol": "auto"}, "lane": ""},
     "metadata.filter_metadata.laneproxy.service.port"),
    ("outbound|8000||mocka.default.svc.cluster.local",
     {"service": {"namespace": "default", "name": "mocka", "port": 8000.0, "protocol": "h3"}, "lane": ""},
     "metadata.filter_metadata.laneproxy.service.protocol"),
    ("outbound|8000||mocka.default.svc.cluster.local",
     {"service": {"namespace": "other", "name": "mocka", "port": 8000.0, "protocol": "auto"}, "lane": ""},
     "metadata.filter_metadata.laneproxy.service.namespace"),
    ("mocka:8000", {}, "name"),
    ("outbound|8000||mocka.default.svc.cluster.local",
     {"service": {"namespace": "default", "name": "mocka", "port": 8000.0, "protocol": "auto", "cluster_ip": 7.0},
      "lane": ""}, "metadata.filter_metadata.laneproxy.service.cluster_ip"),
])
def test_a_malformed_cluster_is_refused_naming_the_resource_and_the_field(name, meta, field) -> None:
    with pytest.raises(XdsResourceError) as caught:
        decode_cluster(name, meta)
    assert [(p.source, p.path) for p in caught.value.problems][0] == (f"Cluster({name})", field)


@pytest.mark.parametrize("endpoint,field", [
    (("", 80, None), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
    (("10.0.0.1", 0, None), "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
    (("10.0.0.1", 80, {"labels": {"ASM_TRAFFIC_TAG": 3.0}}), "endpoints[0].lb_endpoints[0].metadata.filter_metadata.laneproxy.labels"),
])
def test_a_malformed_endpoint_is_refused_naming_the_field(endpoint, field) -> None:
    with pytest.raises(XdsResourceError) as caught:
        decode_assignment("outbound|80||a.default.svc.cluster.local", [endpoint])
    assert caught.value.problems[0].path == field


def test_an_assignment_for_a_cluster_never_received_is_refused_and_the_view_keeps_its_table() -> None:
    view, _, _ = _seed_view()
    before = view.built
    name = "outbound|8000||ghost.default.svc.cluster.local"
    with pytest.raises(XdsResourceError) as caught:
        view.apply(Update(ASSIGNMENT_TYPE, {name: ()}), version="v9")
    assert caught.value.problems[0].source == f"ClusterLoadAssignment({name})"
    assert view.built is before


def test_a_group_with_an_invalid_field_is_refused_by_build_and_the_view_keeps_its_table() -> None:
    view, table, bodies = _seed_view()
    before = view.built
    group_body = next(b for b in bodies if b["kind"] == "ASMSwimLaneGroup")
    bad = {**group_body, "spec": {**group_body["spec"], "isPermissive": "yes"}}
    lanes = [b for b in bodies if b["kind"] == "ASMSwimLane"]
    name = group_body["metadata"]["name"]
    with pytest.raises(ConfigInvalidError) as caught:
        view.apply(Update(GROUP_TYPE, {name: decode_group(name, _wire({"group": bad, "lanes": lanes}))}), version="v9")
    assert any(p.path.endswith("spec.isPermissive") for p in caught.value.problems)
    assert view.built is before
    # and the next good update still applies, incrementally, on the kept state
    assignment = "outbound|8000||mockb.default.svc.cluster.local"
    after = view.apply(Update(ASSIGNMENT_TYPE, {assignment: decode_assignment(assignment, [
        ("127.0.0.1", 16012, {"labels": {"ASM_TRAFFIC_TAG": "base"}})])}), version="v10").table
    assert [e.port for e in after.routes["default/mockb"].default.endpoints] == [16012]
    assert canonical(after.groups) == canonical(table.groups)


def test_a_group_resource_not_carrying_its_group_object_is_refused() -> None:
    with pytest.raises(XdsResourceError) as caught:
        decode_group("g", {"lanes": []})
    assert (caught.value.problems[0].source, caught.value.problems[0].path) == ("SwimLaneGroup(g)", "group")


def test_a_removed_cluster_takes_its_service_out_of_the_table() -> None:
    view, _, _ = _seed_view()
    removed = "outbound|8000||mockc.default.svc.cluster.local"
    after = view.apply(Update(CLUSTER_TYPE, {}, frozenset({removed})), version="v3").table
    # mockc is still named by the group: it stays, with no endpoints (503, not 404), as a direct build has it
    assert after.routes["default/mockc"].service.endpoints == ()
    assert removed not in view.service_clusters


@pytest.mark.parametrize("text,expected", [
    ("xds://127.0.0.1:15010", ("127.0.0.1:15010",)),
    ("xds://a.laneproxy-system:15010,b.laneproxy-system:15010", ("a.laneproxy-system:15010", "b.laneproxy-system:15010")),
    ("xds://[::1]:15010", ("[::1]:15010",)),
])
def test_an_xds_source_names_its_controllers_in_order(text, expected) -> None:
    assert parse_source(text) == expected


@pytest.mark.parametrize("text", ["xds://", "xds://host", "xds://host:0", "xds://host:99999", "grpc://h:1", "xds://:80"])
def test_an_xds_source_without_host_and_port_is_refused(text) -> None:
    with pytest.raises(XdsAddressError):
        parse_source(text)


def _push(view: XdsView, before, after) -> None:
    """What the controller sends a sidecar between two tables (Clusters, then groups, then the assignments it
    subscribes to), applied to the view as the source applies it."""
    changes = diff(before, after)
    for type_url in (CLUSTER_TYPE, GROUP_TYPE, ASSIGNMENT_TYPE):
        change = changes.get(type_url)
        wanted = view.service_clusters
        if type_url == ASSIGNMENT_TYPE:
            # newly subscribed clusters get their assignment whether or not it changed
            names = {n for n in wanted if n not in view.assignments} | {n for n in (change.changed if change else ())
                                                                         if n in wanted}
            removed = frozenset(n for n in (change.removed if change else ()) if n in view.assignments)
        elif change is None:
            continue
        else:
            names, removed = set(change.changed), change.removed
        if not names and not removed:
            continue
        encoded = after.by_type[type_url]
        view.apply(Update(type_url, {n: decode_resource(type_url, n, encoded[n].resource().resource.value)
                                     for n in names}, removed), version=after.version)


endpoint_steps_st = st.lists(
    st.dictionaries(st.sampled_from(("mocka", "mockb", "mockc", "mockd")),
                    st.dictionaries(st.sampled_from(("base", "canary", "dev")),
                                    st.lists(st.sampled_from(("127.0.0.1:1", "127.0.0.2:2", "10.0.0.1:8080")),
                                             max_size=2, unique=True), max_size=3), max_size=4),
    min_size=1, max_size=6)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoint_steps_st, st.lists(st.sampled_from(("base", "canary", "dev")), min_size=1, max_size=3, unique=True))
def test_every_push_of_a_changing_world_leaves_the_sidecar_with_the_direct_table(steps, lanes) -> None:
    swimlanes = [group(SERVICES[:3]), *(lane(name) for name in sorted(set(lanes) | {"base"}))]
    view = XdsView(namespace=NAMESPACE)
    previous = encode_table(build([], version="0").table)
    for number, services in enumerate(steps):
        used: set[str] = set()
        body = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": {}}
        for name, per_lane in services.items():
            kept = {tag: [a for a in addresses if not (a in used or used.add(a))] for tag, addresses in per_lane.items()}
            body["services"][f"default/{name}"] = {"port": 8000, "lanes": kept}
            used.clear()
        table = build([ConfigDocument("s", doc) for doc in (*swimlanes, body)], version=str(number + 1),
                      namespace=NAMESPACE).table
        resources = encode_table(table)
        _push(view, previous, resources)
        previous = resources
        assert not view.missing_assignments()
        # A table that changes no resource is not pushed: the sidecar keeps the version of the last one that did.
        assert same_table(view.built.table, dataclasses.replace(table, version=view.built.table.version))


def test_external_names_cluster_ips_and_a_files_protocol_override_survive_the_round_trip() -> None:
    external = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mockb", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "mockb.example.com",
                         "ports": [{"name": "http", "port": 8000}]}}
    multi = service("mocka", (("http", 8000), ("web", 80), ("grpc-api", 9090)), cluster_ip="10.96.0.7")
    override = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
                "services": {"default/mocka": {"port": 8000, "protocol": "http1", "lanes": {"canary": ["10.0.0.9:8080"]}}}}
    bodies = [group(SERVICES[:3]), lane("base"), lane("canary"), external, multi, override,
              pod("p1", "mocka", "base", "10.0.0.1", True), pod("p2", "mocka", "canary", "10.0.0.2", True)]
    table = build([ConfigDocument(f"s{i}", body) for i, body in enumerate(bodies)], version="9",
                  namespace=NAMESPACE).table
    view = view_of(table)
    assert same_table(view.built.table, table)
    mocka = view.built.table.routes["default/mocka"]
    assert mocka.service.protocol.value == "http1" and mocka.service.cluster_ip == "10.96.0.7"
    assert [e.address for e in mocka.route_for(b"canary").endpoints] == ["10.0.0.2:8080", "10.0.0.9:8080"]
    assert view.built.table.hosts[b"10.96.0.7:9090"].service.port == 9090
    assert [e.address for e in view.built.table.routes["default/mockb"].service.endpoints] == ["mockb.example.com:8000"]
