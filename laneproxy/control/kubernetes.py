"""The Kubernetes source: swimlane resources, Services and Pods on the API server -> RouteTables in the store.

Owns talking to the API server and nothing else: list (from the watch cache, `resourceVersion=0`),
then watch from the list's resourceVersion with bookmarks; relist on 410 Gone; reconnect with capped
exponential backoff when a stream breaks or the server is away; a cache of the watched objects;
coalescing bursts of events into one update; publishing; and writing `status` on the swimlane
objects it had to leave out. An update of a few Services, Pods or EndpointSlices (each reflector knows
which objects changed) replaces only their services in the running table (core.incremental), on the
event loop; a change of a swimlane object, an object with a problem, a namespace followed or dropped,
or a rejected update goes through the full build in a worker thread. Credentials and TLS come from kubernetes_asyncio (a kubeconfig, or the
pod's service account), never from hand-written code.

What it watches: the cluster-scoped `ASMSwimLaneGroup` and `ASMSwimLane` objects, and Services, Pods and
EndpointSlices only in the namespaces the swimlane objects name (one list+watch per namespace, started
and stopped as groups change). It never reads a namespace no group names, so a deployment may grant
them per namespace, and a sidecar never holds every pod of the cluster in memory. A namespace it may not
read (403) counts as empty, is reported, and holds back no other update. With `pods="metadata"` (the
controller's mode) Pods are read as metadata only (`PartialObjectMetadata`, as client-go's metadata
informer reads them) and only those carrying `ASM_TRAFFIC_TAG` (a label selector): the lane labels, joined
by core.build with the EndpointSlices' endpoints by targetRef; addresses and readiness come from the
EndpointSlices alone.

Watch health: a watch is silent while nothing changes, and a connection can die without a FIN. TCP
keepalive notices a peer that stopped answering, and a read timeout (`watch_read_timeout`) a stream that
stays silent; either ends the watch, which resumes from its resourceVersion, so no update is lost. Watch
timeouts are drawn from [watch_timeout, 2 x watch_timeout) as client-go does, so sidecars started
together do not re-watch in lockstep.

It never validates: core.build does, on the plain dicts received. An object with a problem is left out
(with every object that only fails because of it), logged, counted and told so in its `status`; the
rest of the update is published. An update whose problems belong to no object is rejected and the last
good table keeps serving; so does an API outage. The store turns ready only with a table built from a
complete first sync of every collection. Third-party exceptions (aiohttp, kubernetes_asyncio) are
translated here, at the edge.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import socket
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping

import aiohttp
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.config import ConfigException

from laneproxy.control.building import build_off_loop, settle_heap
from laneproxy.core.build import DEFAULT_NAMESPACE, SWIMLANE_API, Built, ConfigDocument, build_skipping
from laneproxy.core.incremental import IncrementalTable
from laneproxy.core.errors import ConfigInvalidError, ConfigProblem, LaneProxyError
from laneproxy.core.headers import TRAFFIC_TAG_LABEL
from laneproxy.core.store import RouteTableStore, SourceHealth

log = logging.getLogger("laneproxy.kubernetes")

USER_AGENT = "laneproxy/kubernetes-source"
# An update of up to this many objects is applied on the event loop (a few ms at 10,000 services, most of it
# one copy of the table's mappings; see loadtests/bench/table_update.py); a larger one (a relist) in a
# worker thread, as a full build is.
INLINE_UPDATE_LIMIT = 64


def _resource_version(body: Mapping[str, Any] | None) -> Any:
    meta = body.get("metadata") if body is not None else None
    return meta.get("resourceVersion") if isinstance(meta, dict) else None


def _mark_bits(mark: str) -> int:
    return int.from_bytes(hashlib.blake2b(mark.encode(), digest_size=8).digest(), "big")


def _version(bits: int) -> str:
    """A table version from the XOR of every object's mark: equal objects, equal version, kept up per change."""
    return f"{bits:016x}"[:12]


# ---------------------------------------------------------------------------------------------
# Errors: every failure of the API conversation is one of these, whatever library raised it.


class KubernetesSourceError(LaneProxyError):
    """Base of the Kubernetes source's errors."""


class KubernetesConfigError(KubernetesSourceError):
    """No usable credentials: a kubeconfig that cannot be read, or not running in a cluster."""


class ApiUnreachableError(KubernetesSourceError):
    """The API server could not be reached, or a stream from it broke or went silent."""


class WatchSilentError(ApiUnreachableError):
    """A watch stream said nothing for the read timeout: the connection may be dead without a FIN."""


class ApiProtocolError(KubernetesSourceError):
    """The API server answered something that is not the JSON the API promises."""


