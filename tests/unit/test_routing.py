"""routing.py: the gateway's lane choice, rule-based and weighted, with randomness passed in."""

from __future__ import annotations

from collections import Counter

import pytest

from laneproxy.core.errors import NoRouteError
from laneproxy.core.routing import bare_host, choose_ingress

from .manifests import build, edit, endpoints_body, lane_body, rule_body, seed_bodies

TAG = "x-asm-prefer-tag"


def lane_endpoints():
    return endpoints_body({
        "default/mocka": {"base": ["10.0.1.1:8000"], "canary": ["10.0.1.2:8000"], "dev": ["10.0.1.3:8000"],
                          "blue": ["10.0.1.4:8000"]},
        "default/mockb": {"base": ["10.0.2.1:8000"], "canary": ["10.0.2.2:8000"]},
        "default/mockc": {"base": ["10.0.3.1:8000"]},
    })


def seed_ingress_table():
    return build(seed_bodies())


def rules_table(*, canary_online: bool = True, permissive: bool = True):
    """Four lanes whose rules use every kind of match; the base rule is the seed's."""
    bodies = seed_bodies()
    if not permissive:
        edit(bodies["group"], "spec.isPermissive", False)
    bodies["canary"] = lane_body("canary", rules=[
        rule_body("shop", hosts=["shop.example.com"], uri={"prefix": "/api/"}, headers={TAG: {"exact": "canary"}},
                  destination="mockb", online=canary_online),
    ])
    bodies["dev"] = lane_body("dev", rules=[
        rule_body("qa", hosts=["*.dev.example.com"], uri={"regex": "/v[0-9]+/items"}, headers={"x-user": {"prefix": "qa-"}}),
    ])
    bodies["blue"] = lane_body("blue", rules=[
        rule_body("blue", uri={"exact": "/blue"}, headers={TAG: {"regex": "blue|azure"}}),
    ])
    bodies["endpoints"] = lane_endpoints()
    return build(bodies)


def decide(table, host, path, headers, random_value=0.0):
    decision = choose_ingress(table, host, path, headers, random_value)
    route = decision.route
    return decision.lane, decision.reason, route.service, route.lane_used, [e.address for e in route.endpoints]


@pytest.mark.parametrize(
    ("host", "path", "headers", "expected"),
    [
        pytest.param("gw.example.com", "/mock", {TAG: "canary"},
                     ("canary", "rule:canary/canary", "default/mocka", "canary", ["127.0.0.1:16004"]),
                     id="canary_tag_enters_the_canary_lane"),
        pytest.param("gw.example.com", "/mock", {TAG: "base"},
                     ("base", "rule:base/base", "default/mocka", "base", ["127.0.0.1:16001"]),
                     id="base_tag_enters_the_base_lane"),
        pytest.param("gw.example.com", "/mock", {},
                     ("base", "baseline", "default/mocka", "base", ["127.0.0.1:16001"]),
                     id="no_tag_goes_to_the_baseline"),
        pytest.param("gw.example.com", "/mock", {TAG: "gold"},
                     ("base", "baseline", "default/mocka", "base", ["127.0.0.1:16001"]),
                     id="unknown_tag_goes_to_the_baseline"),
        pytest.param("gw.example.com", "/mock", {TAG: "Canary"},
                     ("base", "baseline", "default/mocka", "base", ["127.0.0.1:16001"]),
                     id="tags_are_case_sensitive"),
        pytest.param("10.1.2.3:80", "/mock", {TAG: "canary", "x-other": "1"},
                     ("canary", "rule:canary/canary", "default/mocka", "canary", ["127.0.0.1:16004"]),
                     id="extra_headers_and_any_host_match_the_star"),
    ],
)
def test_seed_gateway_puts_requests_in_their_lane_or_the_baseline(host, path, headers, expected):
    assert decide(seed_ingress_table(), host, path, headers) == expected


