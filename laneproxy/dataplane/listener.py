"""Listeners and their roles: gateway, inbound (in front of the app) and outbound (the app's egress).

Owns what differs between the three: how a request's lane is decided, which endpoint it goes to,
and which headers change on the way (Envoy's policy, in header_policy, applied around routing by
Role.prepare), and the mesh's own per-hop headers (the peer identity Istio's metrics need, the
opt-in route trail). It also counts what Envoy counts when an exchange ends (per listener and per
host) and then hands the exchange to its observers (access log, tracing, Istio's metrics), and, for
the pod's app, which of its calls failed further on (FailedHops: the outbound listener records, the
inbound marks the app's 5xx). Draining is per listener: new connections still accepted until
`stop_accepting`, every response saying `Connection: close`, idle connections closed on request.
Everything else (framing, pooling, timeouts) is the exchange's, shared by all roles. The route
table is read once per request.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TYPE_CHECKING, Any, Callable

import httptools

from laneproxy.core import headers as h
from laneproxy.core.errors import DownstreamProtocolError, NoHealthyUpstreamError, OutsideMeshError
from laneproxy.core.model import Endpoint, Route, RouteTable, ServiceRoutes
from laneproxy.core.decision import INBOUND, OUTBOUND, PASSTHROUGH_CLUSTER, RequestMeta, RouteDecision, decide
from laneproxy.core.propagation import LaneSource, TraceLaneTable, trace_key
from laneproxy.core.retry import RetryPolicy
from laneproxy.dataplane import egress, sniff
from laneproxy.dataplane.codec import DateCache
from laneproxy.dataplane.downstream import DownstreamConnection
from laneproxy.dataplane.http2 import Http2Connection
from laneproxy.dataplane.http2_upstream import Http2Pools
from laneproxy.dataplane.header_policy import RequestHeaderPolicy, response_headers
from laneproxy.core.balance import EndpointSelector, FailedHops
from laneproxy.dataplane.route_trail import TRAIL_HOPS, RouteTrails, hop
from laneproxy.observability.recorder import ExchangeRecorder

if TYPE_CHECKING:
    from laneproxy.dataplane.tunnel import Tunnel
    from laneproxy.core.store import RouteTableStore
    from laneproxy.dataplane.exchange import Exchange
    from laneproxy.dataplane.upstream import UpstreamPools
    from laneproxy.observability.stats import ClusterStats, HostStats, ProxyStats
    from laneproxy.observability.tracing import ExchangeTracer
    from laneproxy.settings import ProxySettings


class Target:
    """Where one request goes and what changes on the way: the role's answer to the exchange."""

    __slots__ = ("endpoint", "path", "overrides", "cluster_stats", "route", "routes", "lane_source", "host_stats",
                 "request_id", "timeout", "service_time_ms", "span")

    def __init__(self, endpoint: Endpoint, path: bytes, overrides: dict[bytes, bytes], cluster_stats: ClusterStats,
                 route: Route, routes: ServiceRoutes | None, lane_source: LaneSource | None) -> None:
        self.endpoint = endpoint
        self.path = path
        self.overrides = overrides
        self.cluster_stats = cluster_stats
        self.route = route  # the route actually served: after an outlier fallback, the baseline's
        self.routes = routes  # every lane of the service, for re-selection on retry
        self.lane_source = lane_source
        self.host_stats: HostStats | None = None
        self.request_id: bytes | None = None  # x-request-id as sent upstream
        self.timeout: float | None = None  # route timeout in seconds, x-envoy-upstream-rq-timeout-ms applied
        self.service_time_ms: int | None = None  # x-envoy-upstream-service-time, once the response head is in
        self.span: object = None  # the OpenTelemetry span, when tracing is on


