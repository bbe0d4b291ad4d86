"""The admin API's laneproxy-specific side, on a real process: /route, /lanes, /config_dump, /clusters,
/stats queries, Prometheus lane metrics, the drain switches, the header policy and the JSON access log.

(What laneproxy shares with Envoy is compared against a real Envoy in test_envoy_compat.py.)
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxyrig import SWIMLANES, ProxyProcess, UpstreamThread, endpoints_file, exchange

TAG = "x-asm-prefer-tag"
MOCKB_BASE = "outbound|8000|base|mockb.default.svc.cluster.local"


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_json(port: int, path: str) -> dict:
    status, body = get(port, path)
    assert status == 200, body
    return json.loads(body)


def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> list[str]:
    """Poll the access log until it has `count` lines (a wait for the writer, not a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines


@pytest.fixture(scope="module")
def upstreams():
    with UpstreamThread() as base, UpstreamThread() as canary:
        yield base, canary


@pytest.fixture(scope="module")
def proxy(upstreams, tmp_path_factory):
    """Gateway and outbound listeners in one process; mockb has no canary endpoint (the seed's fallback)."""
    base, canary = upstreams
    workdir = tmp_path_factory.mktemp("admin")
    endpoints = endpoints_file(workdir / "endpoints.yaml", {
        "default/mocka": {"base": [base.port], "canary": [canary.port]},
        "default/mockb": {"base": [base.port]},
        "default/mockc": {"base": [base.port], "canary": [canary.port]},
    })
    access_log = workdir / "access.jsonl"
    process = ProxyProcess(SWIMLANES, endpoints, gateway=True, outbound=True,
                           extra=("--access-log", str(access_log), "--access-log-format", "json")).start()
    process.access_log = access_log
    yield process
    process.stop()


def send(port: int, host: str, path: str = "/", headers: dict[str, str] | None = None) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n".encode()
    return asyncio.run(exchange(port, raw))


# /route and /lanes ------------------------------------------------------------------------------


def route(proxy, **query) -> dict:
    headers = query.pop("headers", {})
    params = list(query.items()) + [("header", f"{k}:{v}") for k, v in headers.items()]
    return get_json(proxy.admin_port, "/route?" + urllib.parse.urlencode(params))


def test_route_explains_a_fallback_hop_of_the_outbound_listener(proxy):
    answer = route(proxy, host="mockb", listener="outbound", headers={TAG: "canary"})
    assert (answer["lane"], answer["lane_source"], answer["route"]["lane_used"], answer["route"]["fallback"]) == (
        "canary", "route-header", "base", True)
    assert answer["route"]["cluster"] == MOCKB_BASE
    assert answer["headers_set_upstream"] == {TAG: "canary"}
    assert "falls back to base" in answer["reason"]


def test_route_defaults_to_the_gateway_and_names_the_matching_rule(proxy):
    answer = route(proxy, host="shop.example.com", path="/mock", headers={TAG: "canary"})
    assert (answer["listener"], answer["lane"], answer["reason"]) == ("gateway", "canary", "rule:canary/canary")
    missing = route(proxy, host="shop.example.com", path="/elsewhere")
    assert missing["local_reply"]["status"] == 404 and missing["local_reply"]["response_flags"] == "NR"


@pytest.mark.parametrize("query", ["", "?host=mockb&header=no-colon", "?host=mockb&random=2",
                                   "?host=mockb&listener=inbound"])
def test_route_refuses_a_query_that_describes_no_request(proxy, query):
    assert get(proxy.admin_port, "/route" + query)[0] == 400


def test_config_dump_lanes_stats_and_server_info_agree_on_the_running_version(proxy):
    dump = get_json(proxy.admin_port, "/config_dump")
    types = [config["@type"].rsplit(".", 1)[1] for config in dump["configs"]]
    assert types == ["BootstrapConfigDump", "ClustersConfigDump", "ListenersConfigDump", "SwimLaneConfigDump"]
    swimlanes = dump["configs"][3]
    version = swimlanes["version_info"]
    assert version and dump["configs"][1]["version_info"] == version
    assert get_json(proxy.admin_port, "/lanes")["version"] == version
    assert get_json(proxy.admin_port, "/server_info")["config_version"] == version
    stats = dict(line.split(": ", 1) for line in proxy.admin("/stats").decode().splitlines())
    assert stats["laneproxy.config.version"] == f'"{version}"'
    assert swimlanes["services"]["default/mockb"]["lanes"]["canary"]["fallback"] is True
    clusters = {c["cluster"]["name"] for c in dump["configs"][1]["static_clusters"]}
    assert MOCKB_BASE in clusters and "outbound|8000|canary|mockc.default.svc.cluster.local" in clusters
    assert get(proxy.admin_port, "/config_dump?resource=nonsense")[0] == 404
    only = get_json(proxy.admin_port, "/config_dump?resource=swimlanes")
    assert [c["@type"] for c in only["configs"]] == [swimlanes["@type"]]


def test_clusters_lists_each_lane_as_a_cluster_and_filters_by_name(proxy):
    text = proxy.admin("/clusters?filter=canary").decode()
    names = {line.split("::", 1)[0] for line in text.splitlines()}
    assert names == {"outbound|8000|canary|mocka.default.svc.cluster.local",
                     "outbound|8000|canary|mockc.default.svc.cluster.local"}


# stats ------------------------------------------------------------------------------------------


def test_stats_query_picks_by_regex_type_and_use(proxy):
    counters = proxy.admin("/stats?filter=%5Ehttp%5C.gateway%5C.&type=Counters").decode().splitlines()
    assert counters and all(line.startswith("http.gateway.") for line in counters)
    assert not any("downstream_cx_active" in line for line in counters)  # a gauge
    histograms = proxy.admin("/stats?type=Histograms").decode().splitlines()
    assert histograms and all(line.split(": ", 1)[1].startswith(("P0(", "No recorded values")) for line in histograms)
    inverted = proxy.admin("/stats?filter=cluster&invert_filter").decode()
    assert "cluster." not in inverted.replace("cluster_manager", "")
    assert get(proxy.admin_port, "/stats?type=Everything")[0] == 400


def test_prometheus_exposes_the_lane_metrics_and_parses(proxy):
    assert send(proxy.outbound_port, "mockb", headers={TAG: "canary"}).startswith(b"HTTP/1.1 200")
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(proxy.admin("/stats/prometheus").decode())
               for s in family.samples}
    fallback = ("laneproxy_fallback_rq_total",
                frozenset({("service", "default/mockb"), ("from_lane", "canary"), ("to_lane", "base")}))
    assert samples[fallback] >= 1
    assert samples[("laneproxy_lane_rq_total", frozenset({("lane", "base")}))] >= 1
    assert samples[("envoy_cluster_upstream_rq_total", frozenset({("envoy_cluster_name", MOCKB_BASE)}))] >= 1
    versions = [dict(labels)["version"] for name, labels in samples if name == "laneproxy_config_info"]
    assert versions == [get_json(proxy.admin_port, "/lanes")["version"]]


