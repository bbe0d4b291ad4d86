"""The sidecar's view of the controller's xDS resources, and the RouteTable it makes of them.

Owns the meaning of the resources the controller serves (the contract in README, "The xDS contract"):
whole-service `Cluster`s with laneproxy's metadata, their `ClusterLoadAssignment`s, and the
`SwimLaneGroup` resource holding the swimlane API objects. It checks each resource (a typed
XdsResourceError naming the resource and the field), turns the state into the documents a direct source
reads (a Service with EndpointSlices and Pods for each service, or a LaneEndpoints entry for a service a
file declared; the group's ASMSwimLaneGroup and ASMSwimLane objects as they are), and builds the table
with core/build.py (the one validation of the swimlane objects, the one route computation). An update of a
few services goes through core/incremental.py: the new table shares every other object with the old one.

An update is all or nothing: a response that does not decode or build leaves the view and its table as
they were (the caller NACKs it). It never touches protobuf, sockets or clocks: the caller hands it plain
values (decoded Structs, addresses, labels) and publishes what it returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from laneproxy.core.build import Built, ConfigDocument, build
from laneproxy.core.errors import ConfigInvalidError, ConfigProblem, LaneProxyError
from laneproxy.core.headers import TRAFFIC_TAG_LABEL
from laneproxy.core.incremental import IncrementalTable
from laneproxy.core.model import UpstreamProtocol

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ASSIGNMENT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
GROUP_TYPE = "type.googleapis.com/laneproxy.v1.SwimLaneGroup"
TYPE_NAMES = {CLUSTER_TYPE: "Cluster", ASSIGNMENT_TYPE: "ClusterLoadAssignment", GROUP_TYPE: "SwimLaneGroup"}

# outbound|PORT|LANE|FQDN, FQDN = name.namespace.svc.cluster.local (Istio's names)
_CLUSTER_NAME = re.compile(r"^outbound\|(\d{1,5})\|([^|]*)\|([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                           r"\.svc\.cluster\.local$")
_SOURCE_PREFIX = "xds:"


class XdsAddressError(LaneProxyError):
    """`--source xds://...` that does not name HOST:PORT addresses."""


def parse_source(text: str) -> tuple[str, ...]:
    """`xds://HOST:PORT[,HOST:PORT...]` -> the addresses, in order; raises XdsAddressError."""
    if not text.startswith("xds://"):
        raise XdsAddressError(f"expected xds://HOST:PORT[,HOST:PORT...], got {text!r}")
    addresses = []
    for item in text[len("xds://"):].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise XdsAddressError(f"expected HOST:PORT in {text!r}, got {item!r}")
        addresses.append(f"{host}:{int(port)}")
    return tuple(addresses)


class XdsResourceError(ConfigInvalidError):
    """A resource the controller sent that this sidecar cannot apply: each problem names the resource and field."""


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One whole-service Cluster (`outbound|PORT||FQDN`): a port of a service, as its laneproxy metadata says."""

    cluster: str
    namespace: str
    name: str
    port: int
    port_name: str
    protocol: UpstreamProtocol
    cluster_ip: str | None
    external_name: str | None
    first_port: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class AssignedEndpoint:
    host: str
    port: int
    labels: Mapping[str, str]


def parse_cluster_name(name: str) -> tuple[int, str, str, str] | None:
    """(port, lane or "", service name, namespace) of an Istio outbound cluster name; None if it is not one."""
    found = _CLUSTER_NAME.match(name)
    if found is None or not 0 < int(found.group(1)) < 65536:
        return None
    return int(found.group(1)), found.group(2), found.group(3), found.group(5)


def is_service_cluster(name: str) -> bool:
    """A whole-service cluster (no lane): the sidecar subscribes to its assignment."""
    parsed = parse_cluster_name(name)
    return parsed is not None and parsed[1] == ""


class _Checker:
    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.problems: list[ConfigProblem] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append(ConfigProblem(self.resource, path, reason))

    def raise_if_any(self) -> None:
        if self.problems:
            raise XdsResourceError(self.problems)


