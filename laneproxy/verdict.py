"""`laneproxy verdict`: is a lane healthy enough to promote? Pass, fail or inconclusive, from Prometheus.

Owns the analysis a gray release's gate needs and no anchor offers per lane: the lane's numbers from
Istio's standard metrics as laneproxy labels them (`lane_used`, `lane_asked`), against its baseline
(the group's fallback target, which every proxy reports as `laneproxy_lane_info`), over one window:

- requests seen: what the lane's pods answered (`reporter="destination"`, `lane_used=<lane>`);
- success rate: the share of those that were not 5xx (Flagger's definition);
- p99 latency, from `istio_request_duration_milliseconds` at the destination;
- fallback share: of the hops that asked for the lane (`reporter="source"`), the share another lane served.

Counts over the window are the difference between now and the window's start, per series, plus the
whole value of series born inside the window: Prometheus' increase() cannot see a counter's first
increments (a series appears already counted), and a canary's series are young by nature. A proxy
restart inside the window (a counter reset) counts that series from its restart only. Every query of
one verdict is evaluated at the same instant, so their numbers agree with each other.

`--serve [HOST:]PORT` answers the same verdict over HTTP (`GET /verdict?group=G&lane=L`), as JSON,
for an Argo Rollouts `web` metric.

Too little traffic is its own answer, inconclusive, never a pass. Exit codes: 0 pass, 1 fail,
3 inconclusive; 2 is a usage error or a Prometheus that cannot be asked (cli.py). Thresholds are
parameters; nothing here reads the environment. Queries go through Prometheus' HTTP API with the
standard library: the command runs in CI jobs and rollout hooks where nothing else is installed.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

from laneproxy.core.errors import LaneProxyError

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
_WINDOW = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")  # a PromQL duration: the only window a query may carry
EXIT_CODES = {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}


class PrometheusQueryError(LaneProxyError):
    """Prometheus could not be asked, refused a query, or knows nothing of the lane."""


@dataclass(frozen=True, slots=True)
class VerdictRequest:
    prometheus: str
    group: str
    lane: str
    baseline: str | None = None
    namespace: str | None = None
    window: str = "5m"
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_requests: int = 20
    min_success_rate: float = 99.0  # percent
    max_success_drop: float = 1.0  # percentage points below the baseline
    max_p99_ms: float = 500.0
    max_fallback_share: float | None = None  # percent; None: reported, not judged


@dataclass(frozen=True, slots=True)
class LaneNumbers:
    lane: str
    requests: float
    success_rate: float | None  # percent; None without requests
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Verdict:
    result: str
    group: str
    window: str
    lane: LaneNumbers
    baseline: LaneNumbers | None
    fallback_share: float | None  # percent of the hops that asked for the lane
    checks: tuple[Check, ...] = field(default=())
    reason: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]

    def as_dict(self) -> dict:
        document = asdict(self)
        document["exit_code"] = self.exit_code
        return document


def _label(value: str) -> str:
    """A PromQL string literal's content."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


