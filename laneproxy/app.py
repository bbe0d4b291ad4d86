"""The one place where laneproxy is wired together, and its lifecycle.

Owns start-up order (sources first, then the first snapshot, then listeners and readiness), the
shared objects of one process (store, stats, trace table, pools), and shutdown: on SIGTERM the
proxy reports DRAINING, keeps accepting and serving with `Connection: close` for the minimum drain
time, then exits as soon as no request is in flight (at the latest at the drain limit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time

from laneproxy.admin.server import AdminServer
from laneproxy.control.files import FileSource
from laneproxy.core.errors import LaneProxyError
from laneproxy.core.model import Endpoint
from laneproxy.core.propagation import TraceLaneTable
from laneproxy.core.store import RouteTableStore
from laneproxy.core.balance import EndpointSelector, FailedHops, OutlierDetector, RandomPicker
from laneproxy.dataplane.listener import GatewayRole, InboundRole, Listener, OutboundRole
from laneproxy.dataplane.http2_upstream import Http2Pools
from laneproxy.dataplane.pools import ProcessPools
from laneproxy.dataplane.upstream import UpstreamPools
from laneproxy.dataplane.route_trail import RouteTrails
from laneproxy.observability.access_log import AccessLog
from laneproxy.observability.istio import IstioMetrics, IstioRecorder, Workload
from laneproxy.observability.stats import ProxyStats
from laneproxy.observability.tracing import Tracing, TracingSetupError
from laneproxy.settings import ProxySettings

log = logging.getLogger("laneproxy")


class StartupError(Exception):
    """The proxy cannot start: bad configuration, a port in use, no listener asked for."""


def make_source(settings: ProxySettings, store: RouteTableStore):
    """The source the settings name (files, kubernetes or xds://), publishing to `store`; the proxy's and the controller's."""
    if settings.source == "kubernetes":
        try:
            from laneproxy.control.kubernetes import KubernetesSource  # optional dependency
        except ImportError as exc:
            raise StartupError(f"--source kubernetes needs: pip install 'laneproxy[kubernetes]' ({exc})") from exc
        return KubernetesSource(store, namespace=settings.namespace, kubeconfig=settings.kubeconfig,
                                lenient=settings.lenient, watch_read_timeout=settings.watch_read_timeout,
                                stale_after=settings.table_stale_after, pods=settings.pods)
    if settings.source.startswith("xds://"):
        try:
            from laneproxy.control.xds import XdsSource, node_id  # optional dependency, and grpcio's memory
        except ImportError as exc:
            raise StartupError(f"--source xds:// needs: pip install 'laneproxy[xds]' ({exc})") from exc
        from laneproxy.core.xds_view import parse_source
        pod = settings.pod
        return XdsSource(parse_source(settings.source), store, namespace=settings.namespace,
                         node=node_id(pod_ip=pod.pod_ip, pod_name=pod.pod_name, namespace=settings.namespace),
                         lenient=settings.lenient, stale_after=settings.table_stale_after)
    if not settings.config_files:
        raise StartupError("no configuration: give --config FILE (or --source kubernetes)")
    return FileSource(settings.config_files, store, namespace=settings.namespace,
                      interval=settings.reload_interval, lenient=settings.lenient,
                      stale_after=settings.table_stale_after)


class ProxyApp:
    def __init__(self, settings: ProxySettings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port  # a worker of `--workers N`: listeners share their ports (SO_REUSEPORT)
        self.store = RouteTableStore()
        self.stats = ProxyStats()
        self.istio = IstioMetrics()
        self.workload = Workload.from_settings(settings.workload)
        self.traces = TraceLaneTable(settings.trace_table_capacity, settings.trace_table_ttl, time.monotonic,
                                     max_bytes=settings.trace_table_bytes)
        self.listeners: list[Listener] = []
        self.bound: dict[str, int] = {}
        self.source = None
        self.admin: AdminServer | None = None
        self.healthcheck_failed = False
        self.draining = False
        self.started_at = time.time()
        self.access_log: AccessLog | None = None
        self.tracing: Tracing | None = None
        self.metrics_server = None
        self._stopped = asyncio.Event()
        self.pod_hooks = None
        self._pod_tasks: list[asyncio.Task] = []
        self._drain_task: asyncio.Task | None = None

    @property
    def state(self) -> str:
        if self.draining or self.healthcheck_failed:
            return "DRAINING"
        return "LIVE" if self.store.ready else "PRE_INITIALIZING"

    def _make_source(self):
        return make_source(self.settings, self.store)

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.source = self._make_source()
        try:
            await self.source.start()
        except LaneProxyError as exc:  # e.g. Kubernetes credentials that cannot be loaded
            raise StartupError(str(exc)) from exc
        if isinstance(self.source, FileSource) and not self.store.ready:
            raise StartupError(f"configuration rejected:\n{self.store.last_error}")
        pools = UpstreamPools(loop, connect_timeout=settings.timeouts.connect,
                              max_response_head_bytes=settings.max_response_headers_kb * 1024,
                              max_response_headers=settings.max_response_headers_count)
        h2_pools = Http2Pools(loop, connect_timeout=settings.timeouts.connect,
                              max_response_head_bytes=settings.max_response_headers_kb * 1024)
        self.pools = ProcessPools(pools, h2_pools)
        picker = RandomPicker(random.Random().random)
        self.outliers = OutlierDetector(consecutive_5xx=settings.outlier.consecutive_5xx,
                                        ejection_seconds=settings.outlier.ejection_seconds,
                                        max_ejection_percent=settings.outlier.max_ejection_percent, clock=loop.time)
        selector = EndpointSelector(picker, self.outliers, random.random)
        self._start_observability(loop)
        roles = []
        if settings.gateway:
            roles.append(("gateway", settings.gateway, GatewayRole(self.stats, selector, random.random)))
        if settings.inbound:
            if settings.app is None:
                raise StartupError("--inbound needs --app: the address of the local application")
            roles.append(("inbound", settings.inbound,
                          InboundRole(self.stats, EndpointSelector(picker, None, random.random), Endpoint(settings.app.host, settings.app.port),
                                      self.traces, settings.app_ports)))
        if settings.outbound:
            roles.append(("outbound", settings.outbound, OutboundRole(self.stats, selector, self.traces, settings.own_lane)))
        if not roles:
            raise StartupError("no listener: give at least one of --gateway, --inbound, --outbound")
        # Before the listeners: a preStop hook sent while the proxy starts must find the port.
        await self._start_lifecycle_port()
        trails = RouteTrails() if settings.observability.route_debug_token else None
        failed_hops = FailedHops(clock=loop.time)  # one per process: the outbound records, the inbound reads
        for name, address, role in roles:
            listener = Listener(name, role, store=self.store, pools=pools, h2_pools=h2_pools, stats=self.stats,
                                settings=settings, loop=loop)
            listener.failed_hops = failed_hops
            self._wire_mesh_observability(listener, trails)
            if self.access_log is not None:
                listener.recorder.observers.append(self.access_log.record)
                listener.connection_observers.append(self.access_log.record_connection)
            if self.tracing is not None:
                listener.attach_tracer(self.tracing.for_listener(name))
            try:
                self.bound[name] = await listener.start(address.host, address.port, reuse_port=self.reuse_port)
            except OSError as exc:
                raise StartupError(f"{name} listener on {address}: {exc.strerror or exc}") from exc
            self.listeners.append(listener)
            log.info("%s listener on %s:%d", name, address.host, self.bound[name])
        if settings.admin is not None:
            self.admin = AdminServer(self)
            try:
                self.bound["admin"] = await self.admin.start(settings.admin.host, settings.admin.port)
            except OSError as exc:
                raise StartupError(f"admin on {settings.admin}: {exc.strerror or exc}") from exc
            log.info("admin on %s:%d", settings.admin.host, self.bound["admin"])
        metrics = settings.observability.metrics
        if metrics is not None:
            from laneproxy.admin.metrics import MetricsServer

            self.metrics_server = MetricsServer(self)
            try:
                self.bound["metrics"] = await self.metrics_server.start(metrics.host, metrics.port)
            except OSError as exc:
                raise StartupError(f"metrics on {metrics}: {exc.strerror or exc}") from exc
            log.info("metrics (Prometheus) on %s:%d", metrics.host, self.bound["metrics"])

        self._start_pod_hooks()

    def _wire_mesh_observability(self, listener: Listener, trails: RouteTrails | None) -> None:
        """Istio's metrics and peer exchange, and the route trail, for one listener (as settings ask)."""
        wanted = self.settings.observability
        role = listener.role
        inbound = role.name == "inbound"
        if wanted.istio_metrics:
            recorder = IstioRecorder(self.istio, "destination" if inbound else "source", self.workload,
                                     self.settings.own_lane, self.store)
            listener.recorder.observers.append(recorder.record)
            listener.connection_observers.append(recorder.record_connection)
            # A proxy that does not know its workload has nothing to tell its peers: it sends no header,
            # so the next proxy sees exactly what an Envoy without Istio's metadata exchange would send.
            known = self.workload.name != "unknown"
            if inbound:
                listener.response_peer = self.workload.header if known else None
            else:
                role.peer_header = self.workload.header if known else None
                listener.reads_peer = True
        if wanted.route_debug_token:
            role.trails = trails
            if role.name == "gateway":
                role.debug_token = wanted.route_debug_token.encode()  # type: ignore[attr-defined]

    def _start_pod_hooks(self) -> None:
        """The injected sidecar's side of its pod's lifecycle: the preStop waits, and a Job's exit with its app."""
        pod = self.settings.pod
        if pod.exit_with:
            from laneproxy.control.kubernetes import KubernetesSource
            from laneproxy.control.own_pod import exit_when_app_ends

            if not isinstance(self.source, KubernetesSource) or not pod.pod_name:
                raise StartupError("--exit-with needs --source kubernetes and --pod-name")
            self._pod_tasks.append(asyncio.get_running_loop().create_task(exit_when_app_ends(
                self.source.get_json, self.settings.namespace, pod.pod_name, pod.exit_with, self.quit)))

    async def _start_lifecycle_port(self) -> None:
        pod = self.settings.pod
        if pod.lifecycle is None:
            return
        from laneproxy.admin.pod_hooks import PodHooksServer

        self.pod_hooks = PodHooksServer(self)
        try:
            self.bound["lifecycle"] = await self.pod_hooks.start(pod.lifecycle.host, pod.lifecycle.port)
        except OSError as exc:
            raise StartupError(f"lifecycle port on {pod.lifecycle}: {exc.strerror or exc}") from exc
        log.info("lifecycle port on %s:%d", pod.lifecycle.host, self.bound["lifecycle"])

    def _start_observability(self, loop: asyncio.AbstractEventLoop) -> None:
        wanted = self.settings.observability
        try:
            if wanted.access_log:
                self.access_log = AccessLog.open(wanted.access_log, loop, log_format=wanted.access_log_format)
            self.tracing = Tracing.create(wanted.tracing, service_name=tracing_service_name(self.settings),
                                          context_capacity=self.settings.trace_table_capacity,
                                          context_ttl=self.settings.trace_table_ttl)
        except (OSError, ValueError, TracingSetupError) as exc:
            raise StartupError(f"observability: {exc}") from exc

    def quit(self) -> None:
        """/quitquitquit: stop now, without a drain period."""
        self.draining = True
        self._stopped.set()

    def drain_listeners(self) -> None:
        for listener in self.listeners:
            listener.drain()

    def begin_shutdown(self) -> None:
        """SIGTERM: drain as Istio's sidecar does (MINIMUM_DRAIN_DURATION, terminationDrainDuration).

        For the minimum drain time every listener keeps accepting and serving, each response saying
        `Connection: close`: the pod's own app and every other proxy may still be sending here until
        the endpoint's removal reaches them. Then new connections are refused, idle ones closed, and the
        process exits once no request is in flight, or at the drain limit. A connection with a request
        in flight is never closed under it: its response goes out first, then the connection closes.
        """
        if self.draining:
            return
        settings = self.settings
        log.info("draining: serving with Connection: close for %.1fs, then until no request is in flight "
                 "(at most %.1fs)", settings.drain_seconds, max(settings.drain_seconds, settings.drain_limit_seconds))
        self.draining = True
        for listener in self.listeners:
            listener.drain(close_idle=False)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        limit = loop.time() + max(settings.drain_seconds, settings.drain_limit_seconds)
        await asyncio.sleep(settings.drain_seconds)
        for listener in self.listeners:
            listener.stop_accepting()
        while True:
            for listener in self.listeners:
                listener.close_idle()
            in_flight = any(listener.requests_in_flight() for listener in self.listeners)
            if not in_flight or loop.time() >= limit:
                break
            await asyncio.sleep(0.05)
        if in_flight:
            log.warning("drain limit reached with requests in flight: exiting anyway")
            for listener in self.listeners:
                listener.close_tunnels()  # each tunnel's record is written as it closes
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        for task in self._pod_tasks:
            task.cancel()
        if self.pod_hooks is not None:
            await self.pod_hooks.stop()
        for listener in self.listeners:
            await listener.stop()
        if self.source is not None:
            await self.source.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if hasattr(self, "pools"):
            self.pools.close()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracing is not None:
            self.tracing.shutdown()


def tracing_service_name(settings: ProxySettings) -> str:
    """OTEL_SERVICE_NAME when set; else the workload's canonical service and namespace, as Istio names spans."""
    configured = os.environ.get("OTEL_SERVICE_NAME")
    if configured:
        return configured
    workload = settings.workload
    service = workload.canonical_service or (workload.app if workload.app != "unknown" else workload.name)
    if service == "unknown":
        return "laneproxy"
    return f"{service}.{workload.namespace}" if workload.namespace != "unknown" else service


async def serve(settings: ProxySettings) -> None:
    """Run a proxy until SIGTERM/SIGINT, then drain and stop."""
    app = ProxyApp(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.begin_shutdown)
    try:
        await app.start()
        await app.wait_stopped()
    finally:
        await app.stop()
