"""Configuration validation: every problem as `source: path.to.field: reason`, all of them at once."""

from __future__ import annotations

import pytest

from laneproxy.core.build import ConfigDocument, build_table, parse_yaml
from laneproxy.core.errors import ConfigInvalidError, ConfigProblem

from .manifests import DELETE, ENDPOINTS, SWIMLANES, documents, edit, problems, seed_bodies, seed_text

GROUP = "config/swimlanes.yaml: ASMSwimLaneGroup(rollout)"
PMC = f"{GROUP}.spec.permissiveModeConfiguration"
STRATEGY = f"{GROUP}.spec.ingress.ingressRouting.ingressRoutingStrategy"
CANARY = "config/swimlanes.yaml: ASMSwimLane(canary)"
RULE = f"{CANARY}.spec.ingressRules[0]"
MOCKA = "config/endpoints.example.yaml: LaneEndpoints.services.default/mocka"

WEIGHTED = ("group", "spec.ingress.ingressRouting.ingressRoutingStrategy", "weighted")
OTHER_GROUP = {
    "apiVersion": "istio.alibabacloud.com/v1",
    "kind": "ASMSwimLaneGroup",
    "metadata": {"name": "other"},
    "spec": {"services": [{"name": "mocka", "namespace": "default"}]},
}


def problems_after(edits) -> list[str]:
    """Apply (role, dotted path, value) edits to the seed documents; a None path replaces the whole document."""
    bodies = seed_bodies()
    for role, path, value in edits:
        if path is None:
            bodies[role] = value
        else:
            edit(bodies[role], path, value)
    return problems(documents(bodies))