def split_target(exchange: Exchange) -> tuple[bytes, bytes | None]:
    """(origin-form path, authority from an absolute-form target or None)."""
    target = exchange.target
    if target[:1] == b"/":
        return target, None
    if target[:7].lower() == b"http://":
        try:
            # Any, not httptools' URL: its stub says bytes where a part absent from the target is None, and the
            # compiled build checks the declared type.
            url: Any = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError as exc:
            raise DownstreamProtocolError(f"invalid request target: {exc}") from exc
        authority = url.host if url.port is None else b"%s:%d" % (url.host, url.port)
        path = url.path or b"/"
        if url.query:
            path += b"?" + url.query
        return path, authority
    if target == b"*" and exchange.method == b"OPTIONS":
        return target, None
    raise DownstreamProtocolError("unsupported request target")


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


# LaneSource's counter names by member identity: `.value` and an Enum's own __hash__ are interpreted Python
# (enum.py) even in the compiled build, and this runs once per outbound request. Members are singletons.
_SOURCE_NAMES: dict[int, str] = {id(source): source.value for source in LaneSource}


def _no_draw() -> float:
    return 0.0  # only the gateway's weighted ingress draws; the other roles' decisions use no randomness


class Role:
    """How one kind of listener turns a request into a Target; subclasses implement `choose`."""

    name = "role"
    edge = False  # faces external clients: strips their x-envoy-* headers, appends to x-forwarded-for
    counts_sources = False  # the outbound listener counts where each request's lane came from

    def __init__(self, stats: ProxyStats, selector: EndpointSelector) -> None:
        self.stats = stats
        self.selector = selector
        self.header_policy = RequestHeaderPolicy(edge=self.edge)  # the listener installs its settings' policy
        self.tracer: ExchangeTracer | None = None
        self.peer_header: bytes | None = None  # this workload, sent upstream for Istio's metrics (app wires it)
        self.trails: RouteTrails | None = None  # "where did this request go", when configured
        self.traces: TraceLaneTable | None = None  # sidecars: the trace -> lane table the decision reads or fills
        self.random_value: Callable[[], float] = _no_draw  # the gateway's weighted ingress draws

    def trace_value(self, exchange: Exchange, table: RouteTable) -> bytes | None:
        """The swimlane trace key of a request (the first group's trace header), for the route trail."""
        for group in table.groups.values():
            name = group.trace_header_key
            if name is not None:
                value = header_value(exchange.headers, name)
                if value is not None:
                    return trace_key(name, value)
        return None

    def prepare(self, exchange: Exchange, table: RouteTable) -> Target:
        """The exchange's question: route the request, then apply the header policy and open its span."""
        facts = self.header_policy.inspect(exchange, table)
        target = self.choose(exchange, table)
        host_stats = target.host_stats = target.cluster_stats.host(target.endpoint)
        host_stats.rq_active += 1
        self.header_policy.apply(exchange, target, facts)
        if self.peer_header is not None:
            target.overrides[h.X_LANEPROXY_PEER] = self.peer_header
        if self.trails is not None:
            self.follow_trail(exchange, target, table)
        if self.tracer is not None:
            self.tracer.start(exchange, target, table)
        return target

    def follow_trail(self, exchange: Exchange, target: Target, table: RouteTable) -> None:
        """Outbound: a call in a trace whose trail is open adds its hop and asks the next sidecar for its own."""
        trails = self.trails
        if not trails:
            return
        key = self.trace_value(exchange, table)
        trail = trails.get(key) if key is not None else None
        if trail is not None:
            if len(trail) < TRAIL_HOPS:
                trail.append(hop(target.route))
            exchange.trail = trail
            target.overrides[h.X_LANEPROXY_ROUTE] = b"1"

    def meta(self, exchange: Exchange, path: bytes, authority: bytes | None) -> RequestMeta:
        """The request as routing sees it, whatever the codec."""
        return RequestMeta(self.name, authority or exchange.host, path, exchange.headers)

    def choose(self, exchange: Exchange, table: RouteTable) -> Target:
        """Ask core.decision where the request goes, then pick a healthy endpoint of that route."""
        path, authority = split_target(exchange)
        decision = decide(table, self.meta(exchange, path, authority), self.traces, self.random_value())
        if self.counts_sources and decision.group is not None and decision.lane_source is not None:
            self.stats.lanes.lane_sources[_SOURCE_NAMES[id(decision.lane_source)]] += 1
        if decision.trace is not None:
            exchange.trace = decision.trace  # before the endpoint is chosen: a `no healthy upstream` is remembered
        overrides = decision.upstream_headers  # a new dict per decision: this request's to change
        if authority is not None:
            overrides[h.HOST] = authority
        if decision.routes is None and decision.route.cluster == PASSTHROUGH_CLUSTER:
            # No outlier ejection: there is no other endpoint to try.
            route = decision.route
            return Target(route.endpoints[0], path, overrides, self.stats.cluster(route.cluster), route, None, None)
        return self._target(decision, path, overrides)

    def static_routes(self) -> tuple[Route, ...]:
        """Routes this role serves that are not in the route table (shown by /clusters and /stats)."""
        return ()

    def _target(self, decision: RouteDecision, path: bytes, overrides: dict[bytes, bytes]) -> Target:
        route, routes = decision.route, decision.routes
        try:
            endpoint, route, spilled = self.selector.choose(route, routes)
        except NoHealthyUpstreamError:
            cluster = self.stats.cluster(route.cluster)  # Envoy charges the cluster: none_healthy and a 503
            cluster.cx_none_healthy += 1
            cluster.rq_by_code[NoHealthyUpstreamError.status] += 1
            raise
        lanes = self.stats.lanes
        if route.lane_used is not None:
            lanes.requests[route.lane_used] += 1
            if route.lane_asked is not None and route.lane_used != route.lane_asked:
                lanes.fallbacks[(route.service, route.lane_asked, route.lane_used)] += 1
                if spilled:
                    lanes.spills[(route.service, route.lane_asked, route.lane_used)] += 1
        return Target(endpoint, path, overrides, self.stats.cluster(route.cluster), route, routes,
                      decision.lane_source)


