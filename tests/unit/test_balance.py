"""balance.py: endpoint pickers with injected randomness."""

from __future__ import annotations

import pytest

from laneproxy.core.balance import RandomPicker, RoundRobinPicker

ENDPOINTS = ("a", "b", "c")


def no_randomness() -> float:
    raise AssertionError("a single endpoint needs no random number")


@pytest.mark.parametrize(
    ("random_value", "picked"),
    [
        pytest.param(0.0, "a", id="zero"),
        pytest.param(0.3333, "a", id="end_of_first_third"),
        pytest.param(1 / 3, "b", id="one_third"),
        pytest.param(0.5, "b", id="middle"),
        pytest.param(0.6666, "b", id="end_of_second_third"),
        pytest.param(2 / 3, "c", id="two_thirds"),
        pytest.param(0.9999999, "c", id="near_one"),
    ],
)
def test_random_picker_maps_the_random_value_onto_equal_slices(random_value, picked):
    assert RandomPicker(lambda: random_value).pick(ENDPOINTS) == picked


def test_random_picker_with_one_endpoint_draws_no_random_number():
    assert RandomPicker(no_randomness).pick(["only"]) == "only"


@pytest.mark.parametrize(
    ("start", "endpoints", "picks"),
    [
        pytest.param(0, ENDPOINTS, ["a", "b", "c", "a", "b"], id="starts_at_the_first_endpoint"),
        pytest.param(2, ENDPOINTS, ["c", "a", "b", "c"], id="starts_where_told"),
        pytest.param(0, ["only"], ["only", "only"], id="one_endpoint"),
    ],
)
def test_round_robin_picker_takes_each_endpoint_in_turn(start, endpoints, picks):
    picker = RoundRobinPicker(start)
    assert [picker.pick(endpoints) for _ in picks] == picks


def test_round_robin_cursor_is_shared_across_endpoint_lists():
    picker = RoundRobinPicker()
    assert [picker.pick(ENDPOINTS), picker.pick(["x", "y"]), picker.pick(ENDPOINTS)] == ["a", "y", "c"]
