"""/lanes: the running lookup table, service x lane -> endpoints, with the fallback each lane takes."""

from __future__ import annotations

from aiohttp import web

from laneproxy.core.model import RouteTable


def lanes_document(table: RouteTable) -> dict:
    services = {}
    for key, routes in table.routes.items():
        services[key] = {
            "group": routes.group.name if routes.group else None,
            "port": routes.service.port,
            "lanes": {
                lane.decode(): {
                    "lane_used": route.lane_used,
                    "fallback": route.fallback,
                    "cluster": route.cluster,
                    "endpoints": [endpoint.address for endpoint in route.endpoints],
                }
                for lane, route in routes.by_lane.items()
            },
            "default": {"lane_used": routes.default.lane_used, "cluster": routes.default.cluster,
                        "endpoints": [e.address for e in routes.default.endpoints]},
        }
    groups = {
        name: {"lanes": list(group.lanes), "permissive": group.permissive, "fallback_target": group.fallback_target,
               "route_header": group.route_header, "trace_header": group.trace_header,
               "strategy": group.strategy.value}
        for name, group in table.groups.items()
    }
    return {"version": table.version, "groups": groups, "services": services}


async def lanes(request: web.Request) -> web.Response:
    return web.json_response(lanes_document(request.app["proxy"].store.current))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/lanes", lanes)
