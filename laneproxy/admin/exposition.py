"""/stats in text, JSON and Prometheus form, streamed in slices so a table of any size never stalls the loop.

Owns how the stats handler walks the clusters: the running table's cluster catalog (built once per
published table), a walk that renders only the clusters with counters from their live numbers and
every other cluster from one template per (membership, selected stats) with its name substituted,
and a pacer that sends what is rendered and yields to the event loop every few milliseconds, so
requests keep flowing while a 50,000-cluster scrape is written. The bytes are those of the plain
renderers in admin/stats.py and observability/prometheus.py (select, format_text, format_json,
metric_families + render), which stay the reference; the tests hold the two to the same output.
Never decides a stat's name, tag, value or `used`: those come from observability.stats.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Mapping

from laneproxy.admin import web
from laneproxy.admin.endpoint import flag
from laneproxy.observability import prometheus
from laneproxy.observability.inventory import (ClusterCatalog, ProcessView, names_are_prefix_free, other_records,
                                               transport_numbers)
from laneproxy.observability.stats import QUANTILES, Histogram, StatKind, StatRecord, cluster_records

if TYPE_CHECKING:
    from laneproxy.observability.stats import ClusterStats

_TYPES = {"all": None, "counters": StatKind.COUNTER, "gauges": StatKind.GAUGE, "histograms": StatKind.HISTOGRAM,
          "textreadouts": StatKind.TEXT}

# Stands for a cluster's name in a template; letters only, so no format's escaping changes it.
PLACEHOLDER = "LaneproxyClusterNamePlaceholder"
_IDLE_SUFFIXES = tuple(record.name[len(f"cluster.{PLACEHOLDER}."):]
                       for record in cluster_records(PLACEHOLDER, None, membership_total=0, membership_healthy=0))

SLICE_SECONDS = 0.005  # longest stretch of rendering between two yields to the loop
_CHECK_EVERY = 32  # clusters between two looks at the clock


def _number(value: float) -> str:
    return f"{value:g}"


def histogram_summary(histogram: Histogram) -> str:
    """Envoy's text form: `P0(interval,cumulative) ...`; laneproxy keeps no interval, so that part is nan."""
    if histogram.count == 0:
        return "No recorded values"
    return " ".join(f"P{_number(q)}(nan,{_number(histogram.quantile(q))})" for q in QUANTILES)


class StatsQueryError(ValueError):
    """A /stats query Envoy would refuse: a bad regular expression, an unknown type or format."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Envoy's /stats query: `filter` (searched in the name), `invert_filter`, `type`, `usedonly`."""

    regex: re.Pattern[str] | None = None
    invert: bool = False
    kind: StatKind | None = None
    used_only: bool = False

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Selection:
        pattern = query.get("filter")
        try:
            regex = re.compile(pattern) if pattern else None
        except re.error as exc:
            raise StatsQueryError(f"Invalid re2 regex: {exc}") from exc
        kind_name = query.get("type", "All").lower()
        if kind_name not in _TYPES:
            raise StatsQueryError(f"invalid type: {query.get('type')}; expected one of All, Counters, Gauges, "
                                  "Histograms, TextReadouts")
        return cls(regex, flag(query, "invert_filter"), _TYPES[kind_name], flag(query, "usedonly"))

    @property
    def everything(self) -> bool:
        return self.regex is None and self.kind is None and not self.used_only

    def wants(self, record: StatRecord, *, by_name: bool = True) -> bool:
        if self.kind is not None and record.kind is not self.kind:
            return False
        if self.used_only and not record.used:
            return False
        if by_name and self.regex is not None and (self.regex.search(record.name) is None) != self.invert:
            return False
        return True

    def choose(self, records: Iterable[StatRecord]) -> list[StatRecord]:
        if self.everything:
            return list(records)
        return [record for record in records if self.wants(record)]

    def name_mask(self, cluster: str) -> tuple[bool, ...] | None:
        """Which of an idle cluster's stats the name filter keeps (None: no name filter)."""
        regex = self.regex
        if regex is None:
            return None
        prefix, invert = f"cluster.{cluster}.", self.invert
        return tuple((regex.search(prefix + suffix) is None) == invert for suffix in _IDLE_SUFFIXES)


# Formats: each turns the chosen records of one cluster (or the process's other records) into pieces,
# one per section of its output. Text and JSON have two sections (stats, then histograms), Prometheus
# one per metric family. A piece of a cluster is written between the pieces of the clusters around it.

Pieces = dict[str, str]


