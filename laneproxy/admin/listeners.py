"""/listeners: each listener's name and bound address, as Envoy's `name::address` lines or JSON."""

from __future__ import annotations

import json

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, text


def listener_addresses(proxy) -> list[tuple[str, str, int]]:
    """(name, host, port) of every listener, with the port actually bound."""
    out = []
    for listener in proxy.listeners:
        address = getattr(proxy.settings, listener.name)
        out.append((listener.name, address.host, proxy.bound.get(listener.name, address.port)))
    return out


async def listeners_handler(request: web.Request) -> web.Response:
    rows = listener_addresses(context(request).proxy)
    if request.query.get("format") == "json":
        statuses = [{"name": name, "local_address": {"socket_address": {"address": host, "port_value": port}}}
                    for name, host, port in rows]
        return web.Response(text=json.dumps({"listener_statuses": statuses}, indent=1), content_type="application/json")
    return text("".join(f"{name}::{host}:{port}\n" for name, host, port in rows))


ENDPOINTS = (
    AdminEndpoint("/listeners", "print listener info", listeners_handler,
                  params=(("format", "File format to use; One of (text, json)"),)),
)
