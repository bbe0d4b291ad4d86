"""A RouteTable as the xDS resources the controller serves: Clusters, ClusterLoadAssignments, SwimLaneGroups.

Owns the names, shapes and versions of those resources (the contract between `laneproxy controller` and
its sidecars, written down in the README's "controller and xDS" section): one `Cluster` and one
`ClusterLoadAssignment` per service port (`outbound|PORT||FQDN`) and per lane of its group
(`outbound|PORT|LANE|FQDN`), EDS clusters save an ExternalName service's (STRICT_DNS, see
cluster_message), and one `laneproxy.v1.SwimLaneGroup` per group (a Struct's wire form
holding the group and lane objects as they were read). A resource's version is a hash of its content,
so every controller replica gives the same resource the same version.

Each resource is encoded once, into the bytes it takes as one `resources` entry of a
DeltaDiscoveryResponse: a response to any number of streams is those bytes appended to its own small
header, never a serialisation of the table per stream. `ResourceEncoder` keeps the encoding of every
`ServiceRoutes` and `SwimLaneGroup` object of the last table, so a table that shares objects with the
previous one (core.incremental) costs the encoding of its new objects only.

Pure: no sockets, no asyncio, no clock; it never reads or edits a published table beyond reading it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2

from laneproxy.core.model import Endpoint, RouteTable, Service, ServiceRoutes, SwimLaneGroup, UpstreamProtocol

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
GROUP_TYPE = "type.googleapis.com/laneproxy.v1.SwimLaneGroup"
KNOWN_TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE, GROUP_TYPE)
SHORT_TYPE_NAMES = MappingProxyType({CLUSTER_TYPE: "cluster", ENDPOINT_TYPE: "cluster_load_assignment",
                                     GROUP_TYPE: "swimlane_group"})
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CONNECT_TIMEOUT_SECONDS = 10
# Annotations that change with every `kubectl apply` and say nothing about lanes: not served on.
_DROPPED_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})


def cluster_name(service: Service, lane: str | None) -> str:
    """Istio's name: `outbound|PORT||FQDN` for the whole service, `outbound|PORT|LANE|FQDN` for one lane."""
    return f"outbound|{service.port}|{lane or ''}|{service.fqdn}"


@dataclass(frozen=True, slots=True)
class EncodedResource:
    """One resource, encoded once: its name, content-hash version, and its bytes as a response entry."""

    type_url: str
    name: str
    version: str
    chunk: bytes  # field 2 (`resources`) of a DeltaDiscoveryResponse, tag and length included

    def resource(self) -> discovery_pb2.Resource:
        """The decoded `Resource` message (for tests and debugging; the server sends `chunk` as it is)."""
        return discovery_pb2.DeltaDiscoveryResponse.FromString(self.chunk).resources[0]


def encode(type_url: str, name: str, message: Any) -> EncodedResource:
    """Pack `message` (a protobuf message of `type_url`'s shape) as a named, versioned resource."""
    value = message.SerializeToString(deterministic=True)  # map order fixed: equal content, equal bytes
    version = hashlib.sha256(value).hexdigest()[:20]
    resource = discovery_pb2.Resource(name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=value))
    chunk = discovery_pb2.DeltaDiscoveryResponse(resources=[resource]).SerializeToString(deterministic=True)
    return EncodedResource(type_url, name, version, chunk)


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _protocol_options(protocol: UpstreamProtocol) -> any_pb2.Any:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    if protocol is UpstreamProtocol.HTTP2:
        options.explicit_http_config.http2_protocol_options.SetInParent()
    elif protocol is UpstreamProtocol.HTTP1:
        options.explicit_http_config.http_protocol_options.SetInParent()
    else:
        options.use_downstream_protocol_config.http_protocol_options.SetInParent()
        options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    packed = any_pb2.Any()
    packed.Pack(options)
    return packed


def service_metadata(service: Service) -> dict[str, Any]:
    """The `laneproxy` metadata's `service`: what a sidecar needs to build the same table from xDS alone."""
    return {"namespace": service.namespace, "name": service.name, "port": service.port,
            "port_name": service.port_name, "protocol": service.protocol.value, "cluster_ip": service.cluster_ip,
            "external_name": service.external_name, "first_port": service.first_port}


