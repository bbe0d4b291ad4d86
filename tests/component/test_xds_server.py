"""`laneproxy controller` over the wire: a real controller process on the file source, raw delta ADS clients.

What a sidecar gets (names, endpoints, the group), what a change sends and to whom, reconnection with the
versions a client has, and bad input: an unknown client, an unknown type URL, the state-of-the-world call,
a NACK, garbage bytes and a nonce never sent each get the protocol's answer and end at most their own
stream; the controller keeps serving everyone else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from xdsrig import (
    ASSIGNMENT,
    CLUSTER,
    GROUP,
    SOTW,
    SWIMLANES,
    AdsStream,
    ControllerProcess,
    fqdn,
    names,
    node,
    wait_for,
    write_endpoints,
)

LANES = {"mocka": {"base": ["10.1.0.1:8080"], "canary": ["10.1.0.4:8080"]},
         "mockb": {"base": ["10.1.0.2:8080"]},
         "mockc": {"base": ["10.1.0.3:8080"], "canary": ["10.1.0.5:8080"]}}
ALL_CLUSTERS = {f"outbound|8000|{lane}|{fqdn(service)}" for service in LANES for lane in ("", "base", "canary")}


@pytest.fixture
def world(tmp_path):
    endpoints = write_endpoints(tmp_path / "endpoints.yaml", LANES)
    controller = ControllerProcess(SWIMLANES, endpoints).start()
    streams: list[AdsStream] = []

    def stream(**options) -> AdsStream:
        opened = AdsStream(controller.xds_port, **options)
        streams.append(opened)
        return opened

    yield controller, endpoints, stream
    for opened in streams:
        opened.close()
    controller.stop()


def addresses(response) -> dict[str, list[str]]:
    found = {}
    for resource in response.resources:
        assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.resource.value)
        found[resource.name] = [f"{e.endpoint.address.socket_address.address}:"
                                f"{e.endpoint.address.socket_address.port_value}"
                                for locality in assignment.endpoints for e in locality.lb_endpoints]
    return found


def subscribed_sidecar(stream) -> tuple[AdsStream, dict]:
    """A stream subscribed as the contract's sidecar does; its first three responses, by type, acknowledged."""
    sidecar = stream()
    sidecar.send(type_url=CLUSTER, node=node())
    clusters = sidecar.receive()
    sidecar.ack(clusters)
    sidecar.send(type_url=GROUP)
    groups = sidecar.receive()
    sidecar.ack(groups)
    sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=sorted(n for n in names(clusters) if "||" in n))
    assignments = sidecar.receive()
    sidecar.ack(assignments)
    return sidecar, {CLUSTER: clusters, GROUP: groups, ASSIGNMENT: assignments}


def test_a_sidecar_gets_every_cluster_the_whole_service_assignments_and_the_group(world) -> None:
    controller, _, stream = world
    _, first = subscribed_sidecar(stream)
    assert names(first[CLUSTER]) == ALL_CLUSTERS
    assert first[CLUSTER].type_url == CLUSTER and first[CLUSTER].system_version_info
    assert addresses(first[ASSIGNMENT]) == {
        f"outbound|8000||{fqdn('mocka')}": ["10.1.0.1:8080", "10.1.0.4:8080"],
        f"outbound|8000||{fqdn('mockb')}": ["10.1.0.2:8080"],
        f"outbound|8000||{fqdn('mockc')}": ["10.1.0.3:8080", "10.1.0.5:8080"]}
    [group] = first[GROUP].resources
    assert group.name == "rollout" and group.resource.type_url == GROUP
    served = json_format.MessageToDict(struct_pb2.Struct.FromString(group.resource.value))
    assert served["group"]["kind"] == "ASMSwimLaneGroup" and served["group"]["metadata"]["name"] == "rollout"
    assert [lane["metadata"]["name"] for lane in served["lanes"]] == ["base", "canary"]
    assert len({first[t].nonce for t in first}) == 3  # a nonce per response
    stats = controller.stats()
    assert stats["controller.xds.cluster.resources_sent"] == 9
    assert stats["controller.xds.cluster_load_assignment.resources_sent"] == 3
    assert stats["controller.xds.streams_connected"] == 1


