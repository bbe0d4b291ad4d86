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
from typing import TYPE_CHECKING, Callable

import httptools

from laneproxy.core import headers as h
from laneproxy.core.errors import DownstreamProtocolError, NoHealthyUpstreamError, NoRouteError
from laneproxy.core.model import Endpoint, Route, RouteTable, ServiceRoutes
from laneproxy.core.propagation import LaneSource, TraceLaneTable, resolve_lane, trace_key
from laneproxy.core.routing import choose_ingress
from laneproxy.dataplane import egress, sniff
from laneproxy.dataplane.codec import DateCache
from laneproxy.dataplane.downstream import DownstreamConnection
from laneproxy.dataplane.exchange import RetryPolicy
from laneproxy.dataplane.header_policy import RequestHeaderPolicy, response_headers
from laneproxy.dataplane.health import EndpointSelector, FailedHops
from laneproxy.dataplane.route_trail import TRAIL_HOPS, RouteTrails, hop

if TYPE_CHECKING:
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
        self.span = None  # the OpenTelemetry span, when tracing is on


def split_target(exchange: Exchange) -> tuple[bytes, bytes | None]:
    """(origin-form path, authority from an absolute-form target or None)."""
    target = exchange.target
    if target[:1] == b"/":
        return target, None
    if target[:7].lower() == b"http://":
        try:
            url = httptools.parse_url(target)
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


class Role:
    """How one kind of listener turns a request into a Target; subclasses implement `choose`."""

    name = "role"
    edge = False  # faces external clients: strips their x-envoy-* headers, appends to x-forwarded-for

    def __init__(self, stats: ProxyStats, selector: EndpointSelector) -> None:
        self.stats = stats
        self.selector = selector
        self.header_policy = RequestHeaderPolicy(edge=self.edge)  # the listener installs its settings' policy
        self.tracer: ExchangeTracer | None = None
        self.peer_header: bytes | None = None  # this workload, sent upstream for Istio's metrics (app wires it)
        self.trails: RouteTrails | None = None  # "where did this request go", when configured

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

    def choose(self, exchange: Exchange, table: RouteTable) -> Target:
        raise NotImplementedError

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

    def static_routes(self) -> tuple[Route, ...]:
        """Routes this role serves that are not in the route table (shown by /clusters and /stats)."""
        return ()

    def _target(self, route: Route, routes: ServiceRoutes | None, path: bytes, overrides: dict[bytes, bytes],
                source: LaneSource | None) -> Target:
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
        return Target(endpoint, path, overrides, self.stats.cluster(route.cluster), route, routes, source)


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

    def choose(self, exchange: Exchange, table: RouteTable) -> Target:
        path, authority = split_target(exchange)
        host = authority or exchange.host or b""
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in exchange.headers}
        decision = choose_ingress(table, host.decode("latin-1"), path.split(b"?", 1)[0].decode("latin-1"),
                                  headers, self.random_value())
        overrides = {decision.group.route_header_key: decision.lane.encode()} if decision.lane else {}
        if authority is not None:
            overrides[h.HOST] = authority
        return self._target(decision.route, table.routes.get(decision.route.service), path, overrides,
                            LaneSource.ROUTE_HEADER)


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

    def choose(self, exchange: Exchange, table: RouteTable) -> Target:
        path, authority = split_target(exchange)
        for group in table.groups.values():
            if group.trace_header is None:
                continue
            route_header, trace_header = group.route_header_key, group.trace_header_key
            lane = trace = None
            for name, value in exchange.headers:
                if name == route_header:
                    lane = value
                elif name == trace_header:
                    trace = value
            key = trace_key(trace_header, trace) if trace else None
            if key is not None and exchange.trace is None:
                exchange.trace = key  # to recognise the app's 5xx for a call that failed further on
            if lane and key is not None and table.is_lane(lane.decode("latin-1")):
                self.traces.remember(key, lane)
        overrides = {h.HOST: authority} if authority is not None else {}
        return self._target(self.route_for(exchange), None, path, overrides, None)


