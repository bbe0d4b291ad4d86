"""Canary analysis against a real Prometheus scraping the demo chain's gateway and sidecars.

The queries analysis tools send are run verbatim: Flagger's Istio provider (request-success-rate and
request-duration), the Argo Rollouts AnalysisTemplate of Argo's Istio guide, and Kiali's three graph
queries. Traffic is sent in two phases: a warm-up that creates every series, then the measured phase,
with the window placed after the warm-up so every series has samples at both ends of it.

What "the right numbers" means for a rate: Prometheus extrapolates a window's increase to its edges
by at most ~1.1 scrape intervals on each side, so `rate * window` lies between the exact count and
count * window / (window - 2.2 * interval) (Kiali's queries). Flagger's queries, on one workload's
sidecar, run over a range that starts and ends on two of its scrapes, where nothing is extrapolated:
their ratios and quantiles are exact. `laneproxy verdict` is then asked about a failing canary
(fail), and, on a second chain, a canary before any traffic (inconclusive) and a healthy one (pass).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from laneproxy.demo import DemoCluster, free_port
from laneproxy.observability.istio import ISTIO_LABELS, LANE_LABELS
from tests.component.conftest import started_demo
from tests.component.promrig import SCRAPE_INTERVAL, PrometheusServer, prometheus_binary

pytestmark = pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package")

NAMESPACE = "default"
MOCKA = "mocka.default.svc.cluster.local"

# Flagger's Istio provider (pkg/metrics/observers/istio.go), template variables filled in by render().
FLAGGER_SUCCESS_RATE = """
	sum(
		rate(
			istio_requests_total{
				reporter="destination",
				destination_workload_namespace="{{ namespace }}",
				destination_workload=~"{{ target }}",
				response_code!~"5.*"
			}[{{ interval }}]
		)
	) 
	/ 
	sum(
		rate(
			istio_requests_total{
				reporter="destination",
				destination_workload_namespace="{{ namespace }}",
				destination_workload=~"{{ target }}"
			}[{{ interval }}]
		)
	) 
	* 100"""
FLAGGER_DURATION = """
	histogram_quantile(
		0.99,
		sum(
			rate(
				istio_request_duration_milliseconds_bucket{
					reporter="destination",
					destination_workload_namespace="{{ namespace }}",
					destination_workload=~"{{ target }}"
				}[{{ interval }}]
			)
		) by (le)
	)"""
# Argo Rollouts' Istio AnalysisTemplate (success-rate), `{{args.service-name}}` filled in.
ARGO_SUCCESS_RATE = ('sum(irate(istio_requests_total{reporter="source",destination_service=~"{{args.service-name}}",'
                     'response_code!~"5.*"}[5m])) / sum(irate(istio_requests_total{reporter="source",'
                     'destination_service=~"{{args.service-name}}"}[5m]))')
# Kiali's namespace graph (graph/telemetry/istio/istio.go, buildNamespaceTrafficMap): three queries.
KIALI_GROUP_BY = ("source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,"
                  "destination_service_namespace,destination_service,destination_service_name,"
                  "destination_workload_namespace,destination_workload,destination_canonical_service,"
                  "destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags")
KIALI_UNKNOWN = ('sum(rate(istio_requests_total{reporter="destination",source_workload="unknown",'
                 'destination_workload_namespace="%s"} [%vs])) by (%s)')
KIALI_EXTERNAL = ('sum(rate(istio_requests_total{reporter="%s",%s,source_workload!="unknown",'
                  'destination_service_namespace="%s"} [%vs])) by (%s)')
KIALI_INTERNAL = 'sum(rate(istio_requests_total{reporter="source",source_workload_namespace="%s"} [%vs])) by (%s)'


def go_sprintf(template: str, *values: object) -> str:
    """Go's fmt.Sprintf for the verbs Kiali's templates use (%s and %v)."""
    return template.replace("%v", "%s") % values


def render(template: str, **values: str) -> str:
    for name, value in values.items():
        template = template.replace("{{ %s }}" % name, value).replace("{{%s}}" % name, value)
    return template


def send(cluster: DemoCluster, lane: str, count: int, tag: str) -> list[int]:
    statuses = []
    for index in range(count):
        request = urllib.request.Request(cluster.gateway_url + "/mock",
                                         headers={"x-asm-prefer-tag": lane, "my-request-id": f"{tag}-{lane}-{index}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                statuses.append(response.status)
        except urllib.error.HTTPError as error:
            statuses.append(error.code)
    return statuses


def send_direct(port: int, count: int) -> None:
    """Requests straight to a sidecar's inbound listener, from outside the mesh (no peer header)."""
    for _ in range(count):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=10) as response:
        return response.read().decode()


