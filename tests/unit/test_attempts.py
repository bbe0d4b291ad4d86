"""Retry host selection (Envoy's previous_hosts predicate) and the back-off between attempts."""

from __future__ import annotations

import itertools

import pytest

from laneproxy.core.attempts import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_MAX_SECONDS,
    HOST_SELECTION_RETRY_MAX_ATTEMPTS,
    backoff_seconds,
    select_untried,
)
from laneproxy.core.errors import NoHealthyUpstreamError


def draws(*values: str):
    """A selector that answers `values` in order and counts how often it was asked."""
    source = iter(values)
    asked = itertools.count()

    def select() -> str:
        next(asked)
        return next(source)

    return select, asked


@pytest.mark.parametrize(("sequence", "tried", "expected", "asked"), [
    (("a",), (), "a", 1),                            # a first attempt: nothing tried, the first draw
    (("b",), ("a",), "b", 1),                        # the draw is untried: taken at once
    (("a", "a", "b"), ("a",), "b", 3),               # draws that land on the dying endpoint are drawn again
    (("a", "b", "c"), ("a", "b"), "c", 3),           # every endpoint tried so far is avoided, not only the last
    (("a",) * 6, ("a",), "a", 6),                    # a lane with one endpoint: after 1 + 5 draws the last stands
    (("a",) * 5 + ("b",), ("a",), "b", 6),           # the fifth re-draw still counts
])
def test_a_retry_draws_again_until_it_finds_an_endpoint_no_attempt_used(sequence, tried, expected, asked):
    select, counter = draws(*sequence, "never")
    assert select_untried(select, tried) == expected
    assert next(counter) == asked


def test_host_selection_gives_up_after_istios_five_extra_draws():
    select, counter = draws(*("a",) * 20)
    assert select_untried(select, {"a"}) == "a"
    assert next(counter) == 1 + HOST_SELECTION_RETRY_MAX_ATTEMPTS


def test_a_retry_with_no_healthy_endpoint_fails_as_the_selector_says():
    def select() -> str:
        raise NoHealthyUpstreamError("no healthy endpoints for mockb")

    with pytest.raises(NoHealthyUpstreamError):
        select_untried(select, {"a"})


@pytest.mark.parametrize(("retry", "random_value", "expected"), [
    (0, 0.9, 0.0),                                   # not a retry: no wait
    (1, 0.0, 0.0),                                   # full jitter: may go at once
    (1, 0.5, 0.5 * BACKOFF_BASE_SECONDS),            # first retry: within one base interval
    (2, 0.5, 0.5 * 3 * BACKOFF_BASE_SECONDS),        # second: within three
    (3, 0.99, 0.99 * 7 * BACKOFF_BASE_SECONDS),      # third: within seven (0.173 s, under the cap)
    (4, 0.99, BACKOFF_MAX_SECONDS),                  # fourth: 15 base intervals, capped at ten
    (60, 0.5, BACKOFF_MAX_SECONDS),                  # absurd retry numbers stay capped
])
def test_the_back_off_before_a_retry_grows_exponentially_with_full_jitter_up_to_the_cap(retry, random_value, expected):
    assert backoff_seconds(retry, random_value) == pytest.approx(expected)
