"""The one routing decision: where a request goes from a listener, which lane it asked, and why.

Owns `decide(table, request, traces, random) -> RouteDecision` for every listener kind and every
codec (an HTTP/1.1 request and an HTTP/2 stream give the same RequestMeta): the gateway's ingress
rules, the inbound listener's remembering of a trace's lane, and the outbound hop's lane resolution
(route header, trace table, baggage, own lane in strict mode) with the table's precomputed fallback.
The admin `/route` answer calls the same function (with no trace table) and `reason` words it.

Pure: randomness arrives as a number in [0, 1); the trace table is the only state it touches (the
inbound listener remembers, the outbound reads). It never picks an endpoint (core.balance does,
with outlier state), never counts and never does I/O: the one fact that costs a system call (a
captured connection's original destination) is asked lazily through a callable, only for a host no
service names.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from laneproxy.core import headers as h
from laneproxy.core.errors import NoRouteError, OutsideMeshError
from laneproxy.core.model import Endpoint, Route, RouteTable, ServiceRoutes, SwimLaneGroup
from laneproxy.core.propagation import LaneSource, TraceLaneTable, lane_in_order, trace_key
from laneproxy.core.routing import choose_ingress

GATEWAY = "gateway"
INBOUND = "inbound"
OUTBOUND = "outbound"
PASSTHROUGH_CLUSTER = "PassthroughCluster"  # Istio's name for traffic to destinations outside the mesh


class RequestMeta(NamedTuple):
    """What routing may read of a request, whatever its codec. Header names are lowercase bytes."""

    listener: str  # GATEWAY, INBOUND or OUTBOUND
    host: bytes | None  # the authority (absolute-form target, :authority) or the Host header
    path: bytes  # origin-form, query included
    headers: Sequence[tuple[bytes, bytes]]
    own_lane: bytes | None = None  # strict mode: the sidecar's own lane
    local_route: Route | None = None  # inbound: the route to the local app port the request came for
    original_destination: Callable[[], Endpoint | None] | None = None  # captured (iptables) connections


class RouteDecision(NamedTuple):
    """The answer: the route (before endpoint health), the lane facts, and the headers it sets upstream."""

    route: Route
    routes: ServiceRoutes | None  # every lane of the service, for health fallback and retries
    lane: bytes | None  # the lane asked, as resolved (None: the baseline)
    lane_source: LaneSource | None
    upstream_headers: dict[bytes, bytes]  # what this hop writes into the request (the route header)
    trace: bytes | None  # the swimlane trace key, when the request carries one
    group: SwimLaneGroup | None
    reason: str | None = None  # the gateway's ingress reason ("rule:<lane>/<rule>", "weighted", "baseline")
    consulted_traces: bool = True


def decide(table: RouteTable, request: RequestMeta, traces: TraceLaneTable | None, random: float) -> RouteDecision:
    """Route one request from `request.listener`; raises NoRouteError when nothing serves it.

    `traces` None: the trace table is neither read nor written (the admin `/route` question).
    """
    if request.listener == GATEWAY:
        return _gateway(table, request, random)
    if request.listener == INBOUND:
        return _inbound(table, request, traces)
    return _outbound(table, request, traces)


def _gateway(table: RouteTable, request: RequestMeta, random: float) -> RouteDecision:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
    host = (request.host or b"").decode("latin-1")
    path = request.path.split(b"?", 1)[0].decode("latin-1")
    ingress = choose_ingress(table, host, path, headers, random)
    upstream = {ingress.group.route_header_key: ingress.lane.encode()} if ingress.lane else {}
    return RouteDecision(ingress.route, table.routes.get(ingress.route.service),
                         ingress.lane.encode() if ingress.lane else None, LaneSource.ROUTE_HEADER, upstream, None,
                         ingress.group, ingress.reason)


def _inbound(table: RouteTable, request: RequestMeta, traces: TraceLaneTable | None) -> RouteDecision:
    route = request.local_route
    if route is None:
        raise NoRouteError("no local app route")
    first_trace = None
    for group in table.groups.values():
        if group.trace_header is None:
            continue
        route_header, trace_header = group.route_header_key, group.trace_header_key
        lane = trace = None
        for name, value in request.headers:
            if name == route_header:
                lane = value
            elif name == trace_header:
                trace = value
        key = trace_key(trace_header, trace) if trace and trace_header is not None else None
        if key is not None and first_trace is None:
            first_trace = key  # to recognise the app's 5xx for a call that failed further on
        if lane and key is not None and traces is not None and table.is_lane(lane.decode("latin-1")):
            traces.remember(key, lane)
    return RouteDecision(route, None, None, None, {}, first_trace, None)


def passthrough_route(endpoint: Endpoint) -> Route:
    """A captured connection's own destination, outside every group: no lane, no other endpoint to try."""
    return Route(PASSTHROUGH_CLUSTER, None, None, PASSTHROUGH_CLUSTER, (endpoint,))


