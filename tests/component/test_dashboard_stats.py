"""The Envoy stats dashboards expect, on a real process: connection-level cluster stats, outlier ejections,
listener.* and server.memory_*, and Istio's tag names as an option."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxyrig import SWIMLANES, ProxyProcess, UpstreamThread, endpoints_file, exchange

MOCKB = "outbound|8000|base|mockb.default.svc.cluster.local"


def stats(process: ProxyProcess) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in process.admin("/stats").decode().splitlines() if ": " in line)


def send(port: int, host: str) -> bytes:
    raw = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return asyncio.run(exchange(port, raw))


@pytest.fixture(scope="module")
def failing_upstream():
    with UpstreamThread(respond=lambda request: b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom") \
            as upstream:
        yield upstream


@pytest.fixture(scope="module")
def second_failing_upstream():
    with UpstreamThread(respond=lambda request: b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom") \
            as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(failing_upstream, second_failing_upstream, tmp_path_factory):
    # Two endpoints: a lane's last healthy endpoint is never ejected, so ejection needs a second one to go to.
    workdir = tmp_path_factory.mktemp("dashboard")
    endpoints = endpoints_file(workdir / "endpoints.yaml",
                               {"default/mockb": {"base": [failing_upstream.port, second_failing_upstream.port]}})
    process = ProxyProcess(SWIMLANES, endpoints, outbound=True,
                           extra=("--outlier-consecutive-5xx", "3", "--max-retries", "0", "--stats-tags", "istio")).start()
    yield process
    process.stop()


def test_connection_bytes_destroys_and_ejections_are_counted_per_cluster(proxy):
    ejected = f"cluster.{MOCKB}.outlier_detection.ejections_enforced_total"
    for sent in range(1, 31):  # three 5xx in a row on one endpoint eject it, whichever the picker chose
        assert send(proxy.outbound_port, "mockb").startswith(b"HTTP/1.1 500")
        if sent >= 3 and stats(proxy).get(ejected) == "1":
            break
    numbers = stats(proxy)
    assert int(numbers[f"cluster.{MOCKB}.upstream_cx_tx_bytes_total"]) > 3 * len(b"GET / HTTP/1.1\r\n")
    assert int(numbers[f"cluster.{MOCKB}.upstream_cx_rx_bytes_total"]) >= 3 * len(b"HTTP/1.1 500 Internal Server Error")
    assert int(numbers[f"cluster.{MOCKB}.upstream_cx_active"]) >= 0
    assert numbers[f"cluster.{MOCKB}.upstream_rq_pending_active"] == "0"
    # One endpoint ejected; the other is the lane's last way and stays (the max-ejection share allows one anyway).
    assert numbers[ejected] == "1"
    assert numbers[f"cluster.{MOCKB}.outlier_detection.ejections_active"] == "1"
    listener = next(name for name in numbers if name.startswith("listener.") and name.endswith(".downstream_cx_total"))
    assert int(numbers[listener]) >= 3
    assert int(numbers["server.memory_heap_size"]) >= int(numbers["server.memory_allocated"]) > 1 << 20


def test_istio_tag_names_are_an_option_of_the_prometheus_output(proxy):
    body = proxy.admin("/stats/prometheus").decode()
    samples = [sample for family in text_string_to_metric_families(body) for sample in family.samples
               if family.name == "envoy_cluster_upstream_rq_xx"]
    assert samples and all(set(s.labels) == {"response_code_class", "cluster_name"} for s in samples)
    assert {s.labels["response_code_class"] for s in samples} == {"5xx"}
    assert "envoy_cluster_name" not in body


def test_with_workers_the_metrics_listener_adds_every_workers_istio_metrics_up(tmp_path):
    from laneproxy.demo import free_port

    with UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        metrics = free_port()
        process = ProxyProcess(SWIMLANES, endpoints, outbound=True,
                               extra=("--workers", "2", "--metrics", f"127.0.0.1:{metrics}", "--workload", "w")).start(
            timeout=60)
        try:
            for _ in range(20):  # a connection each: SO_REUSEPORT spreads them over both workers
                assert send(process.outbound_port, "mockb").startswith(b"HTTP/1.1 200")
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
                body = response.read().decode()
            families = {family.name: family for family in text_string_to_metric_families(body)}
            assert sum(s.value for s in families["istio_requests"].samples) == 20
            info = [s for s in families["laneproxy_lane_info"].samples]
            assert {s.value for s in info} == {1.0}  # the same in every worker: not added up
        finally:
            process.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_metrics_listener_merges_the_apps_own_metrics_after_the_proxys(tmp_path, workers):
    from laneproxy.demo import free_port

    app_text = b"# TYPE shop_orders_total counter\nshop_orders_total{kind=\"book\"} 7\n"

    def app_metrics(request):
        return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(app_text), app_text)

    with UpstreamThread(respond=app_metrics) as app, UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        metrics = free_port()
        process = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=(
            "--workers", str(workers), "--metrics", f"127.0.0.1:{metrics}",
            "--app-metrics", f"http://127.0.0.1:{app.port}/metrics")).start(timeout=60)
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/stats/prometheus", timeout=10) as response:
                body = response.read().decode()
            families = {family.name: family for family in text_string_to_metric_families(body)}
            assert families["shop_orders"].samples[0].value == 7  # the app's, unchanged
            assert "envoy_server_live" in families
            assert [r.request_line for r in app.received] == [b"GET /metrics HTTP/1.1"]
            # The admin API's answer is the proxy's own: merging belongs to the metrics listener.
            assert "shop_orders_total" not in process.admin("/stats/prometheus").decode()
        finally:
            process.stop()


def test_json_logs_come_from_the_supervisor_and_every_worker(tmp_path):
    import json

    with UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        process = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=(
            "--workers", "2", "--log-level", "info", "--log-format", "json")).start(timeout=60)
        process.stop()
    lines = [line for line in process.process.stderr.read().decode().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert sum("outbound listener on" in entry["message"] for entry in entries) == 2  # one per worker
