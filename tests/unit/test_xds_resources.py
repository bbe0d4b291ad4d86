"""xds.resources: a RouteTable as the Clusters, ClusterLoadAssignments and SwimLaneGroups of the xDS contract.

Tables are built from Kubernetes-shaped objects by the real build (and changed by the real incremental
path), then encoded; every resource is decoded back from the bytes the server would send.
"""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format, struct_pb2

from laneproxy.core.build import ConfigDocument, build
from laneproxy.xds.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    GROUP_TYPE,
    HTTP_PROTOCOL_OPTIONS,
    EncodedResource,
    ResourceEncoder,
    diff,
    encode_table,
)

from .test_incremental import World, group, lane, lane_endpoints, pod, service

FQDN = "{}.default.svc.cluster.local"


def bodies() -> list[dict]:
    multi = service("mocka", (("http", 8000), ("grpc", 9000)), cluster_ip="10.96.0.10")
    multi["spec"]["selector"] = {"app": "mocka"}
    lone = service("other", (("tcp-db", 5432),))  # in no group: whole-service cluster only
    lone_pod = pod("other-0", "other", "base", "10.2.0.1", True)
    lone_pod["spec"]["containers"][0]["ports"][0]["containerPort"] = 5432
    canary_lane = lane("canary")
    canary_lane["metadata"]["annotations"] = {"laneproxy.dev/fallback-chain": "base",
                                              "kubectl.kubernetes.io/last-applied-configuration": "{...}"}
    canary_lane["metadata"]["resourceVersion"] = "4711"
    return [group(("mocka", "mockb")), lane("base"), canary_lane,
            multi, service("mockb", (("http-web", 8000),)), lone,
            pod("mocka-0", "mocka", "base", "10.1.0.1", True), pod("mocka-1", "mocka", "canary", "10.1.0.2", True),
            pod("mocka-2", "mocka", "canary", "10.1.0.3", False),  # not ready: in no assignment
            pod("mockb-0", "mockb", "base", "10.1.1.1", True), lone_pod,
            lane_endpoints((("legacy", "base", "10.3.0.1:8000"),), "http1")]


def table_of(items: list[dict]):
    return build([ConfigDocument(f"kubernetes:{b['kind']}/{(b.get('metadata') or {}).get('name')}", b)
                  for b in items], version="v1").table


def decoded(resource: EncodedResource, message_type):
    entry = resource.resource()
    assert entry.name == resource.name and entry.version == resource.version
    assert entry.resource.type_url == resource.type_url
    return message_type.FromString(entry.resource.value)


def endpoints_of(resource: EncodedResource) -> list[tuple[str, int, dict]]:
    assignment = decoded(resource, endpoint_pb2.ClusterLoadAssignment)
    assert assignment.cluster_name == resource.name and len(assignment.endpoints) == 1
    return [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value,
             json_format.MessageToDict(e.metadata.filter_metadata["laneproxy"])["labels"])
            for e in assignment.endpoints[0].lb_endpoints]


def test_every_service_port_gets_a_whole_service_cluster_and_one_per_lane_of_its_group() -> None:
    resources = encode_table(table_of(bodies()))
    expected = {f"outbound|{port}|{lane_name}|{FQDN.format(name)}"
                for name, ports in (("mocka", (8000, 9000)), ("mockb", (8000,)))
                for port in ports for lane_name in ("", "base", "canary")}
    expected |= {f"outbound|5432||{FQDN.format('other')}", f"outbound|8000||{FQDN.format('legacy')}"}
    assert set(resources.by_type[CLUSTER_TYPE]) == expected
    assert set(resources.by_type[ENDPOINT_TYPE]) == expected
    assert set(resources.by_type[GROUP_TYPE]) == {"g"}


