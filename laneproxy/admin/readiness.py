"""/ready and the health-check switches: LIVE once the first table is in, DRAINING after a fail or SIGTERM."""

from __future__ import annotations

from aiohttp import web


async def ready(request: web.Request) -> web.Response:
    proxy = request.app["proxy"]
    state = proxy.state
    return web.Response(status=200 if state == "LIVE" else 503, text=state + "\n")


async def healthcheck_fail(request: web.Request) -> web.Response:
    request.app["proxy"].healthcheck_failed = True
    request.app["proxy"].drain_listeners()
    return web.Response(text="OK\n")


async def healthcheck_ok(request: web.Request) -> web.Response:
    request.app["proxy"].healthcheck_failed = False
    return web.Response(text="OK\n")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ready", ready)
    app.router.add_post("/healthcheck/fail", healthcheck_fail)
    app.router.add_post("/healthcheck/ok", healthcheck_ok)
