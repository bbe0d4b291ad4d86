"""build.py: Services as kube-proxy serves them, and a bad object left out instead of freezing every update.

Every port of a multi-port Service, named target ports resolved per pod (the first container declaring
the name), ClusterIP:port as a host, EndpointSlices with ready/serving/terminating, Services of no group
passed through; build_skipping leaving out what does not validate (and what only failed because of it).
"""

from __future__ import annotations

import pytest

from laneproxy.core.build import ConfigDocument, build_skipping, build_table
from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.store import RouteTableStore

from .manifests import SWIMLANES, seed_bodies


def _kube(kind: str, name: str, *, api: str = "v1", namespace: str = "default", **fields) -> dict:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": namespace}, **fields}


def _pod(name: str, app: str, tag: str, ip: str, containers: list[dict]) -> dict:
    body = _kube("Pod", name, spec={"containers": containers},
                 status={"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]})
    body["metadata"]["labels"] = {"app": app, "ASM_TRAFFIC_TAG": tag}
    return body


def _slice(name: str, service: str, ports: dict[str, int], endpoints: list[tuple[str, dict, str | None]],
           api: str = "discovery.k8s.io/v1") -> dict:
    body = _kube("EndpointSlice", name, api=api, addressType="IPv4",
                 ports=[{"name": port_name, "port": number, "protocol": "TCP"} for port_name, number in ports.items()],
                 endpoints=[{"addresses": [ip], "conditions": conditions,
                             **({"targetRef": {"kind": "Pod", "name": pod}} if pod else {})}
                            for ip, conditions, pod in endpoints])
    body["metadata"]["labels"] = {"kubernetes.io/service-name": service}
    return body


MULTI_PORT = _kube("Service", "mocka", spec={
    "selector": {"app": "mocka"}, "clusterIP": "10.96.0.10",
    "ports": [{"name": "http", "port": 8000, "targetPort": "http"},
              {"name": "metrics", "port": 9090, "targetPort": "metrics"},
              {"name": "dns", "port": 53, "protocol": "UDP"}]})
# Two containers declare `metrics`: Kubernetes resolves a named port to the first container's.
CONTAINERS = [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9100}]},
              {"name": "sidecar", "ports": [{"name": "metrics", "containerPort": 15090}]}]


def _seed_with(*bodies: dict) -> list[ConfigDocument]:
    seed = seed_bodies()
    return ([ConfigDocument(SWIMLANES, seed[role]) for role in ("group", "base", "canary")]
            + [ConfigDocument(f"kubernetes:{body['kind']}/{body['metadata']['name']}", body) for body in bodies])


def kube_table(*bodies: dict):
    return build_table(_seed_with(*bodies), version="t", namespace="default")


@pytest.mark.parametrize(
    ("host", "lane", "addresses"),
    [
        pytest.param(b"mocka:8000", b"canary", ["10.0.0.2:8080"], id="the_first_port_by_name_and_port"),
        pytest.param(b"mocka:9090", b"canary", ["10.0.0.2:9100"], id="the_second_port_has_its_own_target_port"),
        pytest.param(b"mocka.default.svc.cluster.local:9090", b"base", ["10.0.0.1:9100"],
                     id="every_name_carries_every_port"),
        pytest.param(b"mocka", b"canary", ["10.0.0.2:8080"], id="no_port_and_no_port_80_is_the_primary_port"),
        pytest.param(b"10.96.0.10:8000", b"canary", ["10.0.0.2:8080"], id="the_cluster_ip_and_port_keep_the_lane"),
        pytest.param(b"10.96.0.10:9090", b"base", ["10.0.0.1:9100"], id="the_cluster_ip_with_the_second_port"),
    ],
)
def test_every_port_of_a_multi_port_service_routes_to_its_own_target_port(host, lane, addresses):
    table = kube_table(MULTI_PORT, _pod("a1", "mocka", "base", "10.0.0.1", CONTAINERS),
                       _pod("a2", "mocka", "canary", "10.0.0.2", CONTAINERS))
    route = table.hosts[host].route_for(lane)
    assert sorted(e.address for e in route.endpoints) == addresses
    assert route.lane_used == lane.decode()