def _outbound(table: RouteTable, request: RequestMeta, traces: TraceLaneTable | None) -> RouteDecision:
    host = request.host
    if not host:
        raise NoRouteError("no host")
    routes = table.hosts.get(host) or table.hosts.get(host.lower())
    if routes is None or routes.passthrough:
        # Asked only here, so a request for a group's service never pays for the system call.
        original = request.original_destination() if request.original_destination is not None else None
        if original is not None:
            by_address = table.hosts.get(original.address.encode()) if routes is None else None
            if by_address is not None and not by_address.passthrough:
                routes = by_address  # called by ClusterIP under another Host: the service, in its lane
            else:
                # Captured by iptables on its way to a host no group takes over (no service at all, a
                # Service of no group, selector-less, ExternalName): on to where it was going.
                return RouteDecision(passthrough_route(original), None, None, None, {}, None, None)
        elif routes is None:
            raise OutsideMeshError(f"no service for host {host.decode('latin-1')!r}")
    group = routes.group
    if group is None:
        return RouteDecision(routes.default, routes, None, None, {}, None, None)
    route_header = group.route_header_key
    trace_header = group.trace_header_key
    route_value = trace_value = baggage_value = None
    for name, value in request.headers:
        if name == route_header:
            route_value = value
        elif name == trace_header:
            trace_value = value
        elif name == h.BAGGAGE:
            baggage_value = value
    key = trace_key(trace_header, trace_value) if trace_value and trace_header is not None else None
    lane: bytes | None
    if not group.permissive:
        lane, source = request.own_lane, LaneSource.OWN_LANE
    else:
        lane, source = lane_in_order(route_value, key, baggage_value, route_header, traces)
    route = routes.route_for(lane)
    # The lane asked travels on, even across a fallback hop, so the next hop returns to it.
    asked = route.lane_asked_value
    upstream = {route_header: asked} if asked is not None else {}
    return RouteDecision(route, routes, lane, source, upstream, key, group, None, traces is not None)



def reason(decision: RouteDecision, request: RequestMeta) -> str:
    """Why the decision went where it did, in a sentence (for `/route`; never on the hot path)."""
    if decision.reason is not None:
        return decision.reason
    group = decision.group
    route = decision.route
    if route.cluster == PASSTHROUGH_CLUSTER:
        return "a captured connection to a host no group takes over: on to its original destination"
    if group is None:
        return "the service is in no swimlane group: every endpoint serves it"
    lane = decision.lane.decode("latin-1") if decision.lane else None
    source = decision.lane_source
    if source is LaneSource.OWN_LANE:
        text = f"strict mode: this sidecar's own lane ({lane or 'none'})"
    elif source is LaneSource.ROUTE_HEADER:
        text = f"the {group.route_header} header asks for {lane}"
    elif source is LaneSource.TRACE_TABLE:
        text = f"the trace table remembers this trace in {lane}"
    elif source is LaneSource.BAGGAGE:
        text = f"W3C baggage carries {group.route_header}={lane}"
    else:
        text = "no lane asked: the baseline"
    trace_header = group.trace_header
    if (source in (LaneSource.BAGGAGE, LaneSource.BASELINE) and not decision.consulted_traces
            and trace_header and group.trace_header_key is not None):
        value = next((v for n, v in request.headers if n == group.trace_header_key), None)
        if value:
            text += (f"; /route does not consult the trace table: if {trace_header}={value.decode('latin-1')} was "
                     "seen with a lane on this sidecar's inbound listener, a real request would take that lane")
    if route.fallback and route.lane_asked is not None:
        text += f"; {route.service} has no {route.lane_asked} endpoints, so this hop falls back to {route.lane_used}"
    return text
