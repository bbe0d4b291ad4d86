"""Retry policy and the `x-envoy-*` request headers that steer retries and timeouts.

Owns what a retry may be taken on (`retry_on` tokens as Envoy spells them: `5xx`, `gateway-error`,
`connect-failure`, `reset`, `retriable-status-codes`), how many, which methods replay safely, how much
request body is kept for a replay, and the parsing of `x-envoy-max-retries`, `x-envoy-retry-on`,
`x-envoy-upstream-rq-timeout-ms` and `grpc-timeout` (the route timeout of a gRPC call). Pure: it
never sends, waits or counts; the exchange asks and acts.
"""

from __future__ import annotations

from typing import Final

# Replayed after a failure that may have reached the upstream only when the method says it is safe.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# Request body bytes kept after they went upstream, so that a request the next proxy never forwarded
# (its app refused the connection) can go to another endpoint, POSTs included. Beyond this, no replay.
REPLAY_LIMIT: Final = 64 * 1024
# Envoy caps a caller's x-envoy-max-retries the same way: a header must not buy unbounded attempts.
MAX_RETRIES_CAP: Final = 10

_GRPC_TIMEOUT_UNITS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


class RetryPolicy:
    """How many retries a request may take and on what; parsed once per request only when overridden."""

    __slots__ = ("max_retries", "retry_on", "status_codes")

    def __init__(self, max_retries: int, retry_on: frozenset[str], status_codes: frozenset[int]) -> None:
        self.max_retries = max_retries
        self.retry_on = retry_on
        self.status_codes = status_codes

    def with_overrides(self, max_retries: bytes | None, retry_on: bytes | None) -> RetryPolicy:
        """Apply `x-envoy-max-retries` / `x-envoy-retry-on` from a trusted caller; bad values are ignored."""
        count = self.max_retries
        if max_retries is not None and max_retries.strip().isdigit():
            count = min(int(max_retries), MAX_RETRIES_CAP)
        on = self.retry_on
        if retry_on is not None:
            on = frozenset(token.strip().decode("latin-1") for token in retry_on.split(b",") if token.strip())
        return RetryPolicy(count, on, self.status_codes)

    def on_failure(self, kind: str) -> bool:
        """kind: connect-failure or reset."""
        on = self.retry_on
        return kind in on or "5xx" in on or (kind == "connect-failure" and "gateway-error" in on)

    def on_status(self, status: int) -> bool:
        on = self.retry_on
        return (("5xx" in on and status >= 500) or ("gateway-error" in on and status in (502, 503, 504))
                or ("retriable-status-codes" in on and status in self.status_codes))


def timeout_milliseconds(value: bytes) -> int | None:
    """`x-envoy-upstream-rq-timeout-ms`: a plain non-negative integer below 10**9, else ignored (None)."""
    return int(value) if value.isdigit() and len(value) < 10 else None


def grpc_timeout_seconds(value: bytes) -> float | None:
    """`grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit H M S m u n), else None (ignored)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _GRPC_TIMEOUT_UNITS:
        return None
    return int(digits) * _GRPC_TIMEOUT_UNITS[unit]