class OutboundRole(Role):
    """The app's egress: find the service, resolve the lane (header, trace table, baggage), fall back.

    A captured connection (iptables REDIRECT) for a host no service names goes to its original destination.
    """

    name = "outbound"

    def __init__(self, stats: ProxyStats, selector: EndpointSelector, traces: TraceLaneTable,
                 own_lane: str | None) -> None:
        super().__init__(stats, selector)
        self.traces = traces
        self.own_lane = own_lane.encode() if own_lane else None

    def choose(self, exchange: Exchange, table: RouteTable) -> Target:
        path, authority = split_target(exchange)
        host = authority or exchange.host
        if not host:
            raise NoRouteError("no host")
        overrides = {h.HOST: authority} if authority is not None else {}
        routes = table.hosts.get(host) or table.hosts.get(host.lower())
        if routes is None or routes.passthrough:
            # Asked only here, so a request for a group's service never pays for the system call.
            original = original_destination(exchange.downstream.transport)
            if original is not None:
                by_address = table.hosts.get(original.address.encode()) if routes is None else None
                if by_address is not None and not by_address.passthrough:
                    routes = by_address  # called by ClusterIP under another Host: the service, in its lane
                else:
                    # Captured by iptables on its way to a host no group takes over (no service at all, a
                    # Service of no group, selector-less, ExternalName): on to where it was going.
                    route = passthrough_route(original)  # no outlier ejection: there is no other endpoint to try
                    return Target(original, path, overrides, self.stats.cluster(route.cluster), route, None, None)
            elif routes is None:  # egress: a proxy request for a host outside the mesh (ALLOW_ANY passes it on)
                return egress.passthrough_target(self, exchange, authority, host, path, overrides)
        group = routes.group
        if group is None:
            return self._target(routes.default, routes, path, overrides, None)
        route_header = group.route_header_key
        trace_header = group.trace_header_key
        if group.permissive:
            route_value = trace_value = baggage_value = None
            for name, value in exchange.headers:
                if name == route_header:
                    route_value = value
                elif name == trace_header:
                    trace_value = value
                elif name == h.BAGGAGE:
                    baggage_value = value
            lane, source = resolve_lane(route_value, trace_value, baggage_value, trace_header=trace_header,
                                        route_header=route_header, traces=self.traces)
        else:
            lane, source = self.own_lane, LaneSource.OWN_LANE
            trace_value = header_value(exchange.headers, trace_header) if trace_header is not None else None
        if trace_value and trace_header is not None:
            # Before the endpoint is chosen: a `no healthy upstream` is remembered for this trace too (FailedHops).
            exchange.trace = trace_key(trace_header, trace_value)
        route = routes.route_for(lane)
        self.stats.lanes.lane_sources[source.value] += 1
        if route.lane_asked is not None:
            # The lane asked travels on, even across a fallback hop, so the next hop returns to it.
            overrides[route_header] = route.lane_asked_value
        return self._target(route, routes, path, overrides, source)


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: the destination a connection had before REDIRECT
PASSTHROUGH_CLUSTER = "PassthroughCluster"  # Istio's name for traffic to destinations outside the mesh


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


def passthrough_route(endpoint: Endpoint) -> Route:
    return Route(PASSTHROUGH_CLUSTER, None, None, PASSTHROUGH_CLUSTER, (endpoint,))


class Listener:
    """A listening socket with its role and everything its exchanges share."""

    def __init__(self, name: str, role: Role, *, store: RouteTableStore, pools: UpstreamPools, stats: ProxyStats,
                 settings: ProxySettings, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.role = role
        self.store = store
        self.pools = pools
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
        self.connections: set[DownstreamConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.sweeper: asyncio.Task | None = None
        self.now = loop.time()  # a coarse clock for timeouts, advanced by the sweeper
        retries = settings.retries
        self.retry_policy = RetryPolicy(retries.max_retries, frozenset(retries.retry_on),
                                        frozenset(retries.retriable_status_codes))
        # x-envoy-* headers steer retries and timeouts only when they come from inside the mesh.
        self.trust_envoy_headers = role.name != "gateway"
        self.draining = False
        self.address_tag = ""  # `0.0.0.0_8080` once bound
        self.exchange_observers: list[Callable[[Exchange], None]] = []  # access log, tracing, Istio's metrics
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
        self.address_tag = f"{host}_{self.server.sockets[0].getsockname()[1]}"  # Envoy's listener_address tag
        self.sweeper = self.loop.create_task(self._sweep(), name=f"{self.name}-timeouts")
        return self.server.sockets[0].getsockname()[1]

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

    def connection_closed(self, connection: DownstreamConnection) -> None:
        self.connections.discard(connection)
        self.stats.cx_active -= 1

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
        stats = self.stats
        status = exchange.response_status
        stats.rq_total += 1
        stats.rq_by_class[status // 100] += 1
        elapsed_ms = (self.loop.time() - exchange.start) * 1000.0
        stats.rq_time.record(elapsed_ms)
        error = exchange.error
        routed = exchange.routed
        if routed is not None:
            host = routed.host_stats
            if host is not None:
                host.rq_active -= 1
                # A retry may have moved the request to another endpoint: the outcome is the last one's.
                _count_host_result(routed.cluster_stats.host(routed.endpoint), status,
                                   error.flag if error is not None else None)
            if error is None and status:
                routed.cluster_stats.rq_time.record(elapsed_ms)
        elif error is not None and error.flag == "NR":
            stats.no_route += 1
        if status >= 500 and exchange.trace is not None and self.failed_hops is not None and self.role.name == "outbound":
            self.failed_hops.remember(exchange.trace, error.flag.encode() if error is not None
                                      else exchange.failed_hop or b"-")
        for observer in self.exchange_observers:
            observer(exchange)

    def attach_tracer(self, tracer: ExchangeTracer) -> None:
        self.role.tracer = tracer
        self.exchange_observers.append(tracer.finish)

    def active_requests(self) -> int:
        """Requests received and not yet answered, pipelined ones included (downstream_rq_active)."""
        return sum((connection.active is not None) + len(connection.queue) for connection in self.connections)

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
        """Some client has a request here not yet fully answered, or has sent part of one."""
        return any(not connection.idle for connection in self.connections)

    async def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _count_host_result(host: HostStats, status: int, flag: str | None) -> None:
    """Envoy's per-host outcome: a connect failure never reached the host; 5xx, resets and timeouts are errors."""
    if flag == "UF":
        host.cx_connect_fail += 1
        host.rq_error += 1
        return
    if flag is None and status == 0:
        return  # the client left; nothing to say about the host
    host.rq_total += 1
    if flag is not None or status >= 500:
        host.rq_error += 1
        if flag == "UT":
            host.rq_timeout += 1
    else:
        host.rq_success += 1