@pytest.mark.parametrize(
    ("host", "path", "headers"),
    [
        pytest.param("gw", "/mock/", {TAG: "canary"}, id="exact_uri_is_exact"),
        pytest.param("gw", "/other", {}, id="no_rule_matches_the_path"),
        pytest.param("gw", "/Mock", {TAG: "base"}, id="uri_match_is_case_sensitive"),
        pytest.param("gw", "", {TAG: "base"}, id="empty_path"),
    ],
)
def test_seed_request_matching_no_rule_has_no_route(host, path, headers):
    with pytest.raises(NoRouteError):
        choose_ingress(seed_ingress_table(), host, path, headers, 0.0)


@pytest.mark.parametrize(
    ("host", "path", "headers", "expected"),
    [
        pytest.param("shop.example.com", "/api/cart", {TAG: "canary"},
                     ("canary", "rule:canary/shop", "default/mockb", "canary", ["10.0.2.2:8000"]),
                     id="prefix_uri_and_exact_host"),
        pytest.param("shop.example.com", "/api/", {TAG: "canary"},
                     ("canary", "rule:canary/shop", "default/mockb", "canary", ["10.0.2.2:8000"]),
                     id="prefix_matches_itself"),
        pytest.param("shop.example.com:8080", "/api/cart", {TAG: "canary"},
                     ("canary", "rule:canary/shop", "default/mockb", "canary", ["10.0.2.2:8000"]),
                     id="host_port_is_ignored"),
        pytest.param("SHOP.Example.COM", "/api/cart", {TAG: "canary"},
                     ("canary", "rule:canary/shop", "default/mockb", "canary", ["10.0.2.2:8000"]),
                     id="host_is_case_insensitive"),
        pytest.param("shop.example.com", "/api/cart", {},
                     ("base", "baseline", "default/mockb", "base", ["10.0.2.1:8000"]),
                     id="untagged_request_of_a_lane_rule_goes_to_the_baseline_of_its_destination"),
        pytest.param("a.dev.example.com", "/v2/items", {"x-user": "qa-7"},
                     ("dev", "rule:dev/qa", "default/mocka", "dev", ["10.0.1.3:8000"]),
                     id="regex_uri_header_prefix_and_wildcard_host"),
        pytest.param("a.b.dev.example.com:443", "/v10/items", {"x-user": "qa-"},
                     ("dev", "rule:dev/qa", "default/mocka", "dev", ["10.0.1.3:8000"]),
                     id="wildcard_host_matches_any_depth_and_port"),
        pytest.param("gw", "/blue", {TAG: "azure"},
                     ("blue", "rule:blue/blue", "default/mocka", "blue", ["10.0.1.4:8000"]),
                     id="header_regex"),
        pytest.param("gw", "/blue", {TAG: "azure-2"},
                     ("base", "baseline", "default/mocka", "base", ["10.0.1.1:8000"]),
                     id="header_regex_must_match_the_whole_value"),
        pytest.param("gw", "/mock", {TAG: "base"},
                     ("base", "rule:base/base", "default/mocka", "base", ["10.0.1.1:8000"]),
                     id="the_base_rule_still_applies"),
    ],
)
def test_rule_based_ingress_matches_hosts_uris_and_headers(host, path, headers, expected):
    assert decide(rules_table(), host, path, headers) == expected


@pytest.mark.parametrize(
    ("host", "path", "headers"),
    [
        pytest.param("www.example.com", "/api/cart", {TAG: "canary"}, id="exact_host_differs"),
        pytest.param("shop.example.com.evil", "/api/cart", {TAG: "canary"}, id="exact_host_is_not_a_prefix"),
        pytest.param("shop.example.com", "/apix", {TAG: "canary"}, id="prefix_does_not_match"),
        pytest.param("dev.example.com", "/v2/items", {"x-user": "qa-7"}, id="wildcard_needs_a_subdomain"),
        pytest.param("a.dev.example.com", "/v2/items/1", {"x-user": "qa-7"}, id="regex_uri_must_match_the_whole_path"),
        pytest.param("a.dev.example.com", "/vx/items", {"x-user": "qa-7"}, id="regex_uri_does_not_match"),
        pytest.param("a.dev.example.com", "/v2/items", {"x-user": "prod-7"}, id="header_prefix_does_not_match"),
        pytest.param("a.dev.example.com", "/v2/items", {}, id="required_header_is_absent"),
    ],
)
def test_rule_based_request_matching_no_rule_has_no_route(host, path, headers):
    with pytest.raises(NoRouteError) as caught:
        choose_ingress(rules_table(), host, path, headers, 0.0)
    assert (caught.value.status, caught.value.flag) == (404, "NR")


