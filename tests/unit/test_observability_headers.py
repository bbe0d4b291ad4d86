"""dataplane.header_policy: the headers Envoy adds, keeps and strips, for an edge (gateway) and for sidecars."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from laneproxy.core.balance import EndpointSelector, RandomPicker
from laneproxy.core.model import Endpoint, Route
from laneproxy.core.propagation import TraceLaneTable, valid_traceparent
from laneproxy.core.retry import RetryPolicy
from laneproxy.core.store import RouteTableStore
from laneproxy.dataplane.exchange import Exchange
from laneproxy.dataplane.listener import Listener, OutboundRole, Target
from laneproxy.dataplane.upstream import UpstreamPools
from laneproxy.observability.stats import ClusterStats, ProxyStats
from laneproxy.settings import ProxySettings
from laneproxy.dataplane.header_policy import (
    RequestHeaderPolicy,
    edge_trace_value,
    fresh_traceparent,
    response_headers,
    uuid4_bytes,
)
from .manifests import build, edit, seed_bodies

NEW_ID = b"00000000-0000-4000-8000-000000000000"  # what uuid4_bytes makes of all-zero random bits


def real_listener() -> Listener:
    """A real Listener (the compiled build checks the types of the exchange's listener and of a Target), never
    started: its loop is closed at once, the header policy only reads the listener's clock."""
    loop = asyncio.new_event_loop()
    try:
        stats = ProxyStats()
        selector = EndpointSelector(RandomPicker(lambda: 0.0), None, lambda: 0.0)
        return Listener("outbound", OutboundRole(stats, selector, TraceLaneTable(16, 60.0, lambda: 0.0), None), store=RouteTableStore(),
                        pools=UpstreamPools(loop, connect_timeout=1.0), stats=stats, settings=ProxySettings(),
                        loop=loop)
    finally:
        loop.close()


def exchange_with(headers, peer=("10.9.8.7", 50000)):
    """A real Exchange on a real listener, for a client connection that has only a peer."""
    transport = SimpleNamespace(get_extra_info=lambda name: peer if name == "peername" else None)
    downstream = SimpleNamespace(transport=transport, listener=real_listener())
    return Exchange(downstream, b"GET", b"/", 1, list(headers), b"mockb:8000", True, False, False, None, False,
                    RetryPolicy(0, frozenset(), frozenset()))


def real_target() -> Target:
    endpoint = Endpoint("10.0.0.5", 8000)
    route = Route("default/mockb", None, None, "outbound|8000||mockb.default.svc.cluster.local", (endpoint,))
    return Target(endpoint, b"/", {}, ClusterStats(route.cluster), route, None, None)


def apply(headers, *, edge=False, route_timeout=15.0, peer=("10.9.8.7", 50000)):
    exchange = exchange_with(headers, peer)
    target = real_target()
    policy = RequestHeaderPolicy(edge=edge, route_timeout=route_timeout, random_bits=lambda bits: 0)
    facts = policy.inspect(exchange)
    policy.apply(exchange, target, facts)
    return exchange, target


@pytest.mark.parametrize(
    ("headers", "edge", "overrides"),
    [
        ([], False, {b"x-forwarded-proto": b"http", b"x-envoy-expected-rq-timeout-ms": b"15000"}),
        ([(b"x-request-id", b"abc"), (b"x-forwarded-proto", b"https")], False,
         {b"x-envoy-expected-rq-timeout-ms": b"15000"}),
        ([(b"x-forwarded-for", b"1.2.3.4")], False,  # a sidecar passes x-forwarded-for through
         {b"x-forwarded-proto": b"http", b"x-envoy-expected-rq-timeout-ms": b"15000"}),
        ([(b"x-request-id", b"abc"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-for", b"1.2.3.4")], True,
         {b"x-forwarded-for": b"1.2.3.4, 10.9.8.7", b"x-forwarded-proto": b"http",
          b"x-envoy-expected-rq-timeout-ms": b"15000"}),
        ([], True, {b"x-forwarded-for": b"10.9.8.7", b"x-forwarded-proto": b"http",
                    b"x-envoy-expected-rq-timeout-ms": b"15000"}),
    ],
    ids=["sidecar-adds", "sidecar-keeps", "sidecar-passes-xff", "edge-appends-and-overwrites", "edge-adds"],
)
def test_request_headers_set_upstream(headers, edge, overrides):
    _, target = apply(headers, edge=edge)
    assert target.overrides == overrides


@pytest.mark.parametrize(
    ("headers", "request_id"),
    [([], NEW_ID), ([(b"x-request-id", b"abc")], b"abc")],
)
def test_a_request_id_is_kept_or_added_to_the_request_itself_before_routing(headers, request_id):
    exchange, target = apply(headers)
    assert target.request_id == request_id
    assert [value for name, value in exchange.headers if name == b"x-request-id"] == [request_id]


@pytest.mark.parametrize(
    ("value", "timeout", "expected_header"),
    [
        (b"2500", 2.5, b"2500"),
        (b"0", 0.0, None),  # no timeout: nothing to expect
        (b"soon", 15.0, b"15000"),  # not a number: the route's timeout stands
    ],
)
def test_a_trusted_caller_sets_the_upstream_timeout(value, timeout, expected_header):
    exchange, target = apply([(b"x-envoy-upstream-rq-timeout-ms", value)])
    assert target.timeout == timeout
    assert target.overrides.get(b"x-envoy-expected-rq-timeout-ms") == expected_header
    assert (b"x-envoy-upstream-rq-timeout-ms", value) in exchange.headers


def test_the_gateway_strips_every_x_envoy_header_a_client_sends_and_ignores_them():
    sent = [(b"x-envoy-upstream-rq-timeout-ms", b"1"), (b"x-envoy-max-retries", b"9"), (b"x-envoy-foo", b"bar"),
            (b"x-kept", b"yes")]
    exchange, target = apply(sent, edge=True)
    assert exchange.headers == [(b"x-kept", b"yes"), (b"x-request-id", NEW_ID)]
    assert target.timeout == 15.0


def test_no_route_timeout_means_no_expected_timeout_header():
    _, target = apply([], route_timeout=0)
    assert b"x-envoy-expected-rq-timeout-ms" not in target.overrides


def test_response_carries_the_upstream_service_time_and_the_proxy_as_server():
    assert response_headers(42, b"envoy") == {b"x-envoy-upstream-service-time": b"42", b"server": b"envoy"}


@pytest.mark.parametrize("bits", [0, (1 << 128) - 1, 0x0123456789ABCDEF0123456789ABCDEF])
def test_request_ids_are_uuid4_shaped(bits):
    import uuid

    value = uuid.UUID(uuid4_bytes(bits).decode())
    assert (value.version, value.variant) == (4, uuid.RFC_4122)
    assert value == uuid.UUID(int=bits, version=4)


# --- the swimlane trace header at the edge ------------------------------------------------------------

TRACE = b"my-request-id"
TRACEPARENT = b"traceparent"
VALID_PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BITS = 0x0123456789ABCDEF0123456789ABCDEF


def fixed_bits(bits: int) -> int:
    """Injected randomness: the same known bits every time, cut to the width asked for."""
    return BITS & ((1 << bits) - 1)


FRESH_ID = uuid4_bytes(BITS)
FRESH_PARENT = b"00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"


@pytest.mark.parametrize(
    ("name", "sent", "trust", "expected"),
    [
        pytest.param(TRACE, [], False, FRESH_ID, id="no_id_gets_a_fresh_one"),
        pytest.param(TRACE, [b"10002"], False, FRESH_ID, id="a_clients_id_is_replaced"),
        pytest.param(TRACE, [b"10002"], True, None, id="trusted_a_clients_id_is_kept"),
        pytest.param(TRACE, [], True, FRESH_ID, id="trusted_no_id_still_gets_a_fresh_one"),
        pytest.param(TRACE, [b""], True, FRESH_ID, id="trusted_an_empty_id_is_replaced"),
        pytest.param(TRACE, [b"10002", b"10003"], True, FRESH_ID, id="trusted_two_ids_are_replaced_by_one"),
        pytest.param(TRACE, [b"x" * 4096], True, None, id="trusted_a_long_id_is_kept_the_tables_refuse_it"),
        pytest.param(b"x-request-id", [b"abc"], False, FRESH_ID, id="x_request_id_as_trace_header_is_replaced_too"),
        pytest.param(TRACEPARENT, [VALID_PARENT], False, None, id="a_valid_traceparent_is_kept"),
        pytest.param(TRACEPARENT, [VALID_PARENT], True, None, id="trusted_a_valid_traceparent_is_kept"),
        pytest.param(TRACEPARENT, [], False, FRESH_PARENT, id="no_traceparent_gets_a_fresh_one"),
        pytest.param(TRACEPARENT, [b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01"], False, FRESH_PARENT,
                     id="an_all_zero_trace_id_is_replaced"),
        pytest.param(TRACEPARENT, [b"10002"], True, FRESH_PARENT, id="trusted_an_invalid_traceparent_is_replaced"),
        pytest.param(TRACEPARENT, [VALID_PARENT.upper()], False, FRESH_PARENT, id="uppercase_traceparent_is_invalid"),
        pytest.param(TRACEPARENT, [VALID_PARENT, VALID_PARENT], False, FRESH_PARENT,
                     id="two_traceparents_are_replaced_by_one"),
    ],
)
def test_the_edge_chooses_each_trace_header_value(name, sent, trust, expected):
    assert edge_trace_value(name, sent, trust=trust, bits=fixed_bits) == expected


def test_a_fresh_traceparent_is_valid_even_from_all_zero_randomness():
    assert valid_traceparent(fresh_traceparent(lambda bits: 0))
    assert valid_traceparent(fresh_traceparent(fixed_bits))


def table_with(trace_header: str | None = "my-request-id", route_header: str = "x-asm-prefer-tag"):
    bodies = seed_bodies()
    pmc = {"fallbackTarget": "base", "routeHeader": route_header}
    if trace_header is not None:
        pmc["traceHeader"] = trace_header
    edit(bodies["group"], "spec.permissiveModeConfiguration", pmc)
    return build(bodies)


def inspected(headers, table, *, edge=True, trust=False):
    exchange = exchange_with(headers)
    policy = RequestHeaderPolicy(edge=edge, random_bits=lambda bits: 0, trust_client_trace_id=trust,
                                 trace_bits=fixed_bits)
    facts = policy.inspect(exchange, table)
    return exchange.headers, facts[0]


@pytest.mark.parametrize(
    ("trace_header", "headers", "edge", "trust", "expected"),
    [
        pytest.param("my-request-id", [(TRACE, b"10002"), (b"x-asm-prefer-tag", b"canary")], True, False,
                     [(b"x-asm-prefer-tag", b"canary"), (TRACE, FRESH_ID), (b"x-request-id", NEW_ID)],
                     id="gateway_replaces_the_clients_id"),
        pytest.param("my-request-id", [(b"x-asm-prefer-tag", b"canary")], True, False,
                     [(b"x-asm-prefer-tag", b"canary"), (TRACE, FRESH_ID), (b"x-request-id", NEW_ID)],
                     id="gateway_sets_an_id_on_a_request_without_one"),
        pytest.param("my-request-id", [(TRACE, b"10002"), (b"accept", b"*/*"), (TRACE, b"10003")], True, True,
                     [(b"accept", b"*/*"), (TRACE, FRESH_ID), (b"x-request-id", NEW_ID)],
                     id="trusting_gateway_replaces_two_ids_by_one"),
        pytest.param("my-request-id", [(TRACE, b"10002")], True, True,
                     [(TRACE, b"10002"), (b"x-request-id", NEW_ID)], id="trusting_gateway_keeps_the_clients_id"),
        pytest.param("my-request-id", [(TRACE, b"10002")], False, False,
                     [(TRACE, b"10002"), (b"x-request-id", NEW_ID)], id="a_sidecar_never_touches_the_trace_id"),
        pytest.param("x-asm-prefer-tag", [(b"x-asm-prefer-tag", b"canary")], True, False,
                     [(b"x-asm-prefer-tag", b"canary"), (b"x-request-id", NEW_ID)],
                     id="a_trace_header_that_is_the_route_header_is_left_alone"),
        pytest.param(None, [(TRACE, b"10002")], True, False,
                     [(TRACE, b"10002"), (b"x-request-id", NEW_ID)], id="no_trace_header_configured"),
        pytest.param("traceparent", [(TRACEPARENT, VALID_PARENT)], True, False,
                     [(TRACEPARENT, VALID_PARENT), (b"x-request-id", NEW_ID)], id="gateway_keeps_a_valid_traceparent"),
        pytest.param("traceparent", [(TRACEPARENT, b"00-xyz-01")], True, False,
                     [(TRACEPARENT, FRESH_PARENT), (b"x-request-id", NEW_ID)],
                     id="gateway_replaces_an_invalid_traceparent"),
    ],
)
def test_the_gateway_sets_each_requests_trace_id_before_routing(trace_header, headers, edge, trust, expected):
    sent, _ = inspected(headers, table_with(trace_header), edge=edge, trust=trust)
    assert sent == expected


def test_x_request_id_as_the_trace_header_is_the_fresh_value_everywhere():
    sent, request_id = inspected([(b"x-request-id", b"victim")], table_with("x-request-id"))
    assert sent == [(b"x-request-id", FRESH_ID)] and request_id == FRESH_ID


def test_the_trace_headers_of_a_table_are_found_once_per_table():
    policy = RequestHeaderPolicy(edge=True)
    first, second = table_with("my-request-id"), table_with("traceparent")
    assert policy.trace_headers(first) == (TRACE,)
    assert policy.trace_headers(second) == (TRACEPARENT,)
    assert policy.trace_headers(first) == (TRACE,)


def test_the_gateways_trace_ids_are_unguessable_and_distinct_by_default():
    """Trace ids key the lane tables: they come from the system's cryptographic source, not the process PRNG."""
    import secrets
    import uuid

    policy = RequestHeaderPolicy(edge=True)
    assert policy.trace_bits is secrets.randbits and not policy.trust_client_trace_id
    table = table_with()
    values = set()
    for _ in range(50):
        exchange = exchange_with([(TRACE, b"10002")])
        policy.inspect(exchange, table)
        (value,) = [v for n, v in exchange.headers if n == TRACE]
        assert uuid.UUID(value.decode()).version == 4
        values.add(value)
    assert len(values) == 50
