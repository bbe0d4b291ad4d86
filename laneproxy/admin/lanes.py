"""/lanes and /route: the running lookup table, and where one request would go and why.

/lanes is the table: service x lane -> the lane that serves it, its cluster and endpoints, and
whether that is a fallback; each service with its port's upstream protocol (http1, http2 or auto). /route answers for one request described in the query
(`?host=mockb&path=/mock&header=x-asm-prefer-tag:canary&listener=outbound`), using the same pure
routing functions as the data plane; with endpoints ejected it adds `health`: each lane of the chain's
healthy fraction and the lane that fallback chains and spill pick for the draw `random`. It never touches live state: the trace-id -> lane table is not
consulted (a lookup would count as a hit or miss and refresh the entry), which the answer says when
it matters, and for weighted ingress the random draw is the `random` parameter (default 0.5).
"""

from __future__ import annotations

from typing import Any

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, text
from laneproxy.core.errors import LocalReplyError
from laneproxy.core.fallback import choose_lane, healthy_fraction, own_route
from laneproxy.core.decision import RequestMeta, decide, reason
from laneproxy.core.model import Endpoint, Route, RouteTable, ServiceRoutes


def lanes_document(table: RouteTable) -> dict:
    services = {}
    for key, routes in table.routes.items():
        services[key] = {
            "group": routes.group.name if routes.group else None,
            "port": routes.service.port,
            "protocol": routes.service.protocol.value,
            "lanes": {
                lane.decode(): {
                    "lane_used": route.lane_used,
                    "fallback": route.fallback,
                    "cluster": route.cluster,
                    "endpoints": [endpoint.address for endpoint in route.endpoints],
                    "fallback_chain": list(route.chain),
                }
                for lane, route in routes.by_lane.items()
            },
            "default": {"lane_used": routes.default.lane_used, "cluster": routes.default.cluster,
                        "endpoints": [e.address for e in routes.default.endpoints]},
        }
    groups = {
        name: {"lanes": list(group.lanes), "permissive": group.permissive, "fallback_target": group.fallback_target,
               "route_header": group.route_header, "trace_header": group.trace_header,
               "strategy": group.strategy.value,
               "fallback_chains": {lane.name: {service: list(chain) for service, chain in lane.fallback_chains.items()}
                                   for lane in group.lanes.values() if lane.fallback_chains},
               "spill_below": {lane.name: lane.spill_below for lane in group.lanes.values() if lane.spill_below}}
        for name, group in table.groups.items()
    }
    return {"version": table.version, "groups": groups, "services": services}


async def lanes(request: web.Request) -> web.Response:
    return web.json_response(lanes_document(context(request).proxy.store.current))


class RouteQueryError(ValueError):
    """A /route query that does not describe a request: no host, a header without a colon, a bad number."""


def _route_document(route: Route, ejected: frozenset) -> dict:
    return {
        "service": route.service,
        "lane_asked": route.lane_asked,
        "lane_used": route.lane_used,
        "fallback": route.fallback,
        "fallback_chain": list(route.chain),
        "cluster": route.cluster,
        "protocol": route.protocol.value,
        "endpoints": [endpoint.address for endpoint in route.endpoints],
        "ejected_endpoints": [endpoint.address for endpoint in route.endpoints if endpoint in ejected],
    }


def _health_document(route: Route, routes: ServiceRoutes | None, ejected: frozenset, random_value: float) -> dict:
    """With ejected endpoints: each lane of the chain's healthy fraction, and the lane the draw `random` picks."""
    def healthy(endpoints: tuple) -> tuple:
        return tuple(endpoint for endpoint in endpoints if endpoint not in ejected)

    choice = choose_lane(route, routes, healthy, random_value)
    lanes = {}
    if routes is not None and routes.group is not None and route.lane_asked is not None:
        for lane in (route.lane_asked, *route.chain):
            own = own_route(routes, lane)
            group_lane = routes.group.lanes.get(lane)
            lanes[lane] = {"healthy_fraction": healthy_fraction(own, healthy) if own is not None else 0.0,
                           "spill_below": group_lane.spill_below if group_lane is not None else 0.0}
    return {"random": random_value, "lanes": lanes,
            "lane_used": choice.route.lane_used if choice is not None else None,
            "spilled": choice.spilled if choice is not None else False}


