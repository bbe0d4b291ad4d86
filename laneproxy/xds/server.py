"""The controller's xDS server: gRPC ADS, delta variant, for Envoy and laneproxy sidecars.

Owns the streams: per-stream subscriptions per type (wildcard or by name), what each stream was sent
(so nothing is sent twice at one version, a NACKed version included, and a reconnecting client's
`initial_resource_versions` are honoured), nonces, ACK/NACK accounting, and the push of a new table:
the resources are diffed against the previous table's and each stream gets only the changed or
removed resources it subscribes to, as the bytes `resources` encoded once for every stream.

Bad input ends only its own stream, with a gRPC status (INVALID_ARGUMENT): bytes that are no
DeltaDiscoveryRequest, a request without a type URL, a nonce this stream never sent, more subscribed
names than MAX_NAMES_PER_TYPE, more unknown types waiting for an answer than MAX_UNKNOWN_PENDING. What a
stream owes is a set of names per type (a slow reader's pushes coalesce), so its memory is bounded by
the resources, not by how many tables were published meanwhile. The state-of-the-world method answers
UNIMPLEMENTED. A type URL the controller does not serve gets an empty response of that type and is
counted. It never builds or edits a table (the store's source does) and never blocks the loop on I/O.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from laneproxy.core.model import RouteTable
from laneproxy.xds.resources import (
    EMPTY_RESOURCES,
    KNOWN_TYPES,
    SHORT_TYPE_NAMES,
    Change,
    ResourceEncoder,
    Resources,
    diff,
)
from laneproxy.xds.stats import XdsStats

log = logging.getLogger("laneproxy.xds")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
WILDCARD = "*"
# A stream's subscribed names per type beyond this end the stream: the memory one client can make the
# controller hold is bounded (a real sidecar subscribes to one name per cluster).
MAX_NAMES_PER_TYPE = 200_000
MAX_UNKNOWN_PENDING = 64  # unknown type URLs one stream may have waiting for their empty answers
_ABSENT = ""  # a version recorded for a name the client was told does not exist


class StreamRefusedError(Exception):
    """A request that ends its stream: the gRPC status code and the reason sent with it."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class Subscription:
    """One stream's interest in one type, and what that stream holds of it."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the client has or was last sent
    answered: bool = False  # the first request of the type got its response

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class Stream:
    """One DeltaAggregatedResources call: its requests update this state, its writer sends what it owes."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.node_id = ""
        self.subscriptions: dict[str, Subscription] = {}
        self.pending: dict[str, set[str]] = {}  # names to look at again, per known type
        self.unknown_pending: dict[str, None] = {}  # unknown type URLs owed an empty response, in order
        self.token = secrets.token_hex(4)
        self.nonces = 0
        self.wake = asyncio.Event()
        self.refused: StreamRefusedError | None = None
        self.closed = False

    def next_nonce(self) -> str:
        self.nonces += 1
        return f"{self.token}-{self.nonces}"

    def knows_nonce(self, nonce: str) -> bool:
        token, _, number = nonce.partition("-")
        return token == self.token and number.isdigit() and 0 < int(number) <= self.nonces

    def owe(self, type_url: str, names: set[str] | frozenset[str]) -> None:
        subscription = self.subscriptions.get(type_url)
        if subscription is None or not names:
            return
        wanted = names if subscription.wildcard else [name for name in names if name in subscription.names]
        if wanted:
            self.pending.setdefault(type_url, set()).update(wanted)
            self.wake.set()

    def notify(self, changes: dict[str, Change]) -> None:
        for type_url, change in changes.items():
            subscription = self.subscriptions.get(type_url)
            if subscription is None:
                continue
            self.owe(type_url, change.changed)
            gone = [name for name in change.removed if name in subscription.sent]
            if gone:
                self.pending.setdefault(type_url, set()).update(gone)
                self.wake.set()


