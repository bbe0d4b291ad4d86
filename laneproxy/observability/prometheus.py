"""Prometheus exposition of the proxy's stats, named and tagged as Envoy's /stats/prometheus names them.

Owns the process's own CollectorRegistry (never prometheus_client's global REGISTRY) with one
custom collector that turns StatRecords into metric families, and the text rendering. Rendering is
our own rather than `generate_latest` because Envoy's counter families do not all end in `_total`
(`envoy_cluster_upstream_rq{envoy_response_code="200"}` is a counter), and prometheus_client's
writer would rename their `# TYPE` lines to `..._total` and collide with the real
`envoy_cluster_upstream_rq_total` family. The output parses with prometheus_client's own parser.

prometheus_client itself is imported only where its objects are made (metric_families, build_registry: the
reference renderer the tests hold the streamed exposition to): the listeners' streamed answers need only
number formatting, done here as its floatToGoString does, so a sidecar never loads its 18 modules (and the
http.server, wsgiref and urllib.request they pull in), about 1.4 MiB of resident memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

from laneproxy.observability.stats import HISTOGRAM_BOUNDS, Histogram, StatKind, StatRecord

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

_TYPE_ORDER = {"counter": 0, "gauge": 1, "histogram": 2}
_ENVOY_BOUND_LABELS = [str(int(b)) if b == int(b) else str(b) for b in HISTOGRAM_BOUNDS] + ["+Inf"]


def bound_labels(bounds: tuple[float, ...]) -> list[str]:
    """The `le` values of a histogram's buckets (Envoy's default bounds are formatted once)."""
    if bounds is HISTOGRAM_BOUNDS:
        return _ENVOY_BOUND_LABELS
    return [str(int(b)) if b == int(b) else str(b) for b in bounds] + ["+Inf"]


def metric_families(records: Iterable[StatRecord]) -> list[Metric]:
    """Group records into families, Envoy's order: counters, then gauges, then histograms, each by name."""
    from prometheus_client.metrics_core import Metric

    families: dict[str, Metric] = {}
    for record in records:
        kind = record.kind
        if kind is StatKind.TEXT:
            # A text readout becomes an info-style gauge: the text is the label, the value is 1.
            metric_type, value = "gauge", 1
        else:
            metric_type, value = kind.value, record.value
        family = families.get(record.family)
        if family is None:
            family = families[record.family] = Metric(record.family, "", metric_type)
        labels = dict(record.tags)
        if kind is StatKind.HISTOGRAM:
            assert isinstance(value, Histogram)
            for bound, count in zip(bound_labels(value.bounds), value.cumulative()):
                family.add_sample(record.family + "_bucket", {**labels, "le": bound}, count)
            family.add_sample(record.family + "_sum", labels, value.sum)
            family.add_sample(record.family + "_count", labels, value.count)
        else:
            family.add_sample(record.family, labels, value)  # type: ignore[arg-type]
    return sorted(families.values(), key=lambda family: (_TYPE_ORDER.get(family.type, 3), family.name))


class ProxyCollector:
    """Reads the live stats at every scrape; holds no numbers of its own.

    A prometheus_client Collector by shape (a registry asks only for `collect`), not by base class, so that
    defining it imports nothing."""

    def __init__(self, records: Callable[[], Iterable[StatRecord]]) -> None:
        self._records = records

    def collect(self) -> Iterable[Metric]:
        return metric_families(self._records())


def build_registry(records: Callable[[], Iterable[StatRecord]]) -> CollectorRegistry:
    """A registry of this process only (auto_describe off: describing would run a full collection)."""
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(records))
    return registry


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else go_float(value)


def go_float(value: float) -> str:
    """A float as Prometheus (Go) writes it: prometheus_client.utils.floatToGoString's output, without its import."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def render(families: Iterable[Metric]) -> str:
    """Prometheus text format 0.0.4 as Envoy writes it: `# TYPE` lines named after the samples, no HELP."""
    out: list[str] = []
    for family in families:
        out.append(f"# TYPE {family.name} {family.type}\n")
        for sample in family.samples:  # in record order: a histogram's buckets, sum and count stay together
            labels = ",".join(f'{name}="{_escape(value)}"' for name, value in sample.labels.items())
            out.append(f"{sample.name}{{{labels}}} {_number(sample.value)}\n")
    return "".join(out)


def metric_type(record: StatRecord) -> str:
    """The Prometheus type of the family a record belongs to (a text readout is an info-style gauge)."""
    return "gauge" if record.kind is StatKind.TEXT else record.kind.value


def family_order(family: str, metric_type: str) -> tuple[int, str]:
    """Where a family goes in the exposition: counters, then gauges, then histograms, each by name."""
    return _TYPE_ORDER.get(metric_type, 3), family


def type_line(family: str, metric_type: str) -> str:
    return f"# TYPE {family} {metric_type}\n"


def record_lines(record: StatRecord) -> str:
    """The sample lines of one record, exactly as render(metric_families([record])) writes them, without TYPE."""
    labels = ",".join(f'{name}="{_escape(value)}"' for name, value in record.tags)
    kind = record.kind
    if kind is StatKind.HISTOGRAM:
        histogram = record.value
        assert isinstance(histogram, Histogram)
        family = record.family
        prefix = f"{family}_bucket{{{labels}," if labels else f"{family}_bucket{{"
        lines = [f'{prefix}le="{bound}"}} {count}\n'
                 for bound, count in zip(bound_labels(histogram.bounds), histogram.cumulative())]
        lines.append(f"{family}_sum{{{labels}}} {_number(histogram.sum)}\n")
        lines.append(f"{family}_count{{{labels}}} {_number(histogram.count)}\n")
        return "".join(lines)
    value = 1 if kind is StatKind.TEXT else record.value
    return f"{record.family}{{{labels}}} {_number(value)}\n"  # type: ignore[arg-type]


# Istio's bootstrap names Envoy's tags without the `envoy_` prefix (and a class keeps its `xx`):
# `envoy_cluster_upstream_rq{cluster_name="...",response_code="200"}` where Envoy alone writes envoy_cluster_name.
ISTIO_TAG_NAMES = {
    "envoy_cluster_name": "cluster_name",
    "envoy_response_code": "response_code",
    "envoy_response_code_class": "response_code_class",
    "envoy_http_conn_manager_prefix": "http_conn_manager_prefix",
    "envoy_listener_address": "listener_address",
}
STATS_TAG_STYLES = ("envoy", "istio")


def with_istio_tags(record: StatRecord) -> StatRecord:
    """The record under Istio's tag names (records without Envoy tags are returned as they are)."""
    tags = record.tags
    if not tags or not any(name in ISTIO_TAG_NAMES for name, _ in tags):
        return record
    renamed = tuple((ISTIO_TAG_NAMES[name], value + "xx" if name == "envoy_response_code_class" else value)
                    if name in ISTIO_TAG_NAMES else (name, value) for name, value in tags)
    return StatRecord(record.name, record.kind, record.value, record.used, record.family, renamed)


def escape_label(value: str) -> str:
    return _escape(value)


def render_registry(registry: CollectorRegistry) -> str:
    return render(registry.collect())
