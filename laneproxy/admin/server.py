"""The admin HTTP server: routes each path to its endpoint family and owns the admin listener's lifecycle.

Owns what every admin response shares with Envoy's: the POST-only rule for endpoints that change
state (any other method answers 405 `Method GET not allowed, POST required.`, as Envoy 1.40 does),
the 404 help text for unknown paths, and the response headers (`cache-control: no-cache, max-age=0`,
`x-content-type-options: nosniff`, `server`). Binds to 127.0.0.1 unless told otherwise; binding it
anywhere else is an explicit choice of the operator. Handlers live one module per endpoint family.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from laneproxy.admin import (clusters, config_dump, home, lanes, lifecycle, listeners, loggers, readiness, server_info,
                             stats, web)
from laneproxy.admin.endpoint import CONTEXT_KEY, AdminContext, AdminEndpoint, envoy_headers, help_text, text

if TYPE_CHECKING:
    from laneproxy.admin.proxy import RunningProxy

log = logging.getLogger("laneproxy.admin")

FAMILIES = (home, readiness, lifecycle, server_info, stats, clusters, listeners, config_dump, loggers, lanes)


def admin_endpoints() -> tuple[AdminEndpoint, ...]:
    return tuple(sorted((e for family in FAMILIES for e in family.ENDPOINTS), key=lambda e: e.path))


def _handler(endpoint: AdminEndpoint) -> web.Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if endpoint.mutates and request.method != "POST":
            return text(f"Method {request.method} not allowed, POST required.", status=405)
        return await endpoint.handler(request)

    return handle


def build_admin_app(proxy: RunningProxy) -> web.Router:
    endpoints = admin_endpoints()

    async def not_found(request: web.Request) -> web.StreamResponse:
        return text("invalid path. " + help_text(endpoints), status=404)

    app = web.Router(default_headers=envoy_headers(proxy.settings.server_name), not_found=not_found)
    admin = app[CONTEXT_KEY] = AdminContext(proxy, endpoints)
    proxy.store.subscribe(admin.on_publish)
    for endpoint in endpoints:
        app.add(endpoint.path, _handler(endpoint))  # any method: a state change refuses all but POST itself
    return app


class AdminServer:
    def __init__(self, proxy: RunningProxy) -> None:
        self.server = web.Server(build_admin_app(proxy))
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        if not _is_loopback(host):
            log.warning("admin listens on %s: whoever reaches it can fail health checks, drain or stop this proxy",
                        host)
        self.port = await self.server.start(host, port)
        return self.port

    async def stop(self) -> None:
        await self.server.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
