"""The controller's counters: xDS streams, pushes and resources per type, NACKs, unknown types, the table.

Owns their names in both of the admin's forms (Envoy-style `name: value` lines and Prometheus text).
Plain integers bumped by the server on the event loop; nothing here does I/O or reads a clock itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from laneproxy.xds.resources import KNOWN_TYPES, SHORT_TYPE_NAMES


def _per_type() -> dict[str, int]:
    return {type_url: 0 for type_url in KNOWN_TYPES}


@dataclass(slots=True)
class XdsStats:
    streams_connected: int = 0
    streams_total: int = 0
    streams_ended_malformed: int = 0  # streams ended with a gRPC status for bad input
    pushes: dict[str, int] = field(default_factory=_per_type)  # responses sent, by type URL
    resources_sent: dict[str, int] = field(default_factory=_per_type)
    resources_removed: dict[str, int] = field(default_factory=_per_type)
    nacks: dict[str, int] = field(default_factory=_per_type)
    unknown_type_requests: int = 0
    tables: int = 0  # tables taken from the store
    table_version: str = ""
    table_updated_at: float | None = None  # clock time the served resources last changed
    xds_port: int = 0

    def lines(self, now: float, ready: bool, table_age: float | None) -> list[tuple[str, int | float | str]]:
        """Every stat as (Envoy-style dotted name, value)."""
        rows: list[tuple[str, int | float | str]] = [
            ("controller.ready", int(ready)),
            ("controller.xds.port", self.xds_port),
            ("controller.xds.streams_connected", self.streams_connected),
            ("controller.xds.streams_total", self.streams_total),
            ("controller.xds.streams_ended_malformed", self.streams_ended_malformed),
            ("controller.xds.unknown_type_requests", self.unknown_type_requests),
        ]
        for type_url in KNOWN_TYPES:
            short = SHORT_TYPE_NAMES[type_url]
            rows += [(f"controller.xds.{short}.pushes", self.pushes[type_url]),
                     (f"controller.xds.{short}.resources_sent", self.resources_sent[type_url]),
                     (f"controller.xds.{short}.resources_removed", self.resources_removed[type_url]),
                     (f"controller.xds.{short}.nacks", self.nacks[type_url])]
        rows += [("controller.table.tables", self.tables), ("controller.table.version", self.table_version)]
        if self.table_updated_at is not None:
            rows.append(("controller.table.seconds_since_change", round(now - self.table_updated_at, 3)))
        if table_age is not None:
            rows.append(("controller.table.age_seconds", round(table_age, 3)))
        return rows

    def prometheus(self, now: float, ready: bool, table_age: float | None) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        def by_type(counts: dict[str, int]) -> list[tuple[str, float]]:
            return [(f'{{type="{SHORT_TYPE_NAMES[t]}"}}', counts[t]) for t in KNOWN_TYPES]

        metric("laneproxy_controller_ready", "gauge", "1 once the source's first complete table is served",
               [("", int(ready))])
        metric("laneproxy_controller_xds_streams_connected", "gauge", "xDS streams open now",
               [("", self.streams_connected)])
        metric("laneproxy_controller_xds_streams_total", "counter", "xDS streams opened",
               [("", self.streams_total)])
        metric("laneproxy_controller_xds_streams_ended_malformed_total", "counter",
               "xDS streams ended with a gRPC status for a malformed request", [("", self.streams_ended_malformed)])
        metric("laneproxy_controller_xds_pushes_total", "counter", "responses sent, per resource type",
               by_type(self.pushes))
        metric("laneproxy_controller_xds_resources_sent_total", "counter", "resources sent, per resource type",
               by_type(self.resources_sent))
        metric("laneproxy_controller_xds_resources_removed_total", "counter",
               "resource names sent as removed, per resource type", by_type(self.resources_removed))
        metric("laneproxy_controller_xds_nacks_total", "counter", "updates a client rejected, per resource type",
               by_type(self.nacks))
        metric("laneproxy_controller_xds_unknown_type_requests_total", "counter",
               "requests for a resource type the controller does not serve", [("", self.unknown_type_requests)])
        metric("laneproxy_controller_table_info", "gauge", "the version of the route table served",
               [(f'{{version="{self.table_version}"}}', 1)])
        if self.table_updated_at is not None:
            metric("laneproxy_controller_table_seconds_since_change", "gauge",
                   "seconds since the served resources last changed", [("", round(now - self.table_updated_at, 3))])
        if table_age is not None:
            metric("laneproxy_controller_table_age_seconds", "gauge",
                   "how far behind its source the table may be", [("", round(table_age, 3))])
        return "\n".join(out) + "\n"

