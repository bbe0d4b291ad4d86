"""/stats, /stats/prometheus and /reset_counters: every stat of the process under its Envoy name.

Owns the query semantics of Envoy's stats handler: `format` (text, json, prometheus), `filter` (a
regular expression searched in the name; Python's `re` stands in for RE2), `invert_filter`,
`usedonly` and `type` (All, Counters, Gauges, Histograms, TextReadouts), and the text and JSON
shapes. Names, tags and values come from observability.inventory; nothing here invents a stat.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Iterable, Mapping

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, envoy_headers, text
from laneproxy.admin.exposition import (JsonFormat, PrometheusFormat, Selection, StatsQueryError, TextFormat,
                                        histogram_summary, stream)
from laneproxy.core.propagation import TraceTableCounters
from laneproxy.observability.inventory import ClusterCatalog, ProcessView, all_records, process_memory
from laneproxy.observability.prometheus import metric_families, render, with_istio_tags
from laneproxy.observability.stats import QUANTILES, Histogram, StatKind, StatRecord

if TYPE_CHECKING:
    from laneproxy.admin.proxy import RunningProxy

__all__ = ["StatsQueryError", "histogram_summary", "process_view", "select", "format_text", "format_json"]


def process_view(proxy: RunningProxy) -> ProcessView:
    """Gather what the inventory reads, refreshing the gauges that are computed rather than counted."""
    for listener in proxy.listeners:
        listener.stats.rq_active = listener.active_requests()
    return ProcessView(
        stats=proxy.stats, table=proxy.store.current, state=proxy.state,
        uptime_seconds=int(time.time() - proxy.started_at),
        static_routes=tuple(route for listener in proxy.listeners for route in listener.role.static_routes()),
        trace_counters=proxy.traces.counters, trace_table_size=len(proxy.traces),
        trace_table_bytes=proxy.traces.size_bytes,
        config_accepted=proxy.store.accepted, config_rejected=proxy.store.rejected,
        config_skipped=len(proxy.store.skipped), config_objects_rejected=proxy.store.objects_rejected,
        config_health=proxy.store.health(),
        istio=proxy.istio if proxy.settings.observability.istio_metrics else None,
        pools=getattr(proxy, "pools", None), outliers=getattr(proxy, "outliers", None),
        listener_addresses=tuple((listener.name, listener.address_tag) for listener in proxy.listeners),
        memory=process_memory(),
        **_outlier_counters(proxy),
    )


def _outlier_counters(proxy: RunningProxy) -> dict[str, int]:
    outliers = getattr(proxy, "outliers", None)  # absent until the proxy has started its listeners
    if outliers is None:
        return {}
    return {"outlier_ejections": outliers.ejections_total, "outlier_ejections_refused": outliers.ejections_refused,
            "outlier_failed_hop_responses": outliers.failed_hop_responses}


def select(records: Iterable[StatRecord], query: Mapping[str, str]) -> list[StatRecord]:
    """The records an Envoy-style query asks for; raises StatsQueryError on a query Envoy would refuse."""
    return Selection.from_query(query).choose(records)


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


def reference_body(output: str, selection: Selection, view: ProcessView, catalog: ClusterCatalog,
                   tag_style: str = "envoy") -> str:
    """The whole answer rendered at once from StatRecords: the shape the streamed answer must equal."""
    records = selection.choose(all_records(view, catalog))
    if output == "json":
        document = format_json(records)
        document["config_version"] = view.table.version  # laneproxy's; workers.py merges on it
        return json.dumps(document, indent=1)
    if output == "prometheus":
        if tag_style == "istio":
            records = [with_istio_tags(record) for record in records]
        return render(metric_families(records))
    return format_text(records)


async def _answer(request: web.Request, output: str) -> web.StreamResponse:
    admin = context(request)
    return await answer_stats(request, admin.proxy, admin.catalogs, output)


async def answer_stats(request: web.Request, proxy: RunningProxy, catalogs, output: str,
                       trailer=None) -> web.StreamResponse:
    """/stats in one format, streamed; shared by the admin API and the read-only metrics listener."""
    try:
        selection = Selection.from_query(request.query)
    except StatsQueryError as exc:
        return text(str(exc), status=400)
    view = process_view(proxy)
    catalog = catalogs.catalog(view.table, view.static_routes)
    tag_style = proxy.settings.observability.stats_tags
    fmt = (JsonFormat(view.table.version) if output == "json" else PrometheusFormat(tag_style)
           if output == "prometheus" else TextFormat())
    return await stream(request, fmt, selection, view, catalog, envoy_headers(proxy.settings.server_name),
                        lambda: reference_body(output, selection, view, catalog, tag_style), trailer)


async def stats_handler(request: web.Request) -> web.StreamResponse:
    output = request.query.get("format", "text")
    if output not in ("text", "json", "prometheus"):
        return text(f"usage: /stats?format=(text|json|prometheus); got format={output}\n", status=400)
    return await _answer(request, output)


async def prometheus_handler(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "prometheus")


async def reset_counters(request: web.Request) -> web.Response:
    """Envoy's semantics: every counter to zero; gauges and histograms keep their values."""
    proxy = context(request).proxy
    proxy.stats.reset_counters()
    proxy.istio.reset_counters()
    if getattr(proxy, "pools", None) is not None:
        proxy.pools.reset_counters()
    if getattr(proxy, "outliers", None) is not None:
        proxy.outliers.ejections_by_endpoint.clear()
    proxy.traces.counters = TraceTableCounters()
    proxy.store.accepted = proxy.store.rejected = proxy.store.objects_rejected = 0
    outliers = getattr(proxy, "outliers", None)
    if outliers is not None:
        outliers.ejections_total = outliers.ejections_refused = outliers.failed_hop_responses = 0
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
