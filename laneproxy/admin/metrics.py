"""The read-only metrics listener: Prometheus text for a scraper in a cluster, apart from the admin API.

Owns the listener Istio calls its merged-metrics port (15020): GET `/stats/prometheus` (and `/metrics`)
answers every stat of the process (Envoy's, laneproxy's and Istio's standard metrics) exactly as the
admin's /stats/prometheus does, with the same `filter`/`usedonly` query. Nothing else is served here:
no POST, no health-check switch, no drain, so it may bind the pod's address while the admin API stays
on loopback. Any other path or method answers 404/405 without touching the proxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from laneproxy.admin.stats import answer_stats
from laneproxy.observability.inventory import CatalogCache

if TYPE_CHECKING:
    from laneproxy.app import ProxyApp

PATHS = ("/stats/prometheus", "/metrics")


def build_metrics_app(proxy: ProxyApp) -> web.Application:
    catalogs = CatalogCache()  # its own: the admin's is rebuilt on the admin's schedule
    proxy.store.subscribe(catalogs.invalidate)

    async def prometheus(request: web.Request) -> web.StreamResponse:
        return await answer_stats(request, proxy, catalogs, "prometheus")

    app = web.Application()
    for path in PATHS:
        app.router.add_get(path, prometheus)  # GET (and HEAD); anything else is 405, unknown paths 404
    return app


class MetricsServer:
    def __init__(self, proxy: ProxyApp) -> None:
        self.runner = web.AppRunner(build_metrics_app(proxy), access_log=None)

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.runner.cleanup()