def test_the_seed_manifests_have_no_problems():
    assert problems_after([]) == []


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        # permissive mode configuration
        pytest.param([("group", "spec.permissiveModeConfiguration.fallbackTarget", "gold")],
                     [f"{PMC}.fallbackTarget: unknown lane 'gold' (lanes: base, canary)"],
                     id="fallback_target_names_an_unknown_lane"),
        pytest.param([("group", "spec.permissiveModeConfiguration.serviceLevelFallbackTarget", {"default/mockb": "gold"})],
                     [f"{PMC}.serviceLevelFallbackTarget.default/mockb: unknown lane 'gold' (lanes: base, canary)"],
                     id="service_level_fallback_target_names_an_unknown_lane"),
        pytest.param([("group", "spec.permissiveModeConfiguration.serviceLevelFallbackTarget", {"mockb": "canary"})],
                     [f"{PMC}.serviceLevelFallbackTarget.mockb: keys are namespace/name"],
                     id="service_level_fallback_target_key_without_namespace"),
        pytest.param([("group", "spec.permissiveModeConfiguration.serviceLevelFallbackTarget", {"default/mockd": "canary"})],
                     [f"{PMC}.serviceLevelFallbackTarget.default/mockd: not a service of this group"],
                     id="service_level_fallback_target_for_a_service_outside_the_group"),
        pytest.param([("group", "spec.permissiveModeConfiguration.serviceLevelFallbackTarget", "canary")],
                     [f"{PMC}.serviceLevelFallbackTarget: expected a mapping of strings to strings"],
                     id="service_level_fallback_target_is_not_a_mapping"),
        pytest.param([("group", "spec.permissiveModeConfiguration.routeHeader", DELETE)],
                     [f"{PMC}.routeHeader: required"],
                     id="permissive_mode_without_route_header"),
        pytest.param([("group", "spec.permissiveModeConfiguration.fallbackTarget", DELETE)],
                     [f"{PMC}.fallbackTarget: required"],
                     id="permissive_mode_without_fallback_target"),
        pytest.param([("group", "spec.permissiveModeConfiguration.routeHeader", "x asm tag")],
                     [f"{PMC}.routeHeader: not a valid header name"],
                     id="route_header_is_not_a_header_name"),
        pytest.param([("group", "spec.permissiveModeConfiguration.traceHeader", "my:request")],
                     [f"{PMC}.traceHeader: not a valid header name"],
                     id="trace_header_is_not_a_header_name"),
        pytest.param([("group", "spec.isPermissive", False), ("group", "spec.permissiveModeConfiguration", DELETE)],
                     [],
                     id="strict_mode_needs_no_route_header_or_fallback_target"),
        pytest.param([("group", "spec.isPermissive", "yes")],
                     [f"{GROUP}.spec.isPermissive: expected true or false, got 'yes'"],
                     id="is_permissive_is_not_a_boolean"),
        pytest.param([("group", "spec.services.0.name", DELETE)],
                     [f"{GROUP}.spec.services[0].name: required"],
                     id="group_service_without_a_name"),
        pytest.param([("other", None, OTHER_GROUP)],
                     ["other.yaml: ASMSwimLaneGroup(other).spec.services: default/mocka already belongs to group 'rollout'"],
                     id="a_service_in_two_groups"),
        # match expressions
        pytest.param([("canary", "spec.ingressRules.0.match.uri", {"regex": "("})],
                     [f"{RULE}.match.uri.regex: invalid regular expression '(': missing ), unterminated subpattern at position 0"],
                     id="bad_uri_regex"),
        pytest.param([("canary", "spec.ingressRules.0.match.headers.x-asm-prefer-tag", {"regex": "[a-"})],
                     [f"{RULE}.match.headers.x-asm-prefer-tag.regex: invalid regular expression '[a-': "
                      "unterminated character set at position 0"],
                     id="bad_header_regex"),
        pytest.param([("canary", "spec.ingressRules.0.match.uri", {"exact": "/mock", "prefix": "/m"})],
                     [f"{RULE}.match.uri: exactly one of exact, prefix or regex is required"],
                     id="exact_and_prefix_in_one_string_match"),
        pytest.param([("canary", "spec.ingressRules.0.match.headers.x-asm-prefer-tag", {"suffix": "ary"})],
                     [f"{RULE}.match.headers.x-asm-prefer-tag.suffix: unknown field (known: exact, prefix, regex)",
                      f"{RULE}.match.headers.x-asm-prefer-tag: exactly one of exact, prefix or regex is required"],
                     id="unknown_match_type"),
        pytest.param([("canary", "spec.ingressRules.0.match.uri", {"exact": 7})],
                     [f"{RULE}.match.uri.exact: expected a string"],
                     id="match_value_is_not_a_string"),
        pytest.param([("canary", "spec.ingressRules.0.match.headers", {"bad header": {"exact": "x"}})],
                     [f"{RULE}.match.headers.bad header: not a valid header name"],
                     id="header_match_on_an_invalid_header_name"),
        # api versions and kinds
        pytest.param([("canary", "apiVersion", "istio.alibabacloud.com/v1beta1")],
                     ["config/swimlanes.yaml: ASMSwimLane.apiVersion: expected istio.alibabacloud.com/v1, "
                      "got 'istio.alibabacloud.com/v1beta1'"],
                     id="lane_with_wrong_api_version"),
        pytest.param([("endpoints", "apiVersion", "v1")],
                     ["config/endpoints.example.yaml: LaneEndpoints.apiVersion: expected laneproxy.dev/v1, got 'v1'"],
                     id="endpoints_with_wrong_api_version"),
        # lanes
        pytest.param([("canary", "metadata.labels.swimlane-group", "rolout")],
                     [f"{CANARY}.metadata.labels.swimlane-group: no ASMSwimLaneGroup named 'rolout'"],
                     id="lane_label_names_no_group"),
        pytest.param([("canary", "metadata.labels", {})],
                     [f"{CANARY}.metadata.labels.swimlane-group: required: names the ASMSwimLaneGroup this lane belongs to"],
                     id="lane_without_group_label"),
        pytest.param([("canary", "metadata.name", DELETE)],
                     ["config/swimlanes.yaml: ASMSwimLane.metadata.name: required"],
                     id="lane_without_a_name"),
        pytest.param([("canary", "metadata.name", "canary!")],
                     ["config/swimlanes.yaml: ASMSwimLane(canary!).metadata.name: "
                      "a lane name must be 1-63 letters, digits, '-', '_' or '.'"],
                     id="lane_name_that_cannot_be_a_header_value"),
        pytest.param([("canary", "metadata.name", "base")],
                     ["config/swimlanes.yaml: ASMSwimLane(base).metadata.name: duplicate lane name"],
                     id="two_lanes_with_one_name"),
        pytest.param([("canary", "spec.labelSelector", DELETE)],
                     [f"{CANARY}.spec.labelSelector: required: a lane without a label selector would take every pod"],
                     id="lane_without_label_selector"),
        pytest.param([("canary", "spec.ingressRules", {"name": "canary"})],
                     [f"{CANARY}.spec.ingressRules: expected a list"],
                     id="ingress_rules_is_not_a_list"),
        pytest.param([("canary", "spec.ingressRules.0.hosts", ["gw.example.com", 8080])],
                     [f"{RULE}.hosts[1]: expected a host name, got 8080"],
                     id="rule_host_is_not_a_string"),
        pytest.param([("group", "spec.ingress.ingressRouting.weightedRoutingRule.hosts", [""])],
                     [f"{GROUP}.spec.ingress.ingressRouting.weightedRoutingRule.hosts[0]: expected a host name, got ''"],
                     id="weighted_host_is_empty"),
        pytest.param([("canary", "spec.ingressRules.0.route.destination.host", "mockd.default.svc.cluster.local")],
                     [f"{RULE}.route.destination.host: 'mockd.default.svc.cluster.local' is not a service of group 'rollout'"],
                     id="rule_destination_is_not_a_service_of_the_group"),
        pytest.param([("canary", "spec.ingressRules.0.route.destination.host", "mocka.prod")],
                     [f"{RULE}.route.destination.host: 'mocka.prod' is not a service of group 'rollout'"],
                     id="rule_destination_in_another_namespace"),
        pytest.param([("canary", "spec.ingressRules.0.route.destination", {})],
                     [f"{RULE}.route.destination.host: required"],
                     id="rule_without_destination_host"),
        # ingress strategy and weights
        pytest.param([WEIGHTED],
                     [f"{STRATEGY}: weighted routing needs at least one lane with ingressWeight.weight > 0"],
                     id="weighted_group_with_no_weights"),
        pytest.param([("group", "spec.ingress.ingressRouting.ingressRoutingStrategy", "random")],
                     [f"{STRATEGY}: unknown strategy 'random' (use rule_based or weighted)"],
                     id="unknown_ingress_strategy"),
        pytest.param([WEIGHTED, ("canary", "spec.ingressRules", []), ("canary", "spec.ingressWeight", {"weight": 10})],
                     [f"{CANARY}.spec.ingressWeight.destination.host: required for a weighted lane (or give the lane an ingress rule)"],
                     id="weighted_lane_with_nowhere_to_go"),
        pytest.param([("canary", "spec.ingressWeight", {"weight": -1})],
                     [f"{CANARY}.spec.ingressWeight.weight: expected an integer from 0 to 1000000, got -1"],
                     id="negative_weight"),
        pytest.param([("canary", "spec.ingressWeight", {"weight": 10, "destination": {"host": "mockd"}})],
                     [f"{CANARY}.spec.ingressWeight.destination.host: 'mockd' is not a service of group 'rollout'"],
                     id="weight_destination_is_not_a_service_of_the_group"),
        # local endpoints
        pytest.param([("endpoints", "services.default/mocka.lanes.canary", ["127.0.0.1"])],
                     [f"{MOCKA}.lanes.canary[0]: expected host:port, got '127.0.0.1'"],
                     id="endpoint_address_without_port"),
        pytest.param([("endpoints", "services.default/mocka.lanes.canary", ["127.0.0.1:16004", "127.0.0.1:70000"])],
                     [f"{MOCKA}.lanes.canary[1]: expected host:port with a port from 1 to 65535, got '127.0.0.1:70000'"],
                     id="endpoint_port_out_of_range"),
        pytest.param([("endpoints", "services.default/mocka.lanes.canary", ["localhost:http"])],
                     [f"{MOCKA}.lanes.canary[0]: expected host:port with a port from 1 to 65535, got 'localhost:http'"],
                     id="endpoint_port_is_a_name"),
        pytest.param([("endpoints", "services.default/mocka.lanes.canary", [16004])],
                     [f"{MOCKA}.lanes.canary[0]: expected host:port, got 16004"],
                     id="endpoint_address_is_a_number"),
        pytest.param([("endpoints", "services.default/mocka.lanes.canary", "127.0.0.1:16004")],
                     [f"{MOCKA}.lanes.canary: expected a list of host:port"],
                     id="lane_endpoints_are_not_a_list"),
        pytest.param([("endpoints", "services.default/mocka.port", 0)],
                     [f"{MOCKA}.port: expected an integer from 1 to 65535, got 0"],
                     id="service_port_zero"),
        pytest.param([("endpoints", "services.default/mocka.port", True)],
                     [f"{MOCKA}.port: expected an integer from 1 to 65535, got True"],
                     id="service_port_is_a_boolean"),
        pytest.param([("endpoints", "services", DELETE)],
                     ["config/endpoints.example.yaml: LaneEndpoints.services: required: a mapping of namespace/name to {port, lanes}"],
                     id="endpoints_without_services"),
    ],
)
def test_each_config_problem_names_source_field_path_and_reason(edits, expected):
    assert problems_after(edits) == expected


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        pytest.param(
            [("group", "spec.permissiveModeConfiguration.fallbackTarget", "gold"),
             ("canary", "spec.ingressRules.0.match.uri", {"regex": "("})],
            [f"{RULE}.match.uri.regex: invalid regular expression '(': missing ), unterminated subpattern at position 0",
             f"{PMC}.fallbackTarget: unknown lane 'gold' (lanes: base, canary)"],
            id="two_errors_in_one_file"),
        pytest.param(
            [("canary", "metadata.labels.swimlane-group", "rolout"),
             ("endpoints", "services.default/mockb.lanes.base", ["nowhere"]),
             ("endpoints", "services.default/mockc.port", 65536)],
            ["config/endpoints.example.yaml: LaneEndpoints.services.default/mockb.lanes.base[0]: expected host:port, got 'nowhere'",
             "config/endpoints.example.yaml: LaneEndpoints.services.default/mockc.port: "
             "expected an integer from 1 to 65535, got 65536",
             f"{CANARY}.metadata.labels.swimlane-group: no ASMSwimLaneGroup named 'rolout'"],
            id="errors_in_two_files"),
        pytest.param(
            [("group", "spec.permissiveModeConfiguration.routeHeader", DELETE),
             ("group", "spec.permissiveModeConfiguration.fallbackTarget", DELETE)],
            [f"{PMC}.routeHeader: required", f"{PMC}.fallbackTarget: required"],
            id="two_missing_fields_of_one_mapping"),
    ],
)
def test_all_problems_are_reported_at_once(edits, expected):
    assert problems_after(edits) == expected


