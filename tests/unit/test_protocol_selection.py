"""build.py: each service port's upstream protocol (http1, http2 or auto), chosen as Istio chooses it.

Kubernetes Services: `appProtocol` decides when set, else the port name up to its first '-'; a
LaneEndpoints file names it per service. Every route of the port carries it (the lanes' routes, the
default route, and the route a fallback chain picks), and /lanes and /route show it.
"""

from __future__ import annotations

import pytest

from laneproxy.admin.lanes import explain_route, lanes_document
from laneproxy.core.build import ConfigDocument, build_table, select_protocol
from laneproxy.core.fallback import choose_lane
from laneproxy.core.model import UpstreamProtocol

from .manifests import ENDPOINTS, SWIMLANES, build, problems, seed_bodies

HTTP1, HTTP2, AUTO = UpstreamProtocol.HTTP1, UpstreamProtocol.HTTP2, UpstreamProtocol.AUTO


@pytest.mark.parametrize(
    ("port_name", "app_protocol", "expected"),
    [
        pytest.param("grpc", None, HTTP2, id="a_port_named_grpc"),
        pytest.param("grpc-api", None, HTTP2, id="a_port_named_grpc_with_a_suffix"),
        pytest.param("http2", None, HTTP2, id="a_port_named_http2"),
        pytest.param("http2-web", None, HTTP2, id="a_port_named_http2_with_a_suffix"),
        pytest.param("grpc-web", None, HTTP2, id="a_port_named_grpc_web"),
        pytest.param("grpc-web-ui", None, HTTP2, id="a_port_named_grpc_web_with_a_suffix"),
        pytest.param("GRPC-api", None, HTTP2, id="a_port_name_in_capitals"),
        pytest.param("http", None, AUTO, id="a_port_named_http_is_the_downstreams_protocol"),
        pytest.param("http-grpc", None, AUTO, id="only_the_prefix_before_the_dash_counts"),
        pytest.param("grpcx", None, AUTO, id="a_prefix_that_only_starts_with_grpc_is_not_grpc"),
        pytest.param("h2c", None, AUTO, id="h2c_is_an_app_protocol_not_a_port_name"),
        pytest.param("", None, AUTO, id="an_unnamed_port"),
        pytest.param("tcp-db", None, AUTO, id="a_port_named_tcp"),
        pytest.param("http", "grpc", HTTP2, id="app_protocol_grpc_wins_over_the_name"),
        pytest.param("", "h2c", HTTP2, id="app_protocol_h2c"),
        pytest.param("", "kubernetes.io/h2c", HTTP2, id="app_protocol_kubernetes_io_h2c"),
        pytest.param("", "http2", HTTP2, id="app_protocol_http2"),
        pytest.param("", "grpc-web", HTTP2, id="app_protocol_grpc_web"),
        pytest.param("", "GRPC", HTTP2, id="app_protocol_in_capitals"),
        pytest.param("grpc", "http", AUTO, id="app_protocol_http_wins_over_a_grpc_name"),
        pytest.param("grpc", "kubernetes.io/ws", AUTO, id="app_protocol_websocket_wins_over_a_grpc_name"),
        pytest.param("http2", "tcp", AUTO, id="app_protocol_tcp_wins_over_an_http2_name"),
    ],
)
def test_a_kubernetes_port_selects_its_protocol_as_istio_does(port_name, app_protocol, expected):
    assert select_protocol(port_name, app_protocol) is expected


def _service(ports: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mockb", "namespace": "default"},
            "spec": {"selector": {"app": "mockb"}, "clusterIP": "10.96.0.11", "ports": ports}}


def _kube_table(*bodies: dict):
    seed = seed_bodies()
    docs = [ConfigDocument(SWIMLANES, seed[role]) for role in ("group", "base", "canary")]
    docs += [ConfigDocument(f"kubernetes:Service/{body['metadata']['name']}", body) for body in bodies]
    return build_table(docs, version="t", namespace="default")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param(b"mockb:8000", AUTO, id="the_http_port"),
        pytest.param(b"mockb:9000", HTTP2, id="the_grpc_named_port"),
        pytest.param(b"mockb:9001", HTTP2, id="the_port_with_app_protocol_h2c"),
        pytest.param(b"10.96.0.11:9000", HTTP2, id="the_cluster_ip_and_grpc_port"),
        pytest.param(b"mockb", AUTO, id="the_bare_name_is_the_primary_port"),
    ],
)
def test_each_port_of_a_multi_port_service_carries_its_own_protocol_on_every_lane(host, expected):
    table = _kube_table(_service([{"name": "http", "port": 8000}, {"name": "grpc-api", "port": 9000},
                                  {"name": "rpc", "port": 9001, "appProtocol": "kubernetes.io/h2c"}]))
    routes = table.hosts[host]
    assert routes.service.protocol is expected
    assert {lane: route.protocol for lane, route in routes.by_lane.items()} == {b"base": expected, b"canary": expected}
    assert routes.default.protocol is expected


def test_a_non_string_app_protocol_is_reported_at_its_field():
    seed = seed_bodies()
    docs = [ConfigDocument(SWIMLANES, seed[role]) for role in ("group", "base", "canary")]
    docs += [ConfigDocument("kubernetes:Service/mockb", _service([{"name": "http", "port": 8000, "appProtocol": 2}]))]
    assert problems(docs) == ["kubernetes:Service/mockb: Service.spec.ports[0].appProtocol: expected a string, got int"]