def test_a_udp_port_is_not_routed_and_every_tcp_port_has_its_own_cluster():
    table = kube_table(MULTI_PORT, _pod("a1", "mocka", "base", "10.0.0.1", CONTAINERS))
    assert b"mocka:53" not in table.hosts
    clusters = sorted({table.hosts[host].route_for(b"base").cluster for host in (b"mocka:8000", b"mocka:9090")})
    assert clusters == ["outbound|8000|base|mocka.default.svc.cluster.local",
                        "outbound|9090|base|mocka.default.svc.cluster.local"]


def test_a_bare_name_means_port_80_when_the_service_has_it():
    service = _kube("Service", "mockb", spec={"selector": {"app": "mockb"}, "ports": [
        {"name": "admin", "port": 9000}, {"name": "web", "port": 80, "targetPort": 8080}]})
    table = kube_table(service, _pod("b1", "mockb", "base", "10.0.1.1", []))
    assert [e.address for e in table.hosts[b"mockb"].route_for(b"base").endpoints] == ["10.0.1.1:8080"]
    assert [e.address for e in table.hosts[b"mockb:9000"].route_for(b"base").endpoints] == ["10.0.1.1:9000"]


@pytest.mark.parametrize(
    ("host", "passthrough", "addresses"),
    [
        pytest.param(b"legacy:5432", True, ["10.50.0.1:5432"], id="selector_less_service_with_a_mirrored_slice"),
        pytest.param(b"external:443", True, ["db.example.test:443"], id="external_name_stands_for_its_name"),
        pytest.param(b"plain:8000", True, ["10.0.9.1:8000"], id="a_service_of_no_group_is_not_taken_over"),
        pytest.param(b"mocka:8000", False, ["10.0.0.1:8080"], id="a_group_service_is_taken_over"),
    ],
)
def test_only_the_groups_services_are_taken_over(host, passthrough, addresses):
    table = kube_table(
        MULTI_PORT, _pod("a1", "mocka", "base", "10.0.0.1", CONTAINERS),
        _kube("Service", "legacy", spec={"clusterIP": "10.96.0.20", "ports": [{"port": 5432}]}),
        _slice("legacy-1", "legacy", {"": 5432}, [("10.50.0.1", {"ready": True}, None)]),
        _kube("Service", "external", spec={"type": "ExternalName", "externalName": "db.example.test",
                                           "ports": [{"port": 443}]}),
        _kube("Service", "plain", spec={"selector": {"app": "plain"}, "ports": [{"port": 8000}]}),
        _pod("p1", "plain", "base", "10.0.9.1", []),
    )
    routes = table.hosts[host]
    assert routes.passthrough is passthrough
    assert [e.address for e in routes.default.endpoints if passthrough] + \
        [e.address for e in routes.route_for(b"base").endpoints if not passthrough] == addresses


