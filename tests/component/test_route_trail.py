"""The opt-in "where did this request go" header, and the read-only metrics listener, on the demo chain."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import started_demo

TOKEN = "let-me-see"


@pytest.fixture(scope="module")
def traced_cluster():
    with started_demo(metrics=True, proxy_args=("--route-debug-token", TOKEN)) as cluster:
        yield cluster


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


@pytest.mark.parametrize("lane, trail", [
    ("canary", "mocka:canary>canary, mockb:canary>base, mockc:canary>canary"),
    ("base", "mocka:base>base, mockb:base>base, mockc:base>base"),
])
def test_a_trusted_caller_sees_every_hop_with_the_lane_asked_and_the_lane_used(traced_cluster, lane, trail):
    status, headers, _ = get(traced_cluster.gateway_url + "/mock", {
        "x-asm-prefer-tag": lane, "my-request-id": f"trail-{lane}", "x-laneproxy-route": TOKEN})
    assert status == 200 and headers["x-laneproxy-route"] == trail


@pytest.mark.parametrize("extra", [{}, {"x-laneproxy-route": "guess"}, {"x-laneproxy-route": "1"}])
def test_without_the_token_no_hop_is_shown(traced_cluster, extra):
    status, headers, _ = get(traced_cluster.gateway_url + "/mock",
                             {"x-asm-prefer-tag": "canary", "my-request-id": "untrusted", **extra})
    assert status == 200 and "x-laneproxy-route" not in headers


def test_the_peer_header_the_sidecars_exchange_never_reaches_the_client(traced_cluster):
    _, headers, body = get(traced_cluster.gateway_url + "/mock", {"x-asm-prefer-tag": "canary"})
    assert "x-laneproxy-peer" not in headers and body.startswith("mocka(version: v2")


def test_the_metrics_listener_serves_prometheus_text_and_nothing_that_changes_the_proxy(traced_cluster):
    port = traced_cluster.gateway_metrics_port
    status, headers, body = get(f"http://127.0.0.1:{port}/stats/prometheus")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"istio_requests", "envoy_cluster_upstream_rq", "laneproxy_lane_info"} <= names
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    for path in ("/quitquitquit", "/healthcheck/fail", "/drain_listeners", "/reset_counters"):
        assert get(f"http://127.0.0.1:{port}{path}", method="POST")[0] in (404, 405)
    assert get(f"http://127.0.0.1:{port}/stats/prometheus", method="POST")[0] == 405
    assert get(f"http://127.0.0.1:{port}/config_dump")[0] == 404
    # The proxy is still live and serving: nothing above reached its admin.
    assert get(f"{traced_cluster.gateway_admin_url}/ready")[2].strip() == "LIVE"