def _integral(value: Any) -> int | None:
    """A Struct's number (a float on the wire) as an int, if it is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return int(value)


def decode_cluster(name: str, laneproxy: Mapping[str, Any] | None) -> ServicePort | None:
    """A Cluster's laneproxy metadata checked against its name; None for a lane's cluster (its lane comes
    from the labels of the whole service's endpoints). Raises XdsResourceError naming the field."""
    check = _Checker(f"Cluster({name})")
    parsed = parse_cluster_name(name)
    if parsed is None:
        check.fail("name", "expected outbound|PORT|LANE|NAME.NAMESPACE.svc.cluster.local")
        check.raise_if_any()
    assert parsed is not None
    port, lane, service_name, namespace = parsed
    where = "metadata.filter_metadata.laneproxy"
    if not isinstance(laneproxy, Mapping):
        check.fail(where, "required: the laneproxy metadata of the cluster")
        check.raise_if_any()
    assert laneproxy is not None
    if laneproxy.get("lane", "") != lane:
        check.fail(f"{where}.lane", f"{laneproxy.get('lane')!r} differs from the name's lane {lane!r}")
    service = laneproxy.get("service")
    if not isinstance(service, Mapping):
        check.fail(f"{where}.service", "required: a mapping")
        check.raise_if_any()
    assert isinstance(service, Mapping)
    where = f"{where}.service"
    for field_name, expected in (("namespace", namespace), ("name", service_name)):
        if service.get(field_name) != expected:
            check.fail(f"{where}.{field_name}", f"{service.get(field_name)!r} differs from the name's {expected!r}")
    if _integral(service.get("port")) != port:
        check.fail(f"{where}.port", f"{service.get('port')!r} differs from the name's port {port}")
    port_name = service.get("port_name", "")
    if not isinstance(port_name, str):
        check.fail(f"{where}.port_name", f"expected a string, got {port_name!r}")
    protocol_text = service.get("protocol")
    protocol = UpstreamProtocol.AUTO
    try:
        protocol = UpstreamProtocol(protocol_text)
    except ValueError:
        check.fail(f"{where}.protocol", f"expected http1, http2 or auto, got {protocol_text!r}")
    texts: dict[str, str | None] = {}
    for field_name in ("cluster_ip", "external_name"):
        value = service.get(field_name)
        if value is not None and (not isinstance(value, str) or not value):
            check.fail(f"{where}.{field_name}", f"expected a string or null, got {value!r}")
            value = None
        texts[field_name] = value
    first_port = service.get("first_port", True)
    if not isinstance(first_port, bool):
        check.fail(f"{where}.first_port", f"expected true or false, got {first_port!r}")
    check.raise_if_any()
    if lane:
        return None
    return ServicePort(name, namespace, service_name, port, str(port_name), protocol, texts["cluster_ip"],
                       texts["external_name"], bool(first_port))


def decode_assignment(name: str, endpoints: Iterable[tuple[Any, Any, Any]]) -> tuple[AssignedEndpoint, ...]:
    """A ClusterLoadAssignment's endpoints as (address, port, laneproxy metadata or None), checked."""
    check = _Checker(f"ClusterLoadAssignment({name})")
    found = []
    for index, (address, port, metadata) in enumerate(endpoints):
        where = f"endpoints[0].lb_endpoints[{index}]"
        if not isinstance(address, str) or not address:
            check.fail(f"{where}.endpoint.address.socket_address.address", f"expected an address, got {address!r}")
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            check.fail(f"{where}.endpoint.address.socket_address.port_value", f"expected 1 to 65535, got {port!r}")
            continue
        labels: Any = {}
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                check.fail(f"{where}.metadata.filter_metadata.laneproxy", "expected a mapping")
                continue
            labels = metadata.get("labels", {})
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in labels.items()):
            check.fail(f"{where}.metadata.filter_metadata.laneproxy.labels", "expected a mapping of strings to strings")
            continue
        found.append(AssignedEndpoint(address, port, dict(labels)))
    check.raise_if_any()
    return tuple(found)


