"""A request's retries: which endpoint the next attempt goes to, and how long it waits before it goes.

Owns Istio's default retry policy on the host side: Envoy's `previous_hosts` retry host predicate with
`host_selection_retry_max_attempts: 5` (a retry asks the selector again, up to five more times, for an
endpoint no earlier attempt of the request used; when every draw lands on a tried one, as in a lane with a
single endpoint, the last draw stands), and Envoy's jittered exponential back-off between attempts (25 ms
base, 250 ms at most). Without it a retry after a dying pod refused a connection picks that pod again as
often as not, while the callers' tables still list it.

Pure: selection arrives as a function, randomness as a number in [0, 1). It never sleeps, never opens a
socket and never decides whether a request may be retried at all (the exchange does).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import TypeVar

T = TypeVar("T")

HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5  # Istio's default retry policy
BACKOFF_BASE_SECONDS = 0.025  # Envoy's default retry back-off base interval
BACKOFF_MAX_SECONDS = 0.25  # Envoy's default: ten times the base


def select_untried(select: Callable[[], T], tried: Container[T],
                   max_attempts: int = HOST_SELECTION_RETRY_MAX_ATTEMPTS) -> T:
    """The first of up to 1 + `max_attempts` draws of `select` that is not in `tried`, else the last draw.

    Errors of `select` (no healthy upstream) pass through: a retry with nowhere to go fails as the first
    attempt would have.
    """
    choice = select()
    for _ in range(max_attempts):
        if choice not in tried:
            break
        choice = select()
    return choice


def backoff_seconds(retry: int, random_value: float, base: float = BACKOFF_BASE_SECONDS,
                    limit: float = BACKOFF_MAX_SECONDS) -> float:
    """The wait before retry number `retry` (1 for the first): uniform in [0, (2^retry - 1) * base), capped."""
    if retry < 1:
        return 0.0
    span = ((1 << min(retry, 16)) - 1) * base
    return min(random_value * span, limit)
