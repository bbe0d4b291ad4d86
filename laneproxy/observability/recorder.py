"""The one call that records a finished exchange: Envoy's counters, then every observer, exactly once.

Owns what a finished request counts (listener `downstream_rq_*`, cluster `upstream_rq_*` and its
time, per-host outcomes) and the order observers see it (access log, tracing, Istio's metrics), and
the read-only shape observers may rely on (`FinishedExchange`, `RoutedRequest`): whatever codec
carried the request (an HTTP/1.1 connection, an HTTP/2 stream), the data plane hands over an object
of that shape. It never imports the data plane, never changes an exchange, and never does I/O
itself (observers may: the access log writes a line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from laneproxy.core.errors import LocalReplyError
    from laneproxy.core.model import Endpoint, Route
    from laneproxy.core.propagation import LaneSource
    from laneproxy.observability.stats import ClusterStats, HostStats, ListenerStats


class RoutedRequest(Protocol):
    """Where a request went: its endpoint, route, and what the proxy changed and measured on the way."""

    endpoint: Endpoint
    path: bytes
    overrides: dict[bytes, bytes]
    cluster_stats: ClusterStats
    route: Route
    lane_source: LaneSource | None
    host_stats: HostStats | None
    request_id: bytes | None
    service_time_ms: int | None
    span: object


class LoopClock(Protocol):
    def time(self) -> float: ...


class ListenerFacts(Protocol):
    """The listener that served the request, as observers see it."""

    @property
    def name(self) -> str: ...
    @property
    def loop(self) -> LoopClock: ...  # the clock `start` is on


class FinishedExchange(Protocol):
    """A request and its response, once answered (or abandoned), as every codec presents it."""

    @property
    def listener(self) -> ListenerFacts: ...
    @property
    def routed(self) -> RoutedRequest | None: ...
    @property
    def error(self) -> LocalReplyError | None: ...
    @property
    def protocol(self) -> str: ...  # "HTTP/1.1", "HTTP/2": the downstream's
    @property
    def response_started(self) -> bool: ...  # the upstream's response head went to the client

    method: bytes
    target: bytes
    host: bytes | None
    headers: list[tuple[bytes, bytes]]
    start: float  # loop time the request began
    response_status: int  # 0 when the client left before any response
    request_bytes: int
    response_bytes: int
    peer: bytes | None
    counted_active: bool  # counted in its cluster's rq_active (it passed the circuit breaker)
    tunnel_flag: str | None  # a WebSocket or CONNECT tunnel's end: UC (the upstream ended it) or DC (the client)


class PassedConnectionFacts(Protocol):
    """A connection passed through as TCP or TLS (dataplane.sniff), as the access log and Istio's metrics see it."""

    @property
    def protocol(self) -> str: ...
    @property
    def flags(self) -> str: ...
    @property
    def received(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def duration(self) -> float: ...
    @property
    def upstream(self) -> str | None: ...
    @property
    def cluster(self) -> str: ...
    @property
    def sni(self) -> str | None: ...
    @property
    def client(self) -> str | None: ...
    @property
    def listener(self) -> str: ...
    @property
    def closed(self) -> bool: ...


Observer = Callable[[FinishedExchange], None]


class ExchangeRecorder:
    """One listener's recorder: counts a finished exchange as Envoy does, then hands it to the observers."""

    __slots__ = ("stats", "clock", "observers")

    def __init__(self, stats: ListenerStats, clock: Callable[[], float]) -> None:
        self.stats = stats
        self.clock = clock  # the loop's clock, the one exchanges' `start` is on
        self.observers: list[Observer] = []  # access log, tracing, Istio's metrics

    def record(self, exchange: FinishedExchange) -> None:
        stats = self.stats
        status = exchange.response_status
        elapsed_ms = (self.clock() - exchange.start) * 1000.0
        stats.rq_total += 1
        if exchange.protocol == "HTTP/2":
            stats.rq_http2 += 1
        stats.rq_by_class[status // 100] += 1
        stats.rq_time.record(elapsed_ms)
        error = exchange.error
        routed = exchange.routed
        if routed is not None:
            cluster = routed.cluster_stats
            if exchange.counted_active:
                cluster.rq_active -= 1
                if status:
                    cluster.rq_by_code[status] += 1
                cluster.rq_time_ms_sum += elapsed_ms
                cluster.rq_time_count += 1
            host = routed.host_stats
            if host is not None:
                host.rq_active -= 1
                # A retry may have moved the request to another endpoint: the outcome is the last one's.
                count_host_result(cluster.host(routed.endpoint), status, error.flag if error is not None else None)
            if error is None and status:
                cluster.rq_time.record(elapsed_ms)
        elif error is not None and error.flag == "NR":
            stats.no_route += 1
        for observer in self.observers:
            observer(exchange)


def response_flags(exchange: FinishedExchange) -> str:
    """Envoy's %RESPONSE_FLAGS%: the local reply's flag, DC for a client gone before any response, a tunnel's end."""
    error = exchange.error
    if error is not None:
        return error.flag
    if exchange.response_status == 0:
        return "DC"  # the client went away before a response was written
    return exchange.tunnel_flag or "-"


def count_host_result(host: HostStats, status: int, flag: str | None) -> None:
    """Envoy's per-host outcome: a connect failure never reached the host; 5xx, resets and timeouts are errors."""
    if flag == "UF":
        host.cx_connect_fail += 1
        host.rq_error += 1
        return
    if flag is None and status == 0:
        return  # the client left; nothing to say about the host
    host.rq_total += 1
    if flag is not None or status >= 500:
        host.rq_error += 1
        if flag == "UT":
            host.rq_timeout += 1
    else:
        host.rq_success += 1
