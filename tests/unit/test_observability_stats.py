"""observability.stats and .inventory: Envoy's names, tags and `usedonly` meaning for what laneproxy counts."""

from __future__ import annotations

import pytest

from laneproxy.core.model import Endpoint
from laneproxy.core.propagation import TraceTableCounters
from laneproxy.core.store import SourceHealth
from laneproxy.observability.inventory import ProcessView, all_records, cluster_members
from laneproxy.observability.stats import (
    HISTOGRAM_BOUNDS,
    ClusterStats,
    Histogram,
    ListenerStats,
    ProxyStats,
    StatKind,
    cluster_records,
)

from .manifests import build, endpoints_body, seed_bodies

CANARY_B = "outbound|8000|canary|mockb.default.svc.cluster.local"


def by_name(records):
    return {record.name: record for record in records}


def busy_cluster() -> ClusterStats:
    stats = ClusterStats(CANARY_B)
    stats.rq_total = 4
    stats.rq_by_code.update({200: 2, 204: 1, 503: 1})
    stats.cx_total = 2
    stats.rq_active = 1
    return stats


@pytest.mark.parametrize(
    ("stat", "value", "family", "tags"),
    [
        ("upstream_rq_total", 4, "envoy_cluster_upstream_rq_total", {}),
        ("upstream_rq_completed", 4, "envoy_cluster_upstream_rq_completed", {}),
        ("upstream_rq_200", 2, "envoy_cluster_upstream_rq", {"envoy_response_code": "200"}),
        ("upstream_rq_204", 1, "envoy_cluster_upstream_rq", {"envoy_response_code": "204"}),
        ("upstream_rq_2xx", 3, "envoy_cluster_upstream_rq_xx", {"envoy_response_code_class": "2"}),
        ("upstream_rq_5xx", 1, "envoy_cluster_upstream_rq_xx", {"envoy_response_code_class": "5"}),
        ("upstream_cx_total", 2, "envoy_cluster_upstream_cx_total", {}),
        ("upstream_rq_active", 1, "envoy_cluster_upstream_rq_active", {}),
        ("membership_total", 3, "envoy_cluster_membership_total", {}),
        ("membership_healthy", 2, "envoy_cluster_membership_healthy", {}),
    ],
)
def test_cluster_stat_is_named_and_tagged_as_envoy_extracts_it(stat, value, family, tags):
    records = by_name(cluster_records(CANARY_B, busy_cluster(), membership_total=3, membership_healthy=2))
    record = records[f"cluster.{CANARY_B}.{stat}"]
    assert (record.value, record.family, dict(record.tags)) == (value, family, {**tags, "envoy_cluster_name": CANARY_B})


def test_response_code_classes_exist_only_for_codes_seen():
    names = set(by_name(cluster_records(CANARY_B, busy_cluster(), membership_total=1, membership_healthy=1)))
    assert {f"cluster.{CANARY_B}.upstream_rq_{c}" for c in ("1xx", "3xx", "4xx")}.isdisjoint(names)


@pytest.mark.parametrize(
    ("stat", "used"),
    [
        ("upstream_rq_total", True),
        ("upstream_cx_connect_fail", False),  # never incremented
        ("upstream_rq_active", True),  # a gauge of a cluster that saw traffic was set
        ("membership_total", True),  # written when the table arrived, as Envoy's membership gauges
    ],
)
def test_usedonly_means_written_not_nonzero(stat, used):
    records = by_name(cluster_records(CANARY_B, busy_cluster(), membership_total=1, membership_healthy=1))
    assert records[f"cluster.{CANARY_B}.{stat}"].used is used


def test_configured_cluster_without_traffic_reports_zero_counters_that_usedonly_hides():
    records = list(cluster_records(CANARY_B, None, membership_total=2, membership_healthy=2))
    used = {r.name.rsplit(".", 1)[1] for r in records if r.used}
    assert used == {"membership_total", "membership_healthy"}
    assert all(r.value == 0 for r in records if r.kind is StatKind.COUNTER)


def test_listener_stats_use_the_connection_manager_prefix_tag():
    stats = ListenerStats("gateway")
    stats.rq_total = 3
    stats.rq_by_class.update({2: 2, 4: 1})
    stats.cx_total = 1
    stats.no_route = 1
    records = by_name(stats.records())
    xx = records["http.gateway.downstream_rq_4xx"]
    assert (xx.family, dict(xx.tags), xx.value) == (
        "envoy_http_downstream_rq_xx", {"envoy_response_code_class": "4", "envoy_http_conn_manager_prefix": "gateway"}, 1)
    assert records["http.gateway.no_route"].family == "envoy_http_no_route"
    assert records["http.gateway.downstream_rq_total"].value == 3
    assert records["http.gateway.downstream_rq_3xx"].used is False


def test_reset_counters_zeroes_counters_and_keeps_gauges_and_histograms():
    proxy = ProxyStats()
    cluster = proxy.cluster(CANARY_B)
    cluster.rq_total, cluster.rq_active = 5, 2
    cluster.rq_by_code[200] = 5
    cluster.rq_time.record(3.0)
    host = cluster.host(Endpoint("10.0.0.1", 80))
    host.rq_total, host.rq_active = 5, 2
    listener = proxy.listener("outbound")
    listener.rq_total, listener.cx_active = 5, 1
    proxy.lanes.requests["canary"] = 5
    proxy.reset_counters()
    assert (cluster.rq_total, dict(cluster.rq_by_code), cluster.rq_active, cluster.rq_time.count) == (0, {}, 2, 1)
    assert (host.rq_total, host.rq_active) == (0, 2)
    assert (listener.rq_total, listener.cx_active) == (0, 1)
    assert not proxy.lanes.requests


