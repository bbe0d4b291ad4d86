"""observability.prometheus: Envoy's metric names, label keys and TYPE lines, on a registry of our own."""

from __future__ import annotations

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from laneproxy.core.model import EMPTY_TABLE
from laneproxy.observability.inventory import ProcessView, all_records
from laneproxy.observability.prometheus import build_registry, metric_families, render, render_registry
from laneproxy.observability.stats import ProxyStats

CLUSTER = "outbound|8000|canary|mockb.default.svc.cluster.local"


def traffic() -> ProxyStats:
    stats = ProxyStats()
    cluster = stats.cluster(CLUSTER)
    cluster.rq_total = 3
    cluster.rq_by_code.update({200: 2, 503: 1})
    cluster.rq_time.record(3.0)
    cluster.rq_time.record(700.0)
    listener = stats.listener("outbound")
    listener.rq_total = 3
    listener.rq_by_class.update({2: 2, 5: 1})
    listener.cx_total = 1
    stats.lanes.requests["canary"] = 3
    return stats


def exposition(stats: ProxyStats) -> str:
    view = ProcessView(stats=stats, table=EMPTY_TABLE, state="LIVE", uptime_seconds=1)
    return render_registry(build_registry(lambda: all_records(view)))


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_exposition_parses_with_prometheus_clients_own_parser_and_keeps_envoys_sample_names():
    parsed = samples(exposition(traffic()))
    cluster = ("envoy_cluster_name", CLUSTER)
    # the parser appends _total to counter samples that lack it, exactly as it does for Envoy's own output
    assert parsed[("envoy_cluster_upstream_rq_total", frozenset({cluster}))] == 3
    assert parsed[("envoy_cluster_upstream_rq_total", frozenset({cluster, ("envoy_response_code", "200")}))] == 2
    assert parsed[("envoy_cluster_upstream_rq_xx_total",
                   frozenset({cluster, ("envoy_response_code_class", "5")}))] == 1
    assert parsed[("envoy_http_downstream_rq_total",
                   frozenset({("envoy_http_conn_manager_prefix", "outbound")}))] == 3
    assert parsed[("envoy_server_live", frozenset())] == 1
    assert parsed[("laneproxy_lane_rq_total", frozenset({("lane", "canary")}))] == 3


def test_type_lines_are_named_as_envoy_names_them():
    text = exposition(traffic())
    for line in ("# TYPE envoy_cluster_upstream_rq counter\n", "# TYPE envoy_cluster_upstream_rq_total counter\n",
                 "# TYPE envoy_cluster_upstream_rq_active gauge\n", "# TYPE envoy_cluster_upstream_rq_time histogram\n"):
        assert line in text
    type_names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_names) == len(set(type_names)), "a family declared twice breaks Prometheus' parser"
    assert "# HELP" not in text


def test_histogram_exposes_envoys_buckets_cumulatively_with_sum_and_count():
    parsed = samples(exposition(traffic()))
    cluster = ("envoy_cluster_name", CLUSTER)

    def bucket(le: str) -> float:
        return parsed[("envoy_cluster_upstream_rq_time_bucket", frozenset({cluster, ("le", le)}))]

    assert (bucket("1"), bucket("5"), bucket("500"), bucket("1000"), bucket("3600000"), bucket("+Inf")) == (
        0, 1, 1, 2, 2, 2)
    assert parsed[("envoy_cluster_upstream_rq_time_count", frozenset({cluster}))] == 2
    assert parsed[("envoy_cluster_upstream_rq_time_sum", frozenset({cluster}))] == 703.0


def test_label_values_are_escaped():
    stats = ProxyStats()
    stats.lanes.requests['we"ird\\lane'] = 1
    parsed = samples(render(metric_families(stats.lanes.records())))
    assert parsed[("laneproxy_lane_rq_total", frozenset({("lane", 'we"ird\\lane')}))] == 1


def test_the_collector_is_on_its_own_registry_never_the_default_one():
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    registry = build_registry(lambda: all_records(ProcessView(stats=traffic(), table=EMPTY_TABLE, state="LIVE",
                                                              uptime_seconds=1)))
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before
    assert registry is not prometheus_client.REGISTRY
    assert "envoy_cluster_upstream_rq_total" in render_registry(registry)


def test_passed_through_connections_are_exposed_as_envoys_tcp_proxy_stats():
    stats = traffic()
    tcp = stats.tcp("PassthroughCluster")
    tcp.cx_total, tcp.cx_active, tcp.rx_bytes, tcp.tx_bytes = 3, 1, 120, 4096
    parsed = samples(exposition(stats))
    prefix = frozenset({("envoy_tcp_prefix", "PassthroughCluster")})
    assert parsed[("envoy_tcp_downstream_cx_total", prefix)] == 3
    assert parsed[("envoy_tcp_downstream_cx_rx_bytes_total", prefix)] == 120
    assert parsed[("envoy_tcp_downstream_cx_tx_bytes_total", prefix)] == 4096
    assert parsed[("laneproxy_tcp_downstream_cx_active", prefix)] == 1
    stats.reset_counters()
    assert samples(exposition(stats))[("envoy_tcp_downstream_cx_total", prefix)] == 0


def test_numbers_are_written_as_prometheus_clients_float_to_go_string_writes_them():
    """The streamed exposition formats floats itself (so a sidecar never imports prometheus_client): same text."""
    import math
    import random

    from prometheus_client.utils import floatToGoString

    from laneproxy.observability.prometheus import go_float

    draw = random.Random(18)
    values = [0.0, -0.0, 0.5, 1.0, -1.5, 1e-7, 123456.0, 1234567.0, 12345678.9, 1e21, -1e21, 2.5e300, 5e-324,
              math.inf, -math.inf, math.nan, 0.1 + 0.2]
    values += [draw.uniform(-1e9, 1e9) for _ in range(200)] + [10 ** draw.uniform(-12, 30) for _ in range(200)]
    assert [go_float(v) for v in values] == [floatToGoString(v) for v in values]