def seed_with_offline_canary():
    bodies = seed_bodies()
    edit(bodies["canary"], "spec.ingressRules.0.online", False)
    return build(bodies)


@pytest.mark.parametrize(
    ("table", "host", "path", "headers", "expected"),
    [
        pytest.param(seed_with_offline_canary, "gw", "/mock", {TAG: "canary"},
                     ("base", "baseline", "default/mocka", "base", ["127.0.0.1:16001"]),
                     id="a_tag_whose_lane_rule_is_offline_goes_to_the_baseline"),
        pytest.param(lambda: rules_table(canary_online=False), "shop.example.com", "/api/cart", {TAG: "canary"},
                     None, id="an_offline_rule_does_not_match_at_all"),
        pytest.param(lambda: rules_table(canary_online=False), "shop.example.com", "/api/cart", {},
                     None, id="an_offline_rule_gives_no_baseline_either"),
    ],
)
def test_offline_rules_are_ignored(table, host, path, headers, expected):
    built = table()
    assert "canary" not in [rule.lane for rule in built.ingress_rules]
    if expected is None:
        with pytest.raises(NoRouteError):
            decide(built, host, path, headers)
    else:
        assert decide(built, host, path, headers) == expected


def test_strict_group_has_no_baseline_for_untagged_requests():
    table = rules_table(permissive=False)
    assert decide(table, "shop.example.com", "/api/cart", {TAG: "canary"})[:2] == ("canary", "rule:canary/shop")
    with pytest.raises(NoRouteError):
        choose_ingress(table, "shop.example.com", "/api/cart", {}, 0.0)


def weighted_table(weights, *, hosts=None, matches=None, weight_hosts=None):
    """A weighted group with one lane per (name, weight); lanes send to mocka unless weight_hosts says otherwise."""
    bodies = seed_bodies()
    routing = "spec.ingress.ingressRouting"
    edit(bodies["group"], f"{routing}.ingressRoutingStrategy", "weighted")
    if hosts is not None:
        edit(bodies["group"], f"{routing}.weightedRoutingRule.hosts", hosts)
    if matches is not None:
        edit(bodies["group"], f"{routing}.weightedRoutingRule.requestMatches", matches)
    del bodies["base"], bodies["canary"], bodies["endpoints"]
    for name, weight in weights:
        host = (weight_hosts or {}).get(name, "mocka.default.svc.cluster.local")
        bodies[name] = lane_body(name, weight=weight, weight_host=host)
    bodies["endpoints"] = lane_endpoints()
    return build(bodies)