def test_config_invalid_error_carries_every_problem_and_prints_one_per_line():
    bodies = seed_bodies()
    edit(bodies["group"], "spec.permissiveModeConfiguration.fallbackTarget", "gold")
    edit(bodies["canary"], "spec.ingressRules.0.match.uri", {"exact": "/mock", "prefix": "/"})
    with pytest.raises(ConfigInvalidError) as caught:
        build_table(documents(bodies), version="x")
    assert caught.value.problems == (
        ConfigProblem("config/swimlanes.yaml", "ASMSwimLane(canary).spec.ingressRules[0].match.uri",
                      "exactly one of exact, prefix or regex is required"),
        ConfigProblem("config/swimlanes.yaml", "ASMSwimLaneGroup(rollout).spec.permissiveModeConfiguration.fallbackTarget",
                      "unknown lane 'gold' (lanes: base, canary)"),
    )
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)


@pytest.mark.parametrize(
    ("source", "text", "expected"),
    [
        pytest.param("broken.yaml", "a: [1, 2\nb: 3\n",
                     ["broken.yaml: line 2 column 2: malformed YAML: did not find expected ',' or ']'"],
                     id="unclosed_flow_sequence"),
        pytest.param("/etc/laneproxy/lanes.yaml", "apiVersion: v1\nkind: Service\n  bad: indent\n",
                     ["/etc/laneproxy/lanes.yaml: line 3 column 6: malformed YAML: mapping values are not allowed in this context"],
                     id="bad_indentation"),
        pytest.param("list.yaml", "- a\n- b\n",
                     ["list.yaml: document[0]: expected a mapping with apiVersion and kind"],
                     id="a_document_that_is_a_list"),
        pytest.param("many.yaml", "a: 1\n---\n- b\n---\nscalar\n",
                     ["many.yaml: document[1]: expected a mapping with apiVersion and kind",
                      "many.yaml: document[2]: expected a mapping with apiVersion and kind"],
                     id="every_bad_document_is_reported"),
    ],
)
def test_malformed_yaml_names_the_file_and_line(source, text, expected):
    """The reasons are libyaml's: PyYAML's wheels ship it, and laneproxy parses with CSafeLoader when present."""
    with pytest.raises(ConfigInvalidError) as caught:
        parse_yaml(source, text)
    assert [str(p) for p in caught.value.problems] == expected


