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
    """Envoy's defaults: connect 5 s (Envoy's own, not Istio's 10 s), route 15 s."""

    connect: float = 5.0
    route: float = 15.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    gateway: Address | None = None
    inbound: Address | None = None
    app: Address | None = None  # where the inbound listener forwards: the local application
    outbound: Address | None = None
    admin: Address | None = Address("127.0.0.1", 15000)
    config_files: tuple[str, ...] = ()
    source: str = "files"  # files | kubernetes
    kubeconfig: str | None = None
    namespace: str = "default"  # short host names resolve here
    own_lane: str | None = None  # this sidecar's lane, used in strict (non-permissive) mode
    reload_interval: float = 1.0
    trace_table_capacity: int = 100_000
    trace_table_ttl: float = 300.0
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    max_request_headers_kb: int = 60
    max_request_headers_count: int = 100
    max_pipelined_requests: int = 16
    drain_seconds: float = 5.0
    server_name: str = "envoy"
