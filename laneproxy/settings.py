"""Process settings of laneproxy: listeners, timeouts, limits and sources, as one frozen object.

Owns defaults and their documentation. Built from argv and the environment by cli.py; read by app.py,
the data plane and the sources. No parsing of configuration files happens here (core/build.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, default_host: str = "127.0.0.1") -> Address:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = default_host, text
        if not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"expected [host:]port, got {text!r}")
        return cls(host.strip("[]") or default_host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    """Envoy's defaults: connect 5 s (Envoy's own, not Istio's 10 s), route 15 s, stream idle 5 min,
    connection idle 1 h. Envoy leaves the request-headers timeout off; laneproxy sets 10 s so a
    slowloris client cannot hold a connection open by trickling a head. 0 turns any of them off."""

    connect: float = 5.0
    route: float = 15.0
    request_headers: float = 10.0
    stream_idle: float = 300.0
    idle: float = 3600.0


@dataclass(frozen=True, slots=True)
class CircuitBreakerSettings:
    """Envoy's default thresholds, applied per cluster (an endpoint set of one service in one lane)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Retries of idempotent requests without a body, on connect failure, reset and 503 by default."""

    max_retries: int = 2
    retry_on: tuple[str, ...] = ("connect-failure", "reset", "retriable-status-codes")
    retriable_status_codes: tuple[int, ...] = (503,)


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_5xx: int = 5
    ejection_seconds: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class ObservabilitySettings:
    """Access log and tracing; both off by default, as in Envoy."""

    access_log: str | None = None  # None: off; "stdout", "stderr" or a file path
    access_log_format: str = "text"  # text (Envoy's default format, plus the lanes) | json
    tracing: str = "none"  # none | console | otlp | file:PATH ({pid} in PATH becomes the process id)
    # Istio's standard metrics (istio_requests_total, ...) recorded per exchange; on by default, as in Istio.
    istio_metrics: bool = True
    # The Prometheus tag names of Envoy's stats: "envoy" (envoy_cluster_name, envoy_response_code: Envoy's
    # defaults) or "istio" (cluster_name, response_code: what Istio's bootstrap configures).
    stats_tags: str = "envoy"
    # A read-only listener serving /stats/prometheus for Prometheus in a cluster (Istio's 15020); None: off.
    metrics: Address | None = None
    # The app's own Prometheus endpoint, merged into the metrics listener's answer (Istio's metrics merging).
    app_metrics: str | None = None
    # The opt-in "where did this request go" response header: None is off; otherwise the gateway answers
    # with the hops when the request's debug header carries this token (trusted callers only).
    route_debug_token: str | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSettings:
    """Who this proxy speaks for, as Istio's metrics label it: the pod's workload, namespace, app, version.

    In a cluster injection fills these from the downward API; locally they are flags. Unknown values
    are "unknown", as in Istio. The canonical service and revision default to the app and the version
    (Istio: `service.istio.io/canonical-name|revision` labels, then `app` and `version`, then `latest`).
    """

    name: str = "unknown"
    namespace: str = "unknown"
    app: str = "unknown"
    version: str = "unknown"
    canonical_service: str | None = None
    canonical_revision: str | None = None
    cluster: str = "Kubernetes"  # Istio's default cluster id


@dataclass(frozen=True, slots=True)
class PodSettings:
    """What an injected sidecar knows of its pod, for the kubelet's hooks (from the downward API)."""

    lifecycle: Address | None = None  # the lifecycle port: GET /wait-for-stop, the pod's preStop hooks
    pod_ip: str | None = None  # the preStop wait looks for it among the endpoints
    pod_name: str | None = None
    stop_margin: float = 2.0  # seconds for every other proxy to see this pod leave the endpoints
    stop_max: float = 20.0  # the longest a preStop waits (the kubelet's grace period covers it and the drain)
    exit_with: tuple[str, ...] = ()  # a Job's app containers: the sidecar exits once they all have ended


@dataclass(frozen=True, slots=True)
class ProxySettings:
    gateway: Address | None = None
    inbound: Address | None = None
    app: Address | None = None  # where the inbound listener forwards: the local application
    # Every app port captured inbound: a captured connection goes on to the one it was sent to (its original
    # destination port), other connections to `app`. Empty: `app` only.
    app_ports: tuple[int, ...] = ()
    outbound: Address | None = None
    admin: Address | None = Address("127.0.0.1", 15000)
    config_files: tuple[str, ...] = ()
    source: str = "files"  # files | kubernetes | xds://HOST:PORT[,HOST:PORT...]
    kubeconfig: str | None = None
    namespace: str = "default"  # short host names resolve here
    own_lane: str | None = None  # this sidecar's lane, used in strict (non-permissive) mode
    reload_interval: float = 1.0
    lenient: bool = False  # unknown fields in the configuration are warnings instead of a rejected table
    watch_read_timeout: float = 60.0  # a Kubernetes watch silent this long is opened again (half-open connections)
    pods: str = "full"  # Kubernetes source: whole Pods, or "metadata" (labels of lane-labelled pods; EndpointSlices)
    table_stale_after: float = 180.0  # the table behind its source this long: laneproxy.config.table_stale = 1
    trace_table_capacity: int = 100_000
    trace_table_ttl: float = 300.0
    trace_table_bytes: int = 32 * 1024 * 1024  # what the trace table may hold, as its byte budget counts it
    # The gateway keeps a client's swimlane trace id instead of giving the request a fresh one. Only
    # behind an edge that already sets the id: any client that knows a live id can otherwise move it.
    trust_client_trace_id: bool = False
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    circuit_breakers: CircuitBreakerSettings = field(default_factory=CircuitBreakerSettings)
    retries: RetrySettings = field(default_factory=RetrySettings)
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    max_request_headers_kb: int = 60
    max_request_headers_count: int = 100
    max_response_headers_kb: int = 80  # Envoy's HTTP/1 defaults for upstream response heads (502 UPE beyond)
    max_response_headers_count: int = 100
    max_pipelined_requests: int = 16
    # Request body bytes a client connection may have buffered for requests that cannot be forwarded yet
    # (pipelined behind a slow one, or waiting for an upstream connection): Envoy's
    # per_connection_buffer_limit_bytes. Beyond it the proxy stops reading that client until it drains.
    per_connection_buffer_limit_bytes: int = 1 << 20
    # On SIGTERM: keep accepting and serving at least drain_seconds (Istio's MINIMUM_DRAIN_DURATION),
    # then exit once no request is in flight, at the latest drain_limit_seconds after the signal.
    drain_seconds: float = 5.0
    drain_limit_seconds: float = 25.0
    pod: PodSettings = field(default_factory=PodSettings)
    server_name: str = "envoy"
    # Tunnels. Upgrades passed on and tunnelled after a 101 (Envoy's upgrade_configs); any other Upgrade
    # header (h2c) is stripped. A tunnel (upgrade, CONNECT, passed-through TCP) with nothing moving either
    # way this long is closed (Envoy's TCP proxy idle_timeout, 1 h).
    upgrade_types: tuple[str, ...] = ("websocket",)
    tunnel_idle_timeout: float = 3600.0
    # The outbound listener's answer for a host outside the mesh (Istio's outboundTrafficPolicy): ALLOW_ANY
    # passes it through (plain HTTP to the host it names, CONNECT to host:port); REGISTRY_ONLY answers 502.
    outbound_traffic_policy: str = "ALLOW_ANY"
    # A captured connection whose client says nothing this long is passed through as raw TCP (server-first
    # protocols: MySQL, SMTP); Istio's protocolDetectionTimeout.
    protocol_detection_timeout: float = 0.1