@pytest.mark.parametrize(
    ("values", "bucket_counts"),
    [
        ([0.5], {0.5: 1}),  # a bound is inclusive (Prometheus `le`)
        ([0.6, 1.0], {1: 2}),
        ([7, 7, 4000], {10: 2, 5000: 1}),
        ([5_000_000], {"+Inf": 1}),
    ],
)
def test_histogram_buckets_are_envoys(values, bucket_counts):
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    labels = [*HISTOGRAM_BOUNDS, "+Inf"]
    assert {labels[i]: c for i, c in enumerate(histogram.counts) if c} == bucket_counts
    assert histogram.cumulative()[-1] == histogram.count == len(values)


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        ([2.3], 0, 2.3),
        ([2.3], 100, 2.3),
        (list(range(1, 101)), 50, 50.0),
        (list(range(1, 101)), 90, 90.0),
        ([], 50, None),
    ],
)
def test_histogram_quantile_estimates_stay_within_the_values_seen(values, percent, expected):
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    estimate = histogram.quantile(percent)
    assert (estimate if expected is None else pytest.approx(estimate)) == expected


def seed_table():
    bodies = seed_bodies()
    bodies["endpoints"] = endpoints_body({
        "default/mocka": {"base": ["10.0.1.1:8000"], "canary": ["10.0.1.2:8000"]},
        "default/mockb": {"base": ["10.0.2.1:8000", "10.0.2.2:8000"]},
        "default/mockc": {"base": ["10.0.3.1:8000"], "canary": ["10.0.3.2:8000"]},
    })
    return build(bodies)


def test_every_lane_of_every_service_is_its_own_cluster():
    members = cluster_members(seed_table())
    assert {name: len(endpoints) for name, endpoints in members.items()} == {
        "outbound|8000|base|mocka.default.svc.cluster.local": 1,
        "outbound|8000|canary|mocka.default.svc.cluster.local": 1,
        "outbound|8000|base|mockb.default.svc.cluster.local": 2,  # canary falls back here: same cluster
        "outbound|8000|base|mockc.default.svc.cluster.local": 1,
        "outbound|8000|canary|mockc.default.svc.cluster.local": 1,
    }


def test_process_records_include_server_state_lane_and_config_stats():
    stats = ProxyStats()
    stats.lanes.fallbacks[("default/mockb", "canary", "base")] = 2
    view = ProcessView(stats=stats, table=seed_table(), state="DRAINING", uptime_seconds=7,
                       trace_counters=TraceTableCounters(hits=3, rejected_long_ids=4), trace_table_size=1,
                       trace_table_bytes=290, config_accepted=2, config_rejected=1)
    records = by_name(all_records(view))
    assert (records["server.live"].value, records["server.state"].value, records["server.uptime"].value) == (0, 1, 7)
    assert records["cluster_manager.active_clusters"].value == 5
    fallback = records["laneproxy.fallback.default/mockb.canary.base"]
    assert (fallback.family, dict(fallback.tags), fallback.value) == (
        "laneproxy_fallback_rq_total", {"service": "default/mockb", "from_lane": "canary", "to_lane": "base"}, 2)
    assert records["laneproxy.trace_table.hits"].value == 3
    rejected, size_bytes = records["laneproxy.trace_table.rejected_long_ids"], records["laneproxy.trace_table.bytes"]
    assert (rejected.kind, rejected.family, rejected.value) == (
        StatKind.COUNTER, "laneproxy_trace_table_rejected_long_ids", 4)
    assert (size_bytes.kind, size_bytes.family, size_bytes.value) == (StatKind.GAUGE, "laneproxy_trace_table_bytes", 290)
    assert (records["laneproxy.config.update_success"].value, records["laneproxy.config.update_rejected"].value) == (2, 1)
    version = records["laneproxy.config.version"]
    assert (version.kind, version.value, dict(version.tags)) == (StatKind.TEXT, "test", {"version": "test"})


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        pytest.param(SourceHealth(None, False), {"laneproxy.config.table_stale": 0}, id="no_table_yet_has_no_age"),
        pytest.param(SourceHealth(12.7, False, (("Pod.default", "watching"),)),
                     {"laneproxy.config.table_age_seconds": 12, "laneproxy.config.table_stale": 0,
                      "laneproxy.config.sync.Pod.default": "watching"}, id="a_current_table"),
        pytest.param(SourceHealth(400.0, True, (("ASMSwimLane", "retrying"), ("Pod.team-d", "forbidden"))),
                     {"laneproxy.config.table_age_seconds": 400, "laneproxy.config.table_stale": 1,
                      "laneproxy.config.sync.ASMSwimLane": "retrying", "laneproxy.config.sync.Pod.team-d": "forbidden"},
                     id="a_stale_table_turns_the_stale_gauge_red"),
    ],
)
def test_config_records_show_table_age_staleness_sync_state_and_objects_left_out(health, expected):
    view = ProcessView(stats=ProxyStats(), table=seed_table(), state="LIVE", uptime_seconds=1, config_skipped=2,
                       config_objects_rejected=3, config_health=health)
    records = by_name(all_records(view))
    config = {name: record.value for name, record in records.items()
              if name.startswith(("laneproxy.config.table_", "laneproxy.config.sync."))}
    assert config == expected
    assert (records["laneproxy.config.skipped_objects"].kind, records["laneproxy.config.skipped_objects"].value) == (
        StatKind.GAUGE, 2)
    assert (records["laneproxy.config.object_rejected"].kind, records["laneproxy.config.object_rejected"].value) == (
        StatKind.COUNTER, 3)
    for name in expected:
        if name.startswith("laneproxy.config.sync."):
            assert records[name].family == "laneproxy_config_sync_info"
