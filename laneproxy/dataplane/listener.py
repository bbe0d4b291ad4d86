"""Listeners and their roles: gateway, inbound (in front of the app) and outbound (the app's egress).

Owns what differs between the three: how a request's lane is decided, which endpoint it goes to,
and which headers change on the way. Everything else (framing, pooling, timeouts) is the
exchange's, shared by all roles. The route table is read once per request from the store.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Callable

import httptools

from laneproxy.core import headers as h
from laneproxy.core.balance import RandomPicker
from laneproxy.core.errors import DownstreamProtocolError, NoHealthyUpstreamError, NoRouteError
from laneproxy.core.model import Endpoint, Route, RouteTable
from laneproxy.core.propagation import LaneSource, TraceLaneTable, resolve_lane, trace_key
from laneproxy.core.routing import choose_ingress, service_routes_for_host
from laneproxy.dataplane.codec import DateCache
from laneproxy.dataplane.downstream import DownstreamConnection

if TYPE_CHECKING:
    from laneproxy.core.store import RouteTableStore
    from laneproxy.dataplane.exchange import Exchange
    from laneproxy.dataplane.upstream import UpstreamPools
    from laneproxy.observability.stats import ClusterStats, ProxyStats
    from laneproxy.settings import ProxySettings


class Target:
    """Where one request goes and what changes on the way: the role's answer to the exchange."""

    __slots__ = ("endpoint", "path", "overrides", "cluster_stats", "route", "lane_source")

    def __init__(self, endpoint: Endpoint, path: bytes, overrides: dict[bytes, bytes], cluster_stats: ClusterStats,
                 route: Route | None, lane_source: LaneSource | None) -> None:
        self.endpoint = endpoint
        self.path = path
        self.overrides = overrides
        self.cluster_stats = cluster_stats
        self.route = route
        self.lane_source = lane_source


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
    """How one kind of listener turns a request into a Target; subclasses implement `prepare`."""

    name = "role"

    def __init__(self, stats: ProxyStats, picker: RandomPicker) -> None:
        self.stats = stats
        self.picker = picker

    def prepare(self, exchange: Exchange, table: RouteTable) -> Target:
        raise NotImplementedError

    def _target(self, route: Route, path: bytes, overrides: dict[bytes, bytes], source: LaneSource | None) -> Target:
        if not route.endpoints:
            raise NoHealthyUpstreamError(f"no endpoints for {route.cluster}")
        lanes = self.stats.lanes
        if route.lane_used is not None:
            lanes.requests[route.lane_used] += 1
            if route.lane_asked is not None and route.lane_used != route.lane_asked:
                lanes.fallbacks[(route.service, route.lane_asked, route.lane_used)] += 1
        endpoint = self.picker.pick(route.endpoints)
        return Target(endpoint, path, overrides, self.stats.cluster(route.cluster), route, source)


class GatewayRole(Role):
    """The ingress gateway: match ingress rules, choose the lane, write it into the route header."""

    name = "gateway"

    def __init__(self, stats: ProxyStats, picker: RandomPicker, random_value: Callable[[], float]) -> None:
        super().__init__(stats, picker)
        self.random_value = random_value

    def prepare(self, exchange: Exchange, table: RouteTable) -> Target:
        path, authority = split_target(exchange)
        host = authority or exchange.host or b""
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in exchange.headers}
        decision = choose_ingress(table, host.decode("latin-1"), path.split(b"?", 1)[0].decode("latin-1"),
                                  headers, self.random_value())
        overrides = {decision.group.route_header.encode(): decision.lane.encode()} if decision.lane else {}
        if authority is not None:
            overrides[h.HOST] = authority
        return self._target(decision.route, path, overrides, LaneSource.ROUTE_HEADER)


class InboundRole(Role):
    """In front of the local app: remember trace -> lane, then hand the request to the app unchanged."""

    name = "inbound"

    def __init__(self, stats: ProxyStats, picker: RandomPicker, app: Endpoint, traces: TraceLaneTable) -> None:
        super().__init__(stats, picker)
        self.app_route = Route("inbound", None, None, f"inbound|{app.port}||", (app,))
        self.traces = traces

    def prepare(self, exchange: Exchange, table: RouteTable) -> Target:
        path, authority = split_target(exchange)
        for group in table.groups.values():
            if group.trace_header is None:
                continue
            route_header, trace_header = group.route_header.encode(), group.trace_header.encode()
            lane = trace = None
            for name, value in exchange.headers:
                if name == route_header:
                    lane = value
                elif name == trace_header:
                    trace = value
            if lane and trace and table.is_lane(lane.decode("latin-1")):
                key = trace_key(trace_header, trace)
                if key is not None:
                    self.traces.remember(key, lane)
        overrides = {h.HOST: authority} if authority is not None else {}
        return self._target(self.app_route, path, overrides, None)


class OutboundRole(Role):
    """The app's egress: find the service, resolve the lane (header, trace table, baggage), fall back."""

    name = "outbound"

    def __init__(self, stats: ProxyStats, picker: RandomPicker, traces: TraceLaneTable, own_lane: str | None) -> None:
        super().__init__(stats, picker)
        self.traces = traces
        self.own_lane = own_lane.encode() if own_lane else None

    def prepare(self, exchange: Exchange, table: RouteTable) -> Target:
        path, authority = split_target(exchange)
        host = authority or exchange.host
        if not host:
            raise NoRouteError("no host")
        routes = service_routes_for_host(table, host)
        group = routes.group
        overrides = {h.HOST: authority} if authority is not None else {}
        if group is None:
            return self._target(routes.default, path, overrides, None)
        route_header = group.route_header.encode()
        if group.permissive:
            trace_header = group.trace_header.encode() if group.trace_header else None
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
        route = routes.route_for(lane)
        self.stats.lanes.lane_sources[source.value] += 1
        if route.lane_asked is not None:
            # The lane asked travels on, even across a fallback hop, so the next hop returns to it.
            overrides[route_header] = route.lane_asked.encode()
        return self._target(route, path, overrides, source)


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
        self.connections: set[DownstreamConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.draining = False
        self.exchange_observers: list[Callable[[Exchange], None]] = []  # access log, tracing

    def protocol(self) -> DownstreamConnection:
        return DownstreamConnection(self)

    async def start(self, host: str, port: int) -> int:
        self.server = await self.loop.create_server(self.protocol, host, port, reuse_address=True, backlog=1024)
        return self.server.sockets[0].getsockname()[1]

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
        return {}

    def on_exchange_done(self, exchange: Exchange) -> None:
        stats = self.stats
        stats.rq_total += 1
        stats.rq_by_class[exchange.response_status // 100] += 1
        for observer in self.exchange_observers:
            observer(exchange)

    def drain(self) -> None:
        self.draining = True
        for connection in list(self.connections):
            connection.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def default_picker(rng: random.Random | None = None) -> RandomPicker:
    return RandomPicker((rng or random.Random()).random)