@pytest.mark.parametrize("name, addresses", [
    ("outbound|8000||mocka", [("10.1.0.1", 8080), ("10.1.0.2", 8080)]),
    ("outbound|8000|base|mocka", [("10.1.0.1", 8080)]),
    ("outbound|8000|canary|mocka", [("10.1.0.2", 8080)]),
    ("outbound|9000|canary|mocka", [("10.1.0.2", 9001)]),  # the second port's targetPort is port + 1
    ("outbound|8000|canary|mockb", []),  # the lane has no mockb: empty, never base's endpoints
    ("outbound|5432||other", [("10.2.0.1", 5432)]),
])
def test_each_assignment_holds_exactly_the_ready_endpoints_of_its_cluster(name, addresses) -> None:
    resources = encode_table(table_of(bodies()))
    short, _, service_name = name.rpartition("|")
    found = endpoints_of(resources.by_type[ENDPOINT_TYPE][f"{short}|{FQDN.format(service_name)}"])
    assert [(host, port) for host, port, _ in found] == addresses


def test_an_endpoint_carries_its_pod_labels_for_lane_selectors() -> None:
    resources = encode_table(table_of(bodies()))
    [(_, _, labels)] = endpoints_of(resources.by_type[ENDPOINT_TYPE][f"outbound|8000|canary|{FQDN.format('mocka')}"])
    assert labels == {"app": "mocka", "ASM_TRAFFIC_TAG": "canary"}


@pytest.mark.parametrize("name, protocol, service_meta, lane_name", [
    ("outbound|8000|canary|mocka", "auto",
     {"namespace": "default", "name": "mocka", "port": 8000, "port_name": "http", "protocol": "auto",
      "cluster_ip": "10.96.0.10", "external_name": None, "first_port": True}, "canary"),
    ("outbound|9000||mocka", "http2",
     {"namespace": "default", "name": "mocka", "port": 9000, "port_name": "grpc", "protocol": "http2",
      "cluster_ip": "10.96.0.10", "external_name": None, "first_port": False}, ""),
    ("outbound|8000|base|mockb", "auto",
     {"namespace": "default", "name": "mockb", "port": 8000, "port_name": "http-web", "protocol": "auto",
      "cluster_ip": None, "external_name": None, "first_port": True}, "base"),
    ("outbound|8000||legacy", "http1",  # a LaneEndpoints file that says http1
     {"namespace": "default", "name": "legacy", "port": 8000, "port_name": "", "protocol": "http1",
      "cluster_ip": None, "external_name": None, "first_port": True}, ""),
])
def test_a_cluster_is_an_eds_cluster_over_ads_with_istio_and_laneproxy_metadata(name, protocol, service_meta,
                                                                                 lane_name) -> None:
    resources = encode_table(table_of(bodies()))
    short, _, service_name = name.rpartition("|")
    full = f"{short}|{FQDN.format(service_name)}"
    cluster = decoded(resources.by_type[CLUSTER_TYPE][full], cluster_pb2.Cluster)
    assert cluster.name == full and cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.service_name == full
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.connect_timeout.seconds == 10 and cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
    chosen = {"http2": options.explicit_http_config.HasField("http2_protocol_options"),
              "http1": options.explicit_http_config.HasField("http_protocol_options"),
              "auto": options.HasField("use_downstream_protocol_config")}
    assert [key for key, on in chosen.items() if on] == [protocol]
    istio = json_format.MessageToDict(cluster.metadata.filter_metadata["istio"])
    expected_istio = {"services": [{"host": FQDN.format(service_name), "name": service_name, "namespace": "default"}],
                      "default_original_port": float(service_meta["port"])}
    if lane_name:
        expected_istio["subset"] = lane_name
    assert istio == expected_istio
    laneproxy = json_format.MessageToDict(cluster.metadata.filter_metadata["laneproxy"])
    assert laneproxy == {"service": {**service_meta, "port": float(service_meta["port"])}, "lane": lane_name,
                         "group": "" if service_name == "legacy" else "g"}


def test_a_swimlane_group_holds_the_group_and_its_lanes_as_read_less_what_changes_with_every_write() -> None:
    items = bodies()
    resources = encode_table(table_of(items))
    value = struct_pb2.Struct.FromString(resources.by_type[GROUP_TYPE]["g"].resource().resource.value)
    served = json_format.MessageToDict(value)
    assert served["group"] == {"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLaneGroup",
                               "metadata": {"name": "g"}, "spec": items[0]["spec"]}
    assert [entry["metadata"]["name"] for entry in served["lanes"]] == ["base", "canary"]
    canary = served["lanes"][1]
    assert canary["metadata"] == {"name": "canary", "labels": {"swimlane-group": "g"},
                                  "annotations": {"laneproxy.dev/fallback-chain": "base"}}
    assert canary["spec"] == items[2]["spec"]