def test_a_change_in_one_lane_sends_only_the_affected_assignments_to_the_streams_that_watch_them(world) -> None:
    controller, endpoints, stream = world
    watches_a = stream()
    watches_a.send(type_url=ASSIGNMENT, resource_names_subscribe=[f"outbound|8000|{lane}|{fqdn('mocka')}"
                                                                  for lane in ("", "base", "canary")])
    watches_a.ack(watches_a.receive())
    watches_b = stream()
    watches_b.send(type_url=CLUSTER)
    watches_b.ack(watches_b.receive())
    watches_b.send(type_url=ASSIGNMENT, resource_names_subscribe=[f"outbound|8000||{fqdn('mockb')}"])
    watches_b.ack(watches_b.receive())
    before = controller.stats()

    write_endpoints(endpoints, {**LANES, "mocka": {"base": ["10.1.0.1:8080"], "canary": ["10.1.0.9:8080"]}})
    update = watches_a.receive()
    assert update.type_url == ASSIGNMENT and not update.removed_resources
    assert addresses(update) == {f"outbound|8000||{fqdn('mocka')}": ["10.1.0.1:8080", "10.1.0.9:8080"],
                                 f"outbound|8000|canary|{fqdn('mocka')}": ["10.1.0.9:8080"]}
    watches_a.ack(update)
    after = controller.stats()
    assert after["controller.xds.cluster_load_assignment.resources_sent"] - \
        before["controller.xds.cluster_load_assignment.resources_sent"] == 2
    assert after["controller.xds.cluster_load_assignment.pushes"] - \
        before["controller.xds.cluster_load_assignment.pushes"] == 1  # to watches_a only
    assert after["controller.xds.cluster.pushes"] == before["controller.xds.cluster.pushes"]

    # watches_b was sent nothing for mocka: the next thing it gets is mockb's own change.
    write_endpoints(endpoints, {**LANES, "mocka": {"base": ["10.1.0.1:8080"], "canary": ["10.1.0.9:8080"]},
                                "mockb": {"base": ["10.1.0.2:8080", "10.1.0.6:8080"]}})
    update = watches_b.receive()
    assert addresses(update) == {f"outbound|8000||{fqdn('mockb')}": ["10.1.0.2:8080", "10.1.0.6:8080"]}


def test_a_service_that_goes_away_is_sent_as_removed(world) -> None:
    controller, endpoints, stream = world
    write_endpoints(endpoints, {**LANES, "extra": {"base": ["10.2.0.1:8080"]}})
    wait_for(lambda: controller.stats()["controller.table.tables"] == 2, "the controller's second table")
    sidecar = stream()
    sidecar.send(type_url=CLUSTER)
    first = sidecar.receive()
    assert names(first) == ALL_CLUSTERS | {f"outbound|8000||{fqdn('extra')}"}
    sidecar.ack(first)
    sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=[f"outbound|8000||{fqdn('extra')}"])
    assert addresses(sidecar.receive()) == {f"outbound|8000||{fqdn('extra')}": ["10.2.0.1:8080"]}

    write_endpoints(endpoints, LANES)
    removals = {}
    while len(removals) < 2:
        response = sidecar.receive()
        removals[response.type_url] = list(response.removed_resources)
        assert not response.resources
        sidecar.ack(response)
    assert removals == {CLUSTER: [f"outbound|8000||{fqdn('extra')}"], ASSIGNMENT: [f"outbound|8000||{fqdn('extra')}"]}


def test_a_reconnecting_client_is_sent_only_what_it_lacks_at_the_versions_it_has(world) -> None:
    _, _, stream = world
    first = stream()
    first.send(type_url=CLUSTER)
    clusters = first.receive()
    first.ack(clusters)
    versions = {resource.name: resource.version for resource in clusters.resources}
    first.close()

    stale = f"outbound|8000|canary|{fqdn('mocka')}"
    held = {**versions, stale: "an-older-version", "outbound|8000||gone.default.svc.cluster.local": "v0"}
    again = stream()
    again.send(type_url=CLUSTER, initial_resource_versions=held)
    response = again.receive()
    assert names(response) == {stale}
    assert [r.version for r in response.resources] == [versions[stale]]
    assert list(response.removed_resources) == ["outbound|8000||gone.default.svc.cluster.local"]


def test_subscribing_by_name_to_a_resource_that_does_not_exist_is_answered_with_it_removed(world) -> None:
    _, _, stream = world
    sidecar = stream()
    sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=[f"outbound|8000||{fqdn('mocka')}",
                                                                f"outbound|8000||{fqdn('nowhere')}"])
    response = sidecar.receive()
    assert names(response) == {f"outbound|8000||{fqdn('mocka')}"}
    assert list(response.removed_resources) == [f"outbound|8000||{fqdn('nowhere')}"]


def test_a_client_of_unknown_name_and_version_is_served_like_a_sidecar(world) -> None:
    _, _, stream = world
    stranger = stream()
    stranger.send(type_url=CLUSTER, node={"id": "router~1.2.3.4~x~y", "user_agent_name": "someone-else",
                                          "user_agent_version": "99.0-unheard-of"})
    assert names(stranger.receive()) == ALL_CLUSTERS


def test_a_request_for_an_unknown_type_gets_an_empty_response_of_that_type_and_is_counted(world) -> None:
    controller, _, stream = world
    asker = stream()
    unknown = "type.googleapis.com/envoy.config.listener.v3.Listener"
    asker.send(type_url=unknown, node=node())
    response = asker.receive()
    assert response.type_url == unknown and not response.resources and not response.removed_resources
    assert response.nonce
    asker.ack(response)
    asker.send(type_url=CLUSTER)
    assert names(asker.receive()) == ALL_CLUSTERS  # the stream goes on
    assert controller.stats()["controller.xds.unknown_type_requests"] == 1