def cluster_message(service: Service, group: SwimLaneGroup | None, lane: str | None,
                    endpoints: Iterable[Endpoint] = ()) -> cluster_pb2.Cluster:
    """The cluster: EDS over ADS; for an ExternalName service a STRICT_DNS cluster holding its endpoints
    (`endpoints`) itself, as Istio makes it: Envoy refuses a host name in an EDS assignment, and one such
    assignment would make it refuse every other one sent with it. Its ClusterLoadAssignment is still
    served, by name, to the sidecars that ask for it."""
    name = cluster_name(service, lane)
    cluster = cluster_pb2.Cluster(name=name, lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
                                  connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_SECONDS))
    if service.external_name:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED  # an IPv4 address where the name has one
        cluster.load_assignment.CopyFrom(assignment_message(name, endpoints))
    else:
        cluster.type = cluster_pb2.Cluster.EDS
        eds = cluster.eds_cluster_config
        eds.service_name = name
        eds.eds_config.ads.SetInParent()
        eds.eds_config.resource_api_version = config_source_pb2.V3
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_protocol_options(service.protocol))
    istio: dict[str, Any] = {"services": [{"host": service.fqdn, "name": service.name, "namespace": service.namespace}],
                             "default_original_port": service.port}
    if lane:
        istio["subset"] = lane
    metadata = cluster.metadata.filter_metadata
    metadata["istio"].CopyFrom(_struct(istio))
    metadata["laneproxy"].CopyFrom(_struct({"service": service_metadata(service), "lane": lane or "",
                                            "group": group.name if group is not None else ""}))
    return cluster


def assignment_message(name: str, endpoints: Iterable[Endpoint]) -> endpoint_pb2.ClusterLoadAssignment:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = assignment.endpoints.add()
    for endpoint in endpoints:
        lb_endpoint = locality.lb_endpoints.add(health_status=health_check_pb2.HEALTHY)
        lb_endpoint.endpoint.address.CopyFrom(address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=endpoint.host, port_value=endpoint.port)))
        lb_endpoint.metadata.CopyFrom(base_pb2.Metadata(
            filter_metadata={"laneproxy": _struct({"labels": dict(endpoint.labels)})}))
    return assignment


def lane_endpoints(routes: ServiceRoutes, lane: str) -> tuple[Endpoint, ...]:
    """The lane's own endpoints of the service (never the endpoints of a lane it falls back to)."""
    route = routes.by_lane.get(lane.encode())
    return route.endpoints if route is not None and route.lane_used == lane else ()


def service_resources(routes: ServiceRoutes) -> tuple[tuple[EncodedResource, ...], tuple[EncodedResource, ...]]:
    """(Clusters, ClusterLoadAssignments) of one service port: the whole service's, then each lane's."""
    service, group = routes.service, routes.group
    clusters = [encode(CLUSTER_TYPE, cluster_name(service, None),
                       cluster_message(service, group, None, service.endpoints))]
    assignments = [encode(ENDPOINT_TYPE, cluster_name(service, None),
                          assignment_message(cluster_name(service, None), service.endpoints))]
    if group is not None:
        for lane in sorted(group.lanes):
            name = cluster_name(service, lane)
            endpoints = lane_endpoints(routes, lane)
            clusters.append(encode(CLUSTER_TYPE, name, cluster_message(service, group, lane, endpoints)))
            assignments.append(encode(ENDPOINT_TYPE, name, assignment_message(name, endpoints)))
    return tuple(clusters), tuple(assignments)


def served_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """A swimlane object as the API returns it, less what changes with every write and means nothing to
    lanes (resourceVersion, uid, managedFields, status...): apiVersion, kind, metadata (name, namespace,
    labels, annotations) and spec, as JSON values."""
    metadata = document.get("metadata") or {}
    kept: dict[str, Any] = {"name": metadata.get("name")}
    for key in ("namespace", "labels"):
        if metadata.get(key):
            kept[key] = metadata[key]
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items() if k not in _DROPPED_ANNOTATIONS}
    if annotations:
        kept["annotations"] = annotations
    served = {"apiVersion": document.get("apiVersion"), "kind": document.get("kind"), "metadata": kept,
              "spec": document.get("spec") or {}}
    result: dict[str, Any] = json.loads(json.dumps(served, default=str))  # YAML dates and the like become strings
    return result


