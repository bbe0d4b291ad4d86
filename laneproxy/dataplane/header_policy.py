"""Envoy's request and response header handling, per listener: request ids, forwarding headers, x-envoy-*.

Owns what a listener adds to, or takes from, every request it forwards, as its HTTP connection
manager and router would in Envoy (and Istio's sidecars):

- `x-request-id`: kept when present (at the gateway too, as Envoy with `preserve_external_request_id`),
  else a new UUID4, added to the request before routing (as Envoy's connection manager does) so that
  a local reply's access log line and span carry it too;
- `x-forwarded-proto: http`: set when absent; an edge (the gateway) always overwrites it;
- `x-forwarded-for`: an edge appends the client's address (Envoy's `use_remote_address`); sidecars
  pass it through;
- `x-envoy-*` from the client: an edge strips all of them, since an external client must not steer
  timeouts or retries (stricter than Envoy, which strips only the ones it acts on); sidecars trust
  their callers and honour `x-envoy-upstream-rq-timeout-ms` (the Target's `timeout`);
- `x-envoy-expected-rq-timeout-ms`, the timeout in force, goes upstream;
- on responses: `x-envoy-upstream-service-time`, and `server` overwritten with the proxy's name
  (Envoy's default `server_header_transformation: OVERWRITE`).

`x-envoy-max-retries`, `x-envoy-retry-on` and `x-envoy-attempt-count` are the exchange's (retries
are per attempt), read from the same trusted callers only.

Values that do not change per request are precomputed bytes; the one pass over the request headers
is the whole per-request cost, plus a new id when the client sent none. `inspect` runs before
routing, `apply` after it, on the facts `inspect` found.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from laneproxy.core import headers as h

if TYPE_CHECKING:
    from laneproxy.dataplane.exchange import Exchange
    from laneproxy.dataplane.listener import Target

_HTTP = b"http"
_X_DASH = b"x-"
_UUID4_BITS = (0x4 << 76) | (0x2 << 62)  # version 4, RFC 4122 variant
_UUID4_MASK = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def uuid4_bytes(bits: int) -> bytes:
    """A UUID4 in its canonical text form from 128 random bits (faster than uuid.uuid4(), same shape)."""
    n = (bits & _UUID4_MASK) | _UUID4_BITS
    return b"%08x-%04x-%04x-%04x-%012x" % (n >> 96, (n >> 80) & 0xFFFF, (n >> 64) & 0xFFFF, (n >> 48) & 0xFFFF,
                                          n & 0xFFFFFFFFFFFF)


def _milliseconds(value: bytes) -> int | None:
    return int(value) if value.isdigit() and len(value) < 10 else None


# What `inspect` found: (x-request-id, x-forwarded-for, x-forwarded-proto present, x-envoy-upstream-rq-timeout-ms)
RequestFacts = tuple[bytes, bytes | None, bool, bytes | None]


class RequestHeaderPolicy:
    """The header changes one listener makes: `inspect` the request, route it, then `apply` to its Target."""

    __slots__ = ("edge", "route_timeout", "expected_timeout", "random_bits")

    def __init__(self, *, edge: bool, route_timeout: float = 15.0,
                 random_bits: Callable[[int], int] = random.getrandbits) -> None:
        self.edge = edge
        self.route_timeout = route_timeout
        self.expected_timeout = b"%d" % round(route_timeout * 1000) if route_timeout > 0 else None
        self.random_bits = random_bits

    def inspect(self, exchange: Exchange) -> RequestFacts:
        """Before routing: read what the policy needs, strip an external client's x-envoy-*, add x-request-id."""
        request_id = forwarded_for = timeout_value = None
        has_proto = has_envoy = False
        for name, value in exchange.headers:
            if name[:2] != _X_DASH:
                continue  # every header this policy reads starts with "x-"; most requests' headers do not
            if name == h.X_REQUEST_ID:
                request_id = value
            elif name == h.X_FORWARDED_FOR:
                forwarded_for = value
            elif name == h.X_FORWARDED_PROTO:
                has_proto = True
            elif name.startswith(h.X_ENVOY_PREFIX):
                has_envoy = True
                if name == h.X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS:
                    timeout_value = value
        if self.edge and has_envoy:
            exchange.headers = [(n, v) for n, v in exchange.headers if not n.startswith(h.X_ENVOY_PREFIX)]
            timeout_value = None
        if request_id is None:
            request_id = uuid4_bytes(self.random_bits(128))
            exchange.headers.append((h.X_REQUEST_ID, request_id))
        return request_id, forwarded_for, has_proto, timeout_value

    def apply(self, exchange: Exchange, target: Target, facts: RequestFacts) -> None:
        """After routing: the forwarding and timeout headers go into the Target's overrides."""
        request_id, forwarded_for, has_proto, timeout_value = facts
        overrides = target.overrides
        if self.edge:
            transport = exchange.downstream.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            if peer:
                address = peer[0].encode()
                overrides[h.X_FORWARDED_FOR] = forwarded_for + b", " + address if forwarded_for else address
            overrides[h.X_FORWARDED_PROTO] = _HTTP
        elif not has_proto:
            overrides[h.X_FORWARDED_PROTO] = _HTTP
        target.request_id = request_id
        expected = self.expected_timeout
        target.timeout = self.route_timeout
        if timeout_value is not None:
            milliseconds = _milliseconds(timeout_value)
            if milliseconds is not None:
                target.timeout = milliseconds / 1000.0
                expected = b"%d" % milliseconds if milliseconds > 0 else None
        if expected is not None:
            overrides[h.X_ENVOY_EXPECTED_RQ_TIMEOUT_MS] = expected


def response_headers(milliseconds: int, server: bytes) -> dict[bytes, bytes]:
    """The headers a listener sets on a proxied response: the upstream's time, and the proxy as `server`."""
    return {h.X_ENVOY_UPSTREAM_SERVICE_TIME: b"%d" % milliseconds, h.SERVER: server}