@pytest.mark.parametrize(
    ("weights", "random_value", "lane"),
    [
        pytest.param([("base", 90), ("canary", 10)], 0.0, "base", id="90_10_at_0"),
        pytest.param([("base", 90), ("canary", 10)], 0.5, "base", id="90_10_at_0.5"),
        pytest.param([("base", 90), ("canary", 10)], 0.899, "base", id="90_10_at_0.899"),
        pytest.param([("base", 90), ("canary", 10)], 0.8999999, "base", id="90_10_just_below_the_boundary"),
        pytest.param([("base", 90), ("canary", 10)], 0.9, "canary", id="90_10_at_the_boundary"),
        pytest.param([("base", 90), ("canary", 10)], 0.95, "canary", id="90_10_at_0.95"),
        pytest.param([("base", 90), ("canary", 10)], 0.9999999, "canary", id="90_10_near_1"),
        pytest.param([("base", 1), ("canary", 1), ("dev", 2)], 0.2499, "base", id="1_1_2_first_quarter"),
        pytest.param([("base", 1), ("canary", 1), ("dev", 2)], 0.25, "canary", id="1_1_2_second_quarter"),
        pytest.param([("base", 1), ("canary", 1), ("dev", 2)], 0.4999, "canary", id="1_1_2_end_of_second_quarter"),
        pytest.param([("base", 1), ("canary", 1), ("dev", 2)], 0.5, "dev", id="1_1_2_second_half"),
        pytest.param([("base", 100), ("canary", 0)], 0.9999999, "base", id="a_zero_weight_lane_gets_nothing"),
        pytest.param([("base", 0), ("canary", 5)], 0.0, "canary", id="only_weighted_lanes_count"),
    ],
)
def test_weighted_ingress_splits_by_weight_with_the_random_value_given(weights, random_value, lane):
    decision = choose_ingress(weighted_table(weights), "gw", "/mock", {}, random_value)
    assert (decision.lane, decision.reason, decision.route.lane_used, decision.route.service) == (
        lane, "weighted", lane, "default/mocka")


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        pytest.param([("base", 90), ("canary", 10)], {"base": 900, "canary": 100}, id="90_10"),
        pytest.param([("base", 1), ("canary", 1), ("dev", 2)], {"base": 250, "canary": 250, "dev": 500}, id="1_1_2"),
        pytest.param([("base", 3), ("canary", 997)], {"base": 3, "canary": 997}, id="3_997"),
    ],
)
def test_weighted_split_over_evenly_spaced_random_values_follows_the_weights_exactly(weights, expected):
    table = weighted_table(weights)
    counts = Counter(choose_ingress(table, "gw", "/mock", {}, i / 1000).lane for i in range(1000))
    assert counts == expected


def test_weighted_ingress_ignores_the_route_header_of_the_request():
    decision = choose_ingress(weighted_table([("base", 90), ("canary", 10)]), "gw", "/mock", {TAG: "canary"}, 0.1)
    assert decision.lane == "base"


def test_weighted_lane_goes_to_its_own_destination():
    table = weighted_table([("base", 50), ("canary", 50)], weight_hosts={"canary": "mockb"})
    decision = choose_ingress(table, "gw", "/mock", {}, 0.5)
    assert (decision.lane, decision.route.service, [e.address for e in decision.route.endpoints]) == (
        "canary", "default/mockb", ["10.0.2.2:8000"])


@pytest.mark.parametrize(
    ("hosts", "matches", "host", "path", "headers", "routed"),
    [
        pytest.param(None, None, "gw", "/mock", {}, True, id="seed_rule_matches_exact_uri"),
        pytest.param(None, None, "gw", "/mock/1", {}, False, id="seed_rule_is_exact"),
        pytest.param(["*.example.com"], None, "a.example.com:80", "/mock", {}, True, id="wildcard_host_with_port"),
        pytest.param(["*.example.com"], None, "example.org", "/mock", {}, False, id="other_host"),
        pytest.param(["api.example.com"], [], "api.example.com", "/anything", {}, True,
                     id="no_request_matches_means_every_request"),
        pytest.param(None, [{"uri": {"prefix": "/a"}}, {"headers": {"x-beta": {"exact": "1"}}}], "gw", "/b",
                     {"x-beta": "1"}, True, id="any_request_match_is_enough"),
        pytest.param(None, [{"uri": {"prefix": "/a"}}, {"headers": {"x-beta": {"exact": "1"}}}], "gw", "/b",
                     {"x-beta": "0"}, False, id="no_request_match"),
        pytest.param(None, [{"uri": {"prefix": "/a"}, "headers": {"x-beta": {"regex": "1|yes"}}}], "gw", "/a/1",
                     {"x-beta": "yes"}, True, id="every_condition_of_a_match_holds"),
        pytest.param(None, [{"uri": {"prefix": "/a"}, "headers": {"x-beta": {"regex": "1|yes"}}}], "gw", "/a/1",
                     {}, False, id="one_condition_of_a_match_fails"),
    ],
)
def test_weighted_ingress_honours_hosts_and_request_matches(hosts, matches, host, path, headers, routed):
    table = weighted_table([("base", 90), ("canary", 10)], hosts=hosts, matches=matches)
    if routed:
        assert choose_ingress(table, host, path, headers, 0.95).lane == "canary"
    else:
        with pytest.raises(NoRouteError):
            choose_ingress(table, host, path, headers, 0.95)