# headers and the access log -------------------------------------------------------------------


def test_gateway_strips_client_x_envoy_headers_and_appends_the_client_to_x_forwarded_for(proxy, upstreams):
    _, canary = upstreams
    canary.reset()
    response = send(proxy.gateway_port, "shop.example.com", "/mock", {
        TAG: "canary", "x-envoy-upstream-rq-timeout-ms": "1", "x-envoy-debug": "1", "x-forwarded-for": "203.0.113.9",
        "x-forwarded-proto": "https"})
    assert response.startswith(b"HTTP/1.1 200")
    (received,) = canary.received
    names = {name.lower() for name, _ in received.headers()}
    assert {b"x-envoy-upstream-rq-timeout-ms", b"x-envoy-debug"}.isdisjoint(names)
    assert received.header(b"x-envoy-expected-rq-timeout-ms") == b"15000"  # the client's 1 ms was ignored
    assert received.header(b"x-forwarded-for") == b"203.0.113.9, 127.0.0.1"
    assert received.header(b"x-forwarded-proto") == b"http"
    assert uuid.UUID(received.header(b"x-request-id").decode()).version == 4
    assert b"\r\nx-envoy-upstream-service-time: " in response.split(b"\r\n\r\n")[0] + b"\r\n"


def test_a_sidecar_trusts_its_callers_x_envoy_timeout(proxy, upstreams):
    base, _ = upstreams
    base.reset()
    assert send(proxy.outbound_port, "mockb", headers={"x-envoy-upstream-rq-timeout-ms": "2500"}).startswith(
        b"HTTP/1.1 200")
    assert base.received[0].header(b"x-envoy-expected-rq-timeout-ms") == b"2500"