class TextFormat:
    content_type = "text/plain"
    charset = "UTF-8"

    def __init__(self) -> None:
        self.present: set[str] = set()

    @staticmethod
    def escape(name: str) -> str:
        return name

    def pieces(self, records: list[StatRecord]) -> Pieces:
        main, histograms = [], []
        for record in sorted(records, key=lambda r: r.name):
            if record.kind is StatKind.HISTOGRAM:
                histograms.append(f"{record.name}: {histogram_summary(record.value)}\n")  # type: ignore[arg-type]
            elif record.kind is StatKind.TEXT:
                main.append(f'{record.name}: "{record.value}"\n')
            else:
                main.append(f"{record.name}: {record.value}\n")
        out = {}
        if main:
            out["main"] = "".join(main)
        if histograms:
            out["histograms"] = "".join(histograms)
        self.present.update(out)
        return out

    def sections(self) -> list[str]:
        return [section for section in ("main", "histograms") if section in self.present]

    def begin(self) -> str:
        return ""

    def open_section(self, section: str) -> str:
        return ""

    def item(self, section: str, piece: str) -> str:
        return piece

    def close_section(self, section: str) -> str:
        return ""

    def end(self) -> str:
        return ""


def indented_json(value: object, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in json.dumps(value, indent=1).split("\n"))


class JsonFormat(TextFormat):
    """json.dumps(format_json(...), indent=1), byte for byte, written a cluster at a time."""

    content_type = "application/json"
    charset = "utf-8"

    _HISTOGRAMS_HEAD, _HISTOGRAMS_TAIL = indented_json(
        {"histograms": {"supported_quantiles": list(QUANTILES), "computed_quantiles": ["@"]}}, 2).split('"@"')
    _HISTOGRAMS_HEAD = _HISTOGRAMS_HEAD.rstrip(" ").rstrip("\n")

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version
        self._items = 0
        self._first_in_section = True

    @staticmethod
    def escape(name: str) -> str:
        return json.dumps(name)[1:-1]

    def pieces(self, records: list[StatRecord]) -> Pieces:
        main, histograms = [], []
        for record in sorted(records, key=lambda r: r.name):
            if record.kind is StatKind.HISTOGRAM:
                histogram = record.value
                assert isinstance(histogram, Histogram)
                histograms.append(indented_json({"name": record.name, "values": [
                    {"interval": None, "cumulative": histogram.quantile(q)} for q in QUANTILES]}, 5))
            else:
                main.append(f'  {{\n   "name": {json.dumps(record.name)},\n   "value": {json.dumps(record.value)}\n  }}')
        out = {}
        if main:
            out["main"] = ",\n".join(main)
        if histograms:
            out["histograms"] = ",\n".join(histograms)
        self.present.update(out)
        return out

    def begin(self) -> str:
        return '{\n "stats": ['

    def open_section(self, section: str) -> str:
        self._first_in_section = True
        if section == "histograms":
            opening = ("," if self._items else "") + "\n" + self._HISTOGRAMS_HEAD
            self._items += 1
            return opening
        return ""

    def item(self, section: str, piece: str) -> str:
        separator = "\n" if self._first_in_section else ",\n"
        self._first_in_section = False
        if section == "main":
            self._items += 1
        return separator + piece

    def close_section(self, section: str) -> str:
        return self._HISTOGRAMS_TAIL if section == "histograms" else ""

    def end(self) -> str:
        return ("\n ]" if self._items else "]") + f',\n "config_version": {json.dumps(self.version)}\n}}'


class PrometheusFormat(TextFormat):
    """render(metric_families(...)), byte for byte: one section per family, its TYPE line first."""

    charset = "UTF-8"

    def __init__(self, tag_style: str = "envoy") -> None:
        super().__init__()
        self.types: dict[str, str] = {}
        self.istio_tags = tag_style == "istio"

    @staticmethod
    def escape(name: str) -> str:
        return prometheus.escape_label(name)

    def pieces(self, records: list[StatRecord]) -> Pieces:
        grouped: dict[str, list[str]] = {}
        if self.istio_tags:
            records = [prometheus.with_istio_tags(record) for record in records]
        for record in records:
            family = record.family
            lines = grouped.get(family)
            if lines is None:
                lines = grouped[family] = []
                self.types.setdefault(family, prometheus.metric_type(record))
            lines.append(prometheus.record_lines(record))
        out = {family: "".join(lines) for family, lines in grouped.items()}
        self.present.update(out)
        return out

    def sections(self) -> list[str]:
        return sorted(self.present, key=lambda family: prometheus.family_order(family, self.types[family]))

    def open_section(self, section: str) -> str:
        return prometheus.type_line(section, self.types[section])


class Pacer:
    """Collects output and, every SLICE_SECONDS of work, sends it and lets the event loop run."""

    def __init__(self, response: web.StreamResponse | None, slice_seconds: float = SLICE_SECONDS) -> None:
        self.response = response
        self.slice_seconds = slice_seconds
        self.parts: list[str] = []
        self.count = 0
        self.yields = 0
        self.writes = 0
        self.deadline = time.perf_counter() + slice_seconds

    def write(self, text: str) -> None:
        if text:
            self.parts.append(text)

    async def tick(self) -> None:
        self.count += 1
        if self.count % _CHECK_EVERY == 0 and time.perf_counter() >= self.deadline:
            await self.pause()

    async def pause(self) -> None:
        await self.flush()
        await asyncio.sleep(0)
        self.yields += 1
        self.deadline = time.perf_counter() + self.slice_seconds

    async def flush(self) -> None:
        if self.parts and self.response is not None:
            data = "".join(self.parts).encode()
            self.parts.clear()
            await self.response.write(data)
            self.writes += 1