class GatewayRole(Role):
    """The ingress gateway: match ingress rules, choose the lane, write it into the route header.

    Its header policy has already given the request the swimlane trace ids the gateway chose
    (header_policy: a client must not pick the trace id another user's lane is remembered by).
    """

    name = "gateway"
    edge = True

    def __init__(self, stats: ProxyStats, selector: EndpointSelector, random_value: Callable[[], float]) -> None:
        super().__init__(stats, selector)
        self.random_value = random_value
        self.debug_token: bytes | None = None  # the route trail token trusted callers send

    def follow_trail(self, exchange: Exchange, target: Target, table: RouteTable) -> None:
        """The edge starts a trail only for a caller that knows the token; anyone else's header goes nowhere."""
        token = self.debug_token
        if token is not None and header_value(exchange.headers, h.X_LANEPROXY_ROUTE) == token:
            exchange.trail = [hop(target.route)]
            target.overrides[h.X_LANEPROXY_ROUTE] = b"1"

class InboundRole(Role):
    """In front of the local app: remember trace -> lane, then hand the request to the app unchanged."""

    name = "inbound"

    def __init__(self, stats: ProxyStats, selector: EndpointSelector, app: Endpoint, traces: TraceLaneTable,
                 app_ports: tuple[int, ...] = ()) -> None:
        super().__init__(stats, selector)
        self.app_route = Route("inbound", None, None, f"inbound|{app.port}||", (app,))
        # Several app ports captured: each captured connection goes on to the port it was sent to.
        self.port_routes = {port: Route("inbound", None, None, f"inbound|{port}||", (Endpoint(app.host, port),))
                            for port in app_ports if port != app.port}
        if self.port_routes:
            self.port_routes[app.port] = self.app_route
        self.traces = traces

    def static_routes(self) -> tuple[Route, ...]:
        return (self.app_route, *(route for route in self.port_routes.values() if route is not self.app_route))

    def route_for(self, exchange: Exchange) -> Route:
        """The app port a captured connection was sent to (its original destination), else the app's port."""
        if not self.port_routes:
            return self.app_route
        original = original_destination(exchange.downstream.transport)
        if original is None:
            return self.app_route
        return self.port_routes.get(original.port, self.app_route)

    def follow_trail(self, exchange: Exchange, target: Target, table: RouteTable) -> None:
        """A request sent with `x-laneproxy-route: 1` opens this process's trail for its trace."""
        trails = self.trails
        if trails is None or header_value(exchange.headers, h.X_LANEPROXY_ROUTE) != b"1":
            return
        key = self.trace_value(exchange, table)
        if key is not None:
            exchange.trail = trails.open(key)
            exchange.trail_key = key

    def meta(self, exchange: Exchange, path: bytes, authority: bytes | None) -> RequestMeta:
        return RequestMeta(INBOUND, authority or exchange.host, path, exchange.headers, None, self.route_for(exchange))


