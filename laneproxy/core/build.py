"""Raw configuration documents -> one validated, immutable RouteTable. The only validation point.

Owns the meaning of every input field: the ASM swimlane resources (`ASMSwimLaneGroup`, `ASMSwimLane`,
`istio.alibabacloud.com/v1`), Kubernetes `Service`, `EndpointSlice` and `Pod` objects (a Pod also as its
metadata alone, `meta.k8s.io/v1` `PartialObjectMetadata`), and laneproxy's own
`LaneEndpoints` file for local runs. Every problem is collected and reported as
`source: path.to.field: reason`; nothing past this module sees an untyped dict.
A field the schema (core/schema.py, also the source of the CRDs) does not know is an error, or a
warning when the caller is lenient, never silently dropped; a file or document laneproxy does not
read gets a notice.
It never reads files or sockets: callers hand it text or parsed objects.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import yaml

from laneproxy.core.errors import ConfigInvalidError, ConfigProblem
from laneproxy.core.headers import TRAFFIC_TAG_LABEL
from laneproxy.core.schema import DOCUMENT_SCHEMAS
from laneproxy.core.model import (
    Endpoint,
    IngressRule,
    Lane,
    MatchKind,
    RequestMatch,
    Route,
    RouteTable,
    RoutingStrategy,
    Service,
    ServiceRoutes,
    StringMatch,
    SwimLaneGroup,
    UpstreamProtocol,
)

SWIMLANE_API = "istio.alibabacloud.com/v1"
ENDPOINTS_API = "laneproxy.dev/v1"
GROUP_LABEL = "swimlane-group"
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_PORT = 80
# libyaml's parser when PyYAML was built with it: about 5x faster on a 10,000-service table.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_LANE_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
# laneproxy's own settings on an ASMSwimLane, as annotations so that ASM's schema stays untouched.
# fallback-chain: "s2 -> base" (every service), or "default/mockb: s2 -> base; *: base" (per service).
FALLBACK_CHAIN_ANNOTATION = "laneproxy.dev/fallback-chain"
# spill-below: "0.5": below half of its endpoints healthy, the lane keeps healthy/0.5 of its traffic.
SPILL_BELOW_ANNOTATION = "laneproxy.dev/spill-below"
ALL_SERVICES = "*"
# Istio's protocol names that mean HTTP/2 on the wire (its `IsHTTP2`), and Kubernetes' standard appProtocol
# for HTTP/2 over cleartext; bare `h2c` too, which people write for it.
_HTTP2_PROTOCOLS = frozenset({"grpc", "grpc-web", "http2"})
_H2C_APP_PROTOCOLS = frozenset({"kubernetes.io/h2c", "h2c"})


@dataclass(frozen=True, slots=True)
class ConfigDocument:
    """One parsed document and where it came from (a file name, or `kubernetes:<kind>/<name>`)."""

    source: str
    body: Mapping[str, Any]


def parse_yaml(source: str, text: str) -> list[ConfigDocument]:
    """Split multi-document YAML into documents; raise ConfigInvalidError naming the file on bad YAML."""
    try:
        loaded = [doc for doc in yaml.load_all(text, Loader=_YAML_LOADER) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "document"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigInvalidError([ConfigProblem(source, where, f"malformed YAML: {reason}")]) from exc
    problems = [
        ConfigProblem(source, f"document[{index}]", "expected a mapping with apiVersion and kind")
        for index, doc in enumerate(loaded)
        if not isinstance(doc, dict)
    ]
    if problems:
        raise ConfigInvalidError(problems)
    return [ConfigDocument(source, doc) for doc in loaded]


def content_version(texts: Iterable[str]) -> str:
    """A short, stable version string for a set of inputs: equal inputs, equal version."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


class _Problems:
    """Collects problems; `at` gives a field reader bound to one document and path prefix."""

    def __init__(self) -> None:
        self.items: list[ConfigProblem] = []

    def add(self, source: str, path: str, reason: str) -> None:
        self.items.append(ConfigProblem(source, path, reason))