@dataclass(slots=True)
class _Walk:
    """The clusters of one scrape, in output order: each with its own pieces or the key of a template."""

    names: list[str]
    entries: list[Pieces | tuple]
    templates: dict[tuple, Pieces]


def cluster_order(catalog: ClusterCatalog, busy: Iterable[str]) -> list[str] | tuple[str, ...]:
    """The catalog's names, plus the clusters that served traffic under an earlier table, sorted."""
    members = catalog.members
    extra = sorted(name for name in busy if name not in members)
    if not extra:
        return catalog.names
    return list(heapq.merge(catalog.names, extra))


async def _plan(fmt: TextFormat, selection: Selection, catalog: ClusterCatalog, names: Iterable[str],
                busy: dict[str, ClusterStats], pacer: Pacer, view: ProcessView) -> _Walk:
    members = catalog.members
    walk = _Walk([], [], {})
    templates = walk.templates
    for name in names:
        endpoints = members.get(name, ())
        size = len(endpoints)  # without active health checks every listed endpoint is healthy, as in Envoy
        stats = busy.get(name)
        if stats is not None:
            entry: Pieces | tuple = fmt.pieces(selection.choose(
                cluster_records(name, stats, membership_total=size, membership_healthy=size,
                                transport=transport_numbers(view, endpoints))))
        else:
            entry = (size, selection.name_mask(name))
            if entry not in templates:
                records = cluster_records(PLACEHOLDER, None, membership_total=size, membership_healthy=size)
                mask = entry[1]
                chosen = [r for i, r in enumerate(records) if (mask is None or mask[i]) and selection.wants(r, by_name=False)]
                templates[entry] = fmt.pieces(chosen)
        walk.names.append(name)
        walk.entries.append(entry)
        await pacer.tick()
    return walk


async def write_stats(fmt: TextFormat, selection: Selection, view: ProcessView, catalog: ClusterCatalog,
                      pacer: Pacer) -> None:
    """Every chosen stat of the process in `fmt`, written through `pacer` a slice at a time."""
    busy = dict(view.stats.clusters)  # the clusters of this scrape; counters are read live as Envoy's are
    walk = await _plan(fmt, selection, catalog, cluster_order(catalog, busy), busy, pacer, view)
    others = fmt.pieces(selection.choose(other_records(view, active_clusters=len(catalog.members))))
    escape = fmt.escape
    templates = walk.templates
    pacer.write(fmt.begin())
    for section in fmt.sections():
        pacer.write(fmt.open_section(section))
        for name, entry in zip(walk.names, walk.entries):
            if type(entry) is dict:
                piece = entry.get(section)
            else:
                piece = templates[entry].get(section)  # type: ignore[index]
                if piece is not None:
                    piece = piece.replace(PLACEHOLDER, escape(name))
            if piece:
                pacer.write(fmt.item(section, piece))
            await pacer.tick()
        piece = others.get(section)
        if piece:
            pacer.write(fmt.item(section, piece))
        pacer.write(fmt.close_section(section))
    pacer.write(fmt.end())
    await pacer.flush()


def needs_reference_order(fmt: TextFormat, catalog: ClusterCatalog, names: Iterable[str]) -> bool:
    """Text and JSON sort by full stat name; a cluster name that prefixes another interleaves their stats."""
    if isinstance(fmt, PrometheusFormat):
        return False
    if names is catalog.names:
        return not catalog.prefix_free
    return not names_are_prefix_free(names)


async def stream(request: web.Request, fmt: TextFormat, selection: Selection, view: ProcessView,
                 catalog: ClusterCatalog, headers: Mapping[str, str],
                 reference: Callable[[], str],
                 trailer: Callable[[], Awaitable[bytes]] | None = None) -> web.StreamResponse:
    """Answer with the stats streamed in slices; `reference` renders all at once where slicing can't keep order.

    `trailer` adds bytes after the stats (the metrics listener's merged app metrics)."""
    if needs_reference_order(fmt, catalog, cluster_order(catalog, view.stats.clusters)):
        body = reference().encode() + (await trailer() if trailer is not None else b"")
        return web.Response(body=body, content_type=fmt.content_type, charset=fmt.charset)
    response = web.StreamResponse(headers=headers)
    response.content_type = fmt.content_type
    response.charset = fmt.charset
    await response.prepare(request)
    await write_stats(fmt, selection, view, catalog, Pacer(response))
    if trailer is not None:
        await response.write(await trailer())
    await response.write_eof()
    return response