def total(text: str, family: str, **labels: str) -> float:
    """The sum of a family's samples whose labels match, from a proxy's own exposition."""
    value = 0.0
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name == family and all(sample.labels.get(k) == v for k, v in labels.items()):
                value += sample.value
    return value


def buckets(text: str, **labels: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name == "istio_request_duration_milliseconds_bucket" and \
                    all(sample.labels.get(k) == v for k, v in labels.items()):
                bound = float(sample.labels["le"])
                out[bound] = out.get(bound, 0.0) + sample.value
    return out


def histogram_quantile(q: float, counts: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts (linear within the bucket)."""
    bounds = sorted(counts)
    total_count = counts[math.inf]
    rank = q * total_count
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = counts[bound]
        if count >= rank:
            if bound == math.inf:
                return previous_bound
            if bound == bounds[0] and bound <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return math.nan


def assert_rate_matches(rate: float, window: float, count: float) -> None:
    """`rate * window` is the count, enlarged by Prometheus' edge extrapolation and never more."""
    observed = rate * window
    assert count * (1 - 1e-9) <= observed <= count * window / (window - 2.2 * SCRAPE_INTERVAL), (observed, count)


def verdict(prometheus: PrometheusServer, *args: str) -> tuple[int, dict]:
    process = subprocess.run([sys.executable, "-m", "laneproxy", "verdict", "--prometheus", prometheus.url,
                              "--group", "rollout", "--lane", "canary", "--output", "json", *args],
                             capture_output=True, text=True, timeout=60)
    assert process.stdout, process.stderr
    return process.returncode, json.loads(process.stdout)


def targets(cluster: DemoCluster) -> dict[str, list[str]]:
    return {"gateway": [f"127.0.0.1:{cluster.gateway_metrics_port}"],
            "sidecars": [f"127.0.0.1:{pod.metrics_port}" for pod in cluster.pods]}


def pod(cluster: DemoCluster, app: str, version: str):
    return next(p for p in cluster.pods if p.app == app and p.version == version)


@pytest.fixture(scope="module")
def failing_canary():
    """The demo chain whose canary mocka v2 answers 500 to every 10th request, scraped by Prometheus."""
    with started_demo(metrics=True, app_env={("mocka", "v2"): {"fail_share": "0.1"}}) as cluster, \
            PrometheusServer(targets(cluster)) as prometheus:
        yield cluster, prometheus


@pytest.fixture(scope="module")
def measured(failing_canary):
    """Warm-up, then the measured phase: its exact counts, the window that covers it, and snapshots around it."""
    cluster, prometheus = failing_canary
    mockb = pod(cluster, "mockb", "v1")
    mocka_v2 = pod(cluster, "mocka", "v2")
    send(cluster, "base", 10, "warm")
    assert send(cluster, "canary", 10, "warm").count(500) == 1  # the 10th request of mocka v2 fails
    send_direct(mockb.inbound_port, 2)
    warm = sum(total(scrape(p.metrics_port), "istio_requests_total", reporter="destination") for p in cluster.pods)
    prometheus.wait_for('sum(istio_requests_total{reporter="destination"})', warm)
    # The window starts after every target's warm-up samples (so nothing of the warm-up is in it) and at
    # least two scrapes before the measured phase (so every series has samples in it before that phase).
    time.sleep(3 * SCRAPE_INTERVAL)
    start = time.time()
    prometheus.wait_scraped()
    before = scrape(mocka_v2.metrics_port)
    phase = time.time()
    base, canary = send(cluster, "base", 30, "m"), send(cluster, "canary", 30, "m")
    send_direct(mockb.inbound_port, 5)
    after = scrape(mocka_v2.metrics_port)
    done = sum(total(scrape(p.metrics_port), "istio_requests_total", reporter="destination") for p in cluster.pods)
    prometheus.wait_for('sum(istio_requests_total{reporter="destination"})', done)
    prometheus.wait_scraped()
    # A window of 10 s or more keeps the extrapolation bound (2.2 scrape intervals in the window) tight.
    time.sleep(max(0.0, start + 10.5 - time.time()))
    end = time.time()
    window = math.ceil(end - start)  # starts at most a second before `start`: still after the warm-up
    assert base == [200] * 30
    assert canary.count(500) == 3 and canary.count(200) == 27  # requests 20, 30 and 40 of mocka v2
    return {"end": end, "window": window, "before": before, "after": after, "phase": phase}


def test_istio_metrics_carry_istios_label_set_and_parse_with_prometheus_client(failing_canary, measured):
    cluster, _ = failing_canary
    for port in [cluster.gateway_metrics_port] + [p.metrics_port for p in cluster.pods]:
        families = {family.name: family for family in text_string_to_metric_families(scrape(port))}
        requests = families["istio_requests"]  # prometheus_client names a counter family without _total
        assert requests.type == "counter" and requests.samples
        for sample in requests.samples:
            assert tuple(sample.labels) == ISTIO_LABELS + LANE_LABELS
        for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
            assert families[name].type == "histogram"


def aligned_window(prometheus: PrometheusServer, workload: str, measured: dict) -> tuple[float, str]:
    """(evaluation time, range) that start and end exactly on two of the workload's sidecar's scrapes, one
    before the measured phase and its last one: Prometheus then extrapolates nothing, and a rate over the
    range is the phase's exact count divided by the range (its extrapolation differs per series otherwise,
    by how close each one's start value is to zero)."""
    series = prometheus.query(f'istio_requests_total{{reporter="destination",destination_workload="{workload}"}}'
                              f"[{measured['window'] + 5}s]", at=measured["end"])
    stamps = sorted({float(t) for s in series for t, _ in s["values"]})
    first = max(t for t in stamps if t < measured["phase"] - 0.2)  # read before any request of the phase
    last = stamps[-1]
    return last, f"{round((last - first) * 1000)}ms"


def test_flagger_request_success_rate_is_exact_for_base_and_canary(failing_canary, measured):
    _, prometheus = failing_canary
    for target, expected in (("mocka-v2", 27 / 30 * 100), ("mocka-v1", 100.0)):
        at, interval = aligned_window(prometheus, target, measured)
        query = render(FLAGGER_SUCCESS_RATE, namespace=NAMESPACE, target=target, interval=interval)
        assert prometheus.value(query, at=at) == pytest.approx(expected, abs=1e-9)


def test_flagger_request_duration_is_the_p99_of_the_canarys_own_histogram(failing_canary, measured):
    _, prometheus = failing_canary
    delta = {bound: count - buckets(measured["before"], reporter="destination").get(bound, 0.0)
             for bound, count in buckets(measured["after"], reporter="destination").items()}
    assert delta[math.inf] == 30
    at, interval = aligned_window(prometheus, "mocka-v2", measured)
    query = render(FLAGGER_DURATION, namespace=NAMESPACE, target="mocka-v2", interval=interval)
    assert prometheus.value(query, at=at) == pytest.approx(histogram_quantile(0.99, delta), rel=1e-9)


def test_argo_success_rate_is_what_the_gateways_last_two_samples_say(failing_canary, measured):
    _, prometheus = failing_canary
    selector = f'reporter="source",destination_service="{MOCKA}"'
    series = prometheus.query(f"istio_requests_total{{{selector}}}[{measured['window']}s]", at=measured["end"])
    # The gateway's scrapes: the first one that shows the whole measured phase, and the one before it.
    stamps = sorted({float(t) for s in series for t, _ in s["values"]})
    final = {s["metric"]["response_code"] + s["metric"]["lane_used"]: float(s["values"][-1][1]) for s in series}
    at = next(t for t in stamps if sum(float(v) for s in series for ts, v in s["values"] if float(ts) == t)
              == sum(final.values()))
    previous = stamps[stamps.index(at) - 1]

    def delta(good_only: bool, lane: str | None = None) -> float:
        change = 0.0
        for s in series:
            labels = s["metric"]
            if (good_only and labels["response_code"].startswith("5")) or (lane and labels["lane_used"] != lane):
                continue
            values = {float(t): float(v) for t, v in s["values"]}
            change += values[at] - values[previous]
        return change

    query = render(ARGO_SUCCESS_RATE, **{"args.service-name": MOCKA})
    assert prometheus.value(query, at=at) == pytest.approx(delta(True) / delta(False), rel=1e-9)
    canary = query.replace('response_code!~"5.*"', 'response_code!~"5.*",lane_used="canary"').replace(
        f'destination_service=~"{MOCKA}"}}', f'destination_service=~"{MOCKA}",lane_used="canary"}}')
    assert prometheus.value(canary, at=at) == pytest.approx(delta(True, "canary") / delta(False, "canary"), rel=1e-9)


def kiali_edges(prometheus: PrometheusServer, query: str, at: float) -> dict[tuple[str, str, str], float]:
    edges: dict[tuple[str, str, str], float] = {}
    for series in prometheus.query(query, at=at):
        labels = series["metric"]
        for label in KIALI_GROUP_BY.split(","):
            if label != "grpc_response_status":  # Kiali accepts its absence (HTTP); every other one it requires
                assert label in labels, (label, labels)
        key = (labels["source_workload"], labels["destination_workload"], labels["response_code"])
        edges[key] = edges.get(key, 0.0) + float(series["value"][1])
    return edges


def test_kialis_three_graph_queries_draw_the_chain_with_its_counts(failing_canary, measured):
    _, prometheus = failing_canary
    window, at = measured["window"], measured["end"]
    unknown = kiali_edges(prometheus, go_sprintf(KIALI_UNKNOWN, NAMESPACE, window, KIALI_GROUP_BY), at)
    external = kiali_edges(prometheus, go_sprintf(KIALI_EXTERNAL, "source", f'source_workload_namespace!="{NAMESPACE}"',
                                                           NAMESPACE, window, KIALI_GROUP_BY), at)
    internal = kiali_edges(prometheus, go_sprintf(KIALI_INTERNAL, NAMESPACE, window, KIALI_GROUP_BY), at)
    expected_unknown = {("unknown", "mockb-v1", "200"): 5}
    expected_external = {("laneproxy-gateway", "mocka-v1", "200"): 30, ("laneproxy-gateway", "mocka-v2", "200"): 27,
                         ("laneproxy-gateway", "mocka-v2", "500"): 3}
    expected_internal = {("mocka-v1", "mockb-v1", "200"): 30, ("mocka-v2", "mockb-v1", "200"): 27,
                         ("mockb-v1", "mockc-v1", "200"): 35, ("mockb-v1", "mockc-v2", "200"): 27}
    for edges, expected in ((unknown, expected_unknown), (external, expected_external), (internal, expected_internal)):
        assert set(edges) == set(expected)
        for edge, count in expected.items():
            assert_rate_matches(edges[edge], window, count)


def test_verdict_fails_a_canary_answering_ten_percent_5xx(failing_canary, measured):
    _, prometheus = failing_canary
    code, answer = verdict(prometheus, "--max-p99-ms", "5000")
    assert (code, answer["result"], answer["exit_code"]) == (1, "fail", 1)
    assert answer["baseline"]["lane"] == "base"  # the group's fallback target, from laneproxy_lane_info
    assert answer["baseline"]["success_rate"] == pytest.approx(100.0)
    # The canary lane's pods: mocka v2 answered 36 of its 40 requests; mockc v2 all 36 that reached it.
    assert answer["lane"]["requests"] == 76
    assert answer["lane"]["success_rate"] == pytest.approx(72 / 76 * 100)
    failed = {check["name"] for check in answer["checks"] if not check["passed"]}
    assert failed == {"success-rate", "success-rate-vs-baseline"}
    # Hops that asked for canary: 40 to mocka, 36 to mockb (served by base: the fallback), 36 to mockc.
    assert answer["fallback_share"] == pytest.approx(36 / 112 * 100)


def test_verdict_is_inconclusive_without_traffic_and_passes_a_healthy_canary():
    with started_demo(metrics=True) as cluster, PrometheusServer(targets(cluster)) as prometheus:
        prometheus.wait_for("count(laneproxy_lane_info)", 2 * (1 + len(cluster.pods)))
        code, answer = verdict(prometheus)
        assert (code, answer["result"]) == (3, "inconclusive")
        assert answer["lane"]["requests"] == 0
        assert send(cluster, "canary", 20, "healthy") == [200] * 20
        assert send(cluster, "base", 20, "healthy") == [200] * 20
        prometheus.wait_for('sum(istio_requests_total{reporter="destination",lane_used="canary"})', 40)
        prometheus.wait_scraped()
        code, answer = verdict(prometheus, "--max-p99-ms", "5000")
        assert (code, answer["result"]) == (0, "pass"), answer
        assert answer["lane"]["requests"] == 40  # 20 each at mocka v2 and mockc v2
        assert answer["lane"]["success_rate"] == pytest.approx(100.0)
        text = subprocess.run([sys.executable, "-m", "laneproxy", "verdict", "--prometheus", prometheus.url,
                               "--group", "rollout", "--lane", "canary", "--max-p99-ms", "5000"],
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 0 and text.stdout.startswith("PASS: lane canary of group rollout")
        # The same verdict over HTTP, as an Argo Rollouts `web` metric asks for it.
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "laneproxy", "verdict", "--prometheus", prometheus.url,
                                   "--serve", f"127.0.0.1:{port}", "--max-p99-ms", "5000"])
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/verdict?group=rollout&lane=canary",
                                                timeout=30) as response:
                        served = json.loads(response.read())
                    break
                except urllib.error.URLError:
                    assert time.monotonic() < deadline and server.poll() is None
                    time.sleep(0.1)
            assert (served["result"], served["lane"]["requests"]) == ("pass", 40)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/verdict?group=rollout", timeout=30)
            assert refused.value.code == 400
        finally:
            server.terminate()
            server.wait(timeout=15)
