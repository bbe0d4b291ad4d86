"""laneproxy verdict's judgement from the numbers: pass, fail or inconclusive, and why."""

from __future__ import annotations

import pytest

from laneproxy.verdict import FAIL, INCONCLUSIVE, PASS, LaneNumbers, Thresholds, judge, render_text

BASE = LaneNumbers("base", 1000, 99.9, 40.0)


@pytest.mark.parametrize("lane, share, thresholds, result, failed", [
    (LaneNumbers("canary", 500, 99.8, 45.0), 30.0, Thresholds(), PASS, set()),
    (LaneNumbers("canary", 19, 100.0, 10.0), None, Thresholds(), INCONCLUSIVE, set()),
    (LaneNumbers("canary", 0, None, None), None, Thresholds(), INCONCLUSIVE, set()),
    (LaneNumbers("canary", 500, 90.0, 45.0), 30.0, Thresholds(), FAIL, {"success-rate", "success-rate-vs-baseline"}),
    # Above the absolute floor, but more than a point below the baseline.
    (LaneNumbers("canary", 500, 98.5, 45.0), None, Thresholds(min_success_rate=95), FAIL, {"success-rate-vs-baseline"}),
    (LaneNumbers("canary", 500, 99.9, 900.0), None, Thresholds(), FAIL, {"p99"}),
    (LaneNumbers("canary", 500, 99.9, 45.0), 60.0, Thresholds(max_fallback_share=50), FAIL, {"fallback-share"}),
    (LaneNumbers("canary", 500, 99.9, 45.0), 60.0, Thresholds(), PASS, set()),  # reported, not judged
])
def test_verdict_from_numbers(lane, share, thresholds, result, failed):
    verdict = judge("rollout", "5m", lane, BASE, share, thresholds)
    assert verdict.result == result
    assert {check.name for check in verdict.checks if not check.passed} == failed
    assert verdict.exit_code == {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}[result]
    assert render_text(verdict).startswith(f"{result.upper()}: lane canary of group rollout over 5m")


def test_too_little_traffic_is_never_a_pass_even_when_every_request_succeeded():
    verdict = judge("rollout", "5m", LaneNumbers("canary", 3, 100.0, 5.0), BASE, None, Thresholds(min_requests=20))
    assert verdict.result == INCONCLUSIVE and "3 request(s)" in verdict.reason and verdict.as_dict()["exit_code"] == 3