class ApiStatusError(KubernetesSourceError):
    """The API server answered with an error status (a `Status` object)."""

    def __init__(self, status: int, reason: str, message: str, *, what: str = "") -> None:
        super().__init__(f"{what}: {status} {reason}: {message}" if what else f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class ResourceExpiredError(ApiStatusError):
    """410 Gone: the resourceVersion to resume from is older than the server keeps; relist."""


def _status_error(status: int, body: Any, *, what: str) -> ApiStatusError:
    """An error `Status` (as text or parsed) -> the typed error; 410 is the one that means relist."""
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError:
            body = {"message": body.decode(errors="replace") if isinstance(body, bytes) else body}
    body = body if isinstance(body, dict) else {}
    code = body.get("code") if isinstance(body.get("code"), int) else status
    reason, message = str(body.get("reason") or ""), str(body.get("message") or "")[:500]
    error_type = ResourceExpiredError if code == 410 else ApiStatusError
    return error_type(code, reason, message, what=what)


# ---------------------------------------------------------------------------------------------
# What is watched

_DROPPED = frozenset({"managedFields"})
# Annotations of a pod read as metadata: the injected ones are kilobytes per pod and nothing reads them.
_DROPPED_METADATA = frozenset({"managedFields", "annotations", "ownerReferences"})


@dataclass(frozen=True, slots=True)
class ResourceKind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool
    # Read as PartialObjectMetadata (name, labels, resourceVersion: what client-go's metadata informer reads),
    # not as the whole object: a few hundred bytes per pod instead of its spec and status.
    metadata_only: bool = False
    label_selector: str | None = None  # only the objects it selects are listed and watched

    @property
    def dropped(self) -> frozenset[str]:
        """Keys never read, dropped from every object of a list while it is parsed (see _parser)."""
        return _DROPPED_METADATA if self.metadata_only else _DROPPED

    def accept(self, *, watch: bool) -> str:
        """The Accept header: JSON, or JSON as PartialObjectMetadata(List) for a metadata-only kind."""
        if not self.metadata_only:
            return "application/json"
        return f"application/json;as=PartialObjectMetadata{'' if watch else 'List'};g=meta.k8s.io;v=v1"

    def path(self, namespace: str | None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced:
            return f"{prefix}/namespaces/{namespace}/{self.plural}"
        return f"{prefix}/{self.plural}"

    def describe(self, namespace: str | None) -> str:
        return f"{self.kind} in {namespace}" if self.namespaced else self.kind


SWIMLANE_GROUPS = ResourceKind("ASMSwimLaneGroup", SWIMLANE_API, "asmswimlanegroups", namespaced=False)
SWIMLANES = ResourceKind("ASMSwimLane", SWIMLANE_API, "asmswimlanes", namespaced=False)
SERVICES = ResourceKind("Service", "v1", "services", namespaced=True)
PODS = ResourceKind("Pod", "v1", "pods", namespaced=True)
# The controller's pods: metadata only, and only the pods that carry a lane label. Endpoints (addresses,
# readiness, ports) then come from EndpointSlices alone, joined with these labels by their targetRef.
POD_METADATA = ResourceKind("Pod", "v1", "pods", namespaced=True, metadata_only=True,
                            label_selector=TRAFFIC_TAG_LABEL)
POD_MODES = {"full": PODS, "metadata": POD_METADATA}
# What a metadata-only pod keeps: what core.build reads of it, and what the cache's bookkeeping needs.
_METADATA_KEPT = ("name", "namespace", "labels", "resourceVersion", "deletionTimestamp", "uid")
# Served as discovery.k8s.io/v1 from Kubernetes 1.21, v1beta1 on 1.17-1.20: a 404 moves to the older one.
ENDPOINT_SLICES = ResourceKind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", namespaced=True)
OLDER_VERSIONS = {ENDPOINT_SLICES: ResourceKind("EndpointSlice", "discovery.k8s.io/v1beta1", "endpointslices",
                                                namespaced=True)}


# ---------------------------------------------------------------------------------------------
# Transport: HTTP through kubernetes_asyncio's client, which owns credentials, TLS and token refresh.

_NETWORK_ERRORS = (aiohttp.ClientError, OSError)  # TimeoutError is an OSError
# A list answer larger than this is parsed in a worker thread: a namespace of a few thousand pods is
# megabytes of JSON, and parsing it on the event loop would stall every request the sidecar is serving.
PARSE_OFF_LOOP_BYTES = 256 * 1024


class ApiTransport:
    """GET JSON and stream watch events, with every failure translated into this module's errors."""

    def __init__(self, api: kube_client.ApiClient, *, request_timeout: float, connect_timeout: float,
                 keepalive: tuple[int, int, int] = (15, 5, 6)) -> None:
        self.api = api
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive  # idle seconds, probe interval, probes: a silent peer is dropped after ~45 s

    async def get_json(self, path: str, params: Mapping[str, str], *, accept: str = "application/json",
                       drop: frozenset[str] = frozenset()) -> dict:
        """GET a JSON object; every object in it loses the keys in `drop` as it is parsed."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
        response = await self._open(path, params, timeout, accept=accept)
        try:
            raw = await response.read()
        except _NETWORK_ERRORS as exc:
            raise ApiUnreachableError(f"GET {path}: {_describe(exc)}") from exc
        finally:
            response.release()
        parse = _parser(drop)
        del response  # its body must not outlive this parse: a list of pods is megabytes
        try:
            body = await asyncio.to_thread(parse, raw) if len(raw) > PARSE_OFF_LOOP_BYTES else parse(raw)
        except ValueError as exc:
            raise ApiProtocolError(f"GET {path}: answer is not JSON") from exc
        if not isinstance(body, dict):
            raise ApiProtocolError(f"GET {path}: answer is not a JSON object")
        return body

    async def patch_json(self, path: str, patch: Mapping[str, Any]) -> None:
        """A JSON merge patch (the status subresource's writes)."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
        response = await self._open(path, {}, timeout, method="PATCH", body=patch,
                                    content_type="application/merge-patch+json")
        response.release()

    async def stream(self, path: str, params: Mapping[str, str], *, read_timeout: float,
                     opened: Callable[[], None] = lambda: None,
                     accept: str = "application/json") -> AsyncIterator[dict]:
        """Watch events, one JSON object per line, until the server ends the stream; `opened` once it answers."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=read_timeout)
        response = await self._open(path, params, timeout, accept=accept)
        self._keep_alive(response)
        opened()
        try:
            while True:
                try:
                    line = await response.content.readline()
                except aiohttp.ServerTimeoutError as exc:
                    raise WatchSilentError(f"watch {path}: nothing for {read_timeout:.0f}s") from exc
                except (*_NETWORK_ERRORS, ValueError) as exc:  # ValueError: a line longer than the read buffer
                    raise ApiUnreachableError(f"watch {path}: stream broken: {_describe(exc)}") from exc
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise ApiProtocolError(f"watch {path}: event is not JSON") from exc
                if not isinstance(event, dict):
                    raise ApiProtocolError(f"watch {path}: event is not a JSON object")
                yield event
        finally:
            response.close()  # never reuse a watch connection: its rest is unread

    def _keep_alive(self, response: aiohttp.ClientResponse) -> None:
        """TCP keepalive on a watch's connection: a peer gone without a FIN is noticed by the kernel."""
        connection = response.connection
        sock = connection.transport.get_extra_info("socket") if connection and connection.transport else None
        if sock is None:
            return
        idle, interval, count = self.keepalive
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        except (OSError, AttributeError):  # not Linux: the read timeout still notices a dead stream
            pass

    async def _open(self, path: str, params: Mapping[str, str], timeout: aiohttp.ClientTimeout, *,
                    method: str = "GET", body: Any = None, content_type: str | None = None,
                    accept: str = "application/json") -> aiohttp.ClientResponse:
        headers = {"Accept": accept, **({"Content-Type": content_type} if content_type else {})}
        try:
            response = await self.api.call_api(
                path, method, query_params=list(params.items()), header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout,
            )
        except _NETWORK_ERRORS as exc:
            raise ApiUnreachableError(f"GET {path}: {_describe(exc)}") from exc
        except ConfigException as exc:  # a token refresh hook failed (service-account token unreadable)
            raise KubernetesConfigError(f"credentials: {exc}") from exc
        if response.status != 200:
            try:
                text = await response.read()
            except _NETWORK_ERRORS:
                text = b""
            finally:
                response.release()
            raise _status_error(response.status, text, what=f"{method} {path}")
        return response


def _parser(drop: frozenset[str]) -> Callable[[bytes], Any]:
    """json.loads, dropping the keys in `drop` from every object as soon as it is parsed.

    A list of pods is mostly managedFields (and, for metadata only, annotations); dropping them while
    parsing frees each as the next is read, so the parse never holds a whole page of them. Measured with
    2,000 injected pods read as metadata: the list's peak went from ~100 MiB of Python objects to ~10 MiB,
    and the sidecar's settled RSS with it (the heap does not give a peak back).
    """
    if not drop:
        return json.loads

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        # Only a structure goes: a label or annotation value is a string, so a label named like them stays.
        return {key: value for key, value in items if key not in drop or isinstance(value, str)}

    return lambda raw: json.loads(raw, object_pairs_hook=pairs)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# One collection mirrored from the server: the list+watch step, inside a tiny reconnect loop.


class Backoff:
    """Capped exponential backoff with jitter (half fixed, half random); randomness is a parameter."""

    def __init__(self, initial: float, cap: float, rng: random.Random) -> None:
        self.initial, self.cap, self.rng = initial, cap, rng
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * 2 ** self.attempt)
        self.attempt += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


class Reflector:
    """One kind (in one namespace, for namespaced kinds) mirrored into `objects`, kept fresh by a watch.

    `step()` is the testable unit: list if there is nothing to resume from, then watch until the server
    ends the stream. `run()` is the reconnect loop around it. Every change calls `on_change(self)`.
    """

    def __init__(
        self,
        transport: ApiTransport,
        kind: ResourceKind,
        namespace: str | None,
        *,
        on_change: Callable[[Reflector], None],
        backoff: Backoff,
        watch_timeout: int = 300,
        read_timeout: float = 60.0,
        page_size: int = 500,
        on_unauthorized: Callable[[], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport, self.kind, self.namespace = transport, kind, namespace
        self.on_change, self.backoff, self.on_unauthorized = on_change, backoff, on_unauthorized
        self.watch_timeout, self.read_timeout, self.page_size = watch_timeout, read_timeout, page_size
        self.rng, self.clock = rng or random.Random(), clock
        self.slices_required = False  # EndpointSlices: the only source of endpoints (pods read as metadata)
        self.path = kind.path(namespace)
        self.objects: dict[str, Mapping[str, Any]] = {}
        self.changed: set[str] = set()  # names added, modified or deleted since the source last took them
        self.resource_version: str | None = None
        self.synced = False  # true from the first complete list on, also while reconnecting
        self.forbidden = False  # 403: counted as empty (a namespace the sidecar may not read) until allowed
        self.lists = 0
        self.relists_after_expiry = 0
        self.watches = 0
        self.silent_watches = 0  # watches ended by the read timeout (and resumed)
        self.failures = 0
        self.last_error: KubernetesSourceError | None = None
        self.state = "listing"  # listing (before the first list), watching, reconnecting, retrying, forbidden
        self.started_at = clock()
        self.confirmed_at: float | None = None  # the last moment the cache was known to match the server
        self._consistent_list = False  # after 410: the next list reads etcd, not the watch cache
        self._progress = False
        self._streak = 0  # failures since the connection last worked

    @property
    def name(self) -> str:
        return self.kind.describe(self.namespace)

    @property
    def stat_name(self) -> str:
        """`Pod.default`, `ASMSwimLane`: the collection in a stat name."""
        return f"{self.kind.kind}.{self.namespace}" if self.namespace else self.kind.kind

    def fresh_at(self, now: float) -> float | None:
        """Until when the cache is known current: now while a watch is open, else when it last was."""
        return now if self.state == "watching" else self.confirmed_at

    async def list(self) -> None:
        """Read the whole collection, page by page, and swap it in at once with the list's resourceVersion.

        `resourceVersion=0` lets the API server answer from its watch cache instead of etcd (as client-go's
        reflector lists); after a 410 the list is a consistent read, so it cannot be older than what expired.
        """
        objects: dict[str, Mapping[str, Any]] = {}
        params = {"limit": str(self.page_size)}
        if self.kind.label_selector:
            params["labelSelector"] = self.kind.label_selector
        if not self._consistent_list:
            params["resourceVersion"] = "0"
        while True:
            page = await self.transport.get_json(self.path, params, accept=self.kind.accept(watch=False),
                                                 drop=self.kind.dropped)
            items = page.get("items") or []
            if not isinstance(items, list):
                raise ApiProtocolError(f"GET {self.path}: items is not a list")
            for item in items:
                name, body = self._complete(item)
                objects[name] = body
            meta = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
            if meta.get("continue"):
                params["continue"] = str(meta["continue"])
                params.pop("resourceVersion", None)  # the continue token carries it; both is an error
                continue
            resource_version = meta.get("resourceVersion")
            if not resource_version:
                raise ApiProtocolError(f"GET {self.path}: list without metadata.resourceVersion")
            break
        # Swapping the whole collection drops objects deleted while we were not watching.
        # An object listed at the resourceVersion already held is unchanged: a relist touches only what moved.
        self.changed.update(name for name, body in objects.items()
                            if name not in self.objects
                            or _resource_version(self.objects[name]) != _resource_version(body))
        self.changed.update(self.objects.keys() - objects.keys())
        self.objects = objects
        self.resource_version = str(resource_version)
        self.synced = True
        self.forbidden = False
        self._consistent_list = False
        self.lists += 1
        self.confirmed_at = self.clock()
        self._progress = True
        self._recovered()
        self.on_change(self)

    def watch_seconds(self) -> int:
        """This watch's timeoutSeconds, drawn from [watch_timeout, 2 x watch_timeout) as client-go draws it."""
        return int(self.watch_timeout * (1 + self.rng.random()))

    async def watch(self) -> int:
        """Watch from `resource_version` until the server ends the stream; returns the events applied."""
        params = {
            "watch": "true",
            "resourceVersion": self.resource_version or "",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_seconds()),
        }
        if self.kind.label_selector:
            # An object that loses the label arrives as DELETED, one that gains it as ADDED.
            params["labelSelector"] = self.kind.label_selector
        self.watches += 1
        applied = 0
        # The read timeout notices a silent connection (half-open, or a relay that stopped passing bytes);
        # a healthy but quiet watch ends by it too and resumes from its resourceVersion, losing nothing.
        stream = self.transport.stream(self.path, params, read_timeout=self.read_timeout, opened=self._watching,
                                       accept=self.kind.accept(watch=True))
        try:
            async with aclosing(stream) as events:
                async for event in events:
                    self.apply(event)
                    applied += 1
        finally:
            if self.state == "watching":
                self.confirmed_at = self.clock()
                self.state = "reconnecting"
        return applied

    def _watching(self) -> None:
        self.state = "watching"
        self.confirmed_at = self.clock()

    def apply(self, event: Mapping[str, Any]) -> None:
        """One watch event into the cache. An ERROR event raises its typed error (410 -> ResourceExpiredError)."""
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, dict):
            raise ApiProtocolError(f"watch {self.path}: {kind} event without an object")
        if kind == "ERROR":
            raise _status_error(int(obj.get("code") or 500), obj, what=f"watch {self.path}")
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        resource_version = meta.get("resourceVersion")
        self._progress = True
        self._recovered()
        if kind == "BOOKMARK":
            if resource_version:
                self.resource_version = str(resource_version)
            return
        if kind in ("ADDED", "MODIFIED"):
            name, body = self._complete(obj)
            self.objects[name] = body
            self.changed.add(name)
        elif kind == "DELETED":
            self.objects.pop(str(meta.get("name")), None)
            self.changed.add(str(meta.get("name")))
        else:
            log.warning("%s: ignoring watch event of unknown type %r", self.name, kind)
            return
        if resource_version:
            self.resource_version = str(resource_version)
        self.on_change(self)

    async def step(self) -> int:
        """One round: list if there is no resourceVersion to resume from, then one watch."""
        if self.resource_version is None:
            await self.list()
        return await self.watch()

    async def run(self) -> None:
        """Reconnect loop: resume after a stream ends, relist after 410, back off while the server is away."""
        loop = asyncio.get_running_loop()
        expired_in_a_row = 0
        while True:
            started = loop.time()
            delay = 0.0
            try:
                applied = await self.step()
                expired_in_a_row = 0
                # A stream the server ends early and empty is a failing server, not a normal timeout:
                # back off instead of spinning.
                if applied == 0 and loop.time() - started < min(1.0, self.watch_timeout / 2):
                    delay = self._next_delay()
                else:
                    self.backoff.reset()
            except WatchSilentError as exc:
                # Quiet namespaces end here routinely; a dead connection too. Either way: watch again.
                self.silent_watches += 1
                log.debug("%s: %s; watching again from resourceVersion %s", self.name, exc, self.resource_version)
            except ResourceExpiredError as exc:
                log.info("%s: %s; relisting (the served table stays until the relist is built)", self.name,
                         exc.message or "410 Gone")
                self.resource_version = None
                self._consistent_list = True
                self.relists_after_expiry += 1
                expired_in_a_row += 1
                if expired_in_a_row > 1:  # a relist that expires again must not spin
                    delay = self._next_delay()
            except KubernetesSourceError as exc:
                if isinstance(exc, ApiStatusError) and exc.status == 404 and self.kind.kind == "EndpointSlice":
                    older = OLDER_VERSIONS.get(self.kind)
                    if older is not None:
                        log.info("%s: %s is not served; reading %s", self.name, self.kind.api_version, older.api_version)
                        self.kind, self.path = older, older.path(self.namespace)
                        continue
                    if not self.forbidden:
                        log.log(logging.ERROR if self.slices_required else logging.INFO,
                                "%s: no EndpointSlice API served: %s", self.name,
                                "pods read as metadata give no endpoints without it; run with --pods full"
                                if self.slices_required else "endpoints come from the ready pods each Service selects")
                    self._forbid(exc, quiet=True)
                    await asyncio.sleep(self.backoff.cap)
                    continue
                self.failures += 1
                self.last_error = exc
                delay = self._next_delay()
                self._streak += 1
                self.state = "retrying"
                if isinstance(exc, ApiStatusError) and exc.status == 403 and self.kind.namespaced:
                    if self.synced and not self.forbidden:
                        # Read before: keep what it holds, as client-go's reflector keeps its store. A kube-apiserver
                        # that has just started answers 403 until its RBAC cache is warm; emptying the collection
                        # then would take every endpoint of the namespace out of the table for those seconds.
                        self.state = "forbidden"
                    else:
                        self._forbid(exc)
                # The first failure of a streak, then every tenth: an outage must not flood the log.
                level = logging.ERROR if isinstance(exc, (ApiStatusError, KubernetesConfigError)) else logging.WARNING
                log.log(level if self._streak % 10 == 1 else logging.DEBUG,
                        "%s: %s; retrying in %.1fs (attempt %d), serving the last good table%s",
                        self.name, exc, delay, self._streak, _hint(exc))
                if isinstance(exc, ApiStatusError) and exc.status == 401 and self.on_unauthorized is not None:
                    await self.on_unauthorized()
            except Exception:  # noqa: BLE001 - a bug here must not end the watch for the life of the process
                self.failures += 1
                delay = self._next_delay()
                log.exception("%s: unexpected failure; retrying in %.1fs", self.name, delay)
                self.resource_version = None
            if delay:
                await asyncio.sleep(delay)

    def _forbid(self, exc: ApiStatusError, *, quiet: bool = False) -> None:
        """A namespace the sidecar may not read: empty, so that it holds back no other update; asked again later."""
        if not self.forbidden and not quiet:
            log.error("%s: %s: counted as empty until the sidecar may read it (check the RoleBindings of that "
                      "namespace or deploy/rbac); every other namespace keeps updating", self.name, exc.message)
        had_objects = bool(self.objects) or not self.synced
        self.forbidden, self.synced, self.state = True, True, "forbidden"
        self.changed.update(self.objects)
        self.objects, self.resource_version = {}, None
        self.confirmed_at = self.clock()
        if had_objects:
            self.on_change(self)

    def _next_delay(self) -> float:
        if self._progress:  # the connection worked since the last failure: start over from a short delay
            self.backoff.reset()
            self._progress = False
            self._streak = 0
        return self.backoff.next()

    def _recovered(self) -> None:
        if self._streak:
            log.info("%s: API server answers again after %d failed attempts", self.name, self._streak)
            self._streak = 0

    def _complete(self, item: Any) -> tuple[str, Mapping[str, Any]]:
        """A listed or watched object as build.py reads it: with apiVersion and kind, without managedFields."""
        if not isinstance(item, dict) or not isinstance(item.get("metadata"), dict) or not item["metadata"].get("name"):
            raise ApiProtocolError(f"{self.path}: object without metadata.name")
        if self.kind.metadata_only:
            # As the server sends it (PartialObjectMetadata), keeping only what is read: no annotations.
            kept = {key: item["metadata"][key] for key in _METADATA_KEPT if key in item["metadata"]}
            return str(kept["name"]), {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                       "metadata": kept}
        body = dict(item)
        body["apiVersion"], body["kind"] = self.kind.api_version, self.kind.kind  # list items carry neither
        meta = dict(body["metadata"])
        meta.pop("managedFields", None)  # often the largest part of an object, and never read
        body["metadata"] = meta
        return str(meta["name"]), body


def _hint(exc: KubernetesSourceError) -> str:
    if isinstance(exc, ApiStatusError) and exc.status == 403:
        return " (forbidden: check the laneproxy ClusterRole and its binding in deploy/rbac)"
    if isinstance(exc, ApiStatusError) and exc.status == 404:
        return " (not found: are the swimlane CRDs from deploy/crds installed?)"
    return ""


# ---------------------------------------------------------------------------------------------
# The source


def status_for(problems: tuple[ConfigProblem, ...], *, kept: bool = False) -> dict[str, Any]:
    """A swimlane object's status: why it is not in use as written, or nothing (null removes the field)."""
    if not problems:
        return {"error": None, "validationMessage": None}
    lines = [f"{problem.path}: {problem.reason}" for problem in problems]
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    what = "not applied, laneproxy keeps its last good version" if kept else "left out of the route table by laneproxy"
    return {"error": f"{what}: {lines[0]}{more}", "validationMessage": "\n".join(lines)}


def namespaces_named(bodies: Iterable[Mapping[str, Any]]) -> set[str]:
    """Namespaces of the services swimlane objects name in `spec.services`; tolerant, build.py validates."""
    namespaces: set[str] = set()
    for body in bodies:
        spec = body.get("spec")
        services = spec.get("services") if isinstance(spec, dict) else None
        for ref in services if isinstance(services, list) else ():
            if isinstance(ref, dict) and ref.get("name"):
                namespace = ref.get("namespace")
                namespaces.add(namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE)
    return namespaces


class KubernetesSource:
    """Publishes a table built from the watched objects after the first complete sync and after every change."""

    def __init__(
        self,
        store: RouteTableStore,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        kubeconfig: str | None = None,
        context: str | None = None,
        debounce: float = 0.05,
        max_delay: float = 0.5,
        backoff_initial: float = 0.2,
        backoff_cap: float = 10.0,
        watch_timeout: int = 300,
        watch_read_timeout: float = 60.0,
        page_size: int = 500,
        request_timeout: float = 60.0,
        connect_timeout: float = 5.0,
        rng: random.Random | None = None,
        lenient: bool = False,
        write_status: bool = True,
        status_jitter: float = 2.0,
        stale_after: float = 180.0,
        sync_grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        pods: str = "full",
    ) -> None:
        if pods not in POD_MODES:
            raise ValueError(f"pods must be one of {', '.join(POD_MODES)}, not {pods!r}")
        self.store = store
        # full: whole Pods (addresses and readiness from them where a Service has no EndpointSlices);
        # metadata: the labels of the pods carrying ASM_TRAFFIC_TAG only, endpoints from EndpointSlices alone.
        self.pod_kind = POD_MODES[pods]
        self.lenient = lenient  # unknown fields in the objects are warnings, not a rejected update
        self.namespace = namespace  # where the proxy runs: short host names resolve here
        self.kubeconfig, self.context = kubeconfig, context
        self.debounce, self.max_delay = debounce, max_delay
        self.backoff_initial, self.backoff_cap = backoff_initial, backoff_cap
        self.watch_timeout, self.page_size = watch_timeout, page_size
        self.watch_read_timeout = watch_read_timeout
        self.request_timeout, self.connect_timeout = request_timeout, connect_timeout
        self.rng = rng or random.Random()
        self.clock = clock
        self.write_status = write_status  # tell a swimlane object left out of the table why, in its status
        # Each sidecar waits a random part of this before writing a status, then writes only if no other
        # sidecar's write has arrived meanwhile: a thousand sidecars agreeing write it a few times, not a thousand.
        self.status_jitter = status_jitter
        # After the first table: a collection that has not listed within this long (a new namespace whose
        # list keeps failing) counts as empty rather than holding back every other update.
        self.sync_grace = sync_grace
        self._status_task: asyncio.Task | None = None
        self.stale_after = stale_after  # table older than this: laneproxy.config.table_stale turns 1
        self.status_writes = 0
        self.status_write_failures = 0
        self._status_forbidden_logged = False
        self._logged_skips: Mapping[str, tuple[ConfigProblem, ...]] = {}
        # Each object as the running table was built from it: a bad edit of it keeps this version.
        self._last_good: dict[str, ConfigDocument] = {}
        self._kept_last_good: frozenset[str] = frozenset()
        self._published_at: float | None = None
        self.reflectors: dict[tuple[str, str | None], Reflector] = {}
        self.rebuilds = 0  # tables built, fully or incrementally
        self.incremental_updates = 0  # of them, updates applied by replacing only the changed services
        # The running table's indexes, for an update that touches a few objects; None: the next one is a full build.
        self._incremental: IncrementalTable | None = None
        self._marks: dict[str, str] = {}  # source -> the resourceVersion mark the version was computed with
        self._mark_bits = 0
        self._layout = 0  # counts collections followed and dropped: a full build started before one is not reused
        self.synced_after: float | None = None  # seconds from start to the first published table
        self._tasks: dict[tuple[str, str | None], asyncio.Task] = {}
        self._retiring: set[asyncio.Task] = set()  # watches of namespaces no group names any more, cancelled
        self._api: kube_client.ApiClient | None = None
        self._transport: ApiTransport | None = None
        self._dirty = asyncio.Event()
        self._rebuilder: asyncio.Task | None = None
        self._attempted: str | None = None
        self._logged_problems: str | None = None
        self._logged_warnings: tuple = ()
        self._started_at = 0.0
        self._reloading: asyncio.Lock | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load credentials and start watching; returns at once, `store.ready` turns true after the first sync."""
        self._started_at = time.monotonic()
        configuration = await self._load_configuration()
        # Every watch holds a connection for its lifetime: the pool must not cap them (0 = unlimited).
        configuration.connection_pool_maxsize = 0
        self._api = kube_client.ApiClient(configuration=configuration)
        self._api.user_agent = USER_AGENT
        self._transport = ApiTransport(self._api, request_timeout=self.request_timeout,
                                       connect_timeout=self.connect_timeout)
        self._reloading = asyncio.Lock()
        self.store.health = self.health
        log.info("watching %s and %s on %s", SWIMLANE_GROUPS.plural, SWIMLANES.plural, configuration.host)
        self._rebuilder = asyncio.get_running_loop().create_task(self._rebuild_loop(), name="kubernetes-rebuild")
        self._follow(SWIMLANE_GROUPS, None)
        self._follow(SWIMLANES, None)

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._retiring, *([self._rebuilder] if self._rebuilder else []),
                 *([self._status_task] if self._status_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._rebuilder = None
        if self._api is not None:
            await self._api.close()
            self._api = None

    @property
    def synced(self) -> bool:
        """Every collection the current swimlane objects call for has been listed at least once.

        Once a first table is served, a collection still not listed after `sync_grace` counts as empty.
        """
        if not self.reflectors:
            return False
        overdue = self.clock() - self.sync_grace
        return all(r.synced or (self.store.ready and r.started_at < overdue) for r in self.reflectors.values())

    def health(self) -> SourceHealth:
        """How far behind the API server the served table may be, and each collection's state."""
        now = self.clock()
        fresh = [reflector.fresh_at(now) for reflector in self.reflectors.values()]
        age = None
        if self.store.ready and self._published_at is not None:
            known = [at for at in fresh if at is not None]
            oldest = min(known) if len(known) == len(fresh) else self._published_at
            if self.store.last_error is not None:  # the cache is newer than the table: it was rejected
                oldest = min(oldest, self._published_at)
            age = max(0.0, now - oldest)
        resources = tuple(sorted((reflector.stat_name, reflector.state) for reflector in self.reflectors.values()))
        return SourceHealth(age, age is not None and age > self.stale_after, resources)

    @property
    def namespaces(self) -> list[str]:
        return sorted({ns for (kind, ns) in self.reflectors if ns is not None})

    async def _load_configuration(self) -> kube_client.Configuration:
        configuration = kube_client.Configuration()
        if self.kubeconfig and not os.path.isfile(self.kubeconfig):
            raise KubernetesConfigError(f"kubeconfig {self.kubeconfig} does not exist")
        try:
            if self.kubeconfig:
                await kube_config.load_kube_config(config_file=self.kubeconfig, context=self.context,
                                                   client_configuration=configuration, persist_config=False)
            else:
                try:
                    kube_config.load_incluster_config(client_configuration=configuration)
                except ConfigException:
                    # Not in a pod: the default kubeconfig, as kubectl would use.
                    await kube_config.load_kube_config(context=self.context, client_configuration=configuration,
                                                       persist_config=False)
        except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            where = self.kubeconfig or "in-cluster service account or ~/.kube/config"
            raise KubernetesConfigError(f"cannot load Kubernetes credentials from {where}: {_describe(exc)}") from exc
        return configuration

    async def get_json(self, path: str, params: Mapping[str, str]) -> dict:
        """One GET with the source's credentials (a Job's sidecar reads its own pod with it)."""
        if self._transport is None:
            raise KubernetesConfigError("the source has not started")
        return await self._transport.get_json(path, params)

    async def _reload_credentials(self) -> None:
        """After a 401: read the kubeconfig or service-account token again (rotated token, expired exec token)."""
        assert self._reloading is not None and self._api is not None
        if self._reloading.locked():
            return
        async with self._reloading:
            try:
                fresh = await self._load_configuration()
            except KubernetesConfigError as exc:
                log.error("%s", exc)
                return
            self._api.configuration.api_key = fresh.api_key
            self._api.configuration.refresh_api_key_hook = fresh.refresh_api_key_hook

    # -- collections ----------------------------------------------------------------------------

    def _follow(self, kind: ResourceKind, namespace: str | None) -> None:
        assert self._transport is not None
        key = (kind.kind, namespace)
        if key in self.reflectors:
            return
        reflector = Reflector(
            self._transport, kind, namespace, on_change=self._changed,
            backoff=Backoff(self.backoff_initial, self.backoff_cap, self.rng),
            watch_timeout=self.watch_timeout, read_timeout=self.watch_read_timeout, page_size=self.page_size,
            on_unauthorized=self._reload_credentials, rng=self.rng, clock=self.clock,
        )
        reflector.slices_required = kind.kind == ENDPOINT_SLICES.kind and self.pod_kind.metadata_only
        self.reflectors[key] = reflector
        self._incremental, self._layout = None, self._layout + 1  # a new collection: the next table is a full build
        loop = asyncio.get_running_loop()
        self._tasks[key] = loop.create_task(reflector.run(), name=f"watch {reflector.name}")
        if self.store.ready:  # rebuild once its grace is over, even if it never lists
            loop.call_later(self.sync_grace + 0.1, self._dirty.set)

    def _unfollow(self, kind: ResourceKind, namespace: str) -> None:
        key = (kind.kind, namespace)
        self.reflectors.pop(key, None)
        self._incremental, self._layout = None, self._layout + 1
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _changed(self, reflector: Reflector) -> None:
        if reflector.kind in (SWIMLANE_GROUPS, SWIMLANES):
            self._follow_namespaces()
        self._dirty.set()

    def _follow_namespaces(self) -> None:
        """Watch Services, Pods and EndpointSlices exactly in the namespaces the swimlane objects name."""
        wanted = namespaces_named(self._bodies(SWIMLANE_GROUPS)) | namespaces_named(self._bodies(SWIMLANES))
        current = set(self.namespaces)
        kinds = (SERVICES, self.pod_kind, ENDPOINT_SLICES)
        for namespace in sorted(wanted - current):
            log.info("following %s in namespace %s", ", ".join(kind.plural for kind in kinds), namespace)
            for kind in kinds:
                self._follow(kind, namespace)
        for namespace in sorted(current - wanted):
            log.info("no swimlane object names namespace %s any more: stop watching it", namespace)
            for kind in kinds:
                self._unfollow(kind, namespace)

    def _bodies(self, kind: ResourceKind) -> Iterable[Mapping[str, Any]]:
        reflector = self.reflectors.get((kind.kind, None))
        return reflector.objects.values() if reflector is not None else ()

    # -- rebuilding -----------------------------------------------------------------------------

    @staticmethod
    def _source(kind: str, namespace: str | None, name: str) -> str:
        return f"kubernetes:{kind}/{namespace}/{name}" if namespace else f"kubernetes:{kind}/{name}"

    @staticmethod
    def _mark(kind: str, namespace: str | None, name: str, body: Mapping[str, Any]) -> str:
        where = f"{namespace}/{name}" if namespace else name
        return f"{kind}/{where}@{body['metadata'].get('resourceVersion', '')}"

    def documents(self) -> tuple[list[ConfigDocument], str]:
        """The cached objects as build.py's input, ordered by source, and a version made of every object's
        resourceVersion."""
        documents, bits = [], 0
        for (kind, namespace), reflector in self.reflectors.items():
            for name, body in reflector.objects.items():
                documents.append(ConfigDocument(self._source(kind, namespace, name), body))
                bits ^= _mark_bits(self._mark(kind, namespace, name, body))
        documents.sort(key=lambda document: document.source)
        return documents, _version(bits)

    def _take_changes(self) -> dict[str, tuple[ConfigDocument, ...]]:
        """The objects changed since the last table (source -> its document, none if deleted); keeps the version."""
        changes: dict[str, tuple[ConfigDocument, ...]] = {}
        for (kind, namespace), reflector in self.reflectors.items():
            for name in reflector.changed:
                source = self._source(kind, namespace, name)
                body = reflector.objects.get(name)
                old = self._marks.pop(source, None)
                if old is not None:
                    self._mark_bits ^= _mark_bits(old)
                if body is None:
                    changes[source] = ()
                    continue
                mark = self._mark(kind, namespace, name, body)
                self._marks[source] = mark
                self._mark_bits ^= _mark_bits(mark)
                changes[source] = (ConfigDocument(source, body),)
            reflector.changed = set()
        return changes

    async def rebuild(self) -> bool:
        """Apply what changed since the last table and publish; True if a new table was published.

        A change of a few Services, Pods or EndpointSlices replaces only their services' routes
        (core.incremental); anything else (a swimlane object, an object with a problem, a new namespace,
        a rejected update) is a full build from the cache, which decides what is left out.
        """
        if not self.synced:
            return False  # a partial view must never replace the served table (or make it ready)
        if self._incremental is not None:
            incremental, layout = self._incremental, self._layout
            changes = self._take_changes()
            if not changes:
                return False
            version = _version(self._mark_bits)
            self._incremental = None  # until it is through: a failure below leaves a full build to the next rebuild
            if len(changes) <= INLINE_UPDATE_LIMIT:
                built = incremental.apply(changes, version=version)
            else:
                built = await build_off_loop(lambda: incremental.apply(changes, version=version))
            if built is not None and layout == self._layout:
                self._incremental = incremental
                self.rebuilds += 1
                self.incremental_updates += 1
                for source, documents in changes.items():
                    if documents:
                        self._last_good[source] = documents[0]
                    else:
                        self._last_good.pop(source, None)
                self._attempted = version
                self._publish(built)
                return True
        return await self._rebuild_all()

    async def _rebuild_all(self) -> bool:
        for reflector in self.reflectors.values():
            reflector.changed = set()
        documents, version = self.documents()
        self._marks = {}
        self._mark_bits = 0
        for (kind, namespace), reflector in self.reflectors.items():
            for name, body in reflector.objects.items():
                mark = self._mark(kind, namespace, name, body)
                self._marks[self._source(kind, namespace, name)] = mark
                self._mark_bits ^= _mark_bits(mark)
        if version in (self.store.current.version, self._attempted):
            return False
        self._attempted = version
        self.rebuilds += 1
        self._incremental, layout = None, self._layout
        try:
            # Off the event loop: a large namespace must not stall the sidecar's hot path.
            last_good = {doc.source: (self._last_good[doc.source],) for doc in documents if doc.source in self._last_good}
            built = await build_off_loop(lambda: build_skipping(documents, version=version, namespace=self.namespace,
                                                                lenient=self.lenient, last_good=last_good))
            incremental = await build_off_loop(lambda: IncrementalTable(built, namespace=self.namespace,
                                                                        rank=lambda source: source))
        except ConfigInvalidError as exc:
            self.store.reject(exc)
            problems = str(exc)
            if problems != self._logged_problems:  # pod churn must not repeat the same report
                self._logged_problems = problems
                log.error("configuration from Kubernetes rejected, keeping version %r:\n%s",
                          self.store.current.version or "none", exc)
            return False
        # Objects changed while it built are applied to it next; a collection followed or dropped is not.
        self._incremental = incremental if layout == self._layout else None
        self._last_good = {doc.source: doc for doc in documents if doc.source not in built.skipped}
        self._last_good.update((source, self._last_good_before(source, last_good)) for source in built.kept_last_good)
        self._publish(built)
        return True

    def _publish(self, built: Built) -> None:
        table = built.table
        if built.warnings != self._logged_warnings:  # pod churn must not repeat the same report either
            self._logged_warnings = built.warnings
            for warning in built.warnings:
                log.warning("%s (ignored: --lenient)", warning)
        first = not self.store.ready
        self._logged_problems = None
        self._kept_last_good = built.kept_last_good
        self._report_skipped(built.skipped)
        self.store.publish(table, built.skipped)
        self._published_at = self.clock()
        settle_heap()
        if self.write_status and (self._status_task is None or self._status_task.done()):
            # One pending writer at a time; it reads what is left out when it runs, so churn cannot starve it.
            self._status_task = asyncio.get_running_loop().create_task(self._write_statuses(),
                                                                       name="kubernetes-status")
        if first:
            self.synced_after = time.monotonic() - self._started_at
            log.info("first complete sync after %.2fs", self.synced_after)
        log.info("configuration version %s published (%d services, %d groups, namespaces %s)", table.version,
                 len(table.services), len(table.groups), ", ".join(self.namespaces) or "none")

    @staticmethod
    def _last_good_before(source: str, last_good: Mapping[str, tuple[ConfigDocument, ...]]) -> ConfigDocument:
        (document,) = last_good[source]
        return document

    def _report_skipped(self, skipped: Mapping[str, tuple[ConfigProblem, ...]]) -> None:
        """Log each object newly left out (or left out for a new reason) once, and each one taken back."""
        for source, problems in skipped.items():
            if self._logged_skips.get(source) != problems:
                what = ("keeps its last good version in the route table" if source in self._kept_last_good
                        else "left out of the route table")
                log.error("%s %s, every other object still updates:\n%s", source, what,
                          "\n".join(f"  {problem.path}: {problem.reason}" for problem in problems))
        for source in self._logged_skips.keys() - skipped.keys():
            log.info("%s is back in the route table", source)
        self._logged_skips = dict(skipped)

    async def _write_statuses(self) -> None:
        """Say on each swimlane object whether it is in the table, as ASM does (`status.error`, `validationMessage`).

        Written only where the status differs, so many sidecars computing the same answer write it about once.
        """
        assert self._transport is not None
        await asyncio.sleep(self.rng.uniform(0, self.status_jitter))
        written_for = None
        while written_for is not self.store.skipped:  # again if a rebuild changed it while writing
            written_for = self.store.skipped
            if not await self._write_statuses_for(written_for):
                return

    async def _write_statuses_for(self, skipped: Mapping[str, tuple[ConfigProblem, ...]]) -> bool:
        """False if the token may not write statuses at all."""
        assert self._transport is not None
        for kind in (SWIMLANE_GROUPS, SWIMLANES):
            reflector = self.reflectors.get((kind.kind, None))
            for name, body in list(reflector.objects.items()) if reflector is not None else ():
                source = f"kubernetes:{kind.kind}/{name}"
                wanted = status_for(skipped.get(source, ()), kept=source in self._kept_last_good)
                status = body.get("status") if isinstance(body.get("status"), dict) else {}
                if all(status.get(key) == value for key, value in wanted.items()):
                    continue
                try:
                    await self._transport.patch_json(f"{kind.path(None)}/{name}/status", {"status": wanted})
                    self.status_writes += 1
                except KubernetesSourceError as exc:
                    self.status_write_failures += 1
                    if isinstance(exc, ApiStatusError) and exc.status == 403:
                        if not self._status_forbidden_logged:
                            self._status_forbidden_logged = True
                            log.warning("may not write the status of %s (%s): problems are in the log and the "
                                        "laneproxy.config.skipped_objects stat only; deploy/rbac grants it",
                                        kind.plural, exc.message)
                        return False
                    log.warning("writing the status of %s %s: %s", kind.kind, name, exc)
        return True

    async def _rebuild_loop(self) -> None:
        """Coalesce bursts: rebuild once the events stop for `debounce`, or `max_delay` after the first."""
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            first = loop.time()
            while True:
                self._dirty.clear()
                quiet = min(self.debounce, first + self.max_delay - loop.time())
                if quiet <= 0:
                    break
                try:
                    await asyncio.wait_for(self._dirty.wait(), quiet)
                except TimeoutError:
                    break
            try:
                await self.rebuild()
            except Exception:  # noqa: BLE001 - a bug in one rebuild must not stop every later one
                log.exception("rebuilding the route table failed; keeping version %r", self.store.current.version)
