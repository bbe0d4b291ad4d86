"""Envoy's request and response header handling, per listener: request ids, forwarding headers, x-envoy-*.

Owns what a listener adds to, or takes from, every request it forwards, as its HTTP connection
manager and router would in Envoy (and Istio's sidecars):

- `x-request-id`: kept when present (at the gateway too, as Envoy with `preserve_external_request_id`,
  unless a swimlane group names it as its trace header: see below), else a new UUID4, added to the request before routing (as Envoy's connection manager does) so that
  a local reply's access log line and span carry it too;
- each swimlane group's trace header (`my-request-id`), at an edge: the sidecars' trace -> lane tables
  are keyed by its value, so a client that could choose it could move another user's trace into its
  own lane. The gateway treats it as Envoy treats an external `x-request-id` by default
  (`preserve_external_request_id: false`): every request gets a fresh UUID4 from a cryptographic random
  source, unless `trust_client_trace_id` keeps the client's one (then a fresh one only when it sent
  none, an empty one or several). A `traceparent` trace header is the client's W3C trace context and is
  kept when it is one valid traceparent (its trace-id is 128 random bits by the W3C rules: a collision
  is negligible and a live one cannot be guessed), else replaced by a fresh sampled one;
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
import secrets
from typing import TYPE_CHECKING, Callable

from laneproxy.core import headers as h
from laneproxy.core.propagation import valid_traceparent
from laneproxy.core.retry import timeout_milliseconds

if TYPE_CHECKING:
    from laneproxy.core.model import RouteTable
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


def fresh_traceparent(bits: Callable[[int], int]) -> bytes:
    """A new W3C trace context: random trace-id and parent-id (never all zero), sampled as a new trace is."""
    return b"00-%032x-%016x-01" % (bits(128) or 1, bits(64) or 1)


def edge_trace_value(name: bytes, sent: list[bytes], *, trust: bool, bits: Callable[[int], int]) -> bytes | None:
    """The value an edge sends as trace header `name`, given every value the client sent; None keeps them.

    Several values are replaced even when trusted: hops that read the first and hops that read the
    last would disagree about the trace.
    """
    if name == h.TRACEPARENT:
        return None if len(sent) == 1 and valid_traceparent(sent[0]) else fresh_traceparent(bits)
    if trust and len(sent) == 1 and sent[0]:
        return None
    return uuid4_bytes(bits(128))


# What `inspect` found: (x-request-id, x-forwarded-for, x-forwarded-proto present, x-envoy-upstream-rq-timeout-ms)
RequestFacts = tuple[bytes, bytes | None, bool, bytes | None]


class RequestHeaderPolicy:
    """The header changes one listener makes: `inspect` the request, route it, then `apply` to its Target."""

    __slots__ = ("edge", "route_timeout", "expected_timeout", "random_bits", "trust_client_trace_id", "trace_bits",
                 "_table", "_trace_headers")

    def __init__(self, *, edge: bool, route_timeout: float = 15.0,
                 random_bits: Callable[[int], int] = random.getrandbits, trust_client_trace_id: bool = False,
                 trace_bits: Callable[[int], int] = secrets.randbits) -> None:
        self.edge = edge
        self.route_timeout = route_timeout
        self.expected_timeout = b"%d" % round(route_timeout * 1000) if route_timeout > 0 else None
        self.random_bits = random_bits  # request ids: unique is enough
        self.trust_client_trace_id = trust_client_trace_id
        # Trace ids key the lane tables: they must be unguessable, and a Mersenne Twister's next outputs
        # follow from 624 it has given, which an app that echoes its trace id would hand to any client.
        self.trace_bits = trace_bits
        self._table: RouteTable | None = None
        self._trace_headers: tuple[bytes, ...] = ()

    def trace_headers(self, table: RouteTable) -> tuple[bytes, ...]:
        """The swimlane trace headers of `table` that an edge sets (a route header is never one of them)."""
        if table is not self._table:  # tables are immutable: computed once per published table
            groups = table.groups.values()
            route_headers = {group.route_header_key for group in groups}
            self._trace_headers = tuple(sorted({group.trace_header_key for group in groups
                                                if group.trace_header_key is not None} - route_headers))
            self._table = table
        return self._trace_headers

    def set_trace_ids(self, exchange: Exchange, table: RouteTable) -> None:
        """At an edge: each trace header of `table` gets the value `edge_trace_value` chooses."""
        names = self.trace_headers(table)
        if not names:
            return
        sent: dict[bytes, list[bytes]] = {name: [] for name in names}
        for name, value in exchange.headers:
            values = sent.get(name)
            if values is not None:
                values.append(value)
        chosen = {}
        for name, values in sent.items():
            edge_value = edge_trace_value(name, values, trust=self.trust_client_trace_id, bits=self.trace_bits)
            if edge_value is not None:
                chosen[name] = edge_value
        if chosen:
            exchange.headers = [(n, v) for n, v in exchange.headers if n not in chosen]
            exchange.headers.extend(chosen.items())

    def inspect(self, exchange: Exchange, table: RouteTable | None = None) -> RequestFacts:
        """Before routing: set an edge's trace ids, read what the policy needs, strip an external client's
        x-envoy-*, add x-request-id. Without `table` (no swimlane groups known) no trace id is set."""
        if self.edge and table is not None:
            self.set_trace_ids(exchange, table)
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
            milliseconds = timeout_milliseconds(timeout_value)
            if milliseconds is not None:
                target.timeout = milliseconds / 1000.0
                expected = b"%d" % milliseconds if milliseconds > 0 else None
        if expected is not None:
            overrides[h.X_ENVOY_EXPECTED_RQ_TIMEOUT_MS] = expected


def response_headers(milliseconds: int, server: bytes) -> dict[bytes, bytes]:
    """The headers a listener sets on a proxied response: the upstream's time, and the proxy as `server`."""
    return {h.X_ENVOY_UPSTREAM_SERVICE_TIME: b"%d" % milliseconds, h.SERVER: server}