def test_json_access_log_names_the_lane_asked_and_the_lane_used(proxy):
    before = len(wait_for_lines(proxy.access_log, 0))
    assert send(proxy.outbound_port, "mockb", "/hop", {TAG: "canary", "x-request-id": "hop-1"}).startswith(
        b"HTTP/1.1 200")
    entries = [json.loads(line) for line in wait_for_lines(proxy.access_log, before + 1)[before:]]
    (entry,) = [e for e in entries if e["request_id"] == "hop-1"]
    assert {k: entry[k] for k in ("listener", "path", "response_code", "response_flags", "upstream_cluster",
                                  "lane_asked", "lane_used", "lane_source")} == {
        "listener": "outbound", "path": "/hop", "response_code": 200, "response_flags": "-",
        "upstream_cluster": MOCKB_BASE, "lane_asked": "canary", "lane_used": "base", "lane_source": "route-header"}


# drain switches ---------------------------------------------------------------------------------


@pytest.fixture
def lone_sidecar(upstreams, tmp_path):
    base, _ = upstreams
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [base.port]}})
    process = ProxyProcess(SWIMLANES, endpoints, outbound=True).start()
    yield process
    process.stop()


def keep_alive_head(port: int) -> bytes:
    raw = b"GET / HTTP/1.1\r\nHost: mockb\r\n\r\n"
    data = asyncio.run(exchange(port, raw, read_timeout=1.0))
    return data.split(b"\r\n\r\n", 1)[0].lower()


def test_drain_listeners_closes_connections_and_healthcheck_ok_lets_them_live_again(lone_sidecar):
    port, admin = lone_sidecar.outbound_port, lone_sidecar.admin_port
    assert b"connection: close" not in keep_alive_head(port)
    assert get(admin, "/healthcheck/fail", "POST") == (200, b"OK\n")
    assert b"connection: close" in keep_alive_head(port)
    assert get(admin, "/healthcheck/ok", "POST") == (200, b"OK\n")
    assert b"connection: close" not in keep_alive_head(port)
    assert get(admin, "/drain_listeners", "POST") == (200, b"OK\n")
    assert b"connection: close" in keep_alive_head(port)
    assert get(admin, "/ready") == (200, b"LIVE\n")  # draining listeners is not failing health checks


# the trace table's bounds -------------------------------------------------------------------------


def test_the_trace_tables_byte_budget_and_refused_long_ids_show_in_stats(upstreams, tmp_path):
    base, _ = upstreams
    entry = len(b"t-1") + len(b"canary") + 250  # what the byte budget charges an entry (core.propagation)
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [base.port]}})
    sidecar = ProxyProcess(SWIMLANES, endpoints, inbound_app=base.port,
                           extra=("--trace-table-bytes", str(2 * entry + entry // 2))).start()
    try:
        for trace in ("t-1", "t-2", "t-3", "x" * 257):
            head = (b"GET / HTTP/1.1\r\nHost: mocka\r\nx-asm-prefer-tag: canary\r\nmy-request-id: %s\r\n"
                    b"Connection: close\r\n\r\n" % trace.encode())
            assert asyncio.run(exchange(sidecar.inbound_port, head)).startswith(b"HTTP/1.1 200")
        text = {name: sidecar.stat(name) for name in ("laneproxy.trace_table.size", "laneproxy.trace_table.bytes",
                                                      "laneproxy.trace_table.evictions",
                                                      "laneproxy.trace_table.rejected_long_ids")}
        samples = {s.name: s.value for family in text_string_to_metric_families(sidecar.admin("/stats/prometheus").decode())
                   for s in family.samples if s.name.startswith("laneproxy_trace_table")}
    finally:
        sidecar.stop()
    # Two entries fit the budget: t-3 evicted t-1; the 257-byte id was refused, not stored.
    assert text == {"laneproxy.trace_table.size": 2, "laneproxy.trace_table.bytes": 2 * entry,
                    "laneproxy.trace_table.evictions": 1, "laneproxy.trace_table.rejected_long_ids": 1}
    assert (samples["laneproxy_trace_table_bytes"], samples["laneproxy_trace_table_rejected_long_ids_total"]) == (
        2 * entry, 1)


def test_server_info_names_the_build_of_the_hot_path_the_proxy_runs(proxy):
    """The proxy runs in this environment (LANEPROXY_PURE included), so it runs the build this process runs."""
    import laneproxy

    build = get_json(proxy.admin_port, "/server_info")["laneproxy_build"]
    assert build == {"compiled": laneproxy.BUILD.compiled, "detail": str(laneproxy.BUILD)}
