"""The immutable data model of laneproxy: services, endpoints, lanes, swimlane groups and the route table.

Owns the shapes that cross from the control plane to the data plane. Every object here is frozen;
a published RouteTable is never edited, only replaced. Nothing here validates: build.py does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Mapping

EMPTY_MAPPING: Mapping[Any, Any] = MappingProxyType({})  # shared by every empty field: immutable


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address serving a service, with the labels that place it in lanes."""

    host: str
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAPPING, compare=False, hash=False)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def has_labels(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(key) == value for key, value in selector.items())


class UpstreamProtocol(str, Enum):
    """The protocol spoken to a service port's endpoints, as Istio selects it (see build.select_protocol)."""

    HTTP1 = "http1"
    HTTP2 = "http2"
    AUTO = "auto"  # the downstream's protocol: HTTP/2 upstream for an HTTP/2 request, HTTP/1.1 for HTTP/1.1

    def for_downstream(self, downstream: UpstreamProtocol) -> UpstreamProtocol:
        """The protocol of the upstream request when the downstream one arrived in `downstream` (http1 or http2)."""
        return downstream if self is UpstreamProtocol.AUTO else self


@dataclass(frozen=True, slots=True)
class Service:
    """A Kubernetes-style service: `namespace/name`, its port, the port's protocol and every endpoint of every lane."""

    namespace: str
    name: str
    port: int
    endpoints: tuple[Endpoint, ...] = ()
    protocol: UpstreamProtocol = UpstreamProtocol.AUTO
    # What the Service object says of this port and itself, for whoever serves the table on (xDS): the
    # port's name ("" when unnamed), the ClusterIP, an ExternalName's target, and whether this is the
    # Service's first port (the one a host name without a port means, unless it has port 80).
    port_name: str = ""
    cluster_ip: str | None = None
    external_name: str | None = None
    first_port: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


class MatchKind(str, Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's StringMatch: exactly one of exact, prefix or regex (a full match, as in Envoy's RE2 use)."""

    kind: MatchKind
    value: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind is MatchKind.EXACT:
            return text == self.value
        if self.kind is MatchKind.PREFIX:
            return text.startswith(self.value)
        assert self.pattern is not None
        return self.pattern.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """Conditions on the request path and headers; all must hold. Header names are lowercase."""

    uri: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()

    def matches(self, path: str, headers: Mapping[str, str], *, ignore_header: str | None = None) -> bool:
        if self.uri is not None and not self.uri.matches(path):
            return False
        return all(name == ignore_header or match.matches(headers.get(name)) for name, match in self.headers)


def host_matches(patterns: tuple[str, ...], host: str) -> bool:
    """Istio host matching: '*' matches anything, '*.example.com' a suffix, anything else exactly."""
    for pattern in patterns:
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


@dataclass(frozen=True, slots=True)
class IngressRule:
    """One lane's ingress rule at the gateway: matching requests go to `destination` in `lane`."""

    lane: str
    name: str
    hosts: tuple[str, ...]
    match: RequestMatch
    destination: str  # service key, namespace/name


@dataclass(frozen=True, slots=True)
class Lane:
    """A swimlane: the pods its label selector picks, the services it declares, and its ingress."""

    name: str
    group: str
    label_selector: Mapping[str, str]
    declared_services: frozenset[str]
    ingress_rules: tuple[IngressRule, ...] = ()
    weight: int = 0
    weight_destination: str | None = None  # service key
    # laneproxy's extensions (annotations on the ASMSwimLane, so the ASM schema is untouched):
    # the lanes tried in order when this lane has no healthy endpoints, per service key ("*": every
    # service), and the healthy fraction below which a share of the lane's traffic spills to them.
    fallback_chains: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: EMPTY_MAPPING)
    spill_below: float = 0.0
    # The ASMSwimLane object as it was read (apiVersion, kind, metadata, spec), for serving it on unchanged.
    document: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAPPING, compare=False)


