"""The locust load test against the demo chain: a short run stays in its lanes, and the check can fail.

The first tests are the oracle on its own (pure, fast); the last two run real locust against real
processes on 127.0.0.1, bounded to 20 users and about 10 seconds so the suite stays cheap on 2 cores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

# loadtests/ is a directory of the repository, not an installed package; `python -m pytest` puts the
# repository root on sys.path, a bare `pytest` does not.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from laneproxy.demo import DemoCluster  # noqa: E402
from loadtests import run as loadtest  # noqa: E402
from loadtests.expectations import (  # noqa: E402
    Expectations, MembershipHistory, expected_chain, expected_chains, judge,
)

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")

EXPECTATIONS = Expectations.from_document({
    "chain": ["default/mocka", "default/mockb", "default/mockc"],
    "versions": {"default/mocka": {"base": "v1", "canary": "v2"}, "default/mockb": {"base": "v1", "canary": "v2"},
                 "default/mockc": {"base": "v1", "canary": "v2"}},
})
GROUPS = {"rollout": {"lanes": ["base", "canary"], "fallback_target": "base", "route_header": "x-asm-prefer-tag",
                      "trace_header": "my-request-id"}}


def lanes_document(canary: dict[str, list[str]]) -> dict:
    """A /lanes document for the demo's services; `canary` maps app -> its canary endpoints (none: fallback)."""
    base = {"mocka": "127.0.0.1:1001", "mockb": "127.0.0.1:1002", "mockc": "127.0.0.1:1003"}
    services = {}
    for app, address in base.items():
        own = canary.get(app)
        services[f"default/{app}"] = {"group": "rollout", "lanes": {
            "base": {"lane_used": "base", "fallback": False, "endpoints": [address]},
            "canary": ({"lane_used": "canary", "fallback": False, "endpoints": own} if own
                       else {"lane_used": "base", "fallback": True, "endpoints": [address]}),
        }, "default": {"lane_used": "base", "endpoints": [address]}}
    return {"version": "x", "groups": GROUPS, "services": services}


DEMO = lanes_document({"mocka": ["127.0.0.1:2001"], "mockc": ["127.0.0.1:2003"]})
WITH_MOCKB_CANARY = lanes_document({"mocka": ["127.0.0.1:2001"], "mockb": ["127.0.0.1:2002"],
                                    "mockc": ["127.0.0.1:2003"]})


def body(*versions: str) -> str:
    return "-> ".join(f"{app}(version: {v}, ip: 127.0.0.1)" for app, v in zip(("mocka", "mockb", "mockc"), versions))


@pytest.mark.parametrize(
    ("lanes", "tag", "expected"),
    [
        (DEMO, "base", ("v1", "v1", "v1")),
        (DEMO, "canary", ("v2", "v1", "v2")),
        (DEMO, None, ("v1", "v1", "v1")),
        (DEMO, "nightly", ("v1", "v1", "v1")),
        (WITH_MOCKB_CANARY, "canary", ("v2", "v2", "v2")),
        # A canary endpoint pointed at the base pod's address is still the canary lane: the oracle expects
        # what canary pods run, not what the (wrong) address runs, so the leak shows.
        (lanes_document({"mocka": ["127.0.0.1:2001"], "mockc": ["127.0.0.1:1003"]}), "canary", ("v2", "v1", "v2")),
    ],
    ids=["base", "canary-falls-back-for-mockb", "untagged-goes-to-fallback-target", "unknown-tag-goes-to-fallback",
         "canary-with-its-own-mockb", "canary-pointed-at-base-address-still-expects-canary-versions"],
)
def test_expected_chain_is_the_version_of_the_lane_each_hop_resolves_to(lanes, tag, expected):
    assert expected_chain(lanes, EXPECTATIONS, tag) == expected


@pytest.mark.parametrize(
    ("status", "text", "outcome", "failure"),
    [
        (200, body("v2", "v1", "v2"), "ok", None),
        (200, body("v2", "v1", "v1"), "leak",
         "lane leak: expected mocka v2 -> mockb v1 -> mockc v2, got mocka v2 -> mockb v1 -> mockc v1"),
        (200, body("v1", "v1", "v1"), "leak",
         "lane leak: expected mocka v2 -> mockb v1 -> mockc v2, got mocka v1 -> mockb v1 -> mockc v1"),
        (503, "no healthy upstream", "error", "bad response: HTTP 503 no healthy upstream"),
        (200, "mocka(version: v2, ip: 127.0.0.1)-> upstream error: ClientOSError", "error",
         "bad response: unreadable hop 'upstream error: ClientOSError'"),
        (200, "mocka(version: v2, ip: 127.0.0.1)-> mockc(version: v2, ip: 127.0.0.1)", "error",
         "bad response: chain mocka -> mockc is not mocka -> mockb -> mockc"),
    ],
    ids=["exact", "one-hop-leaks", "whole-chain-leaks", "local-reply", "upstream-error", "wrong-services"],
)
def test_judge_tells_a_lane_leak_from_an_error(status, text, outcome, failure):
    accepted = tuple(frozenset({v}) for v in ("v2", "v1", "v2"))
    verdict = judge(EXPECTATIONS, status, text, accepted)
    assert verdict.outcome == outcome
    assert (repr(verdict.failure) if verdict.failure else None) == failure