def test_the_state_of_the_world_call_is_answered_unimplemented_saying_delta_is_served(world) -> None:
    controller, _, _ = world
    with grpc.insecure_channel(f"127.0.0.1:{controller.xds_port}") as channel:
        call = channel.stream_stream(SOTW, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            list(call(iter([b""]), timeout=10))
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "DeltaAggregatedResources" in raised.value.details()


def test_a_nack_is_counted_and_logged_with_its_reason_and_that_version_is_not_sent_again(world) -> None:
    controller, endpoints, stream = world
    sidecar = stream()
    sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=[f"outbound|8000||{fqdn('mocka')}"])
    rejected = sidecar.receive()
    sidecar.send(type_url=ASSIGNMENT, response_nonce=rejected.nonce, error_detail=status_pb2.Status(
        code=3, message="endpoint 10.1.0.4 is not in any lane of mine"))
    wait_for(lambda: controller.stats()["controller.xds.cluster_load_assignment.nacks"] == 1, "the NACK counted")
    wait_for(lambda: any("endpoint 10.1.0.4 is not in any lane of mine" in line for line in controller.log),
               "the NACK's reason in the controller's log")
    # The stream's next request (a subscription to mockb) gets mockb only: the NACKed version is not resent...
    sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=[f"outbound|8000||{fqdn('mockb')}"])
    response = sidecar.receive()
    assert names(response) == {f"outbound|8000||{fqdn('mockb')}"}
    sidecar.ack(response)
    # ...until the resource changes: then its new version goes out.
    write_endpoints(endpoints, {**LANES, "mocka": {"base": ["10.1.0.1:8080"]}})
    changed = sidecar.receive()
    assert addresses(changed) == {f"outbound|8000||{fqdn('mocka')}": ["10.1.0.1:8080"]}
    assert changed.resources[0].version != rejected.resources[0].version
    assert controller.stats()["controller.xds.cluster_load_assignment.nacks"] == 1


def test_garbage_bytes_end_only_that_stream_with_invalid_argument(world) -> None:
    controller, _, stream = world
    healthy = stream()
    healthy.send(type_url=CLUSTER)
    healthy.ack(healthy.receive())
    garbage = stream(raw=True)
    garbage.send(b"\xff\xff\xff\xff\x0fnot a protobuf at all")
    with pytest.raises(grpc.RpcError) as raised:
        garbage.receive()
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed DeltaDiscoveryRequest" in raised.value.details()
    assert controller.stats()["controller.xds.streams_ended_malformed"] == 1
    healthy.send(type_url=GROUP)  # the other stream, and the server, go on
    assert names(healthy.receive()) == {"rollout"}
    newcomer = stream()
    newcomer.send(type_url=GROUP)
    assert names(newcomer.receive()) == {"rollout"}


def test_an_ack_with_a_nonce_never_sent_ends_only_that_stream(world) -> None:
    controller, _, stream = world
    liar = stream()
    liar.send(type_url=CLUSTER)
    liar.receive()
    liar.send(type_url=CLUSTER, response_nonce="made-up-7")
    with pytest.raises(grpc.RpcError) as raised:
        liar.receive()
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "never sent on this stream" in raised.value.details()
    other = stream()
    other.send(type_url=CLUSTER)
    assert names(other.receive()) == ALL_CLUSTERS
    assert controller.stats()["controller.xds.streams_connected"] == 1


def controller_exit(*args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LANEPROXY_")}
    return subprocess.run([sys.executable, "-m", "laneproxy", "controller", "--xds-address", "127.0.0.1",
                           "--admin", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=30,
                          env=environment)


def test_a_controller_whose_xds_port_is_taken_exits_2_naming_it_never_sharing_the_port(tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = controller_exit("--xds-port", str(port), "--config", str(SWIMLANES))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"laneproxy controller: xDS on 127.0.0.1:{port}" in result.stderr


def test_a_controller_whose_configuration_is_rejected_exits_2_with_every_problem(tmp_path) -> None:
    broken = tmp_path / "swimlanes.yaml"
    broken.write_text(SWIMLANES.read_text().replace("fallbackTarget: base", "fallbackTarget: nowhere"))
    result = controller_exit("--xds-port", "0", "--config", str(broken))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "laneproxy controller: configuration rejected" in result.stderr
    assert "unknown lane 'nowhere'" in result.stderr


def test_a_client_moving_to_another_replica_is_sent_nothing_it_already_has(world) -> None:
    controller, endpoints, stream = world
    other = ControllerProcess(SWIMLANES, endpoints).start()  # a second replica on the same input
    try:
        versions = {}
        for type_url in (CLUSTER, GROUP):
            first = stream()
            first.send(type_url=type_url)
            versions[type_url] = {r.name: r.version for r in first.receive().resources}
            first.close()
        moved = AdsStream(other.xds_port)
        try:
            for type_url in (CLUSTER, GROUP):
                moved.send(type_url=type_url, initial_resource_versions=versions[type_url])
                response = moved.receive()
                assert response.type_url == type_url
                assert not response.resources and not response.removed_resources
            assert other.stats()["controller.xds.cluster.resources_sent"] == 0
        finally:
            moved.close()
    finally:
        other.stop()
