"""/stats, /stats/prometheus and /reset_counters: every stat of the process under its Envoy name.

Owns the query semantics of Envoy's stats handler: `format` (text, json, prometheus), `filter` (a
regular expression searched in the name; Python's `re` stands in for RE2), `invert_filter`,
`usedonly` and `type` (All, Counters, Gauges, Histograms, TextReadouts), and the text and JSON
shapes. Names, tags and values come from observability.inventory; nothing here invents a stat.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Iterable, Mapping

from aiohttp import web

from laneproxy.admin.endpoint import AdminEndpoint, context, flag, text
from laneproxy.core.propagation import TraceTableCounters
from laneproxy.observability.inventory import ProcessView, all_records
from laneproxy.observability.prometheus import metric_families, render, render_registry
from laneproxy.observability.stats import QUANTILES, Histogram, StatKind, StatRecord

if TYPE_CHECKING:
    from laneproxy.app import ProxyApp

_TYPES = {"all": None, "counters": StatKind.COUNTER, "gauges": StatKind.GAUGE, "histograms": StatKind.HISTOGRAM,
          "textreadouts": StatKind.TEXT}


class StatsQueryError(ValueError):
    """A /stats query Envoy would refuse: a bad regular expression, an unknown type or format."""


def process_view(proxy: ProxyApp) -> ProcessView:
    """Gather what the inventory reads, refreshing the gauges that are computed rather than counted."""
    for listener in proxy.listeners:
        listener.stats.rq_active = listener.active_requests()
    return ProcessView(
        stats=proxy.stats, table=proxy.store.current, state=proxy.state,
        uptime_seconds=int(time.time() - proxy.started_at),
        static_routes=tuple(route for listener in proxy.listeners for route in listener.role.static_routes()),
        trace_counters=proxy.traces.counters, trace_table_size=len(proxy.traces),
        config_accepted=proxy.store.accepted, config_rejected=proxy.store.rejected,
    )


def select(records: Iterable[StatRecord], query: Mapping[str, str]) -> list[StatRecord]:
    """The records an Envoy-style query asks for; raises StatsQueryError on a query Envoy would refuse."""
    pattern = query.get("filter")
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as exc:
        raise StatsQueryError(f"Invalid re2 regex: {exc}") from exc
    kind_name = query.get("type", "All").lower()
    if kind_name not in _TYPES:
        raise StatsQueryError(f"invalid type: {query.get('type')}; expected one of All, Counters, Gauges, "
                              "Histograms, TextReadouts")
    kind = _TYPES[kind_name]
    invert = flag(query, "invert_filter")
    used_only = flag(query, "usedonly")
    chosen = []
    for record in records:
        if kind is not None and record.kind is not kind:
            continue
        if used_only and not record.used:
            continue
        if regex is not None and (regex.search(record.name) is None) != invert:
            continue
        chosen.append(record)
    return chosen


def _number(value: float) -> str:
    return f"{value:g}"


def histogram_summary(histogram: Histogram) -> str:
    """Envoy's text form: `P0(interval,cumulative) ...`; laneproxy keeps no interval, so that part is nan."""
    if histogram.count == 0:
        return "No recorded values"
    return " ".join(f"P{_number(q)}(nan,{_number(histogram.quantile(q))})" for q in QUANTILES)


def format_text(records: list[StatRecord]) -> str:
    lines = []
    histograms = []
    for record in sorted(records, key=lambda r: r.name):
        if record.kind is StatKind.HISTOGRAM:
            histograms.append(record)
        elif record.kind is StatKind.TEXT:
            lines.append(f'{record.name}: "{record.value}"\n')
        else:
            lines.append(f"{record.name}: {record.value}\n")
    for record in histograms:
        lines.append(f"{record.name}: {histogram_summary(record.value)}\n")  # type: ignore[arg-type]
    return "".join(lines)


def format_json(records: list[StatRecord]) -> dict:
    stats: list[dict] = []
    computed = []
    for record in sorted(records, key=lambda r: r.name):
        if record.kind is StatKind.HISTOGRAM:
            histogram = record.value
            assert isinstance(histogram, Histogram)
            computed.append({"name": record.name,
                             "values": [{"interval": None, "cumulative": histogram.quantile(q)} for q in QUANTILES]})
        else:
            stats.append({"name": record.name, "value": record.value})
    if computed:
        stats.append({"histograms": {"supported_quantiles": list(QUANTILES), "computed_quantiles": computed}})
    return {"stats": stats}


async def stats_handler(request: web.Request) -> web.Response:
    admin = context(request)
    output = request.query.get("format", "text")
    if output == "prometheus":
        return await prometheus_handler(request)
    if output not in ("text", "json"):
        return text(f"usage: /stats?format=(text|json|prometheus); got format={output}\n", status=400)
    try:
        records = select(all_records(process_view(admin.proxy)), request.query)
    except StatsQueryError as exc:
        return text(str(exc), status=400)
    if output == "json":
        document = format_json(records)
        document["config_version"] = admin.proxy.store.current.version  # laneproxy's; workers.py merges on it
        return web.Response(text=json.dumps(document, indent=1), content_type="application/json")
    return text(format_text(records))


async def prometheus_handler(request: web.Request) -> web.Response:
    admin = context(request)
    query = request.query
    if not any(name in query for name in ("filter", "usedonly", "type", "invert_filter")):
        return text(render_registry(admin.registry))  # a plain scrape reads through the registry
    try:
        records = select(all_records(process_view(admin.proxy)), query)
    except StatsQueryError as exc:
        return text(str(exc), status=400)
    return text(render(metric_families(records)))


async def reset_counters(request: web.Request) -> web.Response:
    """Envoy's semantics: every counter to zero; gauges and histograms keep their values."""
    proxy = context(request).proxy
    proxy.stats.reset_counters()
    proxy.traces.counters = TraceTableCounters()
    proxy.store.accepted = proxy.store.rejected = 0
    return text("OK\n")


_QUERY_HELP = (
    ("usedonly", "Only include stats that have been written by system since restart"),
    ("filter", "Regular expression (Python re, standing in for Google re2) for filtering stats"),
    ("invert_filter", "Invert the filter regex"),
)

ENDPOINTS = (
    AdminEndpoint("/stats", "print server stats", stats_handler, params=(
        *_QUERY_HELP,
        ("format", "Format to use; One of (text, json, prometheus)"),
        ("type", "Stat types to include.; One of (All, Counters, Histograms, Gauges, TextReadouts)"),
    )),
    AdminEndpoint("/stats/prometheus", "print server stats in prometheus format", prometheus_handler,
                  params=_QUERY_HELP),
    AdminEndpoint("/reset_counters", "reset all counters to zero", reset_counters, mutates=True),
)
