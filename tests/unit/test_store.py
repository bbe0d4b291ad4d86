"""store.py: whole tables are published, a rejected update keeps the last good one, both are counted."""

from __future__ import annotations

import pytest

from laneproxy.core.errors import ConfigInvalidError, ConfigProblem
from laneproxy.core.model import EMPTY_TABLE, RouteTable
from laneproxy.core.store import RouteTableStore


def table(version: str) -> RouteTable:
    return RouteTable(version=version, services={}, groups={}, routes={}, hosts={}, ingress_rules=())


def rejection(reason: str) -> ConfigInvalidError:
    return ConfigInvalidError([ConfigProblem("lanes.yaml", "ASMSwimLaneGroup(rollout).spec", reason)])


@pytest.mark.parametrize(
    ("steps", "current", "accepted", "rejected", "ready", "last_error", "notified"),
    [
        pytest.param([], "", 0, 0, False, None, [], id="a_new_store_holds_the_empty_table_and_is_not_ready"),
        pytest.param(["+v1"], "v1", 1, 0, True, None, ["v1"], id="a_publish_replaces_the_table_and_makes_ready"),
        pytest.param(["-bad"], "", 0, 1, False, "bad", [], id="a_rejection_before_any_table_keeps_the_store_unready"),
        pytest.param(["+v1", "-bad"], "v1", 1, 1, True, "bad", ["v1"], id="a_rejected_update_keeps_the_current_table"),
        pytest.param(["+v1", "-bad", "-worse", "+v2"], "v2", 2, 2, True, None, ["v1", "v2"],
                     id="rejections_are_counted_and_a_later_good_table_clears_the_last_error"),
        pytest.param(["+v1", "+v2", "+v3"], "v3", 3, 0, True, None, ["v1", "v2", "v3"], id="every_publish_notifies"),
    ],
)
def test_store_publishes_whole_tables_and_keeps_the_last_good_one_on_rejection(
    steps, current, accepted, rejected, ready, last_error, notified
):
    store = RouteTableStore()
    seen: list[RouteTable] = []
    store.subscribe(seen.append)
    published = {"": EMPTY_TABLE}
    for step in steps:
        if step[0] == "+":
            published[step[1:]] = table(step[1:])
            store.publish(published[step[1:]])
        else:
            store.reject(rejection(step[1:]))
    assert store.current is published[current]
    assert (store.accepted, store.rejected, store.ready) == (accepted, rejected, ready)
    assert (store.last_error.problems[0].reason if store.last_error else None) == last_error
    assert [t.version for t in seen] == notified
    assert all(t is published[t.version] for t in seen)
