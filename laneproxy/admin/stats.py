"""/stats: every counter and gauge of the process under its Envoy name, as text or JSON."""

from __future__ import annotations

from typing import Iterator

from aiohttp import web


def all_stats(proxy) -> Iterator[tuple[str, int]]:
    stats = proxy.stats
    for listener in stats.listeners.values():
        yield from listener.counters()
        yield from listener.gauges()
    for cluster in stats.clusters.values():
        yield from cluster.counters()
        yield from cluster.gauges()
    yield from stats.lanes.counters()
    traces = proxy.traces.counters
    yield "laneproxy.trace_table.hits", traces.hits
    yield "laneproxy.trace_table.misses", traces.misses
    yield "laneproxy.trace_table.evictions", traces.evictions
    yield "laneproxy.trace_table.expirations", traces.expirations
    yield "laneproxy.trace_table.size", len(proxy.traces)
    yield "laneproxy.config.update_success", proxy.store.accepted
    yield "laneproxy.config.update_rejected", proxy.store.rejected


async def stats(request: web.Request) -> web.Response:
    proxy = request.app["proxy"]
    pattern = request.query.get("filter")
    rows = sorted((name, value) for name, value in all_stats(proxy) if not pattern or pattern in name)
    if request.query.get("format") == "json":
        return web.json_response({"stats": [{"name": n, "value": v} for n, v in rows],
                                  "config_version": proxy.store.current.version})
    return web.Response(text="".join(f"{name}: {value}\n" for name, value in rows))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/stats", stats)
