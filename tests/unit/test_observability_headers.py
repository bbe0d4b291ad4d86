"""dataplane.header_policy: the headers Envoy adds, keeps and strips, for an edge (gateway) and for sidecars."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from laneproxy.dataplane.header_policy import RequestHeaderPolicy, response_headers, uuid4_bytes

NEW_ID = b"00000000-0000-4000-8000-000000000000"  # what uuid4_bytes makes of all-zero random bits


def apply(headers, *, edge=False, route_timeout=15.0, peer=("10.9.8.7", 50000)):
    transport = SimpleNamespace(get_extra_info=lambda name: peer if name == "peername" else None)
    exchange = SimpleNamespace(headers=list(headers), downstream=SimpleNamespace(transport=transport))
    target = SimpleNamespace(overrides={}, request_id=None, timeout=None)
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
