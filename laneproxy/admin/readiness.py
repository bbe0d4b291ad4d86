"""/ready and the health-check switches: LIVE once the first table is in, DRAINING after a fail or SIGTERM.

As in Envoy, /healthcheck/fail also makes every listener close connections after their response
(Envoy's drain manager answers "drain close" while health checks fail); /healthcheck/ok lets new
connections stay alive again, unless the process itself is shutting down.
"""

from __future__ import annotations

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, text


async def ready(request: web.Request) -> web.Response:
    state = context(request).proxy.state
    return text(state + "\n", status=200 if state == "LIVE" else 503)


async def healthcheck_fail(request: web.Request) -> web.Response:
    proxy = context(request).proxy
    proxy.healthcheck_failed = True
    proxy.drain_listeners()
    return text("OK\n")


async def healthcheck_ok(request: web.Request) -> web.Response:
    proxy = context(request).proxy
    proxy.healthcheck_failed = False
    if not proxy.draining:
        for listener in proxy.listeners:
            listener.resume()
    return text("OK\n")


ENDPOINTS = (
    AdminEndpoint("/ready", "print server state, return 200 if LIVE, otherwise return 503", ready),
    AdminEndpoint("/healthcheck/fail", "cause the server to fail health checks", healthcheck_fail, mutates=True),
    AdminEndpoint("/healthcheck/ok", "cause the server to pass health checks", healthcheck_ok, mutates=True),
)
