"""The xDS source (`--source xds://HOST:PORT[,HOST:PORT...]`): the controller's delta ADS stream -> RouteTables.

Owns the sidecar's end of the stream: one gRPC channel at a time to one of the given controller
addresses, the delta ADS subscriptions (Cluster and SwimLaneGroup wildcard; ClusterLoadAssignment by
name for every whole-service cluster, following clusters as they come and go), ACK of every response
applied and NACK (with `error_detail` saying why, counted) of one that cannot be, reconnection with a
capped, jittered backoff that moves on to the next address, `initial_resource_versions` on reconnect,
and the staleness numbers stats show. The first table is published once every subscribed type has
answered and every cluster's assignment is in; until then the proxy is not ready. While no controller
answers, the last table stays in service.

The resources' meaning and the table are core/xds_view.py's; this module only unpacks protobuf and
talks gRPC. It reads no Kubernetes credentials and never edits a published table. grpcio and the
xds-protos messages are imported with this module, which app.py imports only for this source.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from laneproxy import __version__
from laneproxy.control.building import build_off_loop, settle_heap
from laneproxy.core.build import Built
from laneproxy.core.errors import ConfigInvalidError, ConfigProblem
from laneproxy.core.model import RouteTable
from laneproxy.core.store import RouteTableStore, SourceHealth, SourceNumber
from laneproxy.core.xds_view import (
    ASSIGNMENT_TYPE,
    CLUSTER_TYPE,
    GROUP_TYPE,
    TYPE_NAMES,
    Update,
    XdsAddressError,
    XdsResourceError,
    XdsView,
    decode_assignment,
    decode_cluster,
    decode_group,
    parse_cluster_name,
)

log = logging.getLogger("laneproxy.xds")

SUBSCRIBED = (CLUSTER_TYPE, GROUP_TYPE, ASSIGNMENT_TYPE)
# An update of up to this many assignments is applied on the event loop (as the Kubernetes source's
# INLINE_UPDATE_LIMIT: a few ms at 10,000 services); a larger one in a worker thread.
INLINE_UPDATE_LIMIT = 64
_SETTLED = 5.0  # a stream that lasted this long starts the backoff over, even if it carried nothing new
_SERVING = (health_check_pb2.HealthStatus.UNKNOWN, health_check_pb2.HealthStatus.HEALTHY)
# HTTP/2 PINGs on an idle stream: gRPC servers refuse them more often than every 5 minutes by default, so
# this only finds a controller gone without a FIN (a power-off); one that stopped answering is noticed by
# the first-snapshot timeout, and the table stays in service meanwhile.
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 300_000), ("grpc.keepalive_timeout_ms", 20_000),
                    ("grpc.keepalive_permit_without_calls", 0), ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.enable_retries", 0)]


def node_id(*, pod_ip: str | None, pod_name: str | None, namespace: str) -> str:
    """The node id as Istio's sidecars write it."""
    return f"sidecar~{pod_ip or '127.0.0.1'}~{pod_name or 'laneproxy'}.{namespace}~{namespace}.svc.cluster.local"


def _plain_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _plain_struct(value.struct_value)
    if kind == "list_value":
        return [_plain_value(item) for item in value.list_value.values]
    if kind == "null_value" or kind is None:
        return None
    return getattr(value, kind)