def test_empty_documents_are_skipped():
    assert parse_yaml("empty.yaml", "---\n---\n# nothing\n") == []


@pytest.mark.parametrize(
    ("source", "replace", "by", "expected"),
    [
        pytest.param("/srv/lanes/swimlanes.yaml", "fallbackTarget: base", "fallbackTarget: gold",
                     "/srv/lanes/swimlanes.yaml: ASMSwimLaneGroup(rollout).spec.permissiveModeConfiguration.fallbackTarget: "
                     "unknown lane 'gold' (lanes: base, canary)",
                     id="absolute_path"),
        pytest.param("kubernetes:ASMSwimLane/canary", "exact: canary", "regex: '*canary'",
                     "kubernetes:ASMSwimLane/canary: ASMSwimLane(canary).spec.ingressRules[0].match.headers.x-asm-prefer-tag"
                     ".regex: invalid regular expression '*canary': nothing to repeat at position 0",
                     id="kubernetes_object"),
    ],
)
def test_problems_name_the_source_they_were_given(source, replace, by, expected):
    text = seed_text(SWIMLANES)
    assert text.count(replace) == 1
    docs = parse_yaml(source, text.replace(replace, by)) + parse_yaml(ENDPOINTS, seed_text(ENDPOINTS))
    assert problems(docs) == [expected]


