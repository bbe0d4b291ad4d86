"""propagation.py: where an outbound hop's lane comes from, trace keys, baggage, and the trace -> lane table."""

from __future__ import annotations

import pytest

from laneproxy.core.propagation import (
    MAX_TRACE_KEY_BYTES,
    LaneSource,
    TraceLaneTable,
    entry_bytes,
    lane_from_baggage,
    resolve_lane,
    trace_key,
    valid_traceparent,
)

ROUTE = b"x-asm-prefer-tag"
TRACE = b"my-request-id"
TRACEPARENT = b"traceparent"
TRACE_ID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_1 = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
PARENT_2 = b"00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-00"
OTHER_TRACE = b"00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"


class Clock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def traces_with(entries: dict[bytes, bytes]) -> TraceLaneTable:
    table = TraceLaneTable(capacity=16, ttl=60.0, clock=Clock())
    for key, lane in entries.items():
        table.remember(key, lane)
    return table


@pytest.mark.parametrize(
    ("route_value", "trace_value", "baggage", "trace_header", "remembered", "expected"),
    [
        pytest.param(b"canary", b"10002", b"x-asm-prefer-tag=blue", TRACE, {b"10002": b"dev"},
                     (b"canary", LaneSource.ROUTE_HEADER), id="route_header_wins_over_everything"),
        pytest.param(None, b"10002", b"x-asm-prefer-tag=blue", TRACE, {b"10002": b"dev"},
                     (b"dev", LaneSource.TRACE_TABLE), id="trace_table_wins_over_baggage"),
        pytest.param(b"", b"10002", None, TRACE, {b"10002": b"dev"},
                     (b"dev", LaneSource.TRACE_TABLE), id="an_empty_route_header_is_no_route_header"),
        pytest.param(None, b"10003", b"x-asm-prefer-tag=blue", TRACE, {b"10002": b"dev"},
                     (b"blue", LaneSource.BAGGAGE), id="unknown_trace_falls_through_to_baggage"),
        pytest.param(None, b"10002", b"x-asm-prefer-tag=blue", None, {b"10002": b"dev"},
                     (b"blue", LaneSource.BAGGAGE), id="no_trace_header_configured_skips_the_trace_table"),
        pytest.param(None, None, b"a=1,x-asm-prefer-tag=blue;p=1", TRACE, {},
                     (b"blue", LaneSource.BAGGAGE), id="baggage_member_with_properties"),
        pytest.param(None, b"10003", b"a=1", TRACE, {b"10002": b"dev"},
                     (None, LaneSource.BASELINE), id="nothing_known_is_the_baseline"),
        pytest.param(None, None, None, TRACE, {}, (None, LaneSource.BASELINE), id="no_headers_at_all"),
        pytest.param(None, PARENT_2, None, TRACEPARENT, {TRACE_ID: b"canary"},
                     (b"canary", LaneSource.TRACE_TABLE), id="traceparent_is_looked_up_by_trace_id"),
        pytest.param(None, b"00-xyz-00f067aa0ba902b7-01", b"x-asm-prefer-tag=blue", TRACEPARENT, {TRACE_ID: b"canary"},
                     (b"blue", LaneSource.BAGGAGE), id="invalid_traceparent_falls_through_to_baggage"),
        pytest.param(b"gold", None, None, TRACE, {},
                     (b"gold", LaneSource.ROUTE_HEADER), id="values_are_not_checked_against_lanes_here"),
    ],
)
def test_resolve_lane_tries_route_header_then_trace_table_then_baggage_then_baseline(
    route_value, trace_value, baggage, trace_header, remembered, expected
):
    traces = traces_with(remembered)
    assert resolve_lane(route_value, trace_value, baggage, trace_header=trace_header, route_header=ROUTE,
                        traces=traces) == expected