class PrometheusClient:
    """Instant queries against Prometheus' HTTP API (never through a proxy from the environment)."""

    def __init__(self, base_url: str, timeout: float, at: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # One evaluation time for every query of a verdict, so two queries over the same series agree.
        self.at = time.time() if at is None else at
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def query(self, promql: str) -> list[dict]:
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": f"{self.at:.3f}"})
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                document = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, OSError):
                detail = exc.reason
            raise PrometheusQueryError(f"{self.base_url} refused the query ({exc.code}): {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PrometheusQueryError(f"cannot query Prometheus at {self.base_url}: {exc}") from exc
        if document.get("status") != "success":
            raise PrometheusQueryError(f"Prometheus answered {document.get('status')}: {document.get('error')}")
        return document["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element vector; None when the vector is empty or the value is NaN."""
        result = self.query(promql)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value


def window_increase(series: str, window: str, by: str = "") -> str:
    """PromQL for how much `series` grew over `window`, summed (by `by`), counting series born inside it."""
    grouping = f" by ({by})" if by else ""
    existing = f"sum{grouping} (clamp_min({series} - ({series} offset {window}), 0))"
    born = f"sum{grouping} ({series} unless ({series} offset {window}))"
    return f"(({existing} + {born}) or {existing} or {born})"


def baseline_of(client: PrometheusClient, group: str, lane: str) -> str:
    """The group's fallback target for the lane, as the proxies report it."""
    result = client.query(f'max by (fallback_target) (laneproxy_lane_info{{group="{_label(group)}",'
                          f'lane="{_label(lane)}"}})')
    if not result:
        raise PrometheusQueryError(f"no proxy reports lane {lane!r} of group {group!r} (laneproxy_lane_info): "
                                   "is the lane in the configuration and are the proxies scraped?")
    target = result[0]["metric"].get("fallback_target", "")
    if not target:
        raise PrometheusQueryError(f"group {group!r} has no fallback target: give --baseline")
    return target


def lane_numbers(client: PrometheusClient, lane: str, namespace: str | None, window: str) -> LaneNumbers:
    selector = f'reporter="destination",lane_used="{_label(lane)}"'
    if namespace:
        selector += f',destination_workload_namespace="{_label(namespace)}"'
    requests = client.scalar(window_increase(f"istio_requests_total{{{selector}}}", window)) or 0.0
    good = client.scalar(window_increase(f'istio_requests_total{{{selector},response_code!~"5.*"}}', window)) or 0.0
    p99 = client.scalar("histogram_quantile(0.99, " + window_increase(
        f"istio_request_duration_milliseconds_bucket{{{selector}}}", window, by="le") + ")")
    success = 100.0 * good / requests if requests > 0 else None
    return LaneNumbers(lane, requests, success, p99 if requests > 0 else None)


def fallback_share(client: PrometheusClient, lane: str, window: str) -> float | None:
    asked = f'reporter="source",lane_asked="{_label(lane)}"'
    total = client.scalar(window_increase(f"istio_requests_total{{{asked}}}", window)) or 0.0
    if total <= 0:
        return None
    elsewhere = client.scalar(window_increase(
        f'istio_requests_total{{{asked},lane_used!="{_label(lane)}"}}', window)) or 0.0
    return 100.0 * elsewhere / total


def judge(group: str, window: str, lane: LaneNumbers, baseline: LaneNumbers | None, share: float | None,
          thresholds: Thresholds) -> Verdict:
    """The verdict from the numbers (pure: tested without Prometheus)."""
    if lane.requests < thresholds.min_requests:
        return Verdict(INCONCLUSIVE, group, window, lane, baseline, share,
                       reason=f"{lane.requests:.0f} request(s) in {window}, fewer than the {thresholds.min_requests} "
                              f"needed to judge")
    checks = []
    assert lane.success_rate is not None
    checks.append(Check("success-rate", lane.success_rate >= thresholds.min_success_rate,
                        f"{lane.success_rate:.2f}% (min {thresholds.min_success_rate:g}%)"))
    if baseline is not None and baseline.success_rate is not None:
        floor = baseline.success_rate - thresholds.max_success_drop
        checks.append(Check("success-rate-vs-baseline", lane.success_rate >= floor,
                            f"{lane.success_rate:.2f}% vs {baseline.lane} {baseline.success_rate:.2f}% "
                            f"(at most {thresholds.max_success_drop:g} points below)"))
    if lane.p99_ms is not None:
        checks.append(Check("p99", lane.p99_ms <= thresholds.max_p99_ms,
                            f"{lane.p99_ms:.1f} ms (max {thresholds.max_p99_ms:g} ms)"))
    if thresholds.max_fallback_share is not None and share is not None:
        checks.append(Check("fallback-share", share <= thresholds.max_fallback_share,
                            f"{share:.1f}% (max {thresholds.max_fallback_share:g}%)"))
    failed = [check.name for check in checks if not check.passed]
    result = FAIL if failed else PASS
    reason = f"failed: {', '.join(failed)}" if failed else "every check passed"
    return Verdict(result, group, window, lane, baseline, share, tuple(checks), reason)


def decide(request: VerdictRequest, thresholds: Thresholds) -> Verdict:
    client = PrometheusClient(request.prometheus, request.timeout)
    baseline_lane = request.baseline or baseline_of(client, request.group, request.lane)
    lane = lane_numbers(client, request.lane, request.namespace, request.window)
    baseline = lane_numbers(client, baseline_lane, request.namespace, request.window) \
        if baseline_lane != request.lane else None
    share = fallback_share(client, request.lane, request.window)
    return judge(request.group, request.window, lane, baseline, share, thresholds)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render_text(verdict: Verdict) -> str:
    lines = [f"{verdict.result.upper()}: lane {verdict.lane.lane} of group {verdict.group} over {verdict.window}: "
             f"{verdict.reason}"]
    rows = [verdict.lane] + ([verdict.baseline] if verdict.baseline is not None else [])
    lines.append(f"  {'lane':<12} {'requests':>9} {'success':>9} {'p99':>10}")
    for row in rows:
        lines.append(f"  {row.lane:<12} {row.requests:>9.0f} {_percent(row.success_rate):>9} {_ms(row.p99_ms):>10}")
    lines.append(f"  fallback share of hops asking {verdict.lane.lane}: {_percent(verdict.fallback_share)}")
    for check in verdict.checks:
        lines.append(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    return "\n".join(lines)


# The verdict over HTTP, for an Argo Rollouts `web` metric ----------------------------------------------------


def build_verdict_app(defaults: VerdictRequest, thresholds: Thresholds):
    """GET /verdict?group=G&lane=L[&baseline=B&namespace=N&window=W]: the verdict as JSON.

    Always 200 with the verdict when Prometheus answered (the caller reads `result`: an Argo `web`
    metric's `successCondition: result == "pass"`), 400 for a request without group or lane, 502 when
    Prometheus could not be asked. Queries run in a thread: the standard library's HTTP client blocks.
    """
    import asyncio
    from dataclasses import replace

    from aiohttp import web

    async def verdict(request: web.Request) -> web.Response:
        query = request.query
        asked = replace(defaults, group=query.get("group", defaults.group), lane=query.get("lane", defaults.lane),
                        baseline=query.get("baseline", defaults.baseline),
                        namespace=query.get("namespace", defaults.namespace),
                        window=query.get("window", defaults.window))
        if not asked.group or not asked.lane:
            return web.json_response({"error": "group and lane are required"}, status=400)
        if not _WINDOW.fullmatch(asked.window):
            return web.json_response({"error": f"window must be a PromQL duration, got {asked.window!r}"}, status=400)
        try:
            answer = await asyncio.to_thread(decide, asked, thresholds)
        except PrometheusQueryError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response(answer.as_dict())

    app = web.Application()
    app.router.add_get("/verdict", verdict)
    return app