def _with_protocol(**protocols: object) -> dict:
    bodies = seed_bodies()
    for name, protocol in protocols.items():
        bodies["endpoints"]["services"][f"default/{name}"]["protocol"] = protocol
    return bodies


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        pytest.param(None, AUTO, id="unsaid_is_auto"),
        pytest.param("auto", AUTO, id="auto"),
        pytest.param("http1", HTTP1, id="http1"),
        pytest.param("http2", HTTP2, id="http2"),
    ],
)
def test_a_lane_endpoints_service_names_its_protocol(written, expected):
    bodies = _with_protocol(mockb=written) if written else seed_bodies()
    table = build(bodies)
    mockb = table.routes["default/mockb"]
    assert mockb.service.protocol is expected
    assert {route.protocol for route in (*mockb.by_lane.values(), mockb.default)} == {expected}
    assert table.routes["default/mocka"].service.protocol is AUTO  # the others keep their own


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        pytest.param("grpc", "unknown protocol 'grpc'", id="a_protocol_name_not_ours"),
        pytest.param("HTTP2", "unknown protocol 'HTTP2'", id="capitals"),
        pytest.param(2, "unknown protocol 2", id="a_number"),
    ],
)
def test_an_unknown_protocol_in_the_endpoints_file_is_a_clear_error(written, reason):
    bodies = _with_protocol(mockb=written)
    docs = [ConfigDocument(SWIMLANES if role != "endpoints" else ENDPOINTS, body) for role, body in bodies.items()]
    assert problems(docs) == [f"{ENDPOINTS}: LaneEndpoints.services.default/mockb.protocol: {reason} "
                              "(use one of: http1, http2, auto; gRPC and h2c are http2)"]


def test_two_endpoints_files_naming_two_protocols_for_one_service_is_an_error():
    bodies = _with_protocol(mockb="http2")
    other = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
             "services": {"default/mockb": {"port": 8000, "protocol": "http1", "lanes": {"canary": ["127.0.0.1:16006"]}}}}
    docs = [ConfigDocument(SWIMLANES if role != "endpoints" else ENDPOINTS, body) for role, body in bodies.items()]
    docs.append(ConfigDocument("more-endpoints.yaml", other))
    assert problems(docs) == [f"more-endpoints.yaml: LaneEndpoints.services.default/mockb.protocol: "
                              f"http1 here, http2 in {ENDPOINTS}"]


@pytest.mark.parametrize(
    ("first_port_name", "file_says", "first", "second"),
    [
        pytest.param("http", None, AUTO, HTTP2, id="a_file_without_protocol_keeps_the_ports_own"),
        pytest.param("grpc", None, HTTP2, HTTP2, id="a_file_without_protocol_keeps_a_grpc_port_http2"),
        pytest.param("http", "http2", HTTP2, HTTP2, id="the_file_makes_the_first_port_http2"),
        pytest.param("grpc", "http1", HTTP1, HTTP2, id="the_file_overrides_a_grpc_first_port_only"),
    ],
)
@pytest.mark.parametrize("kube_first", [False, True], ids=["file_read_first", "service_read_first"])
def test_an_endpoints_file_protocol_overrides_the_kubernetes_services_first_port_only(
        first_port_name, file_says, first, second, kube_first):
    seed = seed_bodies()
    service = {"port": 8000, "lanes": {"base": ["127.0.0.1:16002"]}}
    if file_says:
        service["protocol"] = file_says
    listed = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": {"default/mockb": service}}
    docs = [ConfigDocument(SWIMLANES, seed[role]) for role in ("group", "base", "canary")]
    inputs = [ConfigDocument("local.yaml", listed),
              ConfigDocument("kubernetes:Service/mockb", _service([{"name": first_port_name, "port": 8000},
                                                                  {"name": "grpc-admin", "port": 9000}]))]
    docs += inputs[::-1] if kube_first else inputs
    table = build_table(docs, version="t", namespace="default")
    assert (table.hosts[b"mockb:8000"].service.protocol, table.hosts[b"mockb:9000"].service.protocol) == (first, second)


def test_the_route_a_fallback_picks_keeps_the_service_protocol():
    table = build(_with_protocol(mockc="http2"))
    mockc = table.routes["default/mockc"]
    # The canary's mockc endpoint is ejected: the fallback chain picks base, and that route still says http2.
    canary = mockc.route_for(b"canary")
    assert (canary.lane_used, canary.protocol) == ("canary", HTTP2)
    choice = choose_lane(canary, mockc, lambda endpoints: tuple(e for e in endpoints if e.port != 16005), 0.0)
    assert choice is not None
    assert (choice.route.lane_used, choice.route.protocol) == ("base", HTTP2)


@pytest.mark.parametrize(
    ("declared", "downstream", "upstream"),
    [
        pytest.param(AUTO, HTTP1, HTTP1, id="auto_follows_an_http1_downstream"),
        pytest.param(AUTO, HTTP2, HTTP2, id="auto_follows_an_http2_downstream"),
        pytest.param(HTTP2, HTTP1, HTTP2, id="http2_whatever_the_downstream"),
        pytest.param(HTTP1, HTTP2, HTTP1, id="http1_whatever_the_downstream"),
    ],
)
def test_the_upstream_protocol_for_a_downstream_one(declared, downstream, upstream):
    assert declared.for_downstream(downstream) is upstream


def test_admin_lanes_and_route_show_the_protocol():
    table = build(_with_protocol(mockb="http2"))
    document = lanes_document(table)
    assert {key: service["protocol"] for key, service in document["services"].items()} == {
        "default/mocka": "auto", "default/mockb": "http2", "default/mockc": "auto"}
    answer = explain_route(table, listener="outbound", host="mockb", path="/", headers={"x-asm-prefer-tag": "canary"})
    assert (answer["route"]["lane_used"], answer["route"]["protocol"]) == ("base", "http2")