class OutboundRole(Role):
    """The app's egress: find the service, resolve the lane (header, trace table, baggage), fall back.

    A captured connection (iptables REDIRECT) for a host no service names goes to its original destination.
    """

    name = "outbound"
    counts_sources = True

    def __init__(self, stats: ProxyStats, selector: EndpointSelector, traces: TraceLaneTable,
                 own_lane: str | None) -> None:
        super().__init__(stats, selector)
        self.traces = traces
        self.own_lane = own_lane.encode() if own_lane else None

    def meta(self, exchange: Exchange, path: bytes, authority: bytes | None) -> RequestMeta:
        transport = exchange.downstream.transport
        # Positional: this runs once per request, and a NamedTuple built from keywords costs half as much again.
        return RequestMeta(OUTBOUND, authority or exchange.host, path, exchange.headers, self.own_lane, None,
                           lambda: original_destination(transport))

    def choose(self, exchange: Exchange, table: RouteTable) -> Target:
        try:
            return super().choose(exchange, table)
        except OutsideMeshError:
            # egress: a proxy request for a host outside the mesh (ALLOW_ANY passes it on, REGISTRY_ONLY refuses)
            path, authority = split_target(exchange)
            host = authority or exchange.host or b""
            overrides = {h.HOST: authority} if authority is not None else {}
            return egress.passthrough_target(self, exchange, authority, host, path, overrides)


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: the destination a connection had before REDIRECT


def original_destination(transport: asyncio.BaseTransport | None) -> Endpoint | None:
    """Where a connection redirected to this listener by iptables was going; None if it was not redirected.

    Asked only for requests no route matches, so the hot path never pays for the system call.
    """
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:  # ENOENT: no NAT entry, the client connected to this listener itself (HTTP_PROXY)
        return None
    port, address = struct.unpack_from("!H4s", raw, 2)
    original = (socket.inet_ntoa(address), port)
    if original == tuple(transport.get_extra_info("sockname")[:2]):
        return None  # not redirected: passing it on would loop back here
    return Endpoint(*original)