@pytest.mark.parametrize(
    ("host", "bare"),
    [
        pytest.param("Shop.Example.com", "shop.example.com", id="lowercase"),
        pytest.param("shop.example.com:8080", "shop.example.com", id="port_removed"),
        pytest.param("[::1]:8080", "[::1]", id="ipv6_with_port"),
        pytest.param("[::1]", "[::1]", id="ipv6_without_port"),
        pytest.param("::1", "::1", id="bare_ipv6_is_kept"),
        pytest.param("", "", id="empty"),
    ],
)
def test_bare_host_drops_the_port_and_case(host, bare):
    assert bare_host(host) == bare


@pytest.mark.parametrize(
    ("pattern", "host", "lane"),
    [
        pytest.param("shop.example.com", "shop.example.com", "canary", id="exact"),
        pytest.param("shop.example.com", "shop.example.com:8080", "canary", id="exact_with_port"),
        pytest.param("Shop.Example.COM", "shop.example.com", "canary", id="exact_pattern_in_mixed_case"),
        pytest.param("*.example.com", "a.b.example.com", "canary", id="wildcard_any_depth"),
        pytest.param("*.Example.com", "A.example.COM:80", "canary", id="wildcard_pattern_in_mixed_case"),
        pytest.param("*.example.com", "example.com", "base", id="wildcard_needs_a_label_before_the_suffix"),
        pytest.param("*.example.com", "badexample.com", "base", id="wildcard_matches_whole_labels"),
        pytest.param("*", "10.0.0.1:8080", "canary", id="star_matches_anything"),
    ],
)
def test_rule_hosts_match_exactly_or_by_suffix_without_regard_to_case(pattern, host, lane):
    bodies = seed_bodies()
    edit(bodies["canary"], "spec.ingressRules.0.hosts", [pattern])
    assert choose_ingress(build(bodies), host, "/mock", {TAG: "canary"}, 0.0).lane == lane


@pytest.mark.parametrize(
    ("pattern", "host", "routed"),
    [
        pytest.param("*.Example.com", "a.example.com", True, id="wildcard_pattern_in_mixed_case"),
        pytest.param("API.example.com", "api.example.com:443", True, id="exact_pattern_in_mixed_case"),
        pytest.param("api.example.com", "www.example.com", False, id="other_host"),
    ],
)
def test_weighted_hosts_match_without_regard_to_case(pattern, host, routed):
    table = weighted_table([("base", 1)], hosts=[pattern])
    if routed:
        assert choose_ingress(table, host, "/mock", {}, 0.0).lane == "base"
    else:
        with pytest.raises(NoRouteError):
            choose_ingress(table, host, "/mock", {}, 0.0)


def test_header_names_in_rules_and_the_route_header_are_case_insensitive():
    bodies = seed_bodies()
    edit(bodies["group"], "spec.permissiveModeConfiguration.routeHeader", "X-ASM-Prefer-Tag")
    edit(bodies["canary"], "spec.ingressRules.0.match.headers", {"X-ASM-Prefer-Tag": {"exact": "canary"},
                                                                 "X-User": {"exact": "qa"}})
    table = build(bodies)
    assert decide(table, "gw", "/mock", {TAG: "canary", "x-user": "qa"})[:2] == ("canary", "rule:canary/canary")
    assert decide(table, "gw", "/mock", {TAG: "canary", "x-user": "prod"})[:2] == ("base", "baseline")