class DeltaAdsServer:
    """Serves the resources of the store's current table to every delta ADS stream; `publish` pushes a new one."""

    def __init__(self, stats: XdsStats | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats or XdsStats()
        self.clock = clock
        self.resources: Resources = EMPTY_RESOURCES
        self.encoder = ResourceEncoder()
        self.streams: set[Stream] = set()
        self.served = asyncio.Event()  # set by the first table: streams are answered only from then on
        self._server: grpc.aio.Server | None = None

    # -- tables ---------------------------------------------------------------------------------

    def publish(self, table: RouteTable) -> None:
        """Take a new table: encode what is new in it, and owe each stream the resources that changed for it."""
        resources = self.encoder.encode(table)
        changes = diff(self.resources, resources)
        self.resources = resources
        self.stats.tables += 1
        self.stats.table_version = table.version
        if changes or self.stats.table_updated_at is None:
            self.stats.table_updated_at = self.clock()
        for stream in self.streams:
            stream.notify(changes)
        self.served.set()

    # -- the gRPC server ------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: the kernel chooses); returns the bound port."""
        # No SO_REUSEPORT: a port another process holds is an error at start, never a shared port.
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024), ("grpc.so_reuseport", 0)])
        handlers = {
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, request_deserializer=None, response_serializer=None),
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._state_of_the_world, request_deserializer=None, response_serializer=None),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = server.add_insecure_port(target)
        if bound == 0:
            raise OSError(f"cannot listen on {target}")
        await server.start()
        self._server = server
        self.stats.xds_port = bound
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _state_of_the_world(self, request_iterator: AsyncIterator[bytes], context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "laneproxy controller serves delta xDS only: use DeltaAggregatedResources")

    async def _delta(self, request_iterator: AsyncIterator[bytes], context: Any) -> None:
        stream = Stream(context.peer())
        self.streams.add(stream)
        self.stats.streams_connected += 1
        self.stats.streams_total += 1
        reader = asyncio.get_running_loop().create_task(self._read(stream, request_iterator))
        try:
            if not self.served.is_set():  # nothing is answered before the source's first complete table
                served = asyncio.get_running_loop().create_task(self.served.wait())
                await asyncio.wait((served, reader), return_when=asyncio.FIRST_COMPLETED)
                served.cancel()
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.refused is not None:
                    self.stats.streams_ended_malformed += 1
                    log.warning("xDS stream from %s (%s) ended: %s", stream.peer, stream.node_id or "no node",
                                stream.refused.reason)
                    await context.abort(stream.refused.code, stream.refused.reason)
                for response in self.responses(stream):
                    await context.write(response)
                if stream.closed:
                    return
        finally:
            reader.cancel()
            self.streams.discard(stream)
            self.stats.streams_connected -= 1

    async def _read(self, stream: Stream, requests: AsyncIterator[bytes]) -> None:
        try:
            async for raw in requests:
                try:
                    request = discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
                except DecodeError as exc:
                    raise StreamRefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                                             f"malformed DeltaDiscoveryRequest ({len(raw)} bytes): {exc}") from None
                self.receive(stream, request)
        except StreamRefusedError as exc:
            stream.refused = exc
        finally:
            stream.closed = True
            stream.wake.set()

    # -- requests -------------------------------------------------------------------------------

    def receive(self, stream: Stream, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Apply one request to the stream's state (raises StreamRefusedError for bad input)."""
        type_url = request.type_url
        if not type_url:
            raise StreamRefusedError(grpc.StatusCode.INVALID_ARGUMENT, "a DeltaDiscoveryRequest without type_url")
        if request.HasField("node") and not stream.node_id:
            node = request.node
            stream.node_id = node.id
            log.info("xDS stream from %s: node %r, %s %s", stream.peer, node.id, node.user_agent_name or "unknown client",
                     node.user_agent_version or "(no version)")
        nonce = request.response_nonce
        if nonce:
            if not stream.knows_nonce(nonce):
                raise StreamRefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                                         f"response_nonce {nonce[:64]!r} was never sent on this stream")
            if request.HasField("error_detail"):
                if type_url in KNOWN_TYPES:
                    self.stats.nacks[type_url] += 1
                log.warning("NACK of %s (nonce %s) from %s: %s", SHORT_TYPE_NAMES.get(type_url, type_url), nonce,
                            stream.node_id or stream.peer, request.error_detail.message)
        if type_url not in KNOWN_TYPES:
            if not nonce:
                self.stats.unknown_type_requests += 1
                log.info("xDS stream from %s asks for %r, a type the controller does not serve: empty answer",
                         stream.node_id or stream.peer, type_url[:200])
                stream.unknown_pending[type_url] = None
                if len(stream.unknown_pending) > MAX_UNKNOWN_PENDING:
                    raise StreamRefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                                             f"more than {MAX_UNKNOWN_PENDING} unknown type URLs asked at once")
                stream.wake.set()
            return
        subscription = stream.subscriptions.get(type_url)
        first = subscription is None
        if subscription is None:
            subscription = stream.subscriptions[type_url] = Subscription()
            subscription.wildcard = not request.resource_names_subscribe
            subscription.sent.update(request.initial_resource_versions)
        subscribe = set(request.resource_names_subscribe)
        if WILDCARD in subscribe:
            subscribe.discard(WILDCARD)
            subscription.wildcard = True
        unsubscribe = set(request.resource_names_unsubscribe)
        if WILDCARD in unsubscribe:
            unsubscribe.discard(WILDCARD)
            subscription.wildcard = False
        for name in unsubscribe:
            subscription.names.discard(name)
            if not subscription.wildcard:
                subscription.sent.pop(name, None)  # the client forgets it: a new subscription sends it again
        new_names = subscribe - subscription.names
        subscription.names |= subscribe
        if len(subscription.names) > MAX_NAMES_PER_TYPE:
            raise StreamRefusedError(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"more than {MAX_NAMES_PER_TYPE} names subscribed to {type_url}")
        owed = set(new_names)
        if first:
            owed |= set(subscription.sent)
            if subscription.wildcard:
                owed |= set(self.resources.by_type[type_url])
        if owed:
            stream.pending.setdefault(type_url, set()).update(owed)
        if first or owed:
            stream.wake.set()

    # -- responses ------------------------------------------------------------------------------

    def responses(self, stream: Stream) -> list[bytes]:
        """The responses the stream is owed now, serialised; records them as sent."""
        out: list[bytes] = []
        version = self.resources.version
        for type_url in stream.unknown_pending:
            out.append(discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version, type_url=type_url, nonce=stream.next_nonce()).SerializeToString())
        stream.unknown_pending.clear()
        for type_url, subscription in stream.subscriptions.items():
            names = stream.pending.pop(type_url, None)
            if not names and subscription.answered:
                continue
            available = self.resources.by_type[type_url]
            chunks: list[bytes] = []
            removed: list[str] = []
            for name in sorted(names or ()):
                resource = available.get(name)
                had = subscription.sent.get(name)
                if resource is not None:
                    if subscription.wants(name) and had != resource.version:
                        chunks.append(resource.chunk)
                        subscription.sent[name] = resource.version
                elif had != _ABSENT and (had is not None or name in subscription.names):
                    removed.append(name)  # gone, or asked for by name and never there: the client is told
                    if name in subscription.names:
                        subscription.sent[name] = _ABSENT
                    else:
                        subscription.sent.pop(name, None)
            if not chunks and not removed and subscription.answered:
                continue
            subscription.answered = True
            header = discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, type_url=type_url,
                                                          nonce=stream.next_nonce(), removed_resources=removed)
            out.append(header.SerializeToString() + b"".join(chunks))
            self.stats.pushes[type_url] += 1
            self.stats.resources_sent[type_url] += len(chunks)
            self.stats.resources_removed[type_url] += len(removed)
        return out
