"""`laneproxy controller`: one source (files or Kubernetes) feeding one store, served to sidecars over xDS.

Owns the controller process's wiring and lifecycle: the source is the proxy's own (app.make_source:
the same FileSource / KubernetesSource and RouteTableStore, never a copy), every table the store
publishes goes to the delta ADS server, and a small admin listener answers `/ready` (200 once the
source's first complete table is served), `/stats` and `/stats/prometheus`. Each replica serves on
its own: no leader, no state shared between replicas (resource versions are content hashes, equal
on every replica). It never routes a request and never edits a table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass

from aiohttp import web

from laneproxy.app import StartupError, make_source
from laneproxy.core.errors import LaneProxyError
from laneproxy.core.store import RouteTableStore
from laneproxy.settings import Address, ProxySettings
from laneproxy.xds.server import DeltaAdsServer
from laneproxy.xds.stats import XdsStats

log = logging.getLogger("laneproxy.controller")


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    source: ProxySettings  # only its source fields are read: source, config_files, kubeconfig, namespace, ...
    xds: Address = Address("0.0.0.0", 15010)
    admin: Address | None = Address("0.0.0.0", 15014)


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.store = RouteTableStore()
        self.stats = XdsStats()
        self.xds = DeltaAdsServer(self.stats)
        self.source = None
        self.bound: dict[str, int] = {}
        self._admin_runner: web.AppRunner | None = None
        self.started_at = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.store.ready and self.xds.served.is_set()

    async def start(self) -> None:
        settings = self.settings
        self.source = make_source(settings.source, self.store)
        # The store calls its listeners on the loop, where sources publish: the push starts at once.
        self.store.subscribe(self.xds.publish)
        try:
            self.bound["xds"] = await self.xds.start(settings.xds.host, settings.xds.port)
        except (OSError, RuntimeError) as exc:
            raise StartupError(f"xDS on {settings.xds}: {exc}") from exc
        log.info("xDS (delta ADS) on %s:%d", settings.xds.host, self.bound["xds"])
        if settings.admin is not None:
            runner = web.AppRunner(self.admin_app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, settings.admin.host, settings.admin.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                raise StartupError(f"admin on {settings.admin}: {exc.strerror or exc}") from exc
            self._admin_runner = runner
            self.bound["admin"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            log.info("admin on %s:%d", settings.admin.host, self.bound["admin"])
        try:
            await self.source.start()
        except LaneProxyError as exc:  # e.g. Kubernetes credentials that cannot be loaded
            raise StartupError(str(exc)) from exc
        if settings.source.source == "files" and not self.store.ready:
            raise StartupError(f"configuration rejected:\n{self.store.last_error}")

    async def stop(self) -> None:
        if self.source is not None:
            await self.source.stop()
        await self.xds.stop()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    # -- admin ----------------------------------------------------------------------------------

    def _table_age(self) -> float | None:
        return self.store.health().table_age_seconds

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/stats/prometheus", self._prometheus)
        app.router.add_get("/", self._home)
        return app

    async def _home(self, request: web.Request) -> web.Response:
        return web.Response(text="laneproxy controller\n/ready\n/stats (?format=json)\n/stats/prometheus\n")

    async def _ready(self, request: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="LIVE\n")
        return web.Response(status=503, text="PRE_INITIALIZING\n")

    async def _stats(self, request: web.Request) -> web.Response:
        rows = self.stats.lines(time.monotonic(), self.ready, self._table_age())
        rows.append(("controller.config.update_rejected", self.store.rejected))
        # Inputs the served table was built without (a swimlane object left out says why on its own status).
        rows.append(("controller.config.skipped_objects", len(self.store.skipped)))
        if request.query.get("format") == "json":
            return web.Response(text=json.dumps({"stats": [{"name": name, "value": value} for name, value in rows]},
                                                indent=1), content_type="application/json")
        return web.Response(text="".join(f"{name}: {value}\n" for name, value in rows))

    async def _prometheus(self, request: web.Request) -> web.Response:
        text = self.stats.prometheus(time.monotonic(), self.ready, self._table_age())
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def serve_controller(settings: ControllerSettings) -> None:
    """Run a controller until SIGTERM/SIGINT."""
    controller = Controller(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await controller.start()
        await stop.wait()
    finally:
        await controller.stop()
