"""build.py: raw documents -> RouteTable; lane membership, fallback, host names, Kubernetes objects, cluster names."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from laneproxy.core.build import ConfigDocument, build_table, parse_yaml
from laneproxy.core.errors import NoRouteError
from laneproxy.core.model import Endpoint, Route, RoutingStrategy
from laneproxy.core.routing import outbound_route, service_routes_for_host

from .manifests import (
    ENDPOINTS,
    SWIMLANES,
    build,
    edit,
    endpoints_body,
    lane_body,
    seed_bodies,
    seed_text,
)

MOCKA = "mocka.default.svc.cluster.local"
MOCKB = "mockb.default.svc.cluster.local"
MOCKC = "mockc.default.svc.cluster.local"


def ep(address: str) -> Endpoint:
    host, port = address.rsplit(":", 1)
    return Endpoint(host, int(port))


def seed_table():
    docs = parse_yaml(SWIMLANES, seed_text(SWIMLANES)) + parse_yaml(ENDPOINTS, seed_text(ENDPOINTS))
    return build_table(docs, version="seed", namespace="default")


def test_seed_manifests_build_one_permissive_group_of_three_services_and_two_lanes():
    table = seed_table()
    group = table.groups["rollout"]
    assert list(table.groups) == ["rollout"]
    assert list(table.services) == ["default/mocka", "default/mockb", "default/mockc"]
    assert [(s.port, [e.address for e in s.endpoints]) for s in table.services.values()] == [
        (8000, ["127.0.0.1:16001", "127.0.0.1:16004"]),
        (8000, ["127.0.0.1:16002"]),
        (8000, ["127.0.0.1:16003", "127.0.0.1:16005"]),
    ]
    assert list(group.lanes) == ["base", "canary"]
    assert group.services == frozenset({"default/mocka", "default/mockb", "default/mockc"})
    assert (group.strategy, group.permissive, group.auto_update) == (RoutingStrategy.RULE_BASED, True, True)
    assert (group.fallback_target, group.route_header, group.trace_header) == ("base", "x-asm-prefer-tag", "my-request-id")
    assert group.lanes["canary"].declared_services == frozenset()
    assert dict(group.lanes["canary"].label_selector) == {"ASM_TRAFFIC_TAG": "canary"}
    assert [(r.lane, r.name, r.hosts, r.destination) for r in table.ingress_rules] == [
        ("base", "base", ("*",), "default/mocka"),
        ("canary", "canary", ("*",), "default/mocka"),
    ]
    assert table.version == "seed"


@pytest.mark.parametrize(
    ("service", "lane", "expected"),
    [
        pytest.param("default/mocka", b"canary",
                     Route("default/mocka", "canary", "canary", f"outbound|8000|canary|{MOCKA}", (ep("127.0.0.1:16004"),)),
                     id="canary_has_mocka_through_auto_update"),
        pytest.param("default/mockc", b"canary",
                     Route("default/mockc", "canary", "canary", f"outbound|8000|canary|{MOCKC}", (ep("127.0.0.1:16005"),)),
                     id="canary_has_mockc_through_auto_update"),
        pytest.param("default/mockb", b"canary",
                     Route("default/mockb", "canary", "base", f"outbound|8000|base|{MOCKB}", (ep("127.0.0.1:16002"),)),
                     id="canary_without_mockb_falls_back_to_base"),
        pytest.param("default/mocka", b"base",
                     Route("default/mocka", "base", "base", f"outbound|8000|base|{MOCKA}", (ep("127.0.0.1:16001"),)),
                     id="base_lane_is_served_by_base"),
        pytest.param("default/mockb", b"base",
                     Route("default/mockb", "base", "base", f"outbound|8000|base|{MOCKB}", (ep("127.0.0.1:16002"),)),
                     id="base_mockb"),
        pytest.param("default/mocka", None,
                     Route("default/mocka", "base", "base", f"outbound|8000|base|{MOCKA}", (ep("127.0.0.1:16001"),)),
                     id="no_lane_uses_the_baseline"),
        pytest.param("default/mockc", b"gold",
                     Route("default/mockc", "base", "base", f"outbound|8000|base|{MOCKC}", (ep("127.0.0.1:16003"),)),
                     id="unconfigured_lane_uses_the_baseline"),
        pytest.param("default/mocka", b"Canary",
                     Route("default/mocka", "base", "base", f"outbound|8000|base|{MOCKA}", (ep("127.0.0.1:16001"),)),
                     id="lane_values_are_case_sensitive"),
        pytest.param("default/mocka", b"",
                     Route("default/mocka", "base", "base", f"outbound|8000|base|{MOCKA}", (ep("127.0.0.1:16001"),)),
                     id="empty_lane_uses_the_baseline"),
    ],
)
def test_seed_request_for_missing_lane_falls_back_to_base_for_one_hop(service, lane, expected):
    route = seed_table().routes[service].route_for(lane)
    assert route == expected
    assert route.fallback is (expected.lane_asked != expected.lane_used)


def test_seed_endpoints_carry_their_lane_label():
    route = seed_table().routes["default/mocka"].route_for(b"canary")
    assert [dict(e.labels) for e in route.endpoints] == [{"ASM_TRAFFIC_TAG": "canary"}]


@pytest.mark.parametrize(
    ("auto_update", "canary_services", "expected"),
    [
        pytest.param(True, [], {"mocka": ("canary", ["127.0.0.1:16004"]), "mockb": ("base", ["127.0.0.1:16002"]),
                                "mockc": ("canary", ["127.0.0.1:16005"])},
                     id="auto_update_adds_every_service_with_canary_pods"),
        pytest.param(False, [], {"mocka": ("base", ["127.0.0.1:16001"]), "mockb": ("base", ["127.0.0.1:16002"]),
                                 "mockc": ("base", ["127.0.0.1:16003"])},
                     id="without_auto_update_an_empty_services_list_means_every_hop_falls_back"),
        pytest.param(False, ["mocka"], {"mocka": ("canary", ["127.0.0.1:16004"]), "mockb": ("base", ["127.0.0.1:16002"]),
                                        "mockc": ("base", ["127.0.0.1:16003"])},
                     id="without_auto_update_only_listed_services_are_in_the_lane"),
        pytest.param(False, ["mockb"], {"mocka": ("base", ["127.0.0.1:16001"]), "mockb": ("base", ["127.0.0.1:16002"]),
                                        "mockc": ("base", ["127.0.0.1:16003"])},
                     id="a_listed_service_with_no_lane_pods_still_falls_back"),
        pytest.param(True, ["mockb"], {"mocka": ("canary", ["127.0.0.1:16004"]), "mockb": ("base", ["127.0.0.1:16002"]),
                                       "mockc": ("canary", ["127.0.0.1:16005"])},
                     id="auto_update_keeps_listed_services_and_adds_discovered_ones"),
    ],
)
def test_auto_update_false_makes_the_lane_services_list_authoritative(auto_update, canary_services, expected):
    bodies = seed_bodies()
    edit(bodies["group"], "spec.autoUpdate", auto_update)
    edit(bodies["canary"], "spec.services", [{"name": name, "namespace": "default"} for name in canary_services])
    table = build(bodies)
    got = {}
    for name in expected:
        route = table.routes[f"default/{name}"].route_for(b"canary")
        got[name] = (route.lane_used, [e.address for e in route.endpoints])
    assert got == expected


def _three_lane_bodies(service_fallback):
    bodies = seed_bodies()
    edit(bodies["group"], "spec.permissiveModeConfiguration.serviceLevelFallbackTarget", service_fallback)
    bodies["dev"] = lane_body("dev")
    bodies["endpoints"] = endpoints_body({
        "default/mocka": {"base": ["10.0.1.1:8000"], "canary": ["10.0.1.2:8000"], "dev": ["10.0.1.3:8000"]},
        "default/mockb": {"base": ["10.0.2.1:8000"], "canary": ["10.0.2.2:8000"]},
        "default/mockc": {"base": ["10.0.3.1:8000"], "canary": ["10.0.3.2:8000"]},
    })
    return bodies


@pytest.mark.parametrize(
    ("service_fallback", "service", "lane", "expected_lane", "expected_address"),
    [
        pytest.param({"default/mockb": "canary"}, "default/mockb", b"dev", "canary", "10.0.2.2:8000",
                     id="service_level_target_overrides_for_its_service"),
        pytest.param({"default/mockb": "canary"}, "default/mockc", b"dev", "base", "10.0.3.1:8000",
                     id="other_services_keep_the_group_fallback"),
        pytest.param({"default/mockb": "canary"}, "default/mocka", b"dev", "dev", "10.0.1.3:8000",
                     id="a_lane_that_has_the_service_does_not_fall_back"),
        pytest.param({"default/mockb": "canary"}, "default/mockb", b"canary", "canary", "10.0.2.2:8000",
                     id="the_service_level_target_itself_is_served_normally"),
        pytest.param({"default/mockb": "canary"}, "default/mockb", None, "base", "10.0.2.1:8000",
                     id="a_request_with_no_lane_still_uses_the_group_baseline"),
        pytest.param({}, "default/mockb", b"dev", "base", "10.0.2.1:8000",
                     id="without_service_level_targets_the_group_fallback_applies"),
    ],
)
def test_service_level_fallback_target_overrides_fallback_target_for_that_service_only(
    service_fallback, service, lane, expected_lane, expected_address
):
    route = build(_three_lane_bodies(service_fallback)).routes[service].route_for(lane)
    assert (route.lane_used, [e.address for e in route.endpoints]) == (expected_lane, [expected_address])
    assert route.cluster == f"outbound|8000|{expected_lane}|{service.split('/')[1]}.default.svc.cluster.local"


@pytest.mark.parametrize(
    ("fallback_target", "service", "lane", "expected"),
    [
        pytest.param(None, "default/mockb", b"canary",
                     Route("default/mockb", "canary", "canary", f"outbound|8000|canary|{MOCKB}", ()),
                     id="a_missing_service_has_no_endpoints_instead_of_a_fallback"),
        pytest.param(None, "default/mocka", b"canary",
                     Route("default/mocka", "canary", "canary", f"outbound|8000|canary|{MOCKA}", (ep("127.0.0.1:16004"),)),
                     id="a_present_service_is_served_by_its_lane"),
        pytest.param(None, "default/mocka", None,
                     Route("default/mocka", None, None, f"outbound|8000||{MOCKA}", ()),
                     id="no_lane_has_no_baseline"),
        pytest.param(None, "default/mocka", b"gold",
                     Route("default/mocka", None, None, f"outbound|8000||{MOCKA}", ()),
                     id="an_unknown_lane_has_no_baseline"),
        pytest.param("base", "default/mockb", b"canary",
                     Route("default/mockb", "canary", "canary", f"outbound|8000|canary|{MOCKB}", ()),
                     id="a_fallback_target_is_ignored_in_strict_mode"),
        pytest.param("base", "default/mocka", None,
                     Route("default/mocka", None, None, f"outbound|8000||{MOCKA}", ()),
                     id="a_fallback_target_gives_no_default_in_strict_mode"),
    ],
)
def test_strict_mode_has_no_fallback(fallback_target, service, lane, expected):
    bodies = seed_bodies()
    edit(bodies["group"], "spec.isPermissive", False)
    pmc = {"routeHeader": "x-asm-prefer-tag"}
    if fallback_target is not None:
        pmc["fallbackTarget"] = fallback_target
    edit(bodies["group"], "spec.permissiveModeConfiguration", pmc)
    table = build(bodies)
    group = table.groups["rollout"]
    assert (group.permissive, group.fallback_target, dict(group.service_fallback)) == (False, None, {})
    assert table.routes[service].route_for(lane) == expected


@pytest.mark.parametrize(
    ("host", "namespace", "service"),
    [
        pytest.param(b"mockb", "default", "default/mockb", id="short_name"),
        pytest.param(b"mockb:8000", "default", "default/mockb", id="short_name_with_port"),
        pytest.param(b"mockb.default", "default", "default/mockb", id="name_and_namespace"),
        pytest.param(b"mockb.default:8000", "default", "default/mockb", id="name_and_namespace_with_port"),
        pytest.param(b"mockb.default.svc", "default", "default/mockb", id="svc"),
        pytest.param(b"mockb.default.svc.cluster.local", "default", "default/mockb", id="fqdn"),
        pytest.param(b"mockb.default.svc.cluster.local:8000", "default", "default/mockb", id="fqdn_with_port"),
        pytest.param(b"MockB.Default.SVC.cluster.local", "default", "default/mockb", id="host_is_case_insensitive"),
        pytest.param(b"mocka", "default", "default/mocka", id="another_service"),
        pytest.param(b"mockb.default", "prod", "default/mockb", id="qualified_names_work_from_any_namespace"),
        pytest.param(b"mockb.default.svc.cluster.local", "prod", "default/mockb", id="fqdn_from_another_namespace"),
    ],
)
def test_every_host_name_of_a_service_resolves_to_the_same_routes(host, namespace, service):
    table = build(seed_bodies(), namespace=namespace)
    assert service_routes_for_host(table, host) is table.routes[service]
    assert outbound_route(table, host, b"canary") is table.routes[service].route_for(b"canary")


@pytest.mark.parametrize(
    ("host", "namespace"),
    [
        pytest.param(b"mockb", "prod", id="short_names_only_resolve_in_the_proxy_namespace"),
        pytest.param(b"mockb:8000", "prod", id="short_name_with_port_in_another_namespace"),
        pytest.param(b"mockb:9000", "default", id="a_port_the_service_does_not_have"),
        pytest.param(b"mockd", "default", id="an_unknown_service"),
        pytest.param(b"mockb.prod", "default", id="the_service_in_another_namespace"),
        pytest.param(b"", "default", id="an_empty_host"),
    ],
)
def test_a_host_that_names_no_service_has_no_route(host, namespace):
    table = build(seed_bodies(), namespace=namespace)
    with pytest.raises(NoRouteError) as caught:
        service_routes_for_host(table, host)
    assert (caught.value.status, caught.value.flag) == (404, "NR")


def _kube(kind: str, name: str, **fields):
    body = {"apiVersion": fields.pop("apiVersion", "v1"), "kind": kind,
            "metadata": {"name": name, "namespace": fields.pop("namespace", "default")}}
    body.update(fields)
    return body


def _service(name: str, target_port=None):
    port = {"name": "http", "port": 8000}
    if target_port is not None:
        port["targetPort"] = target_port
    return _kube("Service", name, spec={"selector": {"app": name}, "ports": [port]})


def _pod(name: str, app: str, tag: str, ip: str | None, *, ready=True, namespace="default", deleting=False):
    body = _kube("Pod", name, namespace=namespace,
                 spec={"containers": [{"name": "app", "ports": [{"name": "web", "containerPort": 8080}]}]},
                 status={"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]})
    body["metadata"]["labels"] = {"app": app, "ASM_TRAFFIC_TAG": tag}
    if ip is not None:
        body["status"]["podIP"] = ip
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return body


def kube_table():
    """The seed lanes over Kubernetes objects, with pods that must not become endpoints, and foreign kinds."""
    bodies = [
        _service("mocka", target_port="web"),
        _service("mockb", target_port=9080),
        _service("mockc"),
        _pod("mocka-v1", "mocka", "base", "10.0.0.1"),
        _pod("mocka-v2", "mocka", "canary", "10.0.0.2"),
        _pod("mocka-v2-starting", "mocka", "canary", "10.0.0.3", ready=False),
        _pod("mocka-v2-pending", "mocka", "canary", None),
        _pod("mocka-v2-terminating", "mocka", "canary", "10.0.0.4", deleting=True),
        _pod("mocka-elsewhere", "mocka", "canary", "10.9.0.1", namespace="prod"),
        _pod("mockb-v1", "mockb", "base", "10.0.1.1"),
        _pod("mockc-v1", "mockc", "base", "10.0.2.1"),
        _pod("mockc-v2", "mockc", "canary", "10.0.2.2"),
        _kube("Gateway", "ingressgateway", apiVersion="networking.istio.io/v1beta1", spec={"servers": "not ours"}),
        _kube("Deployment", "mocka-v1", apiVersion="apps/v1", spec=["not", "a", "mapping"]),
        _kube("Rollout", "rollout-mocka", apiVersion="rollouts.kruise.io/v1alpha1", spec={"strategy": {"canary": {}}}),
        _kube("Service", "not-core", apiVersion="serving.knative.dev/v1"),
    ]
    seed = seed_bodies()
    docs = [ConfigDocument("kube.yaml", body) for body in bodies]
    docs += [ConfigDocument(SWIMLANES, seed[role]) for role in ("group", "base", "canary")]
    return build_table(docs, version="kube", namespace="default")


@pytest.mark.parametrize(
    ("service", "lane", "lane_used", "addresses"),
    [
        pytest.param("default/mocka", b"base", "base", ["10.0.0.1:8080"], id="named_target_port_resolves_on_the_pod"),
        pytest.param("default/mocka", b"canary", "canary", ["10.0.0.2:8080"],
                     id="only_ready_running_pods_of_the_namespace_are_endpoints"),
        pytest.param("default/mockb", b"base", "base", ["10.0.1.1:9080"], id="numeric_target_port_is_used_as_is"),
        pytest.param("default/mockb", b"canary", "base", ["10.0.1.1:9080"], id="no_canary_pod_falls_back_to_base"),
        pytest.param("default/mockc", b"base", "base", ["10.0.2.1:8000"], id="target_port_defaults_to_the_port"),
        pytest.param("default/mockc", b"canary", "canary", ["10.0.2.2:8000"], id="pod_labels_pick_the_lane"),
    ],
)
def test_kubernetes_services_and_ready_pods_become_lane_endpoints(service, lane, lane_used, addresses):
    route = kube_table().routes[service].route_for(lane)
    assert (route.lane_used, [e.address for e in route.endpoints]) == (lane_used, addresses)


def test_kubernetes_pod_labels_travel_with_their_endpoint_and_other_kinds_are_ignored():
    table = kube_table()
    assert list(table.services) == ["default/mocka", "default/mockb", "default/mockc"]
    (endpoint,) = table.routes["default/mocka"].route_for(b"canary").endpoints
    assert endpoint.labels == MappingProxyType({"app": "mocka", "ASM_TRAFFIC_TAG": "canary"})
    assert table.services["default/mocka"].port == 8000


@pytest.mark.parametrize(
    ("service", "lane", "cluster"),
    [
        pytest.param("default/mocka", b"canary", "outbound|8000|canary|mocka.default.svc.cluster.local", id="lane_is_subset"),
        pytest.param("default/mockb", b"canary", "outbound|8000|base|mockb.default.svc.cluster.local",
                     id="a_fallback_hop_names_the_lane_used"),
        pytest.param("default/mockc", None, "outbound|8000|base|mockc.default.svc.cluster.local", id="default_is_base"),
        pytest.param("default/mockd", None, "outbound|8000||mockd.default.svc.cluster.local",
                     id="a_service_in_no_group_has_an_empty_subset"),
        pytest.param("prod/mocke", b"canary", "outbound|80||mocke.prod.svc.cluster.local",
                     id="a_service_without_a_port_uses_80"),
    ],
)
def test_cluster_names_follow_istio_outbound_port_subset_fqdn(service, lane, cluster):
    bodies = seed_bodies()
    bodies["more"] = endpoints_body({"default/mockd": {"base": ["10.0.4.1:8000"]}})
    bodies["more"]["services"]["prod/mocke"] = {"lanes": {"base": ["10.0.5.1:9000"]}}
    assert build(bodies).routes[service].route_for(lane).cluster == cluster


def test_group_services_without_endpoints_exist_with_no_endpoints():
    bodies = seed_bodies()
    del bodies["endpoints"]
    table = build(bodies)
    assert [(key, s.port, s.endpoints) for key, s in table.services.items()] == [
        ("default/mocka", 80, ()), ("default/mockb", 80, ()), ("default/mockc", 80, ()),
    ]
    assert table.routes["default/mockb"].route_for(b"canary") == Route(
        "default/mockb", "canary", "base", "outbound|80|base|mockb.default.svc.cluster.local", ())


@pytest.mark.parametrize(
    ("route_header", "trace_header", "expected"),
    [
        pytest.param("X-ASM-Prefer-Tag", "My-Request-Id", ("x-asm-prefer-tag", "my-request-id"), id="names_are_lowercased"),
        pytest.param("x-asm-prefer-tag", "X-ASM-PREFER-TAG", ("x-asm-prefer-tag", None),
                     id="a_trace_header_equal_to_the_route_header_needs_no_trace_table"),
        pytest.param("x-lane", None, ("x-lane", None), id="no_trace_header"),
    ],
)
def test_group_header_names_are_normalised(route_header, trace_header, expected):
    bodies = seed_bodies()
    pmc = {"fallbackTarget": "base", "routeHeader": route_header}
    if trace_header is not None:
        pmc["traceHeader"] = trace_header
    edit(bodies["group"], "spec.permissiveModeConfiguration", pmc)
    group = build(bodies).groups["rollout"]
    assert (group.route_header, group.trace_header) == expected