def test_unknown_kinds_in_a_file_are_not_validated():
    docs = [ConfigDocument("mixed.yaml", {"apiVersion": "apps/v1", "kind": "Deployment", "spec": "anything"}),
            ConfigDocument("mixed.yaml", {"kind": "Gateway"}),
            ConfigDocument("mixed.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "data": ["x"]})]
    assert problems(docs) == []


def _service_and_pod(service_port=None, pod=None):
    port = {"port": 8000, "targetPort": "web"} if service_port is None else service_port
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "mocka"},
               "spec": {"selector": {"app": "mocka"}, "ports": [port]}}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mocka-v1", "labels": {"app": "mocka"}},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "web", "containerPort": 8080}]}]},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    for path, value in (pod or {}).items():
        edit(body, path, value)
    return [ConfigDocument("kube.yaml", service), ConfigDocument("kube.yaml", body)]


@pytest.mark.parametrize(
    ("service_port", "pod", "expected"),
    [
        pytest.param(None, None, [], id="a_well_formed_pair"),
        pytest.param(None, {"status.conditions": ["Ready"]}, ["kube.yaml: Pod.status.conditions[0]: expected a mapping"],
                     id="condition_is_not_a_mapping"),
        pytest.param(None, {"spec.containers.0.ports.0.containerPort": "http"},
                     ["kube.yaml: Pod.spec.containers[0].ports[0].containerPort: expected an integer from 1 to 65535, got 'http'"],
                     id="container_port_is_not_a_number"),
        pytest.param(None, {"metadata.labels": ["app"]},
                     ["kube.yaml: Pod.metadata.labels: expected a mapping of strings to strings"],
                     id="pod_labels_are_not_a_mapping"),
        pytest.param(None, {"spec.containers": "app"}, ["kube.yaml: Pod.spec.containers: expected a list"],
                     id="containers_are_not_a_list"),
        pytest.param(None, {"status.podIP": 167772161}, ["kube.yaml: Pod.status.podIP: expected a string, got int"],
                     id="pod_ip_is_not_a_string"),
        pytest.param({"port": 8000, "targetPort": [8080]}, None,
                     ["kube.yaml: Service.spec.ports[0].targetPort: expected a port number from 1 to 65535 or a port name, "
                      "got [8080]"],
                     id="target_port_is_a_list"),
        pytest.param({"port": 8000, "targetPort": 0}, None,
                     ["kube.yaml: Service.spec.ports[0].targetPort: expected a port number from 1 to 65535 or a port name, got 0"],
                     id="target_port_zero"),
    ],
)
def test_malformed_kubernetes_objects_are_problems_not_crashes(service_port, pod, expected):
    assert problems(_service_and_pod(service_port, pod)) == expected


def test_an_address_listed_in_two_lanes_of_one_service_is_ambiguous_and_refused():
    text = (
        "apiVersion: laneproxy.dev/v1\nkind: LaneEndpoints\nservices:\n  default/mockc:\n"
        "    lanes:\n      base: [127.0.0.1:9001]\n      canary: [127.0.0.1:9001]\n"
    )
    with pytest.raises(ConfigInvalidError) as caught:
        build_table(parse_yaml("endpoints.yaml", text), version="v")
    assert [str(p) for p in caught.value.problems] == [
        "endpoints.yaml: LaneEndpoints.services.default/mockc.lanes.canary[0]: 127.0.0.1:9001 is already listed in lane 'base'"
    ]