@dataclass(frozen=True, slots=True)
class Built:
    """A table and what was said about its input without rejecting it."""

    table: RouteTable
    # Unknown fields, when the build was lenient: the field is ignored, and the user must hear about it.
    warnings: tuple[ConfigProblem, ...]
    # Inputs that change nothing: a file with no swimlane objects, a kind laneproxy does not read.
    notices: tuple[ConfigProblem, ...]
    # Inputs not in the table as they are because of their problems (build_skipping only): source -> why.
    skipped: Mapping[str, tuple[ConfigProblem, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # Those of them that are in the table at their last good version; the others are left out.
    kept_last_good: frozenset[str] = frozenset()
    # The pieces of the table, for core.incremental to update it in place of a full build.
    parts: Parts | None = field(default=None, compare=False, repr=False)


def _suggestion(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a change of case only scores low for difflib
        close = [name for name in known if name.lower() == key.lower()]
    if close:
        return f"unknown field (did you mean {close[0]}?)"
    return f"unknown field (known: {', '.join(known)})"


def _unknown_fields(schema: Mapping[str, Any], value: Any, source: str, path: str, found: list[ConfigProblem]) -> None:
    """Walk a document along its schema; record every field the schema does not have. Types are build's to check."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        values = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}"
            if properties is not None:
                if key in properties:
                    _unknown_fields(properties[key], item, source, where, found)
                else:
                    found.append(ConfigProblem(source, where, _suggestion(str(key), properties)))
            elif isinstance(values, dict):
                _unknown_fields(values, item, source, where, found)
            # neither: an open object (metadata), checked by the API server, not here
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _unknown_fields(schema["items"], item, source, f"{path}[{index}]", found)


class _Fields:
    """Typed access to one mapping inside a document, recording a problem for each wrong field."""

    def __init__(self, problems: _Problems, source: str, path: str, body: Any) -> None:
        self.problems, self.source, self.path = problems, source, path
        self.body = body if isinstance(body, dict) else {}
        if body is not None and not isinstance(body, dict):
            self.fail("", "expected a mapping")

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if key else self.path

    def fail(self, key: str, reason: str) -> None:
        self.problems.add(self.source, self.where(key), reason)

    def sub(self, key: str) -> _Fields:
        return _Fields(self.problems, self.source, self.where(key), self.body.get(key))

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.body.get(key)
        if value is None or value == "":
            if required:
                self.fail(key, "required")
            return default
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {type(value).__name__}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")
            return default
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"expected an integer from {low} to {high}, got {value!r}")
            return default
        return value

    def items(self, key: str) -> list[tuple[str, Any]]:
        """A list field as (path, element) pairs."""
        value = self.body.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, "expected a list")
            return []
        return [(f"{self.where(key)}[{index}]", element) for index, element in enumerate(value)]

    def string_map(self, key: str) -> dict[str, str]:
        value = self.body.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            self.fail(key, "expected a mapping of strings to strings")
            return {}
        return dict(value)

    def at(self, path: str, body: Any) -> _Fields:
        return _Fields(self.problems, self.source, path, body)


# ---------------------------------------------------------------------------------------------
# Documents -> intermediate declarations


@dataclass(slots=True)
class _GroupDecl:
    source: str
    name: str
    services: list[str]
    strategy: RoutingStrategy
    weighted_hosts: tuple[str, ...]
    weighted_matches: tuple[RequestMatch, ...]
    permissive: bool
    fallback_target: str | None
    fallback_path: str
    service_fallback: dict[str, str]
    service_fallback_path: str
    route_header: str
    trace_header: str | None
    auto_update: bool
    body: Mapping[str, Any] = field(default_factory=dict)  # the document, kept as it was read


@dataclass(slots=True)
class _LaneDecl:
    source: str
    name: str
    group: str | None
    label_selector: dict[str, str]
    services: list[str]
    rules: list[tuple[str, str, str, tuple[str, ...], RequestMatch, str]]  # path, rule name, host, hosts, match, dest path
    weight: int
    weight_host: str | None
    fallback_chains: dict[str, tuple[str, ...]]
    fallback_chain_path: str
    spill_below: float
    body: Mapping[str, Any] = field(default_factory=dict)  # the document, kept as it was read


@dataclass(slots=True)
class _PortDecl:
    name: str  # "" for a Service's only, unnamed port
    port: int
    target: int | str | None  # a number, or a container port name resolved per pod
    endpoints: list[Endpoint]
    protocol: UpstreamProtocol | None = None  # None: not said (a LaneEndpoints file without `protocol`): auto


@dataclass(slots=True)
class _ServiceDecl:
    source: str
    namespace: str
    name: str
    ports: list[_PortDecl]  # the first is the service's primary port (a destination host names no port)
    selector: dict[str, str] | None
    kube: bool = False  # declared by a Kubernetes Service object (not a LaneEndpoints file, not a group)
    cluster_ip: str | None = None
    external_name: str | None = None


@dataclass(slots=True)
class _PodDecl:
    namespace: str
    name: str
    labels: dict[str, str]
    ip: str
    ready: bool
    ports: dict[str, int]


@dataclass(slots=True)
class _SliceEndpoint:
    ip: str
    ready: bool
    serving: bool
    terminating: bool
    pod: str | None


@dataclass(slots=True)
class _SliceDecl:
    namespace: str
    service: str
    ports: dict[str, int]  # service port name -> the endpoints' port number
    endpoints: list[_SliceEndpoint]


def _name_of(fields: _Fields) -> str | None:
    return fields.sub("metadata").string("name", required=True)


def _string_match(fields: _Fields) -> StringMatch | None:
    # Other keys (`suffix`) are unknown fields, reported with the schema's; the match is still incomplete.
    present = [(kind, fields.body[kind.value]) for kind in MatchKind if fields.body.get(kind.value) not in (None, "")]
    if len(present) != 1:
        fields.fail("", "exactly one of exact, prefix or regex is required")
        return None
    kind, value = present[0]
    if not isinstance(value, str):
        fields.fail(kind.value, "expected a string")
        return None
    pattern = None
    if kind is MatchKind.REGEX:
        try:
            pattern = re.compile(value)
        except re.error as exc:
            fields.fail(kind.value, f"invalid regular expression {value!r}: {exc}")
            return None
    return StringMatch(kind, value, pattern)


def _request_match(fields: _Fields) -> RequestMatch:
    uri = _string_match(fields.sub("uri")) if fields.body.get("uri") else None
    headers = []
    raw_headers = fields.body.get("headers") or {}
    if not isinstance(raw_headers, dict):
        fields.fail("headers", "expected a mapping of header name to match")
        raw_headers = {}
    for name in raw_headers:
        if not isinstance(name, str) or not _TOKEN.match(name):
            fields.fail(f"headers.{name}", "not a valid header name")
            continue
        match = _string_match(fields.sub("headers").sub(name))
        if match is not None:
            headers.append((name.lower(), match))
    return RequestMatch(uri, tuple(headers))


def _hosts(fields: _Fields) -> tuple[str, ...]:
    """Istio `hosts`, lowercased because requests are matched on their lowercased Host; none means every host."""
    hosts = []
    for path, host in fields.items("hosts"):
        if isinstance(host, str) and host:
            hosts.append(host.lower())
        else:
            fields.problems.add(fields.source, path, f"expected a host name, got {host!r}")
    return tuple(hosts) or ("*",)


def _service_refs(fields: _Fields, key: str) -> list[str]:
    refs = []
    for path, element in fields.items(key):
        ref = fields.at(path, element)
        name = ref.string("name", required=True)
        namespace = ref.string("namespace", DEFAULT_NAMESPACE)
        if name:
            refs.append(f"{namespace}/{name}")
    return refs


def _group_decl(doc: ConfigDocument, problems: _Problems) -> _GroupDecl | None:
    top = _Fields(problems, doc.source, "ASMSwimLaneGroup", doc.body)
    name = _name_of(top)
    root = top.at(f"ASMSwimLaneGroup({name})", doc.body)
    spec = root.sub("spec")
    routing = spec.sub("ingress").sub("ingressRouting")
    strategy_name = routing.string("ingressRoutingStrategy", RoutingStrategy.RULE_BASED.value)
    try:
        strategy = RoutingStrategy(strategy_name)
    except ValueError:
        routing.fail("ingressRoutingStrategy", f"unknown strategy {strategy_name!r} (use rule_based or weighted)")
        strategy = RoutingStrategy.RULE_BASED
    weighted = routing.sub("weightedRoutingRule")
    weighted_hosts = _hosts(weighted)
    weighted_matches = tuple(_request_match(weighted.at(path, m)) for path, m in weighted.items("requestMatches"))
    permissive = spec.boolean("isPermissive", False)
    pmc = spec.sub("permissiveModeConfiguration")
    route_header = pmc.string("routeHeader", required=permissive)
    if route_header and not _TOKEN.match(route_header):
        pmc.fail("routeHeader", "not a valid header name")
    trace_header = pmc.string("traceHeader")
    if trace_header and not _TOKEN.match(trace_header):
        pmc.fail("traceHeader", "not a valid header name")
    if trace_header and route_header and trace_header.lower() == route_header.lower():
        trace_header = None  # the app propagates the route header itself: nothing to remember
    fallback_target = pmc.string("fallbackTarget", required=permissive)
    service_fallback = pmc.string_map("serviceLevelFallbackTarget")
    if name is None:
        return None
    return _GroupDecl(
        source=doc.source,
        name=name,
        services=_service_refs(spec, "services"),
        strategy=strategy,
        weighted_hosts=weighted_hosts,
        weighted_matches=weighted_matches,
        permissive=permissive,
        fallback_target=fallback_target,
        fallback_path=pmc.where("fallbackTarget"),
        service_fallback=service_fallback,
        service_fallback_path=pmc.where("serviceLevelFallbackTarget"),
        route_header=(route_header or "x-asm-prefer-tag").lower(),
        trace_header=trace_header.lower() if trace_header else None,
        auto_update=spec.boolean("autoUpdate", False),
        body=doc.body,
    )


def _lane_decl(doc: ConfigDocument, problems: _Problems) -> _LaneDecl | None:
    top = _Fields(problems, doc.source, "ASMSwimLane", doc.body)
    name = _name_of(top)
    root = top.at(f"ASMSwimLane({name})", doc.body)
    if name is not None and not _LANE_VALUE.match(name):
        root.fail("metadata.name", "a lane name must be 1-63 letters, digits, '-', '_' or '.'")
    group = root.sub("metadata").string_map("labels").get(GROUP_LABEL)
    annotations = root.sub("metadata").sub("annotations")
    chains = _fallback_chains(annotations)
    spill_below = _spill_below(annotations)
    if group is None:
        root.fail(f"metadata.labels.{GROUP_LABEL}", "required: names the ASMSwimLaneGroup this lane belongs to")
    spec = root.sub("spec")
    selector = spec.string_map("labelSelector")
    if not selector:
        spec.fail("labelSelector", "required: a lane without a label selector would take every pod")
    rules = []
    for path, element in spec.items("ingressRules"):
        rule = spec.at(path, element)
        if not rule.boolean("online", True):
            continue
        hosts = _hosts(rule)
        match = _request_match(rule.sub("match"))
        destination = rule.sub("route").sub("destination")
        host = destination.string("host", required=True)
        if host:
            rules.append((path, rule.string("name", name) or "", host, hosts, match, destination.where("host")))
    weight = spec.sub("ingressWeight")
    if name is None:
        return None
    return _LaneDecl(
        source=doc.source,
        name=name,
        group=group,
        label_selector=selector,
        services=_service_refs(spec, "services"),
        rules=rules,
        weight=weight.integer("weight", 0, low=0, high=1_000_000),
        weight_host=weight.sub("destination").string("host"),
        fallback_chains=chains,
        fallback_chain_path=annotations.where(FALLBACK_CHAIN_ANNOTATION),
        spill_below=spill_below,
        body=doc.body,
    )


def _fallback_chains(annotations: _Fields) -> dict[str, tuple[str, ...]]:
    """The fallback-chain annotation as {service key or "*": (lane, ...)}; lanes are checked in _assemble."""
    text = annotations.string(FALLBACK_CHAIN_ANNOTATION)
    if not text:
        return {}
    chains: dict[str, tuple[str, ...]] = {}
    for entry in filter(None, (part.strip() for part in re.split(r"[;\n]", text))):
        service, sep, chain_text = entry.rpartition(":")
        service = service.strip() if sep else ALL_SERVICES
        if service != ALL_SERVICES and "/" not in service:
            service = f"{DEFAULT_NAMESPACE}/{service}"
        lanes = tuple(lane.strip() for lane in chain_text.split("->"))
        if not all(lanes):
            annotations.fail(FALLBACK_CHAIN_ANNOTATION, f"expected 'lane -> lane ...', got {entry!r}")
            continue
        if service in chains:
            annotations.fail(FALLBACK_CHAIN_ANNOTATION, f"{service} has two chains")
            continue
        chains[service] = lanes
    return chains


def _spill_below(annotations: _Fields) -> float:
    text = annotations.string(SPILL_BELOW_ANNOTATION)
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        annotations.fail(SPILL_BELOW_ANNOTATION, f"expected a healthy fraction from 0 to 1, got {text!r}")
        return 0.0
    return value


def _parse_address(fields: _Fields, path: str, value: Any) -> Endpoint | None:
    if not isinstance(value, str) or ":" not in value:
        fields.problems.add(fields.source, path, f"expected host:port, got {value!r}")
        return None
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        fields.problems.add(fields.source, path, f"expected host:port with a port from 1 to 65535, got {value!r}")
        return None
    return Endpoint(host, int(port_text))


def select_protocol(port_name: str, app_protocol: str | None) -> UpstreamProtocol:
    """A Kubernetes Service port's upstream protocol, selected as Istio selects it.

    `appProtocol`, when set, decides alone (the port name is not read); else the port name does. Either is
    read up to its first '-' (`grpc-api` is grpc), after a `grpc-web` prefix check; grpc, grpc-web and http2
    are HTTP/2, and so is the appProtocol `kubernetes.io/h2c` (or `h2c`). Anything else, and no name at all,
    is the downstream's protocol (auto), as the issue asks: Istio would send HTTP/1.1 to a port named `http`.
    """
    name = (app_protocol or port_name).lower()
    if app_protocol and name in _H2C_APP_PROTOCOLS:
        return UpstreamProtocol.HTTP2
    if name.startswith("grpc-web"):
        return UpstreamProtocol.HTTP2
    return UpstreamProtocol.HTTP2 if name.split("-", 1)[0] in _HTTP2_PROTOCOLS else UpstreamProtocol.AUTO


def _endpoints_protocol(fields: _Fields) -> UpstreamProtocol | None:
    """A LaneEndpoints service's `protocol`: http1, http2 or auto; absent: not said (auto)."""
    value = fields.body.get("protocol")
    if value is None:
        return None
    try:
        return UpstreamProtocol(value)
    except ValueError:
        choices = ", ".join(protocol.value for protocol in UpstreamProtocol)
        fields.fail("protocol", f"unknown protocol {value!r} (use one of: {choices}; gRPC and h2c are http2)")
        return None


def _endpoints_decls(doc: ConfigDocument, problems: _Problems) -> list[_ServiceDecl]:
    root = _Fields(problems, doc.source, "LaneEndpoints", doc.body)
    services = root.body.get("services")
    if not isinstance(services, dict):
        root.fail("services", "required: a mapping of namespace/name to {port, lanes}")
        return []
    decls = []
    for key in services:
        fields = root.sub("services").sub(str(key))
        namespace, _, name = str(key).rpartition("/")
        if not name:
            fields.fail("", "service key must be namespace/name or name")
            continue
        port = fields.integer("port", DEFAULT_SERVICE_PORT, low=1, high=65535)
        endpoints = []
        lanes = fields.body.get("lanes") or {}
        if not isinstance(lanes, dict):
            fields.fail("lanes", f"expected a mapping of {TRAFFIC_TAG_LABEL} value to a list of host:port")
            lanes = {}
        lane_of_address: dict[tuple[str, int], str] = {}
        for tag, addresses in lanes.items():
            lane_fields = fields.sub("lanes")
            if not isinstance(addresses, list):
                lane_fields.fail(str(tag), "expected a list of host:port")
                continue
            for index, address in enumerate(addresses):
                path = f"{lane_fields.where(str(tag))}[{index}]"
                endpoint = _parse_address(fields, path, address)
                if endpoint is None:
                    continue
                # One address is one pod with one ASM_TRAFFIC_TAG: listing it twice would make membership ambiguous.
                seen = lane_of_address.setdefault((endpoint.host, endpoint.port), str(tag))
                if seen != str(tag):
                    problems.add(fields.source, path, f"{address} is already listed in lane {seen!r}")
                    continue
                labels = MappingProxyType({TRAFFIC_TAG_LABEL: str(tag)})
                endpoints.append(Endpoint(endpoint.host, endpoint.port, labels))
        decls.append(_ServiceDecl(doc.source, namespace or DEFAULT_NAMESPACE, name,
                                  [_PortDecl("", port, None, endpoints, _endpoints_protocol(fields))], None))
    return decls


def _kube_service_decl(doc: ConfigDocument, problems: _Problems) -> _ServiceDecl | None:
    """Every port of a Service, as kube-proxy serves them; its ClusterIP; ExternalName's target host."""
    root = _Fields(problems, doc.source, "Service", doc.body)
    meta = root.sub("metadata")
    name = meta.string("name", required=True)
    spec = root.sub("spec")
    external_name = spec.string("externalName") if spec.body.get("type") == "ExternalName" else None
    ports: list[_PortDecl] = []
    for path, element in spec.items("ports"):
        fields = root.at(path, element)
        if fields.body.get("protocol", "TCP") != "TCP":
            continue  # UDP and SCTP never reach an HTTP proxy
        port = fields.integer("port", DEFAULT_SERVICE_PORT, low=1, high=65535)
        target = fields.body.get("targetPort", port)
        number = isinstance(target, int) and not isinstance(target, bool) and 0 < target < 65536
        if not (number or isinstance(target, str) and target):
            fields.fail("targetPort", f"expected a port number from 1 to 65535 or a port name, got {target!r}")
            target = port
        port_name = fields.string("name", "") or ""
        protocol = select_protocol(port_name, fields.string("appProtocol"))
        ports.append(_PortDecl(port_name, port, target, [], protocol))
    if name is None or not ports:
        return None
    selector = spec.string_map("selector") or None
    cluster_ip = spec.string("clusterIP")
    return _ServiceDecl(doc.source, meta.string("namespace", DEFAULT_NAMESPACE) or DEFAULT_NAMESPACE, name, ports,
                        selector, kube=True, cluster_ip=cluster_ip if cluster_ip and cluster_ip != "None" else None,
                        external_name=external_name)


def _slice_decl(doc: ConfigDocument, problems: _Problems) -> _SliceDecl | None:
    """An EndpointSlice (discovery.k8s.io v1 or v1beta1): the ports and conditions kube-proxy reads."""
    root = _Fields(problems, doc.source, "EndpointSlice", doc.body)
    meta = root.sub("metadata")
    service = meta.string_map("labels").get("kubernetes.io/service-name")
    if not service or root.body.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return None  # not a Service's slice (or FQDN endpoints, which kube-proxy does not read either)
    ports = {}
    for path, element in root.items("ports"):
        fields = root.at(path, element)
        number = fields.integer("port", 0, low=1, high=65535)
        if number and fields.body.get("protocol", "TCP") == "TCP":
            ports[fields.string("name", "") or ""] = number
    endpoints = []
    for path, element in root.items("endpoints"):
        fields = root.at(path, element)
        addresses = [address for _, address in fields.items("addresses") if isinstance(address, str) and address]
        if not addresses:
            continue
        conditions = fields.sub("conditions")
        # The API: a condition left out is unknown, and consumers read unknown readiness as ready.
        ready = conditions.boolean("ready", True)
        serving = conditions.boolean("serving", ready)
        terminating = conditions.boolean("terminating", False)
        target = fields.sub("targetRef")
        pod = target.string("name") if target.body.get("kind", "Pod") == "Pod" else None
        endpoints.append(_SliceEndpoint(addresses[0], ready, serving, terminating, pod))
    return _SliceDecl(meta.string("namespace", DEFAULT_NAMESPACE) or DEFAULT_NAMESPACE, service, ports, endpoints)


def _pod_decl(doc: ConfigDocument, problems: _Problems) -> _PodDecl | None:
    root = _Fields(problems, doc.source, "Pod", doc.body)
    meta, status = root.sub("metadata"), root.sub("status")
    ip = status.string("podIP")
    if not ip or meta.body.get("deletionTimestamp"):
        return None
    ready = False
    for path, element in status.items("conditions"):
        condition = root.at(path, element)
        ready = ready or (condition.string("type") == "Ready" and condition.string("status") == "True")
    ports: dict[str, int] = {}
    for path, element in root.sub("spec").items("containers"):
        container = root.at(path, element)
        for port_path, port_element in container.items("ports"):
            port = root.at(port_path, port_element)
            name, number = port.string("name"), port.integer("containerPort", 0, low=1, high=65535)
            if name and number:
                ports.setdefault(name, number)  # as Kubernetes resolves a named port: the first container's
    namespace = meta.string("namespace", DEFAULT_NAMESPACE) or DEFAULT_NAMESPACE
    return _PodDecl(namespace, meta.string("name", "") or "", meta.string_map("labels"), ip, ready, ports)


def _pod_metadata_decl(doc: ConfigDocument, problems: _Problems) -> _PodDecl | None:
    """A Pod read as metadata only (PartialObjectMetadata, the only kind laneproxy reads that way): its labels.

    It has no address and no readiness, so it is never an endpoint by itself; its labels join the
    EndpointSlice endpoints that name it in their targetRef, as a whole Pod's do. A terminating pod's
    labels are left out as a whole Pod's are (a Pod with a deletionTimestamp declares nothing).
    """
    root = _Fields(problems, doc.source, "PartialObjectMetadata", doc.body)
    meta = root.sub("metadata")
    if meta.body.get("deletionTimestamp"):
        return None
    namespace = meta.string("namespace", DEFAULT_NAMESPACE) or DEFAULT_NAMESPACE
    return _PodDecl(namespace, meta.string("name", "") or "", meta.string_map("labels"), "", False, {})


# ---------------------------------------------------------------------------------------------
# Declarations -> table


def _service_key_for_host(host: str, namespace: str) -> str:
    """`mocka`, `mocka.default`, `mocka.default.svc[.cluster.local]` -> `default/mocka`."""
    parts = host.split(":")[0].lower().split(".")
    if len(parts) == 1:
        return f"{namespace}/{parts[0]}"
    return f"{parts[1]}/{parts[0]}"


def _chain(group: SwimLaneGroup, lane: Lane, service_key: str) -> tuple[str, ...]:
    """The lanes tried after `lane` for this service: its own chain, else the group's fallback target."""
    if not group.permissive:
        return ()
    chain = lane.fallback_chains.get(service_key) or lane.fallback_chains.get(ALL_SERVICES)
    if chain is not None:
        return chain
    fallback = group.fallback_for(service_key)
    return (fallback,) if fallback is not None and fallback != lane.name else ()


def _cluster_name(service: Service, lane: str | None) -> str:
    return f"outbound|{service.port}|{lane or ''}|{service.fqdn}"


def _host_names(service: Service, local_namespace: str) -> list[bytes]:
    """The names a client calls the service by, without a port."""
    names = [service.fqdn, f"{service.name}.{service.namespace}.svc", f"{service.name}.{service.namespace}"]
    if service.namespace == local_namespace:
        names.append(service.name)
    return [name.encode() for name in names]


def build_table(documents: Iterable[ConfigDocument], *, version: str, namespace: str = DEFAULT_NAMESPACE,
                lenient: bool = False) -> RouteTable:
    """Validate every document and build the complete table, or raise ConfigInvalidError with all problems.

    `namespace` is the namespace the proxy runs in: short host names (`mockb`) resolve there.
    """
    return build(documents, version=version, namespace=namespace, lenient=lenient).table


_SWIMLANE_KINDS = ("ASMSwimLaneGroup", "ASMSwimLane", "LaneEndpoints")


@dataclass(frozen=True, slots=True)
class Declared:
    """What one document declares, before any other document is read. Never mutated by a build."""

    kind: str
    groups: tuple[_GroupDecl, ...] = ()
    lanes: tuple[_LaneDecl, ...] = ()
    services: tuple[_ServiceDecl, ...] = ()
    pods: tuple[_PodDecl, ...] = ()
    slices: tuple[_SliceDecl, ...] = ()


def declare(doc: ConfigDocument, problems: _Problems, unknown: list[ConfigProblem]) -> Declared | None:
    """One document's declarations, its problems into `problems` and its unknown fields into `unknown`.

    None: a kind laneproxy does not read (the caller says so in a notice).
    """
    api, kind = doc.body.get("apiVersion"), doc.body.get("kind")
    schema = DOCUMENT_SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is not None and isinstance(kind, str):
        name = (doc.body.get("metadata") or {}).get("name") if isinstance(doc.body.get("metadata"), dict) else None
        prefix = f"{kind}({name})" if isinstance(name, str) and kind != "LaneEndpoints" else kind
        _unknown_fields(schema, doc.body, doc.source, prefix, unknown)
    if kind in ("ASMSwimLaneGroup", "ASMSwimLane") and api != SWIMLANE_API:
        problems.add(doc.source, f"{kind}.apiVersion", f"expected {SWIMLANE_API}, got {api!r}")
        return Declared(str(kind))
    if kind == "ASMSwimLaneGroup":
        group = _group_decl(doc, problems)
        return Declared(kind, groups=(group,) if group is not None else ())
    if kind == "ASMSwimLane":
        lane = _lane_decl(doc, problems)
        return Declared(kind, lanes=(lane,) if lane is not None else ())
    if kind == "LaneEndpoints":
        if api != ENDPOINTS_API:
            problems.add(doc.source, "LaneEndpoints.apiVersion", f"expected {ENDPOINTS_API}, got {api!r}")
        return Declared(kind, services=tuple(_endpoints_decls(doc, problems)))
    if kind == "Service" and api == "v1":
        decl = _kube_service_decl(doc, problems)
        return Declared(kind, services=(decl,) if decl is not None else ())
    if kind == "Pod" and api == "v1":
        pod = _pod_decl(doc, problems)
        return Declared(kind, pods=(pod,) if pod is not None else ())
    if kind == "PartialObjectMetadata" and api == "meta.k8s.io/v1":
        pod = _pod_metadata_decl(doc, problems)
        return Declared("Pod", pods=(pod,) if pod is not None else ())
    if kind == "EndpointSlice" and api in ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"):
        endpoint_slice = _slice_decl(doc, problems)
        return Declared(kind, slices=(endpoint_slice,) if endpoint_slice is not None else ())
    return None


def _copy_service(decl: _ServiceDecl) -> _ServiceDecl:
    """A declaration a merge may extend, leaving the document's own untouched."""
    ports = [_PortDecl(p.name, p.port, p.target, list(p.endpoints), p.protocol) for p in decl.ports]
    return _ServiceDecl(decl.source, decl.namespace, decl.name, ports, decl.selector, decl.kube, decl.cluster_ip,
                        decl.external_name)


def build(documents: Iterable[ConfigDocument], *, version: str, namespace: str = DEFAULT_NAMESPACE,
          lenient: bool = False, sources: Iterable[str] = ()) -> Built:
    """build_table, also returning the warnings and notices; raises ConfigInvalidError with every problem.

    Unknown fields are problems, or warnings when `lenient`. `sources` names every input file, so a file
    holding no documents at all gets its notice too.
    """
    problems = _Problems()
    unknown: list[ConfigProblem] = []
    notices: list[ConfigProblem] = []
    read_kinds: dict[str, set[str]] = {source: set() for source in sources}
    ignored: dict[str, list[tuple[str, str]]] = {}
    groups: list[_GroupDecl] = []
    lanes: list[_LaneDecl] = []
    services: dict[str, _ServiceDecl] = {}
    pods: list[_PodDecl] = []
    slices: list[_SliceDecl] = []
    declared: list[tuple[ConfigDocument, Declared]] = []
    for doc in documents:
        api, kind = doc.body.get("apiVersion"), doc.body.get("kind")
        if isinstance(kind, str) and kind in DOCUMENT_SCHEMAS:
            read_kinds.get(doc.source, set()).add(kind)
        found = declare(doc, problems, unknown)
        if found is None:
            # Gateway, VirtualService, Deployment, Rollout... may share a file with ours; they are not ours to read.
            metadata = doc.body.get("metadata")
            name = metadata.get("name") if isinstance(metadata, dict) else None
            ignored.setdefault(doc.source, []).append((f"{kind}({name})" if name else str(kind), f"{api} {kind}"))
            continue
        declared.append((doc, found))
        groups.extend(found.groups)
        lanes.extend(found.lanes)
        for decl in found.services:
            _merge_service(services, _copy_service(decl), problems)
        pods.extend(found.pods)
        slices.extend(found.slices)
    for source in {**read_kinds, **ignored}:
        if source in read_kinds and not read_kinds[source] & set(_SWIMLANE_KINDS):
            listed = "; ignored: " + ", ".join(what for what, _ in ignored.get(source, ())) if source in ignored else ""
            notices.append(ConfigProblem(source, "file", "no swimlane objects (ASMSwimLaneGroup, ASMSwimLane, "
                                                         f"LaneEndpoints){listed}"))
            continue
        for what, kind_name in ignored.get(source, ()):
            notices.append(ConfigProblem(source, what, f"ignored: laneproxy does not read {kind_name}"))
    _attach_endpoints(services, pods, slices)
    parts = Parts(declared)
    table = _assemble(groups, lanes, services, problems, version=version, namespace=namespace, parts=parts)
    errors = problems.items if lenient else unknown + problems.items
    if errors:
        raise ConfigInvalidError(errors)
    return Built(table, tuple(unknown) if lenient else (), tuple(notices), parts=parts)


def build_skipping(documents: Iterable[ConfigDocument], *, version: str, namespace: str = DEFAULT_NAMESPACE,
                   lenient: bool = False, sources: Iterable[str] = (),
                   last_good: Mapping[str, tuple[ConfigDocument, ...]] | None = None, drop: bool = True) -> Built:
    """build, leaving out every input with a problem instead of rejecting the whole update.

    One bad object must not freeze every other update: an input (a document's `source`) with a problem is
    replaced by its entry in `last_good` when there is one (the version of it the running table was built
    from: a bad edit changes nothing), else left out; then the rest is built again, so an input that only
    failed because of it (a lane whose group was left out) is left out in turn, saying why. A last good
    version that fails too is left out as well. Without `drop` nothing is left out: where there is no last
    good version to keep, ConfigInvalidError is raised, as it is for a problem that belongs to no input.
    `Built.skipped` says which inputs did not make it as they are, with the problems of their current
    version, and `Built.kept_last_good` which of them are in the table at their last good version.
    """
    kept = list(documents)
    substitutes = dict(last_good or {})
    skipped: dict[str, list[ConfigProblem]] = {}
    at_last_good: set[str] = set()
    while True:
        try:
            built = build(kept, version=version, namespace=namespace, lenient=lenient, sources=sources)
        except ConfigInvalidError as exc:
            present = {doc.source for doc in kept}
            culprits = {problem.source for problem in exc.problems} & present
            if not culprits or any(problem.source not in present for problem in exc.problems):
                raise
            replaced: list[ConfigDocument] = []
            for source in sorted(culprits):
                substitute = substitutes.pop(source, None)
                if substitute is None and not drop:
                    raise  # nothing sound is left to serve for it
                if source not in skipped:  # the problems of what the user wrote, not of the older version
                    skipped[source] = [p for p in exc.problems if p.source == source]
                if substitute is None:
                    at_last_good.discard(source)
                else:
                    at_last_good.add(source)
                    replaced.extend(substitute)
            kept = [doc for doc in kept if doc.source not in culprits] + replaced
            continue
        return Built(built.table, built.warnings, built.notices,
                     MappingProxyType({source: tuple(problems) for source, problems in sorted(skipped.items())}),
                     frozenset(at_last_good), built.parts)


def _merge_service(services: dict[str, _ServiceDecl], decl: _ServiceDecl, problems: _Problems) -> None:
    """A Kubernetes Service defines the ports; addresses a LaneEndpoints file lists join its first port, and
    the protocol the file names (an operator's override) replaces that port's. Two files naming two protocols
    for one service is a problem."""
    key = f"{decl.namespace}/{decl.name}"
    existing = services.get(key)
    if existing is None:
        services[key] = decl
        return
    kube, listed = (decl, existing) if decl.kube else (existing, decl)
    said, first = listed.ports[0].protocol, kube.ports[0]
    if not kube.kube and said is not None and first.protocol is not None and first.protocol is not said:
        problems.add(listed.source, f"LaneEndpoints.services.{key}.protocol",
                     f"{said.value} here, {first.protocol.value} in {kube.source}")
    if said is not None:
        first.protocol = said
    if decl.kube:
        decl.ports[0].endpoints.extend(existing.ports[0].endpoints)
        services[key] = decl
    else:
        existing.ports[0].endpoints.extend(decl.ports[0].endpoints)


def _attach_endpoints(services: dict[str, _ServiceDecl], pods: list[_PodDecl], slices: list[_SliceDecl]) -> None:
    """Each port's endpoints: from the Service's EndpointSlices where it has any, else from its pods.

    EndpointSlices are what kube-proxy reads (ready endpoints; with none ready, the serving ones that are
    terminating). A cluster without the EndpointSlice controller (or a file of Pods) has none: then the
    ready pods the selector picks, a named target port resolved per pod.
    """
    labels_of = {(pod.namespace, pod.name): pod.labels for pod in pods}
    slices_of: dict[str, list[_SliceDecl]] = {}
    for endpoint_slice in slices:
        slices_of.setdefault(f"{endpoint_slice.namespace}/{endpoint_slice.service}", []).append(endpoint_slice)
    # The pods carrying each label, in input order: a selector's candidates without reading every pod per service.
    with_label: dict[tuple[str, str, str], list[_PodDecl]] = {}
    for pod in pods:
        for name, value in pod.labels.items():
            with_label.setdefault((pod.namespace, name, value), []).append(pod)
    for key, decl in services.items():
        candidates: Iterable[_PodDecl] = ()
        if decl.selector:
            name, value = min(decl.selector.items())
            candidates = with_label.get((decl.namespace, name, value), ())
        _attach_key_endpoints(decl, slices_of.get(key, ()), candidates, labels_of)


def _attach_key_endpoints(decl: _ServiceDecl, slices: Iterable[_SliceDecl], pods: Iterable[_PodDecl],
                          labels_of: Mapping[tuple[str, str], Mapping[str, str]]) -> None:
    """One service's endpoints (see _attach_endpoints); `pods` may hold more pods than the selector picks."""
    slices = list(slices)
    if decl.external_name:
        # No endpoints of its own: the name it stands for, as a client resolving it would reach it.
        for port in decl.ports:
            port.endpoints.append(Endpoint(decl.external_name, port.port))
    elif slices:
        for port in decl.ports:
            candidates = [(endpoint, endpoint_slice.ports[port.name]) for endpoint_slice in slices
                          if port.name in endpoint_slice.ports for endpoint in endpoint_slice.endpoints]
            chosen = [item for item in candidates if item[0].ready]
            if not chosen:
                chosen = [item for item in candidates if item[0].serving and item[0].terminating]
            for endpoint, number in chosen:
                labels = labels_of.get((decl.namespace, endpoint.pod or ""), {})
                port.endpoints.append(Endpoint(endpoint.ip, number, MappingProxyType(dict(labels))))
    elif decl.selector:
        for pod in pods:
            if not pod.ready or pod.namespace != decl.namespace:
                continue
            if not all(pod.labels.get(k) == v for k, v in decl.selector.items()):
                continue
            for port in decl.ports:
                target = port.target
                pod_port: int | None = pod.ports.get(target) if isinstance(target, str) else target
                if pod_port:
                    port.endpoints.append(Endpoint(pod.ip, int(pod_port), MappingProxyType(dict(pod.labels))))


def _assemble(
    group_decls: list[_GroupDecl],
    lane_decls: list[_LaneDecl],
    service_decls: dict[str, _ServiceDecl],
    problems: _Problems,
    *,
    version: str,
    namespace: str,
    parts: Parts | None = None,
) -> RouteTable:
    known_groups = {g.name for g in group_decls}
    lane_names: dict[str, _LaneDecl] = {}
    for lane in lane_decls:
        if lane.name in lane_names:
            problems.add(lane.source, f"ASMSwimLane({lane.name}).metadata.name", "duplicate lane name")
        lane_names[lane.name] = lane
        if lane.group is not None and lane.group not in known_groups:
            problems.add(lane.source, f"ASMSwimLane({lane.name}).metadata.labels.{GROUP_LABEL}",
                         f"no ASMSwimLaneGroup named {lane.group!r}")

    # Every service a group names exists, even with no endpoints yet: requests to it get 503, not 404.
    for group in group_decls:
        for key in group.services:
            if key not in service_decls:
                service_decls[key] = _placeholder(group.source, key)
    by_port = {key: _port_services(d) for key, d in sorted(service_decls.items())}
    services = {key: ports[0] for key, ports in by_port.items()}

    groups: dict[str, SwimLaneGroup] = {}
    group_of_service: dict[str, str] = {}
    rules: list[IngressRule] = []
    for decl in group_decls:
        prefix = f"ASMSwimLaneGroup({decl.name})"
        if decl.name in groups:
            problems.add(decl.source, f"{prefix}.metadata.name", "duplicate group name")
            continue
        for key in decl.services:
            if group_of_service.setdefault(key, decl.name) != decl.name:
                problems.add(decl.source, f"{prefix}.spec.services", f"{key} already belongs to group {group_of_service[key]!r}")
        members = [lane for lane in lane_decls if lane.group == decl.name]
        member_names = {lane.name for lane in members}
        if decl.fallback_target and decl.fallback_target not in member_names:
            problems.add(decl.source, decl.fallback_path, f"unknown lane {decl.fallback_target!r} (lanes: {_names(member_names)})")
        for key, target in decl.service_fallback.items():
            if "/" not in key:
                problems.add(decl.source, f"{decl.service_fallback_path}.{key}", "keys are namespace/name")
            elif key not in decl.services:
                problems.add(decl.source, f"{decl.service_fallback_path}.{key}", "not a service of this group")
            if target not in member_names:
                problems.add(decl.source, f"{decl.service_fallback_path}.{key}", f"unknown lane {target!r} (lanes: {_names(member_names)})")
        lanes = {}
        for lane in members:
            lane_prefix = f"ASMSwimLane({lane.name})"
            lane_rules = []
            for _path, rule_name, host, rule_hosts, match, dest_path in lane.rules:
                key = _service_key_for_host(host, namespace)
                if key not in decl.services:
                    problems.add(lane.source, dest_path, f"{host!r} is not a service of group {decl.name!r}")
                lane_rules.append(IngressRule(lane.name, rule_name, rule_hosts, match, key))
            weight_destination = None
            if lane.weight_host:
                weight_destination = _service_key_for_host(lane.weight_host, namespace)
                if weight_destination not in decl.services:
                    problems.add(lane.source, f"{lane_prefix}.spec.ingressWeight.destination.host",
                                 f"{lane.weight_host!r} is not a service of group {decl.name!r}")
            elif lane_rules:
                weight_destination = lane_rules[0].destination
            if decl.strategy is RoutingStrategy.WEIGHTED and lane.weight > 0 and weight_destination is None:
                problems.add(lane.source, f"{lane_prefix}.spec.ingressWeight.destination.host",
                             "required for a weighted lane (or give the lane an ingress rule)")
            _check_chains(lane, decl, member_names, problems)
            lanes[lane.name] = Lane(
                name=lane.name,
                group=decl.name,
                label_selector=MappingProxyType(lane.label_selector),
                declared_services=frozenset(lane.services),
                ingress_rules=tuple(lane_rules),
                weight=lane.weight,
                weight_destination=weight_destination,
                fallback_chains=MappingProxyType(dict(lane.fallback_chains)),
                spill_below=lane.spill_below,
                document=lane.body,
            )
            rules.extend(lane_rules)
        if decl.strategy is RoutingStrategy.WEIGHTED and not any(lane.weight for lane in lanes.values()):
            problems.add(decl.source, f"{prefix}.spec.ingress.ingressRouting.ingressRoutingStrategy",
                         "weighted routing needs at least one lane with ingressWeight.weight > 0")
        # ASM reads the fallback targets in permissive mode only: a strict group has no baseline to fall back to.
        groups[decl.name] = SwimLaneGroup(
            name=decl.name,
            services=frozenset(decl.services),
            lanes=MappingProxyType(lanes),
            strategy=decl.strategy,
            weighted_hosts=decl.weighted_hosts,
            weighted_matches=decl.weighted_matches,
            permissive=decl.permissive,
            fallback_target=decl.fallback_target if decl.permissive else None,
            service_fallback=MappingProxyType(dict(decl.service_fallback) if decl.permissive else {}),
            route_header=decl.route_header,
            trace_header=decl.trace_header,
            auto_update=decl.auto_update,
            document=decl.body,
        )

    routes: dict[str, ServiceRoutes] = {}
    hosts: dict[bytes, ServiceRoutes] = {}
    other_ports: list[ServiceRoutes] = []
    for key, ports in by_port.items():
        service_decl = service_decls[key]
        per_port, names = _key_routes(service_decl, ports, groups.get(group_of_service.get(key, "")), namespace)
        routes[key] = per_port[0]
        other_ports.extend(per_port[1:])
        for name, service_routes in names.items():
            hosts.setdefault(name, service_routes)
        if parts is not None:
            parts.keys[key] = KeyRoutes(tuple(per_port), names)
    if parts is not None:
        parts.group_of_service = group_of_service
    return RouteTable(
        version=version,
        services=MappingProxyType(services),
        groups=MappingProxyType(groups),
        routes=MappingProxyType(routes),
        hosts=MappingProxyType(hosts),
        ingress_rules=tuple(rules),
        other_ports=tuple(other_ports),
    )


def _placeholder(source: str, key: str) -> _ServiceDecl:
    """A service a group names that nothing declares: it exists, with no endpoints (503, not 404)."""
    ns, _, name = key.partition("/")
    return _ServiceDecl(source, ns, name, [_PortDecl("", DEFAULT_SERVICE_PORT, None, [])], None)


def _port_services(decl: _ServiceDecl) -> list[Service]:
    """One Service per port: each port has its own endpoints (its own target port) and its own clusters."""
    return [Service(decl.namespace, decl.name, p.port, _unique(p.endpoints), p.protocol or UpstreamProtocol.AUTO,
                    port_name=p.name, cluster_ip=decl.cluster_ip, external_name=decl.external_name,
                    first_port=index == 0)
            for index, p in enumerate(decl.ports)]


@dataclass(frozen=True, slots=True)
class KeyRoutes:
    """One service's share of a table: its routes per port (the first is its primary port's) and its host names."""

    per_port: tuple[ServiceRoutes, ...]
    hosts: Mapping[bytes, ServiceRoutes]  # in the order a build offers them to the table's host index


@dataclass(slots=True)
class Parts:
    """How a built table was put together, for an update that replaces only what changed (core.incremental)."""

    declared: list[tuple[ConfigDocument, Declared]] = field(default_factory=list)
    keys: dict[str, KeyRoutes] = field(default_factory=dict)
    group_of_service: dict[str, str] = field(default_factory=dict)


def _key_routes(decl: _ServiceDecl, ports: list[Service], group: SwimLaneGroup | None,
                namespace: str) -> tuple[list[ServiceRoutes], dict[bytes, ServiceRoutes]]:
    """One service's routes per port, and the names it offers the host index (the table keeps the first offer)."""
    # Only a group's services are taken over; any other Service answers as it does without laneproxy.
    passthrough = group is None and decl.kube
    per_port = [_service_routes(service, group, passthrough) for service in ports]
    hosts: dict[bytes, ServiceRoutes] = {}
    # A name without a port is port 80 if the service has it, else its primary port.
    bare = next((r for r in per_port if r.service.port == 80), per_port[0])
    names = _host_names(ports[0], namespace)
    for name in names:
        hosts.setdefault(name, bare)
    for service_routes in per_port:
        for name in names:
            hosts.setdefault(b"%s:%d" % (name, service_routes.service.port), service_routes)
        if decl.cluster_ip:
            # A client that calls the ClusterIP (Host: ip:port, or the captured original destination).
            hosts.setdefault(b"%s:%d" % (decl.cluster_ip.encode(), service_routes.service.port), service_routes)
    if decl.cluster_ip:
        hosts.setdefault(decl.cluster_ip.encode(), bare)
    return per_port, hosts


def _check_chains(lane: _LaneDecl, group: _GroupDecl, member_names: set[str], problems: _Problems) -> None:
    """A chain names other lanes of the lane's group, each once, for services of the group, in permissive mode."""
    where = lane.fallback_chain_path
    if lane.fallback_chains and not group.permissive:
        problems.add(lane.source, where, f"group {group.name!r} is strict (isPermissive: false): lanes never fall back")
    for service, chain in lane.fallback_chains.items():
        if service != ALL_SERVICES and service not in group.services:
            problems.add(lane.source, where, f"{service} is not a service of group {group.name!r}")
        shown = " -> ".join((lane.name, *chain))
        for target in chain:
            if target not in member_names:
                problems.add(lane.source, where, f"unknown lane {target!r} in {shown} (lanes: {_names(member_names)})")
        if lane.name in chain or len(set(chain)) != len(chain):
            problems.add(lane.source, where, f"cycle in {shown}: a chain names each lane once, never its own")


def _unique(endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
    """Endpoints by address, sorted; where an address is declared twice the first labels win."""
    first: dict[tuple[str, int], Endpoint] = {}
    for endpoint in endpoints:
        first.setdefault((endpoint.host, endpoint.port), endpoint)
    return tuple(first[address] for address in sorted(first))


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _service_routes(service: Service, group: SwimLaneGroup | None, passthrough: bool = False) -> ServiceRoutes:
    """Precompute the route for every lane of the service's group, fallback included."""
    if group is None:
        default = Route(service.key, None, None, _cluster_name(service, None), service.endpoints,
                        protocol=service.protocol)
        return ServiceRoutes(service, None, MappingProxyType({}), default, passthrough)
    members: dict[str, tuple[Endpoint, ...]] = {}
    for lane in group.lanes.values():
        selected = tuple(e for e in service.endpoints if e.has_labels(lane.label_selector))
        in_lane = service.key in lane.declared_services or (group.auto_update and bool(selected))
        members[lane.name] = selected if in_lane else ()
    by_lane: dict[bytes, Route] = {}
    for lane in group.lanes.values():
        chain = _chain(group, lane, service.key)
        # The first lane of the chain with endpoints serves; with none, the last one (and its 503).
        used = next((name for name in (lane.name, *chain) if members.get(name)), chain[-1] if chain else lane.name)
        by_lane[lane.name.encode()] = Route(service.key, lane.name, used, _cluster_name(service, used),
                                            members.get(used, ()), chain, service.protocol)
    base = group.fallback_target
    if base is not None and base.encode() in by_lane:
        default = by_lane[base.encode()]
    else:
        default = Route(service.key, None, None, _cluster_name(service, None), (), protocol=service.protocol)
    return ServiceRoutes(service, group, MappingProxyType(by_lane), default)
