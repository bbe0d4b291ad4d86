"""Istio's standard metrics: the label set, the peer header, bounded cardinality, and the exposition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from laneproxy.core.errors import NoHealthyUpstreamError
from laneproxy.core.model import Endpoint, Route
from laneproxy.observability.istio import (
    BYTES_BOUNDS,
    ISTIO_LABELS,
    LANE_LABELS,
    PEER_LIMIT,
    UNKNOWN_WORKLOAD,
    IstioMetrics,
    IstioRecorder,
    PeerCache,
    Workload,
    parse_peer,
)
from laneproxy.observability.prometheus import metric_families, render, with_istio_tags
from laneproxy.observability.stats import StatKind, StatRecord
from .manifests import build, seed_bodies

# https://istio.io/latest/docs/reference/config/metrics: the labels of istio_requests_total and its histograms.
ISTIO_DOCUMENTED_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "request_protocol", "response_code", "connection_security_policy", "response_flags", "source_canonical_service",
    "destination_canonical_service", "source_canonical_revision", "destination_canonical_revision",
    "destination_cluster", "source_cluster", "grpc_response_status",
}

ME = Workload("mocka-v2", "default", "mocka", "v2", cluster="Kubernetes")


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def time(self) -> float:
        return self.now


def exchange(*, route: Route | None = None, status: int = 200, peer: bytes | None = None, error=None,
             headers: list[tuple[bytes, bytes]] | None = None, host: bytes | None = b"mockb:8000",
             path: bytes = b"/", took: float = 0.012):
    """What the recorder reads of a finished exchange (the real one needs a listener and sockets)."""
    clock = Clock()
    routed = None if route is None else SimpleNamespace(route=route, endpoint=route.endpoints[0])
    return SimpleNamespace(routed=routed, error=error, response_status=status, tunnel_flag=None, peer=peer, headers=headers or [],
                           host=host, target=path, start=clock.now - took, listener=SimpleNamespace(loop=clock),
                           request_bytes=0, response_bytes=42)


def store():
    return SimpleNamespace(current=build(seed_bodies()))


def route(service: str, asked: str | None, used: str | None) -> Route:
    return Route(service, asked, used, f"outbound|8000|{used}|{service}", (Endpoint("10.0.0.1", 8000),))


def test_request_metrics_carry_istios_documented_labels_and_the_two_lanes():
    assert set(ISTIO_LABELS) == ISTIO_DOCUMENTED_LABELS and len(ISTIO_LABELS) == len(ISTIO_DOCUMENTED_LABELS)
    metrics = IstioMetrics()
    IstioRecorder(metrics, "source", ME, "canary", store()).record(
        exchange(route=route("default/mockb", "canary", "base"), peer=Workload("mockb-v1", "default").header))
    for record in metrics.records():
        assert tuple(name for name, _ in record.tags) == ISTIO_LABELS + LANE_LABELS


def test_source_reporter_names_this_workload_the_peer_that_answered_and_the_lanes():
    metrics = IstioMetrics()
    peer = Workload("mockb-v1", "default", "mockb", "v1").header
    IstioRecorder(metrics, "source", ME, "canary", store()).record(
        exchange(route=route("default/mockb", "canary", "base"), peer=peer))
    (series,) = metrics.series.values()
    labels = dict(series.labels)
    assert labels["reporter"] == "source"
    assert (labels["source_workload"], labels["source_app"], labels["source_version"]) == ("mocka-v2", "mocka", "v2")
    assert (labels["destination_workload"], labels["destination_canonical_service"],
            labels["destination_canonical_revision"]) == ("mockb-v1", "mockb", "v1")
    assert labels["destination_service"] == "mockb.default.svc.cluster.local"
    assert (labels["destination_service_name"], labels["destination_service_namespace"]) == ("mockb", "default")
    assert (labels["lane_asked"], labels["lane_used"]) == ("canary", "base")
    assert (labels["response_code"], labels["response_flags"], labels["request_protocol"]) == ("200", "-", "http")


def test_destination_reporter_names_the_caller_from_its_peer_header_or_unknown():
    metrics = IstioMetrics()
    recorder = IstioRecorder(metrics, "destination", Workload("mockb-v1", "default", "mockb", "v1"), "base", store())
    caller = Workload("mocka-v2", "default", "mocka", "v2").header
    recorder.record(exchange(headers=[(b"x-laneproxy-peer", caller), (b"x-asm-prefer-tag", b"canary")]))
    recorder.record(exchange(headers=[]))  # from outside the mesh
    sources = {dict(s.labels)["source_workload"]: dict(s.labels) for s in metrics.series.values()}
    assert set(sources) == {"mocka-v2", "unknown"}
    assert sources["mocka-v2"]["lane_asked"] == "canary" and sources["mocka-v2"]["lane_used"] == "base"
    assert sources["mocka-v2"]["destination_workload"] == "mockb-v1"
    assert sources["mocka-v2"]["connection_security_policy"] == "none"


def test_a_local_reply_is_counted_with_its_envoy_response_flag():
    metrics = IstioMetrics()
    IstioRecorder(metrics, "source", ME, None, store()).record(
        exchange(route=route("default/mockb", None, "base"), status=503, error=NoHealthyUpstreamError()))
    (series,) = metrics.series.values()
    assert (dict(series.labels)["response_code"], dict(series.labels)["response_flags"]) == ("503", "UH")


def test_paths_trace_ids_and_unknown_lanes_never_become_series():
    metrics = IstioMetrics()
    recorder = IstioRecorder(metrics, "destination", Workload("mockb-v1", "default", "mockb", "v1"), "base", store())
    for index in range(500):
        recorder.record(exchange(path=b"/item/%d" % index, headers=[
            (b"my-request-id", b"%d" % index), (b"x-asm-prefer-tag", b"lane-%d" % index)]))
    (series,) = metrics.series.values()
    assert series.count == 500 and dict(series.labels)["lane_asked"] == ""


@pytest.mark.parametrize("value", [
    b"workload=a;namespace=b;app=c;version=v1;service=c;revision=v1;cluster=Kubernetes",
    b"workload=a;namespace=b",
])
def test_a_peer_header_laneproxy_wrote_names_its_workload(value):
    workload = parse_peer(value)
    assert workload is not None and (workload.name, workload.namespace) == ("a", "b")


@pytest.mark.parametrize("value", [
    b"", b"garbage", b"workload=a", b"workload=/etc/passwd;namespace=b", b"workload=a b;namespace=b",
    b"workload=" + b"x" * 64 + b";namespace=b", b"workload=a;namespace=b;path=/x", "workload=\xe9;namespace=b".encode(),
])
def test_anything_else_in_a_peer_header_is_unknown(value):
    assert parse_peer(value) is None
    assert PeerCache().get(value) is UNKNOWN_WORKLOAD


def test_the_peer_cache_holds_at_most_its_limit_and_answers_unknown_beyond_it():
    cache = PeerCache(limit=3)
    known = [cache.get(Workload(f"w{i}", "ns").header) for i in range(3)]
    assert [w.name for w in known] == ["w0", "w1", "w2"]
    assert cache.get(Workload("w0", "ns").header) is known[0]  # interned: the series key compares by identity
    assert cache.get(Workload("w3", "ns").header) is UNKNOWN_WORKLOAD and cache.overflow == 1
    assert PEER_LIMIT >= 256


def test_the_exposition_parses_with_prometheus_clients_parser_and_keeps_istios_bucket_bounds():
    metrics = IstioMetrics()
    recorder = IstioRecorder(metrics, "source", ME, "canary", store())
    for status in (200, 200, 500):
        recorder.record(exchange(route=route("default/mockb", "canary", "base"), status=status))
    families = {f.name: f for f in text_string_to_metric_families(render(metric_families(metrics.records())))}
    requests = families["istio_requests"]
    assert requests.type == "counter"
    assert sorted((s.labels["response_code"], s.value) for s in requests.samples) == [("200", 2.0), ("500", 1.0)]
    duration = families["istio_request_duration_milliseconds"]
    assert {s.labels["le"] for s in duration.samples if s.name.endswith("_bucket")} >= {"10", "25", "+Inf"}
    sizes = families["istio_response_bytes"]
    bounds = sorted({float(s.labels["le"]) for s in sizes.samples if s.name.endswith("_bucket")})
    assert bounds == [*BYTES_BOUNDS, float("inf")]
    assert [s.value for s in sizes.samples if s.name == "istio_response_bytes_sum"] == [84.0, 42.0]  # 2 and 1 responses of 42 bytes


@pytest.mark.parametrize("tags, renamed", [
    ((("envoy_cluster_name", "x"),), (("cluster_name", "x"),)),
    ((("envoy_response_code", "200"), ("envoy_cluster_name", "x")), (("response_code", "200"), ("cluster_name", "x"))),
    ((("envoy_response_code_class", "2"), ("envoy_cluster_name", "x")),
     (("response_code_class", "2xx"), ("cluster_name", "x"))),
    ((("envoy_http_conn_manager_prefix", "gateway"),), (("http_conn_manager_prefix", "gateway"),)),
    ((("lane", "canary"),), (("lane", "canary"),)),
])
def test_istio_tag_names_replace_envoys_defaults_and_leave_other_tags(tags, renamed):
    record = StatRecord("cluster.x.upstream_rq_200", StatKind.COUNTER, 1, True, "envoy_cluster_upstream_rq", tags)
    assert with_istio_tags(record).tags == renamed


def test_without_a_peer_header_the_destination_is_what_the_endpoints_pod_labels_say():
    metrics = IstioMetrics()
    labelled = Route("default/mockb", "canary", "canary", "outbound|8000|canary|mockb",
                     (Endpoint("10.0.0.9", 8000, {"app": "mockb", "version": "v2", "ASM_TRAFFIC_TAG": "canary"}),))
    IstioRecorder(metrics, "source", ME, None, store()).record(exchange(route=labelled))
    (series,) = metrics.series.values()
    labels = dict(series.labels)
    assert (labels["destination_app"], labels["destination_version"], labels["destination_canonical_revision"]) == \
        ("mockb", "v2", "v2")
    assert labels["destination_workload"] == "unknown"


def passed(cluster: str, *, closed: bool, received: int = 0, sent: int = 0, flags: str = "-"):
    from laneproxy.dataplane.sniff import PassedConnection

    return PassedConnection(protocol="tcp", flags=flags, received=received, sent=sent, duration=1.0,
                            upstream="10.0.0.9:6379", cluster=cluster, sni=None, client="10.0.0.2:40000",
                            listener="outbound", closed=closed)


def test_passed_through_connections_are_istios_tcp_metrics_opened_at_connect_and_closed_with_their_bytes():
    metrics = IstioMetrics()
    recorder = IstioRecorder(metrics, "source", ME, "canary", store())
    recorder.record_connection(passed("PassthroughCluster", closed=False))
    recorder.record_connection(passed("PassthroughCluster", closed=False))
    families = {f.name: f for f in text_string_to_metric_families(render(metric_families(metrics.records())))}
    assert [s.value for s in families["istio_tcp_connections_opened"].samples] == [2.0]
    assert [s.value for s in families["istio_tcp_connections_closed"].samples] == [0.0]
    recorder.record_connection(passed("PassthroughCluster", closed=True, received=30, sent=7))
    recorder.record_connection(passed("PassthroughCluster", closed=True, flags="UF"))  # never opened
    families = {f.name: f for f in text_string_to_metric_families(render(metric_families(metrics.records())))}
    (opened,) = [s for s in families["istio_tcp_connections_opened"].samples if s.value]
    labels = opened.labels
    assert set(labels) == ISTIO_DOCUMENTED_LABELS - {"response_code", "grpc_response_status"}
    assert (labels["reporter"], labels["source_workload"], labels["destination_workload"]) == ("source", "mocka-v2",
                                                                                                  "unknown")
    assert (labels["request_protocol"], labels["destination_service"], labels["response_flags"]) == (
        "tcp", "PassthroughCluster", "-")
    closed = {s.labels["response_flags"]: s.value for s in families["istio_tcp_connections_closed"].samples}
    assert closed == {"-": 1.0, "UF": 1.0}
    assert {s.labels["response_flags"]: s.value for s in families["istio_tcp_received_bytes"].samples} == {
        "-": 30.0, "UF": 0.0}
    assert {s.labels["response_flags"]: s.value for s in families["istio_tcp_sent_bytes"].samples} == {
        "-": 7.0, "UF": 0.0}