@pytest.mark.parametrize(
    ("conditions", "addresses"),
    [
        pytest.param([{"ready": True}, {"ready": False}], ["10.0.0.1:8080"], id="only_ready_endpoints"),
        pytest.param([{}, {"ready": False, "serving": False}], ["10.0.0.1:8080"],
                     id="an_unknown_ready_condition_counts_as_ready"),
        pytest.param([{"ready": False, "serving": True, "terminating": True}, {"ready": False, "serving": False,
                                                                             "terminating": True}],
                     ["10.0.0.1:8080"], id="with_none_ready_the_serving_terminating_ones"),
        pytest.param([{"ready": True}, {"ready": False, "serving": True, "terminating": True}],
                     ["10.0.0.1:8080"], id="terminating_ones_only_while_none_is_ready"),
        pytest.param([{"ready": False, "serving": False}, {"ready": False, "serving": False}], [], id="none_serving"),
    ],
)
def test_endpoint_slices_are_read_as_kube_proxy_reads_them(conditions, addresses):
    service = _kube("Service", "mocka", spec={"selector": {"app": "mocka"},
                                              "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]})
    table = kube_table(
        service, _pod("a1", "mocka", "base", "10.0.0.1", CONTAINERS), _pod("a2", "mocka", "base", "10.0.0.2", CONTAINERS),
        _slice("mocka-x", "mocka", {"http": 8080}, [("10.0.0.1", conditions[0], "a1"), ("10.0.0.2", conditions[1], "a2")],
               api="discovery.k8s.io/v1beta1"))
    assert sorted(e.address for e in table.hosts[b"mocka:8000"].route_for(b"base").endpoints) == addresses


def test_an_endpoint_slice_takes_its_lane_from_the_pod_it_names():
    service = _kube("Service", "mocka", spec={"selector": {"app": "mocka"}, "ports": [{"name": "http", "port": 8000}]})
    table = kube_table(service, _pod("a2", "mocka", "canary", "10.0.0.2", []),
                       _slice("mocka-x", "mocka", {"http": 8000}, [("10.0.0.2", {"ready": True}, "a2"),
                                                                   ("10.0.0.3", {"ready": True}, "gone")]))
    routes = table.hosts[b"mocka:8000"]
    assert [e.address for e in routes.route_for(b"canary").endpoints] == ["10.0.0.2:8000"]
    # A pod the watcher does not hold (yet) gives no labels: its endpoint is in no lane, not in a wrong one.
    assert [e.address for e in routes.route_for(b"base").endpoints] == []


def _lane(name: str, group: str, **spec) -> dict:
    body = _kube("ASMSwimLane", name, api="istio.alibabacloud.com/v1",
                 spec={"labelSelector": {"ASM_TRAFFIC_TAG": name}, **spec})
    del body["metadata"]["namespace"]
    body["metadata"]["labels"] = {"swimlane-group": group}
    return body


def _group(name: str, services: list[str]) -> dict:
    body = _kube("ASMSwimLaneGroup", name, api="istio.alibabacloud.com/v1", spec={
        "services": [{"name": service, "namespace": "default"} for service in services]})
    del body["metadata"]["namespace"]
    return body


@pytest.mark.parametrize(
    ("extra", "skipped"),
    [
        pytest.param([_lane("orphan", "gone")], {"kubernetes:ASMSwimLane/orphan": "no ASMSwimLaneGroup named 'gone'"},
                     id="a_lane_whose_group_is_gone"),
        pytest.param([_lane("regex", "rollout", ingressRules=[{"name": "r", "match": {"uri": {"regex": "/a("}},
                                                                "route": {"destination": {"host": "mocka"}}}])],
                     {"kubernetes:ASMSwimLane/regex": "invalid regular expression"}, id="a_bad_regex"),
        pytest.param([_lane("typo", "rollout", labelSelectr={"a": "b"})],
                     {"kubernetes:ASMSwimLane/typo": "did you mean labelSelector"}, id="a_misspelled_field"),
        pytest.param([_group("thief", ["mocka"]), _lane("thieving", "thief")],
                     {"kubernetes:ASMSwimLaneGroup/thief": "already belongs to group 'rollout'",
                      "kubernetes:ASMSwimLane/thieving": "no ASMSwimLaneGroup named 'thief'"},
                     id="what_only_failed_because_of_a_left_out_object_is_left_out_in_turn"),
    ],
)
def test_a_bad_object_is_left_out_and_everything_else_still_builds(extra, skipped):
    seed = seed_bodies()
    docs = [ConfigDocument(f"kubernetes:{body['kind']}/{body['metadata']['name']}", body)
            for body in (seed["group"], seed["base"], seed["canary"], *extra)]
    with pytest.raises(ConfigInvalidError):
        build_table(docs, version="v", namespace="default")  # as one update, it would be refused whole
    built = build_skipping(docs, version="v", namespace="default")
    assert {source: " ".join(p.reason for p in problems) for source, problems in built.skipped.items()}.keys() == skipped.keys()
    for source, reason in skipped.items():
        assert reason in " ".join(p.reason for p in built.skipped[source])
    assert sorted(built.table.groups["rollout"].lanes) == ["base", "canary"]


def test_without_drop_an_input_with_a_problem_and_no_last_good_version_rejects_the_update():
    seed = seed_bodies()
    docs = [ConfigDocument("group.yaml", seed["group"]), ConfigDocument("group.yaml", seed["base"]),
            ConfigDocument("lanes.yaml", _lane("orphan", "gone"))]
    assert list(build_skipping(docs, version="v", namespace="default").skipped) == ["lanes.yaml"]
    with pytest.raises(ConfigInvalidError, match="no ASMSwimLaneGroup named 'gone'"):
        build_skipping(docs, version="v", namespace="default", drop=False)


def test_a_file_with_a_problem_is_replaced_by_its_last_good_version():
    seed = seed_bodies()
    good = (ConfigDocument("lanes.yaml", seed["canary"]),)
    bad = dict(seed["canary"], spec={"labelSelectr": {}})
    docs = [ConfigDocument("group.yaml", seed["group"]), ConfigDocument("group.yaml", seed["base"]),
            ConfigDocument("lanes.yaml", bad)]
    built = build_skipping(docs, version="v", namespace="default", drop=False, last_good={"lanes.yaml": good})
    assert list(built.skipped) == ["lanes.yaml"]
    assert sorted(built.table.groups["rollout"].lanes) == ["base", "canary"]


@pytest.mark.parametrize(
    ("publishes", "counted"),
    [
        pytest.param([{}], 0, id="nothing_left_out"),
        pytest.param([{"a": ("x",)}, {"a": ("x",)}], 1, id="the_same_object_left_out_again_counts_once"),
        pytest.param([{"a": ("x",)}, {"a": ("y",)}], 2, id="a_new_reason_counts_again"),
        pytest.param([{"a": ("x",)}, {}, {"a": ("x",)}], 2, id="left_out_again_after_a_fix"),
        pytest.param([{"a": ("x",), "b": ("x",)}], 2, id="each_object_counts"),
    ],
)
def test_the_store_counts_each_object_left_out_once_per_reason(publishes, counted):
    store = RouteTableStore()
    table = build_table([], version="v")
    for skipped in publishes:
        store.publish(table, skipped)
    assert store.objects_rejected == counted
    assert len(store.skipped) == len(publishes[-1])


@pytest.mark.parametrize(
    ("last_good", "lanes", "kept"),
    [
        pytest.param(True, ["base", "canary"], {"kubernetes:ASMSwimLane/canary"}, id="a_bad_edit_keeps_the_last_good_version"),
        pytest.param(False, ["base"], set(), id="with_no_last_good_version_it_is_left_out"),
    ],
)
def test_a_bad_edit_of_an_object_in_use_changes_nothing(last_good, lanes, kept):
    seed = seed_bodies()
    good = ConfigDocument("kubernetes:ASMSwimLane/canary", seed["canary"])
    edited = dict(seed["canary"], spec=dict(seed["canary"]["spec"], labelSelector={}))
    docs = [ConfigDocument("kubernetes:ASMSwimLaneGroup/rollout", seed["group"]),
            ConfigDocument("kubernetes:ASMSwimLane/base", seed["base"]),
            ConfigDocument("kubernetes:ASMSwimLane/canary", edited)]
    built = build_skipping(docs, version="v", namespace="default",
                           last_good={good.source: (good,)} if last_good else None)
    assert sorted(built.table.groups["rollout"].lanes) == lanes
    assert built.kept_last_good == kept
    (problem,) = built.skipped["kubernetes:ASMSwimLane/canary"]
    assert problem.path.endswith("spec.labelSelector")  # the problem of the edit, not of the version kept
