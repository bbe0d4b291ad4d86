"""The sidecar's xDS source (control/xds.py) against faults the real controller cannot produce on demand.

`ScriptedAds` is a small delta ADS server on 127.0.0.1 (grpcio, the xds-protos messages) standing in for the
controller, for exactly that reason: it serves resources the controller's own encoder made from the seed
files (laneproxy.xds.resources), and on demand a malformed Cluster, an assignment for a cluster it never sent,
a group whose object has an invalid field, a stream it holds open without answering, or a stream it ends
mid-way. The source runs in the test's loop with a real RouteTableStore and a real gRPC channel; what the
sidecar sent back (ACKs, NACKs with their reason, subscriptions, initial versions) is read off the server.
Following the real controller end to end is tests/component/test_xds_chain.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, struct_pb2

from laneproxy.control.xds import XdsSource
from laneproxy.core.build import build, parse_yaml
from laneproxy.core.store import RouteTableStore
from laneproxy.xds.resources import encode_table

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
GROUP = "type.googleapis.com/laneproxy.v1.SwimLaneGroup"
MOCKB = "outbound|8000||mockb.default.svc.cluster.local"


def seed_resources():
    paths = [REPO / "config" / "swimlanes.yaml", REPO / "config" / "endpoints.example.yaml"]
    documents = [doc for path in paths for doc in parse_yaml(str(path), path.read_text())]
    table = build(documents, version="seed-1", namespace="default").table
    return table, encode_table(table)


class Stream:
    """One DeltaAggregatedResources call as the script sees it."""

    def __init__(self, server: ScriptedAds, context) -> None:
        self.server, self.context = server, context
        self.requests: asyncio.Queue = asyncio.Queue()
        self.responses: asyncio.Queue = asyncio.Queue()
        self.nonce = 0

    async def request(self, timeout: float = 10.0) -> discovery_pb2.DeltaDiscoveryRequest:
        return await asyncio.wait_for(self.requests.get(), timeout)

    def send(self, type_url: str, resources, *, removed=(), version: str = "seed-1") -> str:
        self.nonce += 1
        nonce = f"n{self.nonce}"
        self.responses.put_nowait(discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url, system_version_info=version, nonce=nonce, resources=list(resources),
            removed_resources=list(removed)))
        return nonce

    def end(self, code: grpc.StatusCode | None = None) -> None:
        self.responses.put_nowait(code or grpc.StatusCode.UNAVAILABLE)


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A delta ADS server whose every stream runs `script(stream)`; every request received is kept, in order."""

    def __init__(self, script: Callable[[Stream], Awaitable[None]]) -> None:
        self.script = script
        self.received: list[discovery_pb2.DeltaDiscoveryRequest] = []
        self.streams = 0
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> ScriptedAds:
        self.server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        self.streams += 1
        stream = Stream(self, context)

        async def read() -> None:
            async for request in request_iterator:
                self.received.append(request)
                stream.requests.put_nowait(request)

        reader = asyncio.ensure_future(read())
        script = asyncio.ensure_future(self.script(stream))
        try:
            while True:
                item = await stream.responses.get()
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "scripted end of stream")
                yield item
        finally:
            reader.cancel()
            script.cancel()

    def nacks(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        return [r for r in self.received if r.HasField("error_detail")]


def entries(resources, type_url: str, names=None):
    encoded = resources.by_type[type_url]
    return [encoded[name].resource() for name in (sorted(encoded) if names is None else names)]


async def serve_seed(stream: Stream, resources, *, withhold: frozenset[str] = frozenset()) -> None:
    """What a controller does: each subscription answered with what it asks for (all of a wildcard type)."""
    while True:
        request = await stream.request(timeout=3600)
        if request.response_nonce:
            continue  # an ACK or a NACK
        if request.type_url in (CLUSTER, GROUP):
            stream.send(request.type_url, entries(resources, request.type_url))
        elif request.type_url == ASSIGNMENT and request.resource_names_subscribe:
            names = [n for n in request.resource_names_subscribe if n not in withhold]
            stream.send(ASSIGNMENT, entries(resources, ASSIGNMENT, names))


def make_source(store: RouteTableStore, *ports: int, first_snapshot_timeout: float = 10.0) -> XdsSource:
    return XdsSource(tuple(f"127.0.0.1:{port}" for port in ports), store, namespace="default",
                     node="sidecar~10.1.0.7~mocka-0.default~default.svc.cluster.local",
                     first_snapshot_timeout=first_snapshot_timeout, backoff_base=0.05, backoff_max=0.5)


async def until(predicate, what: str, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def running():
    started: list = []

    async def run(script, *more_scripts, **options):
        servers = [await ScriptedAds(s).start() for s in (script, *more_scripts)]
        store = RouteTableStore()
        source = make_source(store, *(server.port for server in servers), **options)
        started.append((servers, source))
        await source.start()
        return servers, source, store

    yield run
    for servers, source in started:
        await source.stop()
        for server in servers:
            await server.stop()


async def test_the_first_full_snapshot_makes_the_store_ready_with_the_table_the_files_make(running) -> None:
    table, resources = seed_resources()
    (server,), source, store = await running(lambda stream: serve_seed(stream, resources))
    await until(lambda: store.ready, "ready")
    assert store.current.version == table.version
    assert store.current.routes["default/mocka"].route_for(b"canary").endpoints == \
        table.routes["default/mocka"].route_for(b"canary").endpoints
    first = [r for r in server.received if not r.response_nonce]
    assert first[0].node.id == "sidecar~10.1.0.7~mocka-0.default~default.svc.cluster.local"
    assert (first[0].node.user_agent_name, first[0].node.user_agent_version) == ("laneproxy", "0.1.0")
    wildcard = {r.type_url: list(r.resource_names_subscribe) for r in first if r.type_url in (CLUSTER, GROUP)}
    assert wildcard == {CLUSTER: [], GROUP: []}
    by_name = [r for r in first if r.type_url == ASSIGNMENT]
    assert set(by_name[0].resource_names_subscribe) == {n for n in resources.by_type[CLUSTER] if "||" in n}
    await until(lambda: len([r for r in server.received if r.response_nonce]) == 3, "three ACKs")
    assert not server.nacks()


async def test_a_cluster_whose_assignment_has_not_arrived_keeps_the_proxy_not_ready(running) -> None:
    _, resources = seed_resources()
    (server,), source, store = await running(lambda stream: serve_seed(stream, resources, withhold=frozenset({MOCKB})))
    await until(lambda: len([r for r in server.received if r.response_nonce]) == 3, "three responses answered")
    await asyncio.sleep(0.3)
    assert not store.ready
    assert dict(source.health().resources)["xds.Cluster"] == "current"


def _bad_cluster(resources) -> discovery_pb2.Resource:
    entry = resources.by_type[CLUSTER][MOCKB].resource()
    cluster = cluster_pb2.Cluster.FromString(entry.resource.value)
    cluster.metadata.filter_metadata["laneproxy"]["service"]["port"] = 9999
    entry.resource.value = cluster.SerializeToString()
    return entry


def _bad_group(resources) -> discovery_pb2.Resource:
    entry = resources.by_type[GROUP]["rollout"].resource()
    struct = struct_pb2.Struct.FromString(entry.resource.value)
    struct["group"]["spec"]["isPermissive"] = "yes"
    entry.resource.value = struct.SerializeToString()
    return entry


def _unknown_assignment(resources) -> discovery_pb2.Resource:
    entry = resources.by_type[ASSIGNMENT][MOCKB].resource()
    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(entry.resource.value)
    assignment.cluster_name = entry.name = "outbound|8000||ghost.default.svc.cluster.local"
    entry.resource.value = assignment.SerializeToString()
    return entry


def _garbage_cluster(resources) -> discovery_pb2.Resource:
    return discovery_pb2.Resource(name=MOCKB, version="x", resource=any_pb2.Any(type_url=CLUSTER, value=b"\xff\xff\xff"))


@pytest.mark.parametrize("type_url,bad,reason", [
    (CLUSTER, _bad_cluster, f"Cluster({MOCKB}): metadata.filter_metadata.laneproxy.service.port"),
    (CLUSTER, _garbage_cluster, f"Cluster({MOCKB}): resource.value: malformed Cluster message"),
    (ASSIGNMENT, _unknown_assignment, "ClusterLoadAssignment(outbound|8000||ghost.default.svc.cluster.local): "
                                      "cluster_name: no such whole-service Cluster"),
    (GROUP, _bad_group, "spec.isPermissive: expected true or false"),
], ids=["malformed-cluster", "undecodable-cluster", "assignment-of-unknown-cluster", "invalid-group-field"])
async def test_a_bad_update_is_nacked_with_its_reason_counted_and_the_table_stays(running, type_url, bad, reason) -> None:
    _, resources = seed_resources()
    sent: dict[str, str] = {}

    async def script(stream: Stream) -> None:
        serving = asyncio.ensure_future(serve_seed(stream, resources))
        try:
            await until(lambda: len([r for r in stream.server.received if r.response_nonce]) >= 3, "acked")
            sent["nonce"] = stream.send(type_url, [bad(resources)], version="seed-2")
            await asyncio.sleep(3600)
        finally:
            serving.cancel()

    (server,), source, store = await running(script)
    await until(lambda: server.nacks(), "a NACK")
    nack = server.nacks()[0]
    assert (nack.type_url, nack.response_nonce) == (type_url, sent["nonce"])
    assert nack.error_detail.code == 3  # INVALID_ARGUMENT
    assert reason in nack.error_detail.message
    assert store.current.version == "seed-1" and store.rejected == 1
    assert source.types[type_url].nacks == 1
    numbers = {(n.name, n.tags): n.value for n in source.health().numbers}
    kind = {CLUSTER: "Cluster", ASSIGNMENT: "ClusterLoadAssignment", GROUP: "SwimLaneGroup"}[type_url]
    assert numbers[("xds.nacks", (("type", kind),))] == 1
    assert dict(source.health().resources)[f"xds.{kind}"] == "nacked"
    assert len(server.nacks()) == 1 and not server.nacks()[0].error_detail.message == ""


async def test_a_controller_that_never_answers_is_left_for_the_next_address(running) -> None:
    _, resources = seed_resources()

    async def hang(stream: Stream) -> None:
        await asyncio.sleep(3600)

    (hung, good), source, store = await running(hang, lambda stream: serve_seed(stream, resources),
                                                first_snapshot_timeout=0.5)
    await until(lambda: store.ready, "ready from the second address", timeout=15)
    assert hung.streams >= 1 and good.streams == 1
    assert source.controller == f"127.0.0.1:{good.port}" and source.connected


async def test_a_controller_that_dies_mid_stream_is_replaced_by_the_other_with_the_versions_the_sidecar_has(running) -> None:
    _, resources = seed_resources()
    ended = asyncio.Event()

    async def dies(stream: Stream) -> None:
        serving = asyncio.ensure_future(serve_seed(stream, resources))
        try:
            await until(lambda: len([r for r in stream.server.received if r.response_nonce]) >= 3, "acked")
            stream.end()
            ended.set()
            await asyncio.sleep(3600)
        finally:
            serving.cancel()

    (first, second), source, store = await running(dies, lambda stream: serve_seed(stream, resources))
    await until(lambda: store.ready, "ready")
    table = store.current
    await until(lambda: second.streams == 1 and source.connected and source.controller.endswith(f":{second.port}"),
                "moved to the second address")
    assert ended.is_set()
    await until(lambda: {r.type_url for r in second.received if not r.response_nonce} == {CLUSTER, GROUP, ASSIGNMENT},
                "the second stream's three subscriptions")
    opening = [r for r in second.received if not r.response_nonce]
    cluster_versions = next(r.initial_resource_versions for r in opening if r.type_url == CLUSTER)
    assert dict(cluster_versions) == {name: e.version for name, e in resources.by_type[CLUSTER].items()}
    assignment = next(r for r in opening if r.type_url == ASSIGNMENT)
    assert dict(assignment.initial_resource_versions)[MOCKB] == resources.by_type[ASSIGNMENT][MOCKB].version
    # the table kept serving throughout, and the same resources again make the same table
    await until(lambda: len([r for r in second.received if r.response_nonce]) >= 3, "acked by the second")
    assert store.current.routes == table.routes
    assert source.reconnects >= 1


async def test_clusters_that_come_and_go_change_the_assignment_subscriptions(running) -> None:
    _, resources = seed_resources()

    async def script(stream: Stream) -> None:
        serving = asyncio.ensure_future(serve_seed(stream, resources))
        try:
            await until(lambda: len([r for r in stream.server.received if r.response_nonce]) >= 3, "acked")
            stream.send(CLUSTER, [], removed=[MOCKB], version="seed-2")
            await asyncio.sleep(3600)
        finally:
            serving.cancel()

    (server,), source, store = await running(script)
    await until(lambda: any(MOCKB in r.resource_names_unsubscribe for r in server.received), "unsubscribed")
    assert MOCKB not in source.view.service_clusters
    # mockb is a service of the group: it stays in the table with no endpoints (503, not 404)
    await until(lambda: store.current.version == "seed-2", "published")
    assert store.current.routes["default/mockb"].service.endpoints == ()


async def test_a_response_of_a_type_never_subscribed_to_is_nacked_and_counted_not_a_crash(running) -> None:
    _, resources = seed_resources()
    listener = "type.googleapis.com/envoy.config.listener.v3.Listener"

    async def script(stream: Stream) -> None:
        serving = asyncio.ensure_future(serve_seed(stream, resources))
        try:
            await until(lambda: len([r for r in stream.server.received if r.response_nonce]) >= 3, "acked")
            stream.send(listener, [])
            await asyncio.sleep(3600)
        finally:
            serving.cancel()

    (server,), source, store = await running(script)
    await until(lambda: server.nacks(), "a NACK")
    assert server.nacks()[0].type_url == listener
    assert "not a type this sidecar subscribes to" in server.nacks()[0].error_detail.message
    assert source.unknown_types == 1 and source.connected and store.ready
    assert server.streams == 1  # the stream goes on


async def test_a_bad_group_in_the_first_snapshot_is_nacked_and_the_good_one_after_it_makes_the_proxy_ready(running) -> None:
    _, resources = seed_resources()

    async def script(stream: Stream) -> None:
        while True:
            request = await stream.request(timeout=3600)
            if request.response_nonce:
                if request.HasField("error_detail") and request.type_url == GROUP:
                    stream.send(GROUP, entries(resources, GROUP), version="seed-1")  # the corrected group
                continue
            if request.type_url == CLUSTER:
                stream.send(CLUSTER, entries(resources, CLUSTER))
            elif request.type_url == GROUP:
                stream.send(GROUP, [_bad_group(resources)], version="seed-0")
            elif request.type_url == ASSIGNMENT and request.resource_names_subscribe:
                stream.send(ASSIGNMENT, entries(resources, ASSIGNMENT, request.resource_names_subscribe))

    (server,), source, store = await running(script)
    await until(lambda: store.ready, "ready after the corrected group")
    nacks = server.nacks()
    assert [n.type_url for n in nacks] == [GROUP] and "spec.isPermissive" in nacks[0].error_detail.message
    assert store.current.version == "seed-1" and "rollout" in store.current.groups
    assert source.view.full_builds == 1  # the first table is one build, however many responses it took
