"""The admin HTTP server: routes each path to its endpoint family and owns the admin listener's lifecycle.

Binds to 127.0.0.1 unless told otherwise. Handlers only read process state; the few that change it
(health check fail/ok, drain) are POST-only, as in Envoy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from laneproxy.admin import lanes, readiness, stats

if TYPE_CHECKING:
    from laneproxy.app import ProxyApp


def build_admin_app(proxy: ProxyApp) -> web.Application:
    app = web.Application()
    app["proxy"] = proxy
    readiness.add_routes(app)
    stats.add_routes(app)
    lanes.add_routes(app)
    return app


class AdminServer:
    def __init__(self, proxy: ProxyApp) -> None:
        self.runner = web.AppRunner(build_admin_app(proxy), access_log=None)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        await self.runner.cleanup()