def explain_route(table: RouteTable, *, listener: str, host: str, path: str, headers: dict[str, str],
                  random_value: float = 0.5, own_lane: str | None = None,
                  ejected: frozenset[Endpoint] = frozenset()) -> dict[str, Any]:
    """Where a request with this host, path and headers would go from `listener`, and why.

    Pure, and the data plane's own decision (core.decision.decide) without the trace table.
    """
    answer: dict[str, Any] = {"listener": listener, "table_version": table.version, "host": host, "path": path}
    request = RequestMeta(listener, host.encode(), path.encode(),
                          [(name.encode(), value.encode()) for name, value in headers.items()],
                          own_lane=own_lane.encode() if own_lane else None)
    try:
        decision = decide(table, request, None, random_value)
    except LocalReplyError as error:
        answer.update(local_reply={"status": error.status, "response_flags": error.flag, "body": error.body,
                                   "detail": error.detail})
        return answer
    route, group = decision.route, decision.group
    answer.update(lane=decision.lane.decode("latin-1") if decision.lane else None)
    if decision.lane_source is not None and listener != "gateway":
        answer.update(lane_source=decision.lane_source.value)
    answer.update(reason=reason(decision, request))
    if group is not None:
        answer.update(group=group.name)
    answer.update(route=_route_document(route, ejected),
                  headers_set_upstream={name.decode("latin-1"): value.decode("latin-1")
                                        for name, value in decision.upstream_headers.items()})
    if decision.reason == "weighted":
        answer["random"] = random_value
    if ejected and (group is not None or listener == "gateway"):
        routes = decision.routes if listener != "gateway" else table.routes.get(route.service)
        answer["health"] = _health_document(route, routes, ejected, random_value)
    return answer


def _query(request: web.Request) -> tuple[str, str, dict[str, str], float]:
    host = request.query.get("host")
    if not host:
        raise RouteQueryError("usage: /route?host=<host>[&path=/p][&header=name:value]...[&listener=gateway|outbound]"
                              "[&random=0.5]")
    headers = {}
    for item in request.query.getall("header", []):
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise RouteQueryError(f"header must be name:value, got {item!r}")
        headers[name.strip().lower()] = value.strip()
    try:
        random_value = float(request.query.get("random", "0.5"))
    except ValueError as exc:
        raise RouteQueryError("random must be a number in [0, 1)") from exc
    if not 0.0 <= random_value < 1.0:
        raise RouteQueryError("random must be a number in [0, 1)")
    return host, request.query.get("path", "/"), headers, random_value


async def route(request: web.Request) -> web.Response:
    proxy = context(request).proxy
    try:
        host, path, headers, random_value = _query(request)
    except RouteQueryError as exc:
        return text(f"{exc}\n", status=400)
    names = [listener.name for listener in proxy.listeners]
    listener = request.query.get("listener") or ("gateway" if "gateway" in names else "outbound")
    if listener not in ("gateway", "outbound"):
        return text("listener must be gateway or outbound (the inbound listener always sends to the app)\n", status=400)
    answer = explain_route(proxy.store.current, listener=listener, host=host, path=path, headers=headers,
                           random_value=random_value, own_lane=proxy.settings.own_lane,
                           ejected=frozenset(proxy.outliers.ejected))
    return web.json_response(answer)


ENDPOINTS = (
    AdminEndpoint("/lanes", "the lane lookup table: service x lane -> serving lane, cluster, endpoints, fallback",
                  lanes),
    AdminEndpoint("/route", "where would a request go, and why", route, params=(
        ("host", "the request's Host (or authority)"),
        ("path", "the request path (default /)"),
        ("header", "name:value, repeatable"),
        ("listener", "gateway or outbound (default: gateway if this proxy has one)"),
        ("random", "the random draw in [0, 1) used by weighted ingress and by spill (default 0.5)"),
    )),
)
