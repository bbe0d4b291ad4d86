"""Istio's standard metrics, recorded once per finished exchange, with Istio's names, labels and meaning.

Owns `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes` and
`istio_response_bytes` (https://istio.io/latest/docs/reference/config/metrics), the TCP metrics of
connections passed through as TCP or TLS (`istio_tcp_connections_opened_total`, `_closed_total`,
`istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`; the peer of such a connection is
unknown, as no header carries it, and its destination service is the cluster it was counted under), the peer metadata two
sidecars exchange so each side can name the other (Istio's metadata exchange, as one small header),
and two labels of laneproxy's own: `lane_asked` (the lane the request asked for) and `lane_used`
(the lane whose endpoint served it).

Who reports what, as in Istio: the outbound listener and the gateway report `reporter="source"`
(source: this workload; destination: the peer named by the upstream's response header, else the
endpoint's labels), the inbound listener `reporter="destination"` (source: the peer named by the
request header, else "unknown"; destination: this workload). A canary whose pods keep `version: v1`
(the seed's Kruise Rollout only patches `ASM_TRAFFIC_TAG`) is told apart by `lane_used`, and by
`destination_workload` where its Deployment has a name of its own.

Cardinality is bounded by construction: label values are workloads, services, lanes of the running
table, status codes and response flags; never paths, trace ids or free text. Peer values that do not
look like Kubernetes names are "unknown", and past PEER_LIMIT distinct peers every new one is too.

The hot path pays one dict lookup on a small tuple of already-interned objects and three histogram
records; label strings are built once per series, when the series is first seen.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterator, Mapping, Protocol

from laneproxy.core import headers as h
from laneproxy.observability.stats import Histogram, StatKind, StatRecord
from laneproxy.observability.recorder import response_flags

if TYPE_CHECKING:
    from laneproxy.core.model import RouteTable
    from laneproxy.observability.recorder import FinishedExchange, PassedConnectionFacts
    from laneproxy.settings import WorkloadSettings

UNKNOWN = "unknown"
# Istio's bytes histograms: powers of ten from 1 byte to 10 MB (its stats plugin's default buckets).
BYTES_BOUNDS: tuple[float, ...] = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)
PEER_HEADER = h.X_LANEPROXY_PEER
PEER_LIMIT = 1024  # distinct peers remembered per process; more than a mesh of that size should never see

# The labels of every istio_* request metric, in Istio's documented order, then laneproxy's two.
ISTIO_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster", "source_canonical_service", "source_canonical_revision",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_cluster", "destination_canonical_service", "destination_canonical_revision",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
LANE_LABELS: tuple[str, ...] = ("lane_asked", "lane_used")
# Istio's TCP metrics have the request metrics' labels but the response code and gRPC status.
TCP_LABELS: tuple[str, ...] = tuple(label for label in ISTIO_LABELS
                                    if label not in ("response_code", "grpc_response_status"))

# A Kubernetes label value (what every field of the peer header must be): at most 63 characters.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_PEER_FIELDS = ("workload", "namespace", "app", "version", "service", "revision", "cluster")


class TableSource(Protocol):
    """Where the running route table is read (core.store's RouteTableStore)."""

    @property
    def current(self) -> RouteTable: ...


class Workload:
    """One workload's identity as its metrics label it; compared by identity (each is interned once)."""

    __slots__ = ("name", "namespace", "app", "version", "canonical_service", "canonical_revision", "cluster",
                 "header")

    def __init__(self, name: str = UNKNOWN, namespace: str = UNKNOWN, app: str = UNKNOWN, version: str = UNKNOWN,
                 canonical_service: str | None = None, canonical_revision: str | None = None,
                 cluster: str = UNKNOWN) -> None:
        self.name = name
        self.namespace = namespace
        self.app = app
        self.version = version
        self.canonical_service = canonical_service or (app if app != UNKNOWN else name)
        self.canonical_revision = canonical_revision or (version if version != UNKNOWN else "latest")
        self.cluster = cluster
        values = (name, namespace, app, version, self.canonical_service, self.canonical_revision, cluster)
        self.header = ";".join(f"{key}={value}" for key, value in zip(_PEER_FIELDS, values)).encode()

    @classmethod
    def from_settings(cls, settings: WorkloadSettings) -> Workload:
        return cls(settings.name, settings.namespace, settings.app, settings.version, settings.canonical_service,
                   settings.canonical_revision, settings.cluster)


UNKNOWN_WORKLOAD = Workload()


def parse_peer(value: bytes) -> Workload | None:
    """The workload a peer header names, or None when it is not one laneproxy wrote."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    fields: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, field = part.partition("=")
        if not sep or key not in _PEER_FIELDS or not (field == UNKNOWN or _LABEL_VALUE.fullmatch(field)):
            return None
        fields[key] = field
    if "workload" not in fields or "namespace" not in fields:
        return None
    return Workload(fields["workload"], fields["namespace"], fields.get("app", UNKNOWN), fields.get("version", UNKNOWN),
                    fields.get("service"), fields.get("revision"), fields.get("cluster", UNKNOWN))


class PeerCache:
    """Peer header value -> interned Workload, bounded: the set of peers is the mesh's, not the clients'."""

    __slots__ = ("_known", "limit", "overflow")

    def __init__(self, limit: int = PEER_LIMIT) -> None:
        self._known: dict[bytes, Workload] = {}
        self.limit = limit
        self.overflow = 0

    def get(self, value: bytes | None) -> Workload:
        if value is None:
            return UNKNOWN_WORKLOAD
        known = self._known.get(value)
        if known is not None:
            return known
        if len(self._known) >= self.limit:
            self.overflow += 1
            return UNKNOWN_WORKLOAD
        workload = self._known[value] = parse_peer(value) or UNKNOWN_WORKLOAD
        return workload

    def labelled(self, app: str, version: str) -> Workload:
        """An endpoint known only by its pod's app and version labels, interned like a peer."""
        key = b"endpoint;" + f"{app};{version}".encode()
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self.limit:
                self.overflow += 1
                return UNKNOWN_WORKLOAD
            known = self._known[key] = Workload(UNKNOWN, UNKNOWN, app, version)
        return known


class RequestSeries:
    """The numbers of one label set: a count and Istio's three histograms."""

    __slots__ = ("labels", "count", "duration", "request_bytes", "response_bytes")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        self.count = 0
        self.duration = Histogram()
        self.request_bytes = Histogram(BYTES_BOUNDS)
        self.response_bytes = Histogram(BYTES_BOUNDS)


class TcpSeries:
    """The numbers of one TCP label set: connections opened and closed, bytes each way."""

    __slots__ = ("labels", "opened", "closed", "sent", "received")

    def __init__(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.labels = labels
        self.opened = self.closed = self.sent = self.received = 0


# (source, destination, service key, status, response flags, lane asked, lane used): one request series.
SeriesKey = tuple["Workload", "Workload", str, int, str, "str | None", "str | None"]
TcpKey = tuple["Workload", "Workload", str, str]  # (source, destination, cluster, response flags)


class IstioMetrics:
    """Every istio_* series of one process, keyed by the objects they were recorded with."""

    __slots__ = ("series", "peers", "tcp")

    def __init__(self) -> None:
        self.series: dict[SeriesKey, RequestSeries] = {}
        self.peers = PeerCache()
        self.tcp: dict[TcpKey, TcpSeries] = {}

    def records(self) -> Iterator[StatRecord]:
        families = (("istio_requests_total", StatKind.COUNTER, "count"),
                    ("istio_request_duration_milliseconds", StatKind.HISTOGRAM, "duration"),
                    ("istio_request_bytes", StatKind.HISTOGRAM, "request_bytes"),
                    ("istio_response_bytes", StatKind.HISTOGRAM, "response_bytes"))
        ordered = sorted(self.series.values(), key=lambda series: series.labels)
        for family, kind, attribute in families:
            for series in ordered:
                value = getattr(series, attribute)
                # Envoy's text name for a stat with Istio's tags: `tag=.=value;.;...;.;family`.
                name = "".join(f"{key}=.={tag};.;" for key, tag in series.labels) + family
                yield StatRecord(name, kind, value, True, family, series.labels)
        tcp = sorted(self.tcp.values(), key=lambda series: series.labels)
        for family, attribute in (("istio_tcp_connections_opened_total", "opened"),
                                  ("istio_tcp_connections_closed_total", "closed"),
                                  ("istio_tcp_sent_bytes_total", "sent"),
                                  ("istio_tcp_received_bytes_total", "received")):
            for connections in tcp:  # not `series`: typed RequestSeries above, and compiled code checks that
                name = "".join(f"{key}=.={tag};.;" for key, tag in connections.labels) + family
                yield StatRecord(name, StatKind.COUNTER, getattr(connections, attribute), True, family,
                                 connections.labels)

    def reset_counters(self) -> None:
        for series in self.series.values():
            series.count = 0
        for tcp in self.tcp.values():
            tcp.opened = tcp.closed = tcp.sent = tcp.received = 0


def _service_labels(service: str, table: RouteTable | None) -> tuple[str, str, str]:
    """(destination_service, _name, _namespace) of a service key `namespace/name`."""
    known = table.services.get(service) if table is not None else None
    if known is not None:
        return known.fqdn, known.name, known.namespace
    namespace, _, name = service.rpartition("/")
    if not namespace:
        return service or UNKNOWN, service or UNKNOWN, UNKNOWN
    return f"{name}.{namespace}.svc.cluster.local", name, namespace


def series_labels(reporter: str, source: Workload, destination: Workload, service: tuple[str, str, str],
                  code: int, flags: str, lane_asked: str | None, lane_used: str | None) -> tuple[tuple[str, str], ...]:
    """The label pairs of one series, in ISTIO_LABELS order, then the lanes (empty when there is none)."""
    values = (
        reporter,
        source.name, source.namespace, UNKNOWN, source.app, source.version, source.cluster,
        source.canonical_service, source.canonical_revision,
        destination.name, destination.namespace, UNKNOWN, destination.app, destination.version,
        service[0], service[1], service[2], destination.cluster, destination.canonical_service,
        destination.canonical_revision,
        "http", str(code), "", flags,
        # No mTLS between laneproxy sidecars: "none" where the destination reports, "unknown" at the source.
        "none" if reporter == "destination" else UNKNOWN,
        lane_asked or "", lane_used or "",
    )
    return tuple(zip(ISTIO_LABELS + LANE_LABELS, values))


def tcp_series_labels(reporter: str, source: Workload, destination: Workload, service: str,
                      flags: str) -> tuple[tuple[str, str], ...]:
    """The label pairs of one TCP series, in TCP_LABELS order (a request series' labels without code and status)."""
    request = dict(series_labels(reporter, source, destination, (service, service, UNKNOWN), 0, flags, None, None))
    request["request_protocol"] = "tcp"
    return tuple((label, request[label]) for label in TCP_LABELS)


class IstioRecorder:
    """One listener's reporter: an exchange observer that counts each finished exchange once."""

    __slots__ = ("metrics", "reporter", "own", "own_lane", "store", "_services")

    def __init__(self, metrics: IstioMetrics, reporter: str, own: Workload, own_lane: str | None,
                 store: TableSource) -> None:
        self.metrics = metrics
        self.reporter = reporter  # "source" (outbound, gateway) or "destination" (inbound)
        self.own = own
        self.own_lane = own_lane or None
        self.store = store
        self._services: dict[str, tuple[str, str, str]] = {}  # service key -> its three labels, per process

    def record(self, exchange: FinishedExchange) -> None:
        routed = exchange.routed
        status = exchange.response_status
        flags = response_flags(exchange)
        if self.reporter == "destination":
            service, lane_asked, peer = self._inbound_facts(exchange)
            source = self.metrics.peers.get(peer)
            destination, lane_used = self.own, self.own_lane
        else:
            source = self.own
            if routed is None:
                destination, service, lane_asked, lane_used = UNKNOWN_WORKLOAD, UNKNOWN, None, None
            else:
                route = routed.route
                destination = self.metrics.peers.get(exchange.peer) if exchange.peer is not None else \
                    _endpoint_workload(routed.endpoint.labels, self.metrics.peers)
                service, lane_asked, lane_used = route.service, route.lane_asked, route.lane_used
        key = (source, destination, service, status, flags, lane_asked, lane_used)
        series = self.metrics.series.get(key)
        if series is None:
            series = self.metrics.series[key] = RequestSeries(series_labels(
                self.reporter, source, destination, self._service_labels(service), status, flags, lane_asked,
                lane_used))
        series.count += 1
        series.duration.record((exchange.listener.loop.time() - exchange.start) * 1000.0)
        series.request_bytes.record(exchange.request_bytes)
        series.response_bytes.record(exchange.response_bytes)

    def record_connection(self, connection: PassedConnectionFacts) -> None:
        """A connection passed through as TCP or TLS: opened when its destination connected, closed when it ended."""
        if self.reporter == "destination":
            source, destination = UNKNOWN_WORKLOAD, self.own
        else:
            source, destination = self.own, UNKNOWN_WORKLOAD
        flags = connection.flags if connection.closed else "-"
        key = (source, destination, connection.cluster, flags)
        series = self.metrics.tcp.get(key)
        if series is None:
            series = self.metrics.tcp[key] = TcpSeries(tcp_series_labels(self.reporter, source, destination,
                                                                         connection.cluster, flags))
        if not connection.closed:
            series.opened += 1
            return
        series.closed += 1
        series.sent += connection.sent
        series.received += connection.received

    def _service_labels(self, service: str) -> tuple[str, str, str]:
        labels = self._services.get(service)
        if labels is None:
            labels = self._services[service] = _service_labels(service, self.store.current)
        return labels

    def _inbound_facts(self, exchange: FinishedExchange) -> tuple[str, str | None, bytes | None]:
        """(the service the request was for, the lane it asked, the caller's peer header) at the inbound listener."""
        table = self.store.current
        host = exchange.host
        routes = table.hosts.get(host) if host is not None else None
        if routes is None and host is not None:
            routes = table.hosts.get(host.lower())
        if routes is None:
            # Called by another name than the table's (the gateway passes the client's Host): this pod's app.
            own = self.own
            service = f"{own.namespace}/{own.app}" if own.app != UNKNOWN else UNKNOWN
            routes = table.routes.get(service)
        else:
            service = routes.service.key
        lane_asked = peer = None
        group = routes.group if routes is not None else None
        route_header = group.route_header_key if group is not None else None
        for name, value in exchange.headers:
            if name == PEER_HEADER:
                peer = value
            elif name == route_header:
                text = value.decode("latin-1")
                # Only a lane of the running table: a client's free text never becomes a label value.
                lane_asked = text if text in group.lanes else None  # type: ignore[union-attr]
        return service, lane_asked, peer


def _endpoint_workload(labels: Mapping[str, str], peers: PeerCache) -> Workload:
    """The destination when the upstream sent no peer header: what the endpoint's pod labels say."""
    app = labels.get("app")
    if app is None:
        return UNKNOWN_WORKLOAD
    return peers.labelled(app, labels.get("version", UNKNOWN))