@pytest.mark.parametrize(
    ("header", "value", "key"),
    [
        pytest.param(TRACE, b"10002", b"10002", id="custom_header_is_its_own_key"),
        pytest.param(TRACE, b"", None, id="empty_custom_header_has_no_key"),
        pytest.param(TRACEPARENT, PARENT_1, TRACE_ID, id="traceparent_keys_by_trace_id"),
        pytest.param(TRACEPARENT, PARENT_2, TRACE_ID, id="another_parent_of_the_same_trace_has_the_same_key"),
        pytest.param(TRACEPARENT, PARENT_1.upper(), TRACE_ID, id="uppercase_hex_is_normalised"),
        pytest.param(TRACEPARENT, b"  " + PARENT_1 + b" ", TRACE_ID, id="surrounding_space_is_ignored"),
        pytest.param(TRACEPARENT, PARENT_1 + b"-future", TRACE_ID, id="future_versions_may_add_fields"),
        pytest.param(TRACEPARENT, b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", None, id="all_zero_trace_id"),
        pytest.param(TRACEPARENT, b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None, id="short_trace_id"),
        pytest.param(TRACEPARENT, b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None, id="non_hex_trace_id"),
        pytest.param(TRACEPARENT, b"00-4bf92f3577b34da6a3ce929d0e0e4736-01", None, id="too_few_fields"),
        pytest.param(TRACEPARENT, b"10002", None, id="not_a_traceparent"),
        pytest.param(TRACEPARENT, b"", None, id="empty_traceparent"),
    ],
)
def test_trace_key_of_a_traceparent_is_its_trace_id_only(header, value, key):
    assert trace_key(header, value) == key


def test_two_traceparents_of_one_trace_hit_the_same_entry():
    traces = traces_with({trace_key(TRACEPARENT, PARENT_1): b"canary"})
    assert traces.lookup(trace_key(TRACEPARENT, PARENT_2)) == b"canary"
    assert traces.lookup(trace_key(TRACEPARENT, OTHER_TRACE)) is None
    assert (traces.counters.hits, traces.counters.misses, len(traces)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("baggage", "lane"),
    [
        pytest.param(b"x-asm-prefer-tag=canary", b"canary", id="single_member"),
        pytest.param(b"a=1,x-asm-prefer-tag=canary;prop=1", b"canary", id="member_with_property"),
        pytest.param(b" a = 1 , x-asm-prefer-tag = canary ; prop=1 ", b"canary", id="spaces_around_everything"),
        pytest.param(b"x-asm-prefer-tag=canary,x-asm-prefer-tag=dev", b"canary", id="first_member_wins"),
        pytest.param(b"x-asm-prefer-tag-2=dev,x-asm-prefer-tag=canary", b"canary", id="keys_match_whole"),
        pytest.param(b"a=1,b=2", None, id="absent_key"),
        pytest.param(b"x-asm-prefer-tag=", None, id="empty_value"),
        pytest.param(b"x-asm-prefer-tag=;prop", None, id="only_properties"),
        pytest.param(b"x-asm-prefer-tag", None, id="key_without_value"),
        pytest.param(b"a=x-asm-prefer-tag=canary", None, id="key_inside_a_value"),
        pytest.param(b"", None, id="empty_header"),
    ],
)
def test_lane_from_baggage_reads_one_w3c_member(baggage, lane):
    assert lane_from_baggage(baggage, ROUTE) == lane


# Each step: ("at", time) sets the clock; ("put", key, lane) remembers; ("get", key, expected) looks up.
@pytest.mark.parametrize(
    ("capacity", "ttl", "steps", "counters", "size"),
    [
        pytest.param(2, 60, [("put", b"a", b"1"), ("put", b"b", b"2"), ("put", b"c", b"3"),
                             ("get", b"a", None), ("get", b"b", b"2"), ("get", b"c", b"3")],
                     (2, 1, 1, 0), 2, id="at_capacity_the_least_recently_used_entry_is_evicted"),
        pytest.param(2, 60, [("put", b"a", b"1"), ("put", b"b", b"2"), ("get", b"a", b"1"), ("put", b"c", b"3"),
                             ("get", b"b", None), ("get", b"a", b"1")],
                     (2, 1, 1, 0), 2, id="a_lookup_makes_an_entry_recently_used"),
        pytest.param(2, 60, [("put", b"a", b"1"), ("put", b"b", b"2"), ("put", b"a", b"9"), ("put", b"c", b"3"),
                             ("get", b"b", None), ("get", b"a", b"9")],
                     (1, 1, 1, 0), 2, id="a_write_makes_an_entry_recently_used_and_replaces_its_lane"),
        pytest.param(2, 60, [("put", b"a", b"1"), ("put", b"a", b"2"), ("put", b"a", b"3")],
                     (0, 0, 0, 0), 1, id="rewriting_one_key_evicts_nothing"),
        pytest.param(1, 60, [("put", b"a", b"1"), ("put", b"b", b"2"), ("put", b"c", b"3"), ("get", b"c", b"3")],
                     (1, 0, 2, 0), 1, id="every_forced_removal_is_counted"),
        pytest.param(4, 10, [("at", 0), ("put", b"a", b"1"), ("at", 9.999), ("get", b"a", b"1"),
                             ("at", 10), ("get", b"a", None)],
                     (1, 1, 0, 1), 0, id="an_entry_expires_ttl_seconds_after_its_write_and_counts_a_miss"),
        pytest.param(4, 10, [("at", 0), ("put", b"a", b"1"), ("at", 9), ("get", b"a", b"1"),
                             ("at", 18), ("get", b"a", None)],
                     (1, 1, 0, 1), 0, id="a_lookup_does_not_extend_the_ttl"),
        pytest.param(4, 10, [("at", 0), ("put", b"a", b"1"), ("at", 5), ("put", b"a", b"1"),
                             ("at", 14), ("get", b"a", b"1"), ("at", 15), ("get", b"a", None)],
                     (1, 1, 0, 1), 0, id="a_write_restarts_the_ttl"),
        pytest.param(4, 10, [("at", 0), ("put", b"a", b"1"), ("at", 5), ("put", b"b", b"2"), ("at", 12),
                             ("get", b"b", b"2"), ("get", b"a", None), ("get", b"a", None)],
                     (1, 2, 0, 1), 1, id="an_expired_entry_is_removed_once"),
        pytest.param(4, 10, [("get", b"a", None), ("get", b"a", None)],
                     (0, 2, 0, 0), 0, id="a_lookup_of_an_unknown_key_is_a_miss"),
    ],
)
def test_trace_lane_table_is_lru_bounded_with_ttl_and_counts_everything(capacity, ttl, steps, counters, size):
    clock = Clock(0.0)
    table = TraceLaneTable(capacity, ttl, clock)
    for step in steps:
        if step[0] == "at":
            clock.now = step[1]
        elif step[0] == "put":
            table.remember(step[1], step[2])
        else:
            assert (step[1], table.lookup(step[1])) == (step[1], step[2])
    c = table.counters
    assert (c.hits, c.misses, c.evictions, c.expirations) == counters
    assert len(table) == size


@pytest.mark.parametrize(("capacity", "ttl"), [(0, 10), (-1, 10), (4, 0), (4, -1)])
def test_trace_lane_table_needs_positive_capacity_and_ttl(capacity, ttl):
    with pytest.raises(ValueError):
        TraceLaneTable(capacity, ttl, Clock())


@pytest.mark.parametrize(("max_bytes", "max_key_bytes"), [(0, 256), (-1, 256), (1024, 0)])
def test_trace_lane_table_needs_a_positive_byte_budget_and_key_length(max_bytes, max_key_bytes):
    with pytest.raises(ValueError):
        TraceLaneTable(16, 60, Clock(), max_bytes=max_bytes, max_key_bytes=max_key_bytes)


def cost(*entries: tuple[bytes, bytes]) -> int:
    return sum(entry_bytes(key, lane) for key, lane in entries)


LONG = b"k" * MAX_TRACE_KEY_BYTES


# Steps as above; ("bytes", n) asserts what the table holds by the byte budget's count.
@pytest.mark.parametrize(
    ("max_bytes", "steps", "counters", "size"),
    [
        pytest.param(cost((b"a", b"1"), (b"b", b"2")), [("put", b"a", b"1"), ("put", b"b", b"2"), ("put", b"c", b"3"),
                                                       ("get", b"a", None), ("get", b"b", b"2"), ("get", b"c", b"3")],
                     (2, 1, 1, 0, 0), 2, id="over_the_byte_budget_the_least_recently_used_entry_is_evicted"),
        pytest.param(cost((b"a", b"1"), (b"b", b"2")), [("put", b"a", b"1"), ("put", b"b", b"2"), ("get", b"a", b"1"),
                                                       ("put", b"c", b"3"), ("get", b"b", None), ("get", b"a", b"1")],
                     (2, 1, 1, 0, 0), 2, id="a_lookup_protects_an_entry_from_the_byte_budget_too"),
        pytest.param(cost((b"a", b"1"), (b"b", b"2"), (b"c", b"3")),
                     [("put", b"a", b"1"), ("put", b"b", b"2"), ("put", b"c", b"3"), ("put", b"d" * 40, b"4"),
                      ("get", b"a", None), ("get", b"b", None), ("get", b"c", b"3"), ("bytes", cost((b"c", b"3"), (b"d" * 40, b"4")))],
                     (1, 2, 2, 0, 0), 2, id="one_long_entry_evicts_as_many_short_ones_as_its_bytes_need"),
        pytest.param(cost((b"a", b"1")), [("put", b"a", b"1"), ("put", b"b" * 100, b"2"), ("get", b"b" * 100, b"2"),
                                          ("bytes", cost((b"b" * 100, b"2")))],
                     (1, 0, 1, 0, 0), 1, id="an_entry_alone_over_the_budget_is_kept_until_the_next_write"),
        pytest.param(cost((b"a", b"canary"), (b"b", b"2")),
                     [("put", b"a", b"1"), ("put", b"b", b"2"), ("put", b"a", b"canary"), ("get", b"b", b"2"),
                      ("bytes", cost((b"a", b"canary"), (b"b", b"2")))],
                     (1, 0, 0, 0, 0), 2, id="rewriting_a_key_charges_its_new_lane_not_both"),
        pytest.param(1 << 20, [("at", 0), ("put", b"a", b"1"), ("put", b"b", b"2"), ("at", 60), ("get", b"a", None),
                               ("bytes", cost((b"b", b"2")))],
                     (0, 1, 0, 1, 0), 1, id="an_expired_entry_gives_its_bytes_back"),
        pytest.param(1 << 20, [("put", LONG, b"1"), ("get", LONG, b"1"), ("put", LONG + b"k", b"1"),
                               ("get", LONG + b"k", None), ("bytes", cost((LONG, b"1")))],
                     (1, 1, 0, 0, 1), 1, id="a_key_over_the_length_limit_is_not_remembered_and_is_counted"),
        pytest.param(1 << 20, [("put", b"a", b"1"), ("put", b"x" * 16384, b"canary"), ("put", b"x" * 16384, b"canary"),
                               ("get", b"a", b"1")],
                     (1, 0, 0, 0, 2), 1, id="every_rejected_write_is_counted_and_evicts_nothing"),
    ],
)
def test_trace_lane_table_is_bounded_in_bytes_and_key_length(max_bytes, steps, counters, size):
    clock = Clock(0.0)
    table = TraceLaneTable(100, 10, clock, max_bytes=max_bytes)
    for step in steps:
        if step[0] == "at":
            clock.now = step[1]
        elif step[0] == "put":
            table.remember(step[1], step[2])
        elif step[0] == "bytes":
            assert table.size_bytes == step[1]
        else:
            assert (step[1][:8], table.lookup(step[1])) == (step[1][:8], step[2])
        assert table.size_bytes <= max(max_bytes, cost(*[(k, v) for k, (v, _) in list(table._entries.items())[-1:]]))
    c = table.counters
    assert (c.hits, c.misses, c.evictions, c.expirations, c.rejected_long_ids) == counters
    assert len(table) == size
    assert table.size_bytes == sum(entry_bytes(key, lane) for key, (lane, _) in table._entries.items())


def test_four_thousand_sixteen_kilobyte_trace_ids_cost_the_table_nothing():
    """The audit's case: 4,000 ids of 16 kB once cost 56 MiB; now none is remembered and each is counted."""
    table = TraceLaneTable(100_000, 300, Clock())
    for index in range(4000):
        table.remember(b"%05d" % index + b"x" * 16_000, b"canary")
    assert (len(table), table.size_bytes, table.counters.rejected_long_ids) == (0, 0, 4000)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        pytest.param(PARENT_1, True, id="version_00_sampled"),
        pytest.param(PARENT_2, True, id="version_00_not_sampled"),
        pytest.param(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later", True,
                     id="a_later_version_may_add_fields"),
        pytest.param(PARENT_1 + b"-later", False, id="version_00_has_exactly_four_fields"),
        pytest.param(PARENT_1.upper(), False, id="uppercase_hex"),
        pytest.param(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False, id="version_ff"),
        pytest.param(b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", False, id="all_zero_trace_id"),
        pytest.param(b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01", False, id="all_zero_parent_id"),
        pytest.param(b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False, id="short_trace_id"),
        pytest.param(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01", False, id="short_parent_id"),
        pytest.param(b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", False, id="non_hex_trace_id"),
        pytest.param(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", False, id="one_digit_flags"),
        pytest.param(b"00-4bf92f3577b34da6a3ce929d0e0e4736-01", False, id="too_few_fields"),
        pytest.param(b"10002", False, id="not_a_traceparent"),
        pytest.param(b"", False, id="empty"),
    ],
)
def test_a_valid_traceparent_follows_the_w3c_rules(value, valid):
    assert valid_traceparent(value) is valid
