"""observability.recorder: a finished exchange is counted once, as Envoy counts it, then every observer sees it once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from laneproxy.core.errors import NoRouteError, UpstreamConnectError
from laneproxy.core.model import Endpoint
from laneproxy.observability.recorder import ExchangeRecorder
from laneproxy.observability.stats import ProxyStats

ENDPOINT = Endpoint("10.0.0.1", 8000)


def exchange(stats: ProxyStats, *, status: int, error=None, routed: bool = True, protocol: str = "HTTP/1.1"):
    cluster = stats.cluster("outbound|8000|base|mockb")
    target = None
    if routed:
        cluster.rq_active += 1
        host = cluster.host(ENDPOINT)
        host.rq_active += 1
        target = SimpleNamespace(cluster_stats=cluster, host_stats=host, endpoint=ENDPOINT)
    return SimpleNamespace(response_status=status, tunnel_flag=None, start=10.0, error=error, routed=target, counted_active=routed,
                           protocol=protocol)


@pytest.mark.parametrize(
    ("status", "error", "host_counts"),
    [(200, None, (1, 1, 0, 0)), (503, None, (1, 0, 1, 0)), (503, UpstreamConnectError(), (0, 0, 1, 1))],
    ids=["success", "upstream-5xx", "connect-failure"],
)
def test_a_routed_exchange_is_counted_once_on_its_listener_cluster_and_host_then_observed_once(
        status, error, host_counts):
    stats = ProxyStats()
    seen = []
    recorder = ExchangeRecorder(stats.listener("outbound"), clock=lambda: 10.25)
    recorder.observers.append(seen.append)
    finished = exchange(stats, status=status, error=error)
    recorder.record(finished)
    listener, cluster = stats.listener("outbound"), finished.routed.cluster_stats
    host = cluster.host(ENDPOINT)
    assert (listener.rq_total, listener.rq_by_class[status // 100], cluster.rq_active, cluster.rq_by_code[status],
            cluster.rq_time_count, cluster.rq_time_ms_sum) == (1, 1, 0, 1, 1, 250.0)
    assert (host.rq_total, host.rq_success, host.rq_error, host.cx_connect_fail, host.rq_active) == (*host_counts, 0)
    assert seen == [finished]


def test_a_request_no_route_serves_counts_as_no_route_on_its_listener_and_touches_no_cluster():
    stats = ProxyStats()
    recorder = ExchangeRecorder(stats.listener("gateway"), clock=lambda: 10.0)
    recorder.record(exchange(stats, status=404, error=NoRouteError(), routed=False))
    assert (stats.listener("gateway").no_route, stats.listener("gateway").rq_by_class[4]) == (1, 1)
    assert stats.cluster("outbound|8000|base|mockb").rq_by_code[404] == 0


def test_http2_streams_are_counted_as_http2_requests_and_the_rest_as_http1():
    stats = ProxyStats()
    recorder = ExchangeRecorder(stats.listener("gateway"), clock=lambda: 10.0)
    for protocol in ("HTTP/2", "HTTP/2", "HTTP/1.1"):
        recorder.record(exchange(stats, status=200, protocol=protocol))
    records = {record.name: record.value for record in stats.listener("gateway").records()}
    assert (records["http.gateway.downstream_rq_http2_total"], records["http.gateway.downstream_rq_http1_total"]) == (2, 1)