def decode_group(name: str, fields: Any) -> tuple[ConfigDocument, ...]:
    """A SwimLaneGroup resource (its Struct as a dict) as the ASMSwimLaneGroup and ASMSwimLane documents it
    carries; their fields are build.py's to check."""
    check = _Checker(f"SwimLaneGroup({name})")
    source = f"{_SOURCE_PREFIX}SwimLaneGroup/{name}"
    if not isinstance(fields, Mapping):
        check.fail("", "expected a Struct")
        check.raise_if_any()
    group = fields.get("group")
    if not isinstance(group, Mapping) or group.get("kind") != "ASMSwimLaneGroup":
        check.fail("group", "required: the ASMSwimLaneGroup object")
    elif not isinstance(group.get("metadata"), Mapping) or group["metadata"].get("name") != name:
        check.fail("group.metadata.name", f"expected the resource's name {name!r}")
    lanes = fields.get("lanes", [])
    if not isinstance(lanes, list):
        check.fail("lanes", "expected a list of ASMSwimLane objects")
        lanes = []
    for index, lane in enumerate(lanes):
        if not isinstance(lane, Mapping) or lane.get("kind") != "ASMSwimLane":
            check.fail(f"lanes[{index}]", "expected an ASMSwimLane object")
    check.raise_if_any()
    return tuple(ConfigDocument(source, _plain(body)) for body in (group, *lanes))


def _plain(value: Any) -> Any:
    """A Struct's value with whole numbers as ints (a Struct has only doubles; the schema wants integers)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- documents of one service ----------------------------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def service_documents(ports: Sequence[ServicePort],
                      endpoints: Mapping[str, Sequence[AssignedEndpoint]]) -> tuple[ConfigDocument, ...]:
    """The documents a direct source would have read for one service: the table build.py makes of them has
    this service's ports, protocols, ClusterIP, ExternalName and endpoints (with their labels).

    A service a LaneEndpoints file declared (one unnamed port, no ClusterIP, every endpoint in one lane by
    its ASM_TRAFFIC_TAG) becomes a LaneEndpoints entry, so it is not passed through as a Kubernetes Service
    of no group would be; anything else a Service with an EndpointSlice per target port and a Pod per
    endpoint carrying its labels. `ports`: the first port first.
    """
    first = ports[0]
    key, source = first.key, f"{_SOURCE_PREFIX}{first.key}"
    check = _Checker(f"Cluster({first.cluster})")
    for port in ports[1:]:
        if port.protocol is UpstreamProtocol.HTTP1:
            check.fail("metadata.filter_metadata.laneproxy.service.protocol",
                       f"http1 on port {port.port}: only a Service's first port can be http1 (a LaneEndpoints override)")
    check.raise_if_any()
    first_endpoints = endpoints.get(first.cluster, ())
    file_like = (len(ports) == 1 and not first.port_name and first.cluster_ip is None and first.external_name is None
                 and all(len(e.labels) == 1 and e.labels.get(TRAFFIC_TAG_LABEL) for e in first_endpoints))
    if file_like:
        lanes: dict[str, list[str]] = {}
        for endpoint in first_endpoints:
            lanes.setdefault(endpoint.labels[TRAFFIC_TAG_LABEL], []).append(_address(endpoint.host, endpoint.port))
        body = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
                "services": {key: {"port": first.port, "protocol": first.protocol.value, "lanes": lanes}}}
        return (ConfigDocument(source, body),)
    spec: dict[str, Any] = {"ports": [
        {"name": port.port_name, "port": port.port, "protocol": "TCP",
         # appProtocol decides alone in select_protocol: h2c is http2, http is the downstream's protocol.
         "appProtocol": "kubernetes.io/h2c" if port.protocol is UpstreamProtocol.HTTP2 else "http"}
        for port in ports]}
    if first.cluster_ip is not None:
        spec["clusterIP"] = first.cluster_ip
    if first.external_name is not None:
        spec["type"], spec["externalName"] = "ExternalName", first.external_name
    documents = [ConfigDocument(source, {"apiVersion": "v1", "kind": "Service",
                                         "metadata": {"namespace": first.namespace, "name": first.name}, "spec": spec})]
    if first.protocol is UpstreamProtocol.HTTP1:  # an operator's override in a LaneEndpoints file
        documents.append(ConfigDocument(source, {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
                                                 "services": {key: {"port": first.port, "protocol": "http1"}}}))
    if first.external_name is not None:
        return tuple(documents)  # its endpoint is the name it stands for, which build.py adds itself
    pods: list[ConfigDocument] = []
    for index, port in enumerate(ports):
        by_number: dict[int, list[dict[str, Any]]] = {}
        for number, endpoint in enumerate(endpoints.get(port.cluster, ())):
            entry: dict[str, Any] = {"addresses": [endpoint.host], "conditions": {"ready": True}}
            if endpoint.labels:
                # A Service's name has no dots, so these Pod names are the namespace's own.
                pod = f"{first.name}.{index}.{number}"
                entry["targetRef"] = {"kind": "Pod", "name": pod}
                pods.append(ConfigDocument(source, {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": first.namespace, "name": pod, "labels": dict(endpoint.labels)},
                    "status": {"podIP": endpoint.host}}))
            by_number.setdefault(endpoint.port, []).append(entry)
        for number, entries in sorted(by_number.items()):
            documents.append(ConfigDocument(source, {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": first.namespace, "name": f"{first.name}-{port.port}-{number}",
                             "labels": {"kubernetes.io/service-name": first.name}},
                "addressType": "IPv4", "ports": [{"name": port.port_name, "port": number, "protocol": "TCP"}],
                "endpoints": entries}))
    return (*documents, *pods)


def _drop(index: dict[str, set[str]], key: str, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.discard(name)
        if not names:
            del index[key]


# -- the view --------------------------------------------------------------------------------------


def _rank(source: str) -> tuple[int, str]:
    """Groups first (by name), then services (by key): the order the full build lists them in."""
    return (0 if source.startswith(f"{_SOURCE_PREFIX}SwimLaneGroup/") else 1, source)


@dataclass(frozen=True, slots=True)
class Update:
    """One response's changes of one type: name -> decoded resource, and the names removed."""

    type_url: str
    changed: Mapping[str, Any]
    removed: frozenset[str] = frozenset()


