"""The read-only metrics listener: Prometheus text for a scraper in a cluster, apart from the admin API.

Owns the listener Istio calls its merged-metrics port (15020): GET `/stats/prometheus` (and `/metrics`)
answers every stat of the process (Envoy's, laneproxy's and Istio's standard metrics) exactly as the
admin's /stats/prometheus does, with the same `filter`/`usedonly` query. Nothing else is served here:
no POST, no health-check switch, no drain, so it may bind the pod's address while the admin API stays
on loopback. Any other path or method answers 404/405 without touching the proxy.

With `--app-metrics URL` (injection sets it when the pod's own `prometheus.io/*` annotations named
a scrape target, and points those annotations here instead, as Istio's merged metrics do) the app's
Prometheus text is fetched at each scrape and appended, so one scrape of the pod sees both. An app
that does not answer within APP_METRICS_TIMEOUT costs that scrape its part, never the proxy's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from laneproxy.admin import web
from laneproxy.admin.stats import answer_stats
from laneproxy.observability.inventory import CatalogCache

if TYPE_CHECKING:
    from laneproxy.admin.proxy import RunningProxy

log = logging.getLogger("laneproxy.metrics")

PATHS = ("/stats/prometheus", "/metrics")
APP_METRICS_TIMEOUT = 2.0  # seconds: below Prometheus' default scrape timeout (10 s) with room for the proxy's part
APP_METRICS_LIMIT = 16 << 20  # bytes of app metrics merged per scrape


def build_metrics_app(proxy: RunningProxy) -> web.Router:
    catalogs = CatalogCache()  # its own: the admin's is rebuilt on the admin's schedule
    proxy.store.subscribe(catalogs.invalidate)
    app_metrics = AppMetrics(proxy.settings.observability.app_metrics)

    async def prometheus(request: web.Request) -> web.StreamResponse:
        return await answer_stats(request, proxy, catalogs, "prometheus", app_metrics.fetch if app_metrics.url else None)

    app = web.Router()
    app["app_metrics"] = app_metrics
    for path in PATHS:
        app.add_get(path, prometheus)  # GET (and HEAD); anything else is 405, unknown paths 404
    return app


class AppMetrics:
    """The app's own Prometheus text, fetched at each scrape with aiohttp's client, imported only when configured."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.session = None

    async def fetch(self) -> bytes:
        import aiohttp  # only a pod whose app has metrics of its own pays for aiohttp's memory

        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=APP_METRICS_TIMEOUT),
                                                 trust_env=False)
        try:
            async with self.session.get(self.url) as response:  # type: ignore[arg-type]
                if response.status != 200:
                    log.debug("app metrics at %s answered %d", self.url, response.status)
                    return b""
                body = await response.content.read(APP_METRICS_LIMIT)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.debug("app metrics at %s: %s", self.url, exc)
            return b""
        return body if body.endswith(b"\n") or not body else body + b"\n"

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class MetricsServer:
    def __init__(self, proxy: RunningProxy) -> None:
        self.router = build_metrics_app(proxy)
        self.server = web.Server(self.router)

    async def start(self, host: str, port: int) -> int:
        return await self.server.start(host, port)

    async def stop(self) -> None:
        await self.server.stop()
        await self.router["app_metrics"].close()