def group_message(group: SwimLaneGroup) -> struct_pb2.Struct:
    """The group and its lanes (by name) as a Struct: the wire form of `laneproxy.v1.SwimLaneGroup`."""
    return _struct({"group": served_document(group.document),
                    "lanes": [served_document(group.lanes[name].document) for name in sorted(group.lanes)]})


def group_resource(group: SwimLaneGroup) -> EncodedResource:
    return encode(GROUP_TYPE, group.name, group_message(group))


@dataclass(frozen=True, slots=True)
class Resources:
    """Every resource of one table, by type URL and name, and the table's version."""

    version: str
    by_type: Mapping[str, Mapping[str, EncodedResource]]

    def get(self, type_url: str, name: str) -> EncodedResource | None:
        return self.by_type.get(type_url, {}).get(name)


EMPTY_RESOURCES = Resources("", MappingProxyType({type_url: MappingProxyType({}) for type_url in KNOWN_TYPES}))


def encode_table(table: RouteTable) -> Resources:
    """Every resource of `table`, each encoded afresh."""
    return ResourceEncoder().encode(table)


class ResourceEncoder:
    """Encodes tables one after another, reusing the encoding of every object the previous table shared.

    Objects are matched by identity (a published table is never edited) and kept alive by the cache
    itself, so an identity is never reused by another object while its entry exists.
    """

    __slots__ = ("_services", "_groups")

    def __init__(self) -> None:
        self._services: dict[int, tuple[ServiceRoutes, tuple[EncodedResource, ...], tuple[EncodedResource, ...]]] = {}
        self._groups: dict[int, tuple[SwimLaneGroup, EncodedResource]] = {}

    def encode(self, table: RouteTable) -> Resources:
        services: dict[int, tuple[ServiceRoutes, tuple[EncodedResource, ...], tuple[EncodedResource, ...]]] = {}
        clusters: dict[str, EncodedResource] = {}
        assignments: dict[str, EncodedResource] = {}
        for routes in (*table.routes.values(), *table.other_ports):
            cached = self._services.get(id(routes))
            if cached is None or cached[0] is not routes:
                cached = (routes, *service_resources(routes))
            services[id(routes)] = cached
            for resource in cached[1]:
                clusters[resource.name] = resource
            for resource in cached[2]:
                assignments[resource.name] = resource
        groups: dict[int, tuple[SwimLaneGroup, EncodedResource]] = {}
        group_resources: dict[str, EncodedResource] = {}
        for group in table.groups.values():
            cached_group = self._groups.get(id(group))
            if cached_group is None or cached_group[0] is not group:
                cached_group = (group, group_resource(group))
            groups[id(group)] = cached_group
            group_resources[group.name] = cached_group[1]
        self._services, self._groups = services, groups
        return Resources(table.version, MappingProxyType({
            CLUSTER_TYPE: MappingProxyType(clusters), ENDPOINT_TYPE: MappingProxyType(assignments),
            GROUP_TYPE: MappingProxyType(group_resources)}))


@dataclass(frozen=True, slots=True)
class Change:
    """What one type's resources did between two tables: names added or changed, and names removed."""

    changed: frozenset[str]
    removed: frozenset[str]


def diff(old: Resources, new: Resources) -> dict[str, Change]:
    """Per type URL, the names whose version changed or that appeared, and the names that went away."""
    changes: dict[str, Change] = {}
    for type_url in KNOWN_TYPES:
        before, after = old.by_type.get(type_url, {}), new.by_type.get(type_url, {})
        changed = frozenset(name for name, resource in after.items()
                            if (previous := before.get(name)) is not resource
                            and (previous is None or previous.version != resource.version))
        removed = frozenset(name for name in before if name not in after)
        if changed or removed:
            changes[type_url] = Change(changed, removed)
    return changes
