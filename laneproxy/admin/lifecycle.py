"""/drain_listeners and /quitquitquit: the operator's ways to wind a proxy down.

/drain_listeners makes listeners close each connection after its response in flight (laneproxy's
drain is Envoy's graceful one; listeners keep accepting, which is Envoy's `skip_exit`);
`?inboundonly` drains only the inbound listener. /quitquitquit stops the process without a drain
period, after the reply has been written.
"""

from __future__ import annotations

import asyncio

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, flag, text


async def drain_listeners(request: web.Request) -> web.Response:
    proxy = context(request).proxy
    inbound_only = flag(request.query, "inboundonly")
    for listener in proxy.listeners:
        if not inbound_only or listener.name == "inbound":
            listener.drain()
    return text("OK\n")


async def quitquitquit(request: web.Request) -> web.Response:
    asyncio.get_running_loop().call_soon(context(request).proxy.quit)
    return text("OK\n")


ENDPOINTS = (
    AdminEndpoint("/drain_listeners", "drain listeners", drain_listeners, mutates=True, params=(
        ("inboundonly", "Drains only the inbound listener (the one in front of the application)."),
        ("graceful", "Accepted for compatibility: laneproxy's drain is always graceful."),
    )),
    AdminEndpoint("/quitquitquit", "exit the server", quitquitquit, mutates=True),
)
