"""The Kubernetes source: swimlane resources, Services and Pods on the API server -> RouteTables in the store.

Owns talking to the API server and nothing else: list, then watch from the list's resourceVersion
with bookmarks; relist on 410 Gone; reconnect with capped exponential backoff when a stream breaks
or the server is away; a cache of the watched objects; coalescing bursts of events into one
rebuild; publishing. Credentials and TLS come from kubernetes_asyncio (a kubeconfig, or the pod's
service account), never from hand-written code.

What it watches: the cluster-scoped `ASMSwimLaneGroup` and `ASMSwimLane` objects, and Services and
Pods only in the namespaces the swimlane objects name (one list+watch per namespace, started and
stopped as groups change). It never reads a namespace no group names, so a deployment may grant
Services and Pods per namespace, and a sidecar never holds every pod of the cluster in memory.

It never validates: core.build does, on the plain dicts received. An update that does not validate
is rejected, logged and counted, and the last good table keeps serving; so does an API outage. The
store turns ready only with a table built from a complete first sync of every collection.
Third-party exceptions (aiohttp, kubernetes_asyncio) are translated here, at the edge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping

import aiohttp
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.config import ConfigException

from laneproxy.control.building import build_off_loop, settle_heap
from laneproxy.core.build import DEFAULT_NAMESPACE, SWIMLANE_API, ConfigDocument, build, content_version
from laneproxy.core.errors import ConfigInvalidError, LaneProxyError
from laneproxy.core.store import RouteTableStore

log = logging.getLogger("laneproxy.kubernetes")

USER_AGENT = "laneproxy/kubernetes-source"


# ---------------------------------------------------------------------------------------------
# Errors: every failure of the API conversation is one of these, whatever library raised it.


class KubernetesSourceError(LaneProxyError):
    """Base of the Kubernetes source's errors."""


class KubernetesConfigError(KubernetesSourceError):
    """No usable credentials: a kubeconfig that cannot be read, or not running in a cluster."""


class ApiUnreachableError(KubernetesSourceError):
    """The API server could not be reached, or a stream from it broke or went silent."""


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


@dataclass(frozen=True, slots=True)
class ResourceKind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool

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


# ---------------------------------------------------------------------------------------------
# Transport: HTTP through kubernetes_asyncio's client, which owns credentials, TLS and token refresh.

_NETWORK_ERRORS = (aiohttp.ClientError, OSError)  # TimeoutError is an OSError