def test_versions_are_content_hashes_equal_on_every_replica_and_new_only_where_content_changed() -> None:
    first, second = encode_table(table_of(bodies())), encode_table(table_of(bodies()))
    for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, GROUP_TYPE):
        assert {n: r.version for n, r in first.by_type[type_url].items()} == \
               {n: r.version for n, r in second.by_type[type_url].items()}
        assert {n: r.chunk for n, r in first.by_type[type_url].items()} == \
               {n: r.chunk for n, r in second.by_type[type_url].items()}
    items = bodies()
    items[7] = pod("mocka-1", "mocka", "canary", "10.1.0.9", True)  # the canary pod moved
    changes = diff(first, encode_table(table_of(items)))
    assert set(changes) == {ENDPOINT_TYPE}
    assert changes[ENDPOINT_TYPE].changed == {f"outbound|{port}|{lane_name}|{FQDN.format('mocka')}"
                                              for port in (8000, 9000) for lane_name in ("", "canary")}
    assert not changes[ENDPOINT_TYPE].removed


def test_a_removed_service_and_lane_are_removed_resources() -> None:
    first = encode_table(table_of(bodies()))
    items = [b for b in bodies() if (b.get("metadata") or {}).get("name") not in ("other", "other-0", "canary")]
    changes = diff(first, encode_table(table_of(items)))
    gone = {f"outbound|5432||{FQDN.format('other')}"} | {
        f"outbound|{port}|canary|{FQDN.format(name)}" for name, port in (("mocka", 8000), ("mocka", 9000),
                                                                        ("mockb", 8000))}
    assert changes[CLUSTER_TYPE].removed == gone and changes[ENDPOINT_TYPE].removed == gone
    assert changes[GROUP_TYPE].changed == {"g"}  # the group lost a lane


def test_the_encoder_reencodes_only_the_services_an_incremental_update_replaced() -> None:
    names = [f"svc{n:03d}" for n in range(50)]
    items = [group(tuple(names)), lane("base"), lane("canary")]
    for index, name in enumerate(names):
        items += [service(name, (("http", 8000),)), pod(f"{name}-0", name, "base", f"10.1.0.{index + 1}", True)]
    world = World(items)
    encoder = ResourceEncoder()
    before = encoder.encode(world.served.table)
    world.change(pod("svc007-1", "svc007", "canary", "10.9.0.1", True), "kubernetes:Pod/default/svc007-1")
    assert world.applied == 1  # the incremental path, sharing every other service's objects
    after = encoder.encode(world.served.table)
    fresh = {(type_url, name) for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, GROUP_TYPE)
             for name, resource in after.by_type[type_url].items()
             if before.get(type_url, name) is not resource}
    assert fresh == {(type_url, f"outbound|8000|{lane_name}|{FQDN.format('svc007')}")
                     for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE) for lane_name in ("", "base", "canary")}
    changes = diff(before, after)
    assert set(changes) == {ENDPOINT_TYPE}
    assert changes[ENDPOINT_TYPE].changed == {f"outbound|8000|{lane_name}|{FQDN.format('svc007')}"
                                              for lane_name in ("", "canary")}


def test_an_external_name_service_is_a_strict_dns_cluster_holding_its_name_and_still_has_an_assignment() -> None:
    external = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "db.example.internal", "ports": [{"port": 5432}]}}
    resources = encode_table(table_of([*bodies(), external]))
    name = f"outbound|5432||{FQDN.format('db')}"
    cluster = decoded(resources.by_type[CLUSTER_TYPE][name], cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS and not cluster.HasField("eds_cluster_config")
    inline = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (inline.address, inline.port_value) == ("db.example.internal", 5432)
    assert [(host, port) for host, port, _ in endpoints_of(resources.by_type[ENDPOINT_TYPE][name])] == \
        [("db.example.internal", 5432)]
    others = decoded(resources.by_type[CLUSTER_TYPE][f"outbound|8000||{FQDN.format('mocka')}"], cluster_pb2.Cluster)
    assert others.type == cluster_pb2.Cluster.EDS