class Listener:
    """A listening socket with its role and everything its exchanges share."""

    def __init__(self, name: str, role: Role, *, store: RouteTableStore, pools: UpstreamPools, stats: ProxyStats,
                 settings: ProxySettings, loop: asyncio.AbstractEventLoop, h2_pools: Http2Pools | None = None) -> None:
        self.name = name
        self.role = role
        self.store = store
        self.pools = pools
        # HTTP/2 upstreams: multiplexed connections per endpoint (gRPC, or a port that says http2), the process's
        # (shared by its listeners, as `pools`) when given, else this listener's own, closed when it stops.
        self.owns_h2_pools = h2_pools is None
        self.h2_pools = h2_pools if h2_pools is not None else Http2Pools(
            loop, connect_timeout=settings.timeouts.connect,
            max_response_head_bytes=settings.max_response_headers_kb * 1024)
        self.proxy_stats = stats
        self.stats = stats.listener(name)
        self.settings = settings
        self.loop = loop
        self.dates = DateCache()
        self.server_name = settings.server_name.encode()
        self.max_header_bytes = settings.max_request_headers_kb * 1024
        self.max_header_count = settings.max_request_headers_count
        self.max_pipelined = settings.max_pipelined_requests
        self.buffer_limit = settings.per_connection_buffer_limit_bytes
        self.connections: set[DownstreamConnection | Http2Connection] = set()
        self.tunnels: set[Tunnel] = set()  # open WebSocket and CONNECT tunnels; a drain waits for them
        self.passed_through: set[Tunnel] = set()  # open TCP/TLS connections passed through (sniff); the same
        self.server: asyncio.AbstractServer | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.now = loop.time()  # a coarse clock for timeouts, advanced by the sweeper
        retries = settings.retries
        self.retry_policy = RetryPolicy(retries.max_retries, frozenset(retries.retry_on),
                                        frozenset(retries.retriable_status_codes))
        # x-envoy-* headers steer retries and timeouts only when they come from inside the mesh.
        self.trust_envoy_headers = role.name != "gateway"
        self.draining = False
        self.address_tag = ""  # `0.0.0.0_8080` once bound
        # Counts each finished exchange once, then hands it to the access log, tracing and Istio's metrics.
        self.recorder = ExchangeRecorder(self.stats, loop.time)
        self.reads_peer = False  # an upstream's peer header is read from responses (Istio's source reporter)
        self.response_peer: bytes | None = None  # inbound: this workload, answered to the caller
        # The app's calls that failed further on (outbound records, inbound marks the app's 5xx): see FailedHops.
        self.failed_hops: FailedHops | None = None
        self.marks_local_replies = role.name == "outbound"  # its local replies are about a later hop
        # The gateway's clients are outside the mesh: the failure marks stop there, read but not passed on.
        self.edge_of_mesh = role.name == "gateway"
        self.response_dropped = h.NOT_FORWARDED_TO_CLIENTS if self.edge_of_mesh else h.NOT_FORWARDED
        self.connection_observers: list[Callable[[sniff.PassedConnection], None]] = []  # passed-through connections' log
        role.header_policy = RequestHeaderPolicy(edge=role.edge, route_timeout=settings.timeouts.route,
                                                 trust_client_trace_id=settings.trust_client_trace_id)

    def protocol(self) -> asyncio.Protocol:
        return sniff.protocol_for(self)  # captured connections: HTTP, or passed through as TCP/TLS

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Bind and serve, and start the timeout sweeper: the only way a listener starts (workers pass reuse_port)."""
        self.server = await self.loop.create_server(self.protocol, host, port, reuse_address=True,
                                                    reuse_port=reuse_port or None, backlog=1024)
        # Read as Any: uvloop's Server.sockets is a list where typeshed says tuple, and the compiled build checks
        # the declared type.
        server: Any = self.server
        bound = int(server.sockets[0].getsockname()[1])
        self.address_tag = f"{host}_{bound}"  # Envoy's listener_address tag
        self.sweeper = self.loop.create_task(self._sweep(), name=f"{self.name}-timeouts")
        return bound

    async def _sweep(self) -> None:
        """Advance the coarse clock and enforce per-connection timeouts, without a timer per request."""
        timeouts = self.settings.timeouts
        enabled = [t for t in (timeouts.request_headers, timeouts.idle, timeouts.stream_idle, timeouts.route) if t > 0]
        tick = max(0.05, min([0.25, *(t / 4 for t in enabled)]))
        while True:
            await asyncio.sleep(tick)
            now = self.now = self.loop.time()
            for connection in list(self.connections):
                connection.check_timeouts(now, timeouts.request_headers, timeouts.idle, timeouts.stream_idle)

    def connection_opened(self, connection: DownstreamConnection) -> None:
        self.connections.add(connection)
        self.stats.cx_total += 1
        self.stats.cx_active += 1
        if self.draining:
            connection.draining = True

    def connection_closed(self, connection: DownstreamConnection | Http2Connection) -> None:
        self.connections.discard(connection)
        self.stats.cx_active -= 1
        if isinstance(connection, Http2Connection):
            self.stats.cx_http2_active -= 1

    def connection_upgraded(self, old: DownstreamConnection, new: Http2Connection) -> None:
        """A connection that began with HTTP/2's preface: the same client connection, now HTTP/2's."""
        self.connections.discard(old)
        self.connections.add(new)
        self.stats.cx_http2 += 1
        self.stats.cx_http2_active += 1
        # Draining: the new connection is served and gets its GOAWAY after its first response (as an HTTP/1.1
        # one gets `Connection: close` on it), so a client never sees a GOAWAY before its first stream.

    def response_overrides(self, exchange: Exchange) -> dict[bytes, bytes]:
        milliseconds = int((self.loop.time() - exchange.start) * 1000.0)
        routed = exchange.routed
        if routed is not None:
            routed.service_time_ms = milliseconds
        overrides = response_headers(milliseconds, self.server_name)
        if self.response_peer is not None:
            overrides[h.X_LANEPROXY_PEER] = self.response_peer
        trail = exchange.trail
        if trail is not None:
            if trail:
                overrides[h.X_LANEPROXY_ROUTE] = ", ".join(trail).encode("latin-1")
            if exchange.trail_key is not None and self.role.trails is not None:
                self.role.trails.close(exchange.trail_key)
        if exchange.response_status >= 500 and exchange.trace is not None and self.failed_hops is not None \
                and self.role.name == "inbound":
            flags = self.failed_hops.recall(exchange.trace)
            if flags is not None:
                overrides[h.X_LANEPROXY_FAILED_HOP] = flags  # the app answered 5xx because its own call failed
        return overrides

    def on_exchange_done(self, exchange: Exchange) -> None:
        status = exchange.response_status
        if status >= 500 and exchange.trace is not None and self.failed_hops is not None and self.role.name == "outbound":
            error = exchange.error
            self.failed_hops.remember(exchange.trace, error.flag.encode() if error is not None
                                      else exchange.failed_hop or b"-")
        self.recorder.record(exchange)

    def attach_tracer(self, tracer: ExchangeTracer) -> None:
        self.role.tracer = tracer
        self.recorder.observers.append(tracer.finish)

    def active_requests(self) -> int:
        """Requests received and not yet answered, pipelined ones included (downstream_rq_active)."""
        return sum(connection.request_count() for connection in self.connections)

    def resume(self) -> None:
        """Undo `drain` for new connections (after /healthcheck/ok); drained connections still close."""
        self.draining = False

    def drain(self, *, close_idle: bool = True) -> None:
        """Every response from now on says `Connection: close`; new connections are still accepted."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain(close_idle=close_idle)

    def stop_accepting(self) -> None:
        """Close the listening socket: a new client is refused (a connect failure any caller may retry)
        rather than accepted by a process about to exit."""
        if self.server is not None:
            self.server.close()

    def close_idle(self) -> None:
        for connection in list(self.connections):
            if connection.idle:
                connection.close()

    def requests_in_flight(self) -> bool:
        """Some client has a request here not yet fully answered, or has sent part of one, or an open tunnel, or
        a TCP/TLS connection passed through."""
        return bool(self.tunnels) or bool(self.passed_through) or any(not connection.idle
                                                                     for connection in self.connections)

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        """An upgrade or CONNECT became a tunnel (Envoy's downstream_cx_upgrades_total and _active)."""
        self.tunnels.add(tunnel)
        self.stats.upgrades_total += 1
        self.stats.upgrades_active += 1

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        if tunnel in self.tunnels:
            self.tunnels.discard(tunnel)
            self.stats.upgrades_active -= 1

    def close_tunnels(self) -> None:
        """The drain limit: every tunnel and passed-through connection still open is closed (and so recorded)."""
        for tunnel in [*self.tunnels, *self.passed_through]:
            tunnel.close()

    async def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.owns_h2_pools:
            self.h2_pools.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