class RoutingStrategy(str, Enum):
    RULE_BASED = "rule_based"
    WEIGHTED = "weighted"


@dataclass(frozen=True, slots=True)
class SwimLaneGroup:
    """An ASMSwimLaneGroup with its lanes: how lanes are chosen at the edge and carried along the chain."""

    name: str
    services: frozenset[str]
    lanes: Mapping[str, Lane]
    strategy: RoutingStrategy
    weighted_hosts: tuple[str, ...]
    weighted_matches: tuple[RequestMatch, ...]
    permissive: bool
    fallback_target: str | None
    service_fallback: Mapping[str, str]
    route_header: str
    trace_header: str | None
    auto_update: bool
    # The ASMSwimLaneGroup object as it was read (apiVersion, kind, metadata, spec), for serving it on unchanged.
    document: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAPPING, compare=False)
    # The header names as the data plane compares them (lowercase bytes), derived once per table.
    route_header_key: bytes = field(init=False, compare=False)
    trace_header_key: bytes | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_header_key", self.route_header.lower().encode())
        object.__setattr__(self, "trace_header_key", self.trace_header.lower().encode() if self.trace_header else None)

    def fallback_for(self, service_key: str) -> str | None:
        return self.service_fallback.get(service_key, self.fallback_target)


@dataclass(frozen=True, slots=True)
class Route:
    """The resolved answer for (service, lane asked): the lane that serves it, its endpoints and their protocol."""

    service: str
    lane_asked: str | None
    lane_used: str | None
    cluster: str
    endpoints: tuple[Endpoint, ...]
    lane_asked_value: bytes | None = field(init=False, compare=False)  # as written into the route header
    # The lanes tried after the lane asked, in order, when it has no healthy endpoints (its fallback
    # chain, or the group's fallback target); empty in strict mode and outside any group. Not part of a
    # route's identity: two routes to the same endpoints of the same lane are equal, however they got there.
    chain: tuple[str, ...] = field(default=(), compare=False)
    # What the endpoints speak (the service port's protocol): the upstream codec's choice, per request.
    protocol: UpstreamProtocol = UpstreamProtocol.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "lane_asked_value", self.lane_asked.encode() if self.lane_asked else None)

    @property
    def fallback(self) -> bool:
        return self.lane_used != self.lane_asked


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    """Every route of one service, keyed by the lane value as it arrives on the wire (bytes)."""

    service: Service
    group: SwimLaneGroup | None
    by_lane: Mapping[bytes, Route]
    default: Route
    # A Kubernetes Service of no group: a connection captured on its way there goes on to where it was
    # going (its ClusterIP, kube-proxy's to balance), exactly as without laneproxy. `default` serves the
    # clients that name it without being captured (an explicit proxy).
    passthrough: bool = False

    def route_for(self, lane: bytes | None) -> Route:
        if lane is None:
            return self.default
        return self.by_lane.get(lane, self.default)


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The complete, versioned routing snapshot the data plane reads once per request."""

    version: str
    services: Mapping[str, Service]
    groups: Mapping[str, SwimLaneGroup]
    routes: Mapping[str, ServiceRoutes]  # by service key, namespace/name
    # By lowercase Host value: every name with each port, without a port (port 80, else the primary port),
    # and ClusterIP:port.
    hosts: Mapping[bytes, ServiceRoutes]
    ingress_rules: tuple[IngressRule, ...]
    # The routes of every port of a multi-port Service after its first (`routes` holds the first).
    other_ports: tuple[ServiceRoutes, ...] = ()

    def lane(self, name: str) -> Lane | None:
        for group in self.groups.values():
            lane = group.lanes.get(name)
            if lane is not None:
                return lane
        return None

    def is_lane(self, name: str) -> bool:
        return self.lane(name) is not None


EMPTY_TABLE = RouteTable(
    version="", services=EMPTY_MAPPING, groups=EMPTY_MAPPING, routes=EMPTY_MAPPING, hosts=EMPTY_MAPPING, ingress_rules=()
)