def _plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as dicts, lists, strings, floats, bools and None (json_format's, without its generality)."""
    return {key: _plain_value(value) for key, value in struct.fields.items()}


def decode_resource(type_url: str, name: str, value: bytes) -> Any:
    """One resource's bytes as core.xds_view reads it; raises DecodeError or XdsResourceError."""
    if type_url == CLUSTER_TYPE:
        cluster = cluster_pb2.Cluster.FromString(value)
        if cluster.name != name:
            raise XdsResourceError([ConfigProblem(f"Cluster({name})", "name", f"{cluster.name!r} differs from the "
                                                                              "resource's name")])
        parsed = parse_cluster_name(name)
        if parsed is not None and parsed[1]:
            return None  # a lane's cluster: its lane comes from the whole service's endpoint labels, never read
        metadata = cluster.metadata.filter_metadata
        laneproxy = _plain_struct(metadata["laneproxy"]) if "laneproxy" in metadata else None
        return decode_cluster(name, laneproxy)
    if type_url == ASSIGNMENT_TYPE:
        assignment = endpoint_pb2.ClusterLoadAssignment.FromString(value)
        if assignment.cluster_name != name:
            raise XdsResourceError([ConfigProblem(f"ClusterLoadAssignment({name})", "cluster_name",
                                                  f"{assignment.cluster_name!r} differs from the resource's name")])
        endpoints = []
        for locality in assignment.endpoints:
            for lb_endpoint in locality.lb_endpoints:
                if lb_endpoint.health_status not in _SERVING:
                    continue
                address = lb_endpoint.endpoint.address.socket_address
                metadata = lb_endpoint.metadata.filter_metadata
                labels = _plain_struct(metadata["laneproxy"]) if "laneproxy" in metadata else None
                endpoints.append((address.address, address.port_value, labels))
        return decode_assignment(name, endpoints)
    fields = struct_pb2.Struct.FromString(value)
    return decode_group(name, _plain_struct(fields))


class _Reconnect(Exception):
    """The stream is to be given up and opened again (to the next address)."""


@dataclass(slots=True)
class _TypeState:
    answered: bool = False  # a response of this type was applied on this stream or an earlier one
    updated_at: float | None = None  # when the last response of this type was applied
    nacks: int = 0
    nacked: bool = False  # the last response of this type was NACKed


class XdsSource:
    """Publishes the tables the controller's resources make; `start` returns at once, `store.ready` follows."""

    def __init__(self, addresses: tuple[str, ...], store: RouteTableStore, *, namespace: str, node: str,
                 lenient: bool = False, stale_after: float = 180.0, first_snapshot_timeout: float = 15.0,
                 backoff_base: float = 0.25, backoff_max: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, jitter: Callable[[], float] = random.random) -> None:
        if not addresses:
            raise XdsAddressError("no controller address")
        self.addresses = addresses
        self.store = store
        self.view = XdsView(namespace=namespace, lenient=lenient)
        self.node = base_pb2.Node(id=node, cluster=namespace, user_agent_name="laneproxy",
                                  user_agent_version=__version__)
        self.stale_after = stale_after
        self.first_snapshot_timeout = first_snapshot_timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.clock, self.jitter = clock, jitter
        self.types = {type_url: _TypeState() for type_url in SUBSCRIBED}
        self.versions: dict[str, dict[str, str]] = {type_url: {} for type_url in SUBSCRIBED}
        self.controller: str | None = None  # the address of the stream open now
        self.connected = False
        self.reconnects = 0
        self.unknown_types = 0
        self.complete = False  # a full snapshot has been published
        self._connected_at = 0.0
        self._behind_since: float | None = None  # no stream since then (the table may be behind)
        self._subscribed: set[str] = set()  # assignment names subscribed on this stream
        self._dropped: set[str] = set()  # unsubscribed: an assignment for one of them still in flight is ignored
        self._task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.store.health = self.health
        log.info("following the controller at %s", ", ".join(self.addresses))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="xds-source")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        attempt = 0  # consecutive failures: the backoff's exponent
        index = 0
        while True:
            address = self.addresses[index % len(self.addresses)]
            self.controller = address
            progressed = False
            try:
                progressed = await self._session(address)
                reason = "the controller ended the stream"
            except _Reconnect as exc:
                progressed = bool(exc.args and exc.args[0])
                reason = str(exc.args[1]) if len(exc.args) > 1 else "reconnecting"
            except grpc.aio.AioRpcError as exc:
                progressed = self.connected and self.clock() - self._connected_at > _SETTLED
                reason = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # a bug here must not end the source: the next stream starts afresh
                log.exception("xDS stream to %s failed", address)
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                if self.connected and self._behind_since is None:
                    self._behind_since = self.clock()
                self.connected = False
            self.reconnects += 1
            attempt = 0 if progressed else attempt + 1
            index += 1  # the next replica: this one failed or went away
            delay = min(self.backoff_max, self.backoff_base * (2 ** min(attempt, 16)))
            delay *= 0.5 + self.jitter() / 2  # jitter: sidecars of one controller do not come back in step
            log.warning("xDS stream to %s lost (%s); keeping the last table, next try %s in %.2fs", address, reason,
                        self.addresses[index % len(self.addresses)], delay)
            await asyncio.sleep(delay)

    # -- one stream ------------------------------------------------------------------------------

    async def _session(self, address: str) -> bool:
        """One stream, until it ends; True if a response was applied on it (the backoff starts over)."""
        queue: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()

        async def requests():
            while True:
                yield await queue.get()

        self._subscribed = set(self.view.service_clusters)
        self._dropped.clear()
        for type_url in SUBSCRIBED:
            names = sorted(self._subscribed) if type_url == ASSIGNMENT_TYPE else []
            if type_url == ASSIGNMENT_TYPE and not names:
                continue  # nothing to ask for yet: the clusters say what
            queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                node=self.node, type_url=type_url, resource_names_subscribe=names,
                initial_resource_versions=self.versions[type_url]))
        progressed = False
        async with grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(requests())
            try:
                # Open once the controller took the call: after a reconnect with the versions the sidecar has,
                # a controller with nothing newer rightly says nothing.
                try:
                    await asyncio.wait_for(call.wait_for_connection(), self.first_snapshot_timeout)
                except asyncio.TimeoutError:
                    raise _Reconnect(False, "no connection") from None
                self.connected, self._behind_since = True, None
                opened = self._connected_at = self.clock()
                log.info("xDS stream to %s open", address)
                while True:
                    # Until the first full snapshot, a controller that does not answer is as good as gone.
                    timeout = None if self.complete else self.first_snapshot_timeout
                    try:
                        response = await asyncio.wait_for(call.read(), timeout)
                    except asyncio.TimeoutError:
                        raise _Reconnect(progressed, f"no full snapshot within {self.first_snapshot_timeout:g}s") from None
                    if response is grpc.aio.EOF:
                        return progressed or self.clock() - opened > _SETTLED
                    for request in await self._handle(response):
                        queue.put_nowait(request)
                    progressed = True
            finally:
                call.cancel()

    async def _handle(self, response: discovery_pb2.DeltaDiscoveryResponse) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        """Apply one response; the requests to send: its ACK or NACK, and any change of subscriptions."""
        type_url = response.type_url
        state = self.types.get(type_url)
        if state is None:
            self.unknown_types += 1
            log.warning("xDS response of a type never subscribed to (%s): NACKed", type_url)
            return [self._nack(response, f"{type_url} is not a type this sidecar subscribes to")]
        def apply() -> tuple[Update, Built | None]:
            update = self._decode(response)
            version = response.system_version_info
            # Until the first full snapshot, responses are checked and kept; the table is built once, when the
            # last of them is in. (Should that build fail, this response is NACKed and the next one tries again.)
            built = self.view.apply(update, version=version, build_table=self.complete)
            answered = {t for t, s in self.types.items() if s.answered} | {type_url}
            if built is None and {CLUSTER_TYPE, GROUP_TYPE} <= answered and not self.view.missing_assignments():
                built = self.view.rebuild(version)
            return update, built

        size = len(response.resources) + len(response.removed_resources)
        try:
            # A few assignments are applied on the event loop (core.incremental: a few ms at 10,000 services); a
            # snapshot, or a change of groups (a full build), in a worker thread, as the other sources do.
            if self.complete and type_url == ASSIGNMENT_TYPE and size <= INLINE_UPDATE_LIMIT:
                update, built = apply()
            else:
                update, built = await build_off_loop(apply)
        except ConfigInvalidError as exc:
            state.nacks += 1
            state.nacked = True
            self.store.reject(exc)
            log.error("xDS %s update %s rejected, keeping table %r:\n%s", TYPE_NAMES[type_url], response.nonce,
                      self.store.current.version or "none", exc)
            return [self._nack(response, str(exc))]
        versions = self.versions[type_url]
        for name in update.removed:
            versions.pop(name, None)
        for resource in response.resources:
            if resource.name in update.changed:
                versions[resource.name] = resource.version
        state.answered, state.nacked, state.updated_at = True, False, self.clock()
        out = [discovery_pb2.DeltaDiscoveryRequest(node=self.node, type_url=type_url, response_nonce=response.nonce)]
        if type_url == CLUSTER_TYPE:
            out.extend(self._follow_clusters())
        if built is not None:
            self._publish(built.table, settle=not (type_url == ASSIGNMENT_TYPE and size <= INLINE_UPDATE_LIMIT))
        return out

    def _follow_clusters(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        wanted = set(self.view.service_clusters)
        new, gone = sorted(wanted - self._subscribed), sorted(self._subscribed - wanted)
        if not new and not gone:
            return []
        self._subscribed = wanted
        self._dropped.difference_update(new)
        self._dropped.update(gone)
        for name in gone:
            self.versions[ASSIGNMENT_TYPE].pop(name, None)
        return [discovery_pb2.DeltaDiscoveryRequest(node=self.node, type_url=ASSIGNMENT_TYPE,
                                                    resource_names_subscribe=new, resource_names_unsubscribe=gone)]

    def _publish(self, table: RouteTable, *, settle: bool) -> None:
        ready = self.complete or (self.types[CLUSTER_TYPE].answered and self.types[GROUP_TYPE].answered
                                  and not self.view.missing_assignments())
        if not ready:
            # The first table waits for every cluster's endpoints. Later, a new cluster's assignment is a
            # subscription away; holding every other change back for it would leave the table behind.
            return
        if not self.complete:
            log.info("first full xDS snapshot from %s: %d services, %d groups", self.controller,
                     len(table.services), len(table.groups))
        self.complete = True
        if table is not self.store.current:
            self.store.publish(table)
            if settle:
                settle_heap()

    def _nack(self, response: discovery_pb2.DeltaDiscoveryResponse, reason: str) -> discovery_pb2.DeltaDiscoveryRequest:
        return discovery_pb2.DeltaDiscoveryRequest(
            node=self.node, type_url=response.type_url, response_nonce=response.nonce,
            error_detail=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=reason[:4096]))

    # -- protobuf -> plain values ----------------------------------------------------------------

    def _decode(self, response: discovery_pb2.DeltaDiscoveryResponse) -> Update:
        type_url = response.type_url
        kind = TYPE_NAMES[type_url]
        changed: dict[str, Any] = {}
        problems: list[ConfigProblem] = []
        for resource in response.resources:
            where = f"{kind}({resource.name})"
            if resource.resource.type_url != type_url:
                problems.append(ConfigProblem(where, "resource.type_url", f"{resource.resource.type_url!r} in a "
                                                                          f"response of {type_url}"))
                continue
            if type_url == ASSIGNMENT_TYPE and resource.name in self._dropped:
                continue  # sent before the server saw the unsubscription
            try:
                changed[resource.name] = decode_resource(type_url, resource.name, resource.resource.value)
            except DecodeError as exc:
                problems.append(ConfigProblem(where, "resource.value", f"malformed {kind} message: {exc}"))
            except XdsResourceError as exc:
                problems.extend(exc.problems)
        if problems:
            raise XdsResourceError(problems)
        return Update(type_url, changed, frozenset(response.removed_resources))

    # -- stats -----------------------------------------------------------------------------------

    def health(self) -> SourceHealth:
        now = self.clock()
        age = None
        if self.store.ready:
            behind = [self._behind_since] if self._behind_since is not None else []
            behind += [state.updated_at for state in self.types.values() if state.nacked and state.updated_at]
            age = max(0.0, now - min(behind)) if behind else 0.0
        states = []
        numbers = [SourceNumber("xds.connected", 1 if self.connected else 0),
                   SourceNumber("xds.reconnects", self.reconnects, counter=True),
                   SourceNumber("xds.unknown_type_responses", self.unknown_types, counter=True)]
        for type_url, state in self.types.items():
            kind = TYPE_NAMES[type_url]
            tag = (("type", kind),)
            states.append((f"xds.{kind}", "nacked" if state.nacked else "current" if state.answered else "waiting"))
            numbers.append(SourceNumber("xds.nacks", state.nacks, counter=True, tags=tag))
            if state.updated_at is not None:
                numbers.append(SourceNumber("xds.seconds_since_update", now - state.updated_at, tags=tag))
        controller = f"{'connected' if self.connected else 'connecting'} {self.controller}" if self.controller else "none"
        states.append(("xds.controller", controller))
        return SourceHealth(age, age is not None and age > self.stale_after, tuple(states), tuple(numbers))
