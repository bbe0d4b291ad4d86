"""What every admin endpoint family declares (path, help, whether it changes state) and what they share.

Owns the AdminEndpoint declaration, the per-server AdminContext (the proxy, when the running table
arrived, the running table's cluster catalog), the help
listing, the headers every admin response carries and Envoy's plain-text response shape. No handler
lives here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Mapping

from laneproxy.admin import web
from laneproxy.observability.inventory import CatalogCache

if TYPE_CHECKING:
    from laneproxy.admin.proxy import RunningProxy
    from laneproxy.core.model import RouteTable


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    path: str
    help: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    mutates: bool = False  # POST only, as Envoy's handlers that change server state
    params: tuple[tuple[str, str], ...] = ()  # (query parameter, help), shown by /help


class AdminContext:
    """The state one admin server reads: the proxy, and when the running table was published."""

    __slots__ = ("proxy", "endpoints", "table_updated_at", "catalogs")

    def __init__(self, proxy: RunningProxy, endpoints: tuple[AdminEndpoint, ...]) -> None:
        self.proxy = proxy
        self.endpoints = endpoints
        self.table_updated_at = time.time()
        self.catalogs = CatalogCache()  # the running table's clusters, rebuilt after each publication

    def on_publish(self, table: RouteTable) -> None:
        self.table_updated_at = time.time()
        self.catalogs.invalidate(table)


CONTEXT_KEY = "laneproxy_admin_context"


def context(request: web.Request) -> AdminContext:
    assert request.app is not None
    admin: AdminContext = request.app[CONTEXT_KEY]
    return admin


def help_text(endpoints: Iterable[AdminEndpoint]) -> str:
    lines = ["admin commands are:"]
    for endpoint in endpoints:
        lines.append(f"  {endpoint.path}{' (POST)' if endpoint.mutates else ''}: {endpoint.help}")
        lines.extend(f"      {name}: {text}" for name, text in endpoint.params)
    return "\n".join(lines) + "\n"


ENVOY_HEADERS = {"cache-control": "no-cache, max-age=0", "x-content-type-options": "nosniff"}


def envoy_headers(server_name: str) -> dict[str, str]:
    """The headers every admin response carries, as Envoy's; a streamed response needs them before it starts."""
    return {**ENVOY_HEADERS, "server": server_name}


def text(body: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", charset="UTF-8")


def flag(query: Mapping[str, str], name: str) -> bool:
    """Envoy's boolean query parameters: present means on (`?usedonly`, `?usedonly=`), unless `false` or `0`."""
    value = query.get(name)
    return value is not None and value.lower() not in ("false", "0")
