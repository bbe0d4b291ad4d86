"""The preStop wait and the sidecar's drain fit in the pod's termination grace period."""

from __future__ import annotations

import pytest

from laneproxy.inject import SidecarSettings, StopBudget, inject_pod, stop_budget


@pytest.mark.parametrize(("grace", "expected"), [
    (30, StopBudget(stop_max=20, drain_seconds=5, drain_limit=9)),      # Kubernetes' default
    (None, StopBudget(stop_max=20, drain_seconds=5, drain_limit=9)),    # not set: the default
    ("30", StopBudget(stop_max=20, drain_seconds=5, drain_limit=9)),    # malformed: the default
    (-1, StopBudget(stop_max=20, drain_seconds=5, drain_limit=9)),      # negative: the default
    (60, StopBudget(stop_max=40, drain_seconds=5, drain_limit=19)),     # longer grace: both parts grow
    (10, StopBudget(stop_max=4, drain_seconds=5, drain_limit=5)),       # the minimum drain wins over a third
    (5, StopBudget(stop_max=0, drain_seconds=4, drain_limit=4)),        # shorter than the drain: no preStop wait
    (1, StopBudget(stop_max=0, drain_seconds=0, drain_limit=0)),        # nothing to share
    (0, StopBudget(stop_max=0, drain_seconds=0, drain_limit=0)),
])
def test_the_stop_budget_is_derived_from_the_grace_period(grace, expected):
    assert stop_budget(grace) == expected


@pytest.mark.parametrize("grace", [0, 1, 2, 5, 6, 7, 10, 15, 29, 30, 31, 45, 60, 120, 600])
def test_the_prestop_wait_and_the_drain_limit_end_a_second_before_the_kubelets_kill(grace):
    budget = stop_budget(grace)
    assert budget.stop_max + budget.drain_limit <= max(0, grace - 1)
    assert 0 <= budget.drain_seconds <= budget.drain_limit
    assert budget.drain_seconds == min(5, max(0, grace - 1))  # the minimum drain is kept whenever it fits


def sidecar_env(pod: dict) -> dict[str, str]:
    (sidecar,) = [c for c in inject_pod(pod, SidecarSettings())["spec"]["containers"] if c["name"] == "laneproxy"]
    return {e["name"]: e.get("value") for e in sidecar["env"]}


@pytest.mark.parametrize(("grace", "stop_max", "drain", "limit"), [
    (None, "20", "5", "9"),
    (30, "20", "5", "9"),
    (90, "60", "5", "29"),
    (8, "2", "5", "5"),
])
def test_an_injected_sidecar_gets_the_budget_of_its_pods_grace_period(grace, stop_max, drain, limit):
    pod = {"metadata": {"name": "mocka"},
           "spec": {"containers": [{"name": "app", "image": "mock", "ports": [{"containerPort": 8000}]}]}}
    if grace is not None:
        pod["spec"]["terminationGracePeriodSeconds"] = grace
    env = sidecar_env(pod)
    assert (env["LANEPROXY_STOP_MAX"], env["LANEPROXY_DRAIN_SECONDS"], env["LANEPROXY_DRAIN_LIMIT_SECONDS"]) == \
        (stop_max, drain, limit)