class ApiTransport:
    """GET JSON and stream watch events, with every failure translated into this module's errors."""

    def __init__(self, api: kube_client.ApiClient, *, request_timeout: float, connect_timeout: float) -> None:
        self.api = api
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout

    async def get_json(self, path: str, params: Mapping[str, str]) -> dict:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
        response = await self._open(path, params, timeout)
        try:
            raw = await response.read()
        except _NETWORK_ERRORS as exc:
            raise ApiUnreachableError(f"GET {path}: {_describe(exc)}") from exc
        finally:
            response.release()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiProtocolError(f"GET {path}: answer is not JSON") from exc
        if not isinstance(body, dict):
            raise ApiProtocolError(f"GET {path}: answer is not a JSON object")
        return body

    async def stream(self, path: str, params: Mapping[str, str], *, read_timeout: float) -> AsyncIterator[dict]:
        """Watch events, one JSON object per line, until the server ends the stream."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=read_timeout)
        response = await self._open(path, params, timeout)
        try:
            while True:
                try:
                    line = await response.content.readline()
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

    async def _open(self, path: str, params: Mapping[str, str], timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        try:
            response = await self.api.call_api(
                path, "GET", query_params=list(params.items()), header_params={"Accept": "application/json"},
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
            raise _status_error(response.status, text, what=f"GET {path}")
        return response


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
        page_size: int = 500,
        on_unauthorized: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.transport, self.kind, self.namespace = transport, kind, namespace
        self.on_change, self.backoff, self.on_unauthorized = on_change, backoff, on_unauthorized
        self.watch_timeout, self.page_size = watch_timeout, page_size
        self.path = kind.path(namespace)
        self.objects: dict[str, Mapping[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = False  # true from the first complete list on, also while reconnecting
        self.lists = 0
        self.relists_after_expiry = 0
        self.watches = 0
        self.failures = 0
        self.last_error: KubernetesSourceError | None = None
        self._progress = False
        self._streak = 0  # failures since the connection last worked

    @property
    def name(self) -> str:
        return self.kind.describe(self.namespace)

    async def list(self) -> None:
        """Read the whole collection, page by page, and swap it in at once with the list's resourceVersion."""
        objects: dict[str, Mapping[str, Any]] = {}
        params = {"limit": str(self.page_size)}
        while True:
            page = await self.transport.get_json(self.path, params)
            items = page.get("items") or []
            if not isinstance(items, list):
                raise ApiProtocolError(f"GET {self.path}: items is not a list")
            for item in items:
                name, body = self._complete(item)
                objects[name] = body
            meta = page.get("metadata") if isinstance(page.get("metadata"), dict) else {}
            if meta.get("continue"):
                params["continue"] = str(meta["continue"])
                continue
            resource_version = meta.get("resourceVersion")
            if not resource_version:
                raise ApiProtocolError(f"GET {self.path}: list without metadata.resourceVersion")
            break
        # Swapping the whole collection drops objects deleted while we were not watching.
        self.objects = objects
        self.resource_version = str(resource_version)
        self.synced = True
        self.lists += 1
        self._progress = True
        self._recovered()
        self.on_change(self)

    async def watch(self) -> int:
        """Watch from `resource_version` until the server ends the stream; returns the events applied."""
        params = {
            "watch": "true",
            "resourceVersion": self.resource_version or "",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        self.watches += 1
        applied = 0
        # The read timeout notices a silent, half-open connection; the server itself ends the watch
        # after timeoutSeconds, so only a dead stream stays quiet much longer than that.
        stream = self.transport.stream(self.path, params, read_timeout=self.watch_timeout + 30)
        async with aclosing(stream) as events:
            async for event in events:
                self.apply(event)
                applied += 1
        return applied

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
        elif kind == "DELETED":
            self.objects.pop(str(meta.get("name")), None)
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
            except ResourceExpiredError as exc:
                log.info("%s: %s; relisting (the served table stays until the relist is built)", self.name,
                         exc.message or "410 Gone")
                self.resource_version = None
                self.relists_after_expiry += 1
                expired_in_a_row += 1
                if expired_in_a_row > 1:  # a relist that expires again must not spin
                    delay = self._next_delay()
            except KubernetesSourceError as exc:
                self.failures += 1
                self.last_error = exc
                delay = self._next_delay()
                self._streak += 1
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
        page_size: int = 500,
        request_timeout: float = 60.0,
        connect_timeout: float = 5.0,
        rng: random.Random | None = None,
        lenient: bool = False,
    ) -> None:
        self.store = store
        self.lenient = lenient  # unknown fields in the objects are warnings, not a rejected update
        self.namespace = namespace  # where the proxy runs: short host names resolve here
        self.kubeconfig, self.context = kubeconfig, context
        self.debounce, self.max_delay = debounce, max_delay
        self.backoff_initial, self.backoff_cap = backoff_initial, backoff_cap
        self.watch_timeout, self.page_size = watch_timeout, page_size
        self.request_timeout, self.connect_timeout = request_timeout, connect_timeout
        self.rng = rng or random.Random()
        self.reflectors: dict[tuple[str, str | None], Reflector] = {}
        self.rebuilds = 0
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
        log.info("watching %s and %s on %s", SWIMLANE_GROUPS.plural, SWIMLANES.plural, configuration.host)
        self._rebuilder = asyncio.get_running_loop().create_task(self._rebuild_loop(), name="kubernetes-rebuild")
        self._follow(SWIMLANE_GROUPS, None)
        self._follow(SWIMLANES, None)

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._retiring, *([self._rebuilder] if self._rebuilder else [])]
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
        """Every collection the current swimlane objects call for has been listed at least once."""
        return bool(self.reflectors) and all(r.synced for r in self.reflectors.values())

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
            watch_timeout=self.watch_timeout, page_size=self.page_size, on_unauthorized=self._reload_credentials,
        )
        self.reflectors[key] = reflector
        self._tasks[key] = asyncio.get_running_loop().create_task(reflector.run(), name=f"watch {reflector.name}")

    def _unfollow(self, kind: ResourceKind, namespace: str) -> None:
        key = (kind.kind, namespace)
        self.reflectors.pop(key, None)
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
        """Watch Services and Pods exactly in the namespaces the swimlane objects name."""
        wanted = namespaces_named(self._bodies(SWIMLANE_GROUPS)) | namespaces_named(self._bodies(SWIMLANES))
        current = set(self.namespaces)
        for namespace in sorted(wanted - current):
            log.info("following Services and Pods in namespace %s", namespace)
            self._follow(SERVICES, namespace)
            self._follow(PODS, namespace)
        for namespace in sorted(current - wanted):
            log.info("no swimlane object names namespace %s any more: stop watching it", namespace)
            self._unfollow(SERVICES, namespace)
            self._unfollow(PODS, namespace)

    def _bodies(self, kind: ResourceKind) -> Iterable[Mapping[str, Any]]:
        reflector = self.reflectors.get((kind.kind, None))
        return reflector.objects.values() if reflector is not None else ()

    # -- rebuilding -----------------------------------------------------------------------------

    def documents(self) -> tuple[list[ConfigDocument], str]:
        """The cached objects as build.py's input, and a version: a hash of every object's resourceVersion."""
        documents, marks = [], []
        for (kind, namespace), reflector in sorted(self.reflectors.items(), key=lambda item: (item[0][0], item[0][1] or "")):
            for name, body in sorted(reflector.objects.items()):
                where = f"{namespace}/{name}" if namespace else name
                documents.append(ConfigDocument(f"kubernetes:{kind}/{where}", body))
                marks.append(f"{kind}/{where}@{body['metadata'].get('resourceVersion', '')}")
        return documents, content_version(marks)

    async def rebuild(self) -> bool:
        """Build from the cache as it is now and publish; True if a new table was published."""
        if not self.synced:
            return False  # a partial view must never replace the served table (or make it ready)
        documents, version = self.documents()
        if version in (self.store.current.version, self._attempted):
            return False
        self._attempted = version
        self.rebuilds += 1
        try:
            # Off the event loop: a large namespace must not stall the sidecar's hot path.
            built = await build_off_loop(lambda: build(documents, version=version, namespace=self.namespace,
                                                       lenient=self.lenient))
        except ConfigInvalidError as exc:
            self.store.reject(exc)
            problems = str(exc)
            if problems != self._logged_problems:  # pod churn must not repeat the same report
                self._logged_problems = problems
                log.error("configuration from Kubernetes rejected, keeping version %r:\n%s",
                          self.store.current.version or "none", exc)
            return False
        table = built.table
        if built.warnings != self._logged_warnings:  # pod churn must not repeat the same report either
            self._logged_warnings = built.warnings
            for warning in built.warnings:
                log.warning("%s (ignored: --lenient)", warning)
        first = not self.store.ready
        self._logged_problems = None
        self.store.publish(table)
        settle_heap()
        if first:
            self.synced_after = time.monotonic() - self._started_at
            log.info("first complete sync after %.2fs", self.synced_after)
        log.info("configuration version %s published (%d services, %d groups, namespaces %s)", table.version,
                 len(table.services), len(table.groups), ", ".join(self.namespaces) or "none")
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