def test_a_response_during_a_membership_change_may_take_either_state_per_hop_and_only_then():
    history = MembershipHistory()
    old, new = expected_chains(DEMO, EXPECTATIONS), expected_chains(WITH_MOCKB_CANARY, EXPECTATIONS)
    history.record(0.0, 0.1, [old, old])
    history.record(1.0, 1.1, [old, new])  # the gateway has reloaded, a sidecar has not
    history.record(2.0, 2.1, [new, new])
    history.record(3.0, 3.1, [new, new])

    before = history.accepted("canary", 0.2, 0.5)
    assert before.hops == (frozenset({"v2"}), frozenset({"v1", "v2"}), frozenset({"v2"}))  # next poll is mixed
    exact_after = history.accepted("canary", 2.2, 2.5)
    assert (exact_after.hops, exact_after.states, exact_after.complete) == (
        (frozenset({"v2"}), frozenset({"v2"}), frozenset({"v2"})), 1, True)
    assert judge(EXPECTATIONS, 200, body("v2", "v1", "v2"), exact_after.hops).outcome == "leak"
    assert history.accepted("base", 1.2, 1.5).states == 1  # lanes the change did not touch stay exact
    assert history.accepted("canary", 3.2, 3.5).complete is False  # no poll after it yet: a leak would wait


@needs_locust
def test_ten_second_run_with_a_canary_endpoint_added_and_removed_has_no_leak_and_no_error(tmp_path):
    run = loadtest.run_demo(loadtest.LoadSettings(run_time=10, users=20, max_wait=0.2, scenario="membership",
                                                  out_dir=tmp_path, quiet=True))

    summary = run.summary
    assert run.problems == [], (run.problems, (tmp_path / "locust.log").read_text()[-3000:])
    assert run.returncode == 0
    for lane in ("base", "canary", "untagged"):
        figures = summary["lanes"][lane]
        assert figures["requests"] > 50, lane
        assert (figures["leaks"], figures["errors"], figures["failures"]) == (0, 0, 0), lane
    assert set(summary["chains"]["canary"]) == {"mocka v2 -> mockb v1 -> mockc v2", "mocka v2 -> mockb v2 -> mockc v2"}
    assert [step["action"].split()[0] for step in summary["script"]] == ["add", "remove"]
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "summary.json", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name


@needs_locust
def test_canary_endpoint_pointed_at_a_base_pod_is_reported_as_a_lane_leak(tmp_path):
    with DemoCluster(log_level="warning") as cluster:
        by_key = {(pod.app, pod.lane): pod for pod in cluster.pods}
        base_mockc, canary_mockc = by_key["mockc", "base"], by_key["mockc", "canary"]
        # The base mockc pod's own port, not its sidecar's: an address listed in two lanes is one endpoint
        # whose first labels (base) win, which would make canary fall back to base, correctly and visibly
        # in /lanes. A distinct address in the canary list is the mislabelled pod this test is about.
        wrong_address = f"127.0.0.1:{base_mockc.app_port}"
        cluster.write_endpoints([dataclasses.replace(pod, inbound_port=base_mockc.app_port)
                                 if pod is canary_mockc else pod for pod in cluster.pods])
        sources = loadtest.admin_urls(cluster)
        loadtest.wait_for_lanes(sources, lambda lanes: lanes["services"]["default/mockc"]["lanes"]["canary"]
                                == {**lanes["services"]["default/mockc"]["lanes"]["canary"],
                                    "lane_used": "canary", "endpoints": [wrong_address]})

        run = loadtest.run_locust(host=cluster.gateway_url, sources=sources,
                                  expectations=loadtest.expectations_for(cluster.pods), out_dir=tmp_path,
                                  users=10, run_time=4, max_wait=0.2, quiet=True)

    lanes = run.summary["lanes"]
    assert run.returncode != 0 and not run.passed
    assert lanes["canary"]["requests"] > 0
    assert lanes["canary"]["leaks"] == lanes["canary"]["failures"] == lanes["canary"]["requests"]
    assert (lanes["base"]["failures"], lanes["untagged"]["failures"]) == (0, 0)
    assert {failure["failure"] for failure in run.summary["failures"]} == {
        "lane leak: expected mocka v2 -> mockb v1 -> mockc v2, got mocka v2 -> mockb v1 -> mockc v1"}
    assert "lane leak" in (tmp_path / "locust_failures.csv").read_text()