class XdsView:
    """Every resource received, the documents made of them and the table built from those; one owner calls
    `apply` serially. `incremental_updates` and `full_builds` count how each table was made."""

    def __init__(self, *, namespace: str, lenient: bool = False) -> None:
        self.namespace, self.lenient = namespace, lenient
        self.ports: dict[str, ServicePort] = {}  # whole-service cluster name -> port
        self.lane_clusters: set[str] = set()
        self.assignments: dict[str, tuple[AssignedEndpoint, ...]] = {}
        self.groups: dict[str, tuple[ConfigDocument, ...]] = {}
        self.documents: dict[str, tuple[ConfigDocument, ...]] = {}  # by source: one per service, one per group
        self._ports_of: dict[str, set[str]] = {}  # service key -> its whole-service cluster names
        self._incremental: IncrementalTable | None = None
        self.built: Built | None = None
        self.incremental_updates = 0
        self.full_builds = 0

    @property
    def service_clusters(self) -> frozenset[str]:
        return frozenset(self.ports)

    def missing_assignments(self) -> frozenset[str]:
        """Whole-service clusters whose assignment has not arrived yet."""
        return frozenset(name for name in self.ports if name not in self.assignments)

    def apply(self, update: Update, *, version: str, build_table: bool = True) -> Built | None:
        """The table with `update` applied; raises XdsResourceError (or build's ConfigInvalidError) and changes
        nothing when it cannot be applied. Costs time in proportion to the update, not to the view.

        Without `build_table` (the responses of a first snapshot) the update is only checked and kept, None
        returned, and `rebuild` makes the table once they are all in: one full build, not one per response.
        Groups are then checked by a build of every group on its own, which is what a full build finds wrong
        with them (services a group names need not exist)."""
        # What the update changes, as overlays on the view's mappings (None: removed); committed once it built.
        ports: dict[str, ServicePort | None] = {}
        assignments: dict[str, tuple[AssignedEndpoint, ...] | None] = {}
        groups: dict[str, tuple[ConfigDocument, ...] | None] = {}
        lanes_added: set[str] = set()
        affected: set[str] = set()  # service keys, and SwimLaneGroup/NAME
        if update.type_url == CLUSTER_TYPE:
            for name in (*update.removed, *update.changed):
                old = self.ports.get(name)
                if old is not None:
                    affected.add(old.key)
                    ports[name] = None
            for name, port in update.changed.items():
                if port is None:
                    lanes_added.add(name)
                else:
                    ports[name] = port
                    affected.add(port.key)
        elif update.type_url == ASSIGNMENT_TYPE:
            unknown = sorted(name for name in update.changed if name not in self.ports)
            if unknown:
                raise XdsResourceError([ConfigProblem(f"ClusterLoadAssignment({name})", "cluster_name",
                                                      "no such whole-service Cluster was received") for name in unknown])
            for name in update.removed:
                if name in self.assignments:
                    assignments[name] = None
                    if name in self.ports:
                        affected.add(self.ports[name].key)
            for name, endpoints in update.changed.items():
                assignments[name] = endpoints
                affected.add(self.ports[name].key)
        elif update.type_url == GROUP_TYPE:
            for name in update.removed:
                if name in self.groups:
                    groups[name] = None
                    affected.add(f"SwimLaneGroup/{name}")
            for name, documents in update.changed.items():
                groups[name] = documents
                affected.add(f"SwimLaneGroup/{name}")
        else:
            raise XdsResourceError([ConfigProblem(update.type_url, "type_url", "not a type this sidecar subscribes to")])
        new_ports_of: dict[str, set[str]] = {}
        for name, port in ports.items():
            if port is not None:
                new_ports_of.setdefault(port.key, set()).add(name)
        changes: dict[str, tuple[ConfigDocument, ...]] = {}
        for item in sorted(affected):
            if item.startswith("SwimLaneGroup/"):
                name = item.partition("/")[2]
                changes[f"{_SOURCE_PREFIX}{item}"] = (groups[name] if name in groups else self.groups.get(name)) or ()
                continue
            names = self._ports_of.get(item, set()) | new_ports_of.get(item, set())
            key_ports = [port for port in (ports[n] if n in ports else self.ports.get(n) for n in names) if port is not None]
            key_ports.sort(key=lambda p: (not p.first_port, p.port))
            endpoints = {port.cluster: found for port in key_ports
                         if (found := assignments[port.cluster] if port.cluster in assignments
                             else self.assignments.get(port.cluster)) is not None}
            changes[f"{_SOURCE_PREFIX}{item}"] = service_documents(key_ports, endpoints) if key_ports else ()
        built: Built | None = None
        if build_table:
            built = self._build(changes, version)
        else:
            if update.type_url == GROUP_TYPE:
                every = {**self.groups, **groups}
                build([doc for name in sorted(every) for doc in every[name] or ()], version=version,
                      namespace=self.namespace, lenient=self.lenient)
            self._incremental = None  # the documents move on without it: the next table is a full build
        for name, port in ports.items():  # commit
            old = self.ports.pop(name, None)
            if old is not None:
                _drop(self._ports_of, old.key, name)
            if port is not None:
                self.ports[name] = port
                self._ports_of.setdefault(port.key, set()).add(name)
            self.lane_clusters.discard(name)
        for name in update.removed if update.type_url == CLUSTER_TYPE else ():
            self.lane_clusters.discard(name)
        self.lane_clusters |= lanes_added
        for name, endpoints in assignments.items():
            if endpoints is None:
                self.assignments.pop(name, None)
            else:
                self.assignments[name] = endpoints
        for name, group_documents in groups.items():
            if group_documents is None:
                self.groups.pop(name, None)
            else:
                self.groups[name] = group_documents
        for source, docs in changes.items():
            if docs:
                self.documents[source] = docs
            else:
                self.documents.pop(source, None)
        if built is not None:
            self.built = built
        return built

    def rebuild(self, version: str) -> Built:
        """The table of everything kept (one full build); raises ConfigInvalidError, keeping what was kept."""
        self._incremental = None
        self.built = self._full(self.documents, version)
        return self.built

    def _build(self, changes: Mapping[str, tuple[ConfigDocument, ...]], version: str) -> Built:
        incremental = self._incremental
        # Many sources at once (a first snapshot): one full build is cheaper than as many incremental steps.
        if incremental is not None and not incremental.spent and len(changes) <= max(64, len(self.documents) // 10):
            built = incremental.apply(changes, version=version)
            if built is not None:
                self.incremental_updates += 1
                return built
        self._incremental = None
        documents = dict(self.documents)
        for source, docs in changes.items():
            if docs:
                documents[source] = docs
            else:
                documents.pop(source, None)
        try:
            built = self._full(documents, version)
        except ConfigInvalidError:
            if incremental is not None and not incremental.spent:
                self._incremental = incremental  # untouched: the full build was a choice, not a fallback
            elif self.built is not None:
                # the indexes were half-updated: rebuild them from what the table was made of
                self._full(self.documents, self.built.table.version)
            raise
        return built

    def _full(self, documents: Mapping[str, tuple[ConfigDocument, ...]], version: str) -> Built:
        ordered = [doc for source in sorted(documents, key=_rank) for doc in documents[source]]
        built = build(ordered, version=version, namespace=self.namespace, lenient=self.lenient)
        self._incremental = IncrementalTable(built, namespace=self.namespace, rank=_rank)
        self.full_builds += 1
        return built
