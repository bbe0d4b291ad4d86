"""Updating a built RouteTable by replacing only what changed (structural sharing).

Owns applying a change of some inputs (the documents of some sources: a file, one Kubernetes object) to
the table built from all of them. Only the services those documents touch are merged, given endpoints and
routed again, with build.py's own functions; the new table shares every other `Service`, `Route` and
`ServiceRoutes` object with the old one (the same objects, by identity), and its groups and ingress
rules are the old table's. An update costs time in proportion to what changed plus one copy of the
table's top-level mappings (a C-level dict copy), not a build of the whole table. The result equals,
field for field, what `build` makes of the same documents (tests/unit/test_incremental.py checks it on
random sequences of changes).

It validates nothing itself and decides nothing about bad input: documents are read by
`build.declare`. Where an update is beyond it (a swimlane group or lane changed, a changed document has a
problem, an unknown field or a kind laneproxy does not read, a source the table was built without is
touched, two declarations of one service disagree) `apply` returns None; the caller then runs the full
build (`build_skipping`, the one place that decides what is left out) and starts again from its result.
It never does I/O, and never edits a published table.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

from laneproxy.core.build import (
    Built,
    ConfigDocument,
    Declared,
    KeyRoutes,
    _attach_key_endpoints,
    _copy_service,
    _key_routes,
    _merge_service,
    _placeholder,
    _PodDecl,
    _port_services,
    _Problems,
    _ServiceDecl,
    _SliceDecl,
    declare,
)
from laneproxy.core.errors import ConfigProblem
from laneproxy.core.model import RouteTable, Service, ServiceRoutes

_SWIMLANE = ("ASMSwimLaneGroup", "ASMSwimLane")

# Where a declaration sits in the input: (the source's rank, the document's index in it, the entry's index).
# Declarations are merged in this order, as a full build meets them in its document list.
Position = tuple[Any, int, int]


def _selector_key(namespace: str, selector: Mapping[str, str] | None) -> tuple[str, str, str] | None:
    """One label a pod must carry to be selected: the index entry that finds a service's candidate pods."""
    if not selector:
        return None
    name, value = min(selector.items())
    return namespace, name, value


class IncrementalTable:
    """The current table with the indexes an update needs; one source owns it and calls `apply` serially.

    `rank(source)` orders sources as the caller's full build lists their documents (a file's place on the
    command line; a Kubernetes object's source name), so declarations of one service merge in that order.
    """

    def __init__(self, built: Built, *, namespace: str, rank: Callable[[str], Any],
                 sources: Iterable[str] = ()) -> None:
        if built.parts is None:
            raise ValueError("a Built without parts (not made by build) cannot be updated incrementally")
        self.namespace, self.rank = namespace, rank
        self.sources = frozenset(sources)  # file sources get notices per file: a change of kinds needs a full build
        self.table: RouteTable = built.table
        self.warnings, self.notices = built.warnings, built.notices
        self.skipped, self.kept_last_good = built.skipped, built.kept_last_good
        self.spent = False  # after an apply that returned None: start again from the full build
        parts = built.parts
        self.group_of_service = dict(parts.group_of_service)
        self.keys: dict[str, KeyRoutes] = dict(parts.keys)
        self.docs: dict[str, list[tuple[ConfigDocument, Declared]]] = {}
        self.services_of: dict[str, dict[Position, _ServiceDecl]] = {}
        self.slices_of: dict[str, dict[Position, _SliceDecl]] = {}
        self.slice_refs: dict[tuple[str, str], set[tuple[str, Position]]] = {}
        self.pods: dict[Position, _PodDecl] = {}
        self.pods_by_label: dict[tuple[str, str, str], set[Position]] = {}
        self.pods_by_name: dict[tuple[str, str], set[Position]] = {}
        self.selected: dict[tuple[str, str, str], set[str]] = {}  # selector index entry -> service keys
        self.selector_of: dict[str, tuple[str, str, str]] = {}
        # Host names offered by two or more services, with every one of them; the others have one offer,
        # the owner of the table's entry.
        self.host_offers: dict[bytes, set[str]] = {}
        for doc, found in parts.declared:
            self.docs.setdefault(doc.source, []).append((doc, found))
        for source, entries in self.docs.items():
            self._add(source, entries, set())
        for key in self.services_of:
            self._index_selector(key)
        for key in sorted(self.keys):
            for name in self.keys[key].hosts:
                owner = self.table.hosts[name].service.key
                if owner != key:
                    self.host_offers.setdefault(name, {owner}).add(key)

    # -- contributions --------------------------------------------------------------------------

    def _add(self, source: str, entries: Sequence[tuple[ConfigDocument, Declared]], affected: set[str], *,
             declared: bool = False) -> None:
        """Index a source's declarations; `affected` gets the services they may change (not those a service
        declaration names, when `declared`: the caller compares those)."""
        rank = self.rank(source)
        for index, (_, found) in enumerate(entries):
            for entry, decl in enumerate(found.services):
                key = f"{decl.namespace}/{decl.name}"
                self.services_of.setdefault(key, {})[(rank, index, entry)] = decl
                if not declared:
                    affected.add(key)
            for entry, endpoint_slice in enumerate(found.slices):
                key = f"{endpoint_slice.namespace}/{endpoint_slice.service}"
                position = (rank, index, entry)
                self.slices_of.setdefault(key, {})[position] = endpoint_slice
                for endpoint in endpoint_slice.endpoints:
                    if endpoint.pod:
                        self.slice_refs.setdefault((endpoint_slice.namespace, endpoint.pod), set()).add((key, position))
                affected.add(key)
            for entry, pod in enumerate(found.pods):
                position = (rank, index, entry)
                self.pods[position] = pod
                for label in pod.labels.items():
                    self.pods_by_label.setdefault((pod.namespace, *label), set()).add(position)
                self.pods_by_name.setdefault((pod.namespace, pod.name), set()).add(position)
                affected.update(self._keys_of_pod(pod))

    def _remove(self, source: str, entries: Sequence[tuple[ConfigDocument, Declared]], affected: set[str], *,
                declared: bool = False) -> None:
        rank = self.rank(source)
        for index, (_, found) in enumerate(entries):
            for entry, decl in enumerate(found.services):
                key = f"{decl.namespace}/{decl.name}"
                _discard(self.services_of, key, (rank, index, entry))
                if not declared:
                    affected.add(key)
            for entry, endpoint_slice in enumerate(found.slices):
                key = f"{endpoint_slice.namespace}/{endpoint_slice.service}"
                position = (rank, index, entry)
                _discard(self.slices_of, key, position)
                for endpoint in endpoint_slice.endpoints:
                    if endpoint.pod:
                        _discard(self.slice_refs, (endpoint_slice.namespace, endpoint.pod), (key, position))
                affected.add(key)
            for entry, pod in enumerate(found.pods):
                position = (rank, index, entry)
                affected.update(self._keys_of_pod(pod))
                del self.pods[position]
                for label in pod.labels.items():
                    _discard(self.pods_by_label, (pod.namespace, *label), position)
                _discard(self.pods_by_name, (pod.namespace, pod.name), position)

    def _keys_of_pod(self, pod: _PodDecl) -> set[str]:
        """Every service whose endpoints this pod may be among: its selector picks it, or a slice names it."""
        keys = {key for label in pod.labels.items() for key in self.selected.get((pod.namespace, *label), ())}
        keys.update(key for key, _ in self.slice_refs.get((pod.namespace, pod.name), ()))
        return keys

    def _index_selector(self, key: str) -> None:
        old = self.selector_of.pop(key, None)
        if old is not None:
            _discard(self.selected, old, key)
        contributions = self.services_of.get(key)
        # A merge keeps the last Kubernetes Service's selector (a LaneEndpoints entry has none).
        kube = [decl for _, decl in sorted(contributions.items()) if decl.kube] if contributions else []
        new = _selector_key(kube[-1].namespace, kube[-1].selector) if kube else None
        if new is not None:
            self.selector_of[key] = new
            self.selected.setdefault(new, set()).add(key)

    # -- one service ----------------------------------------------------------------------------

    def _routes_of(self, key: str) -> KeyRoutes | None | bool:
        """The key's routes now; None: the table has no such service; False: its declarations disagree."""
        contributions = self.services_of.get(key)
        group_name = self.group_of_service.get(key)
        if not contributions:
            if group_name is None:
                return None
            decl = _placeholder("", key)
        else:
            merged: dict[str, _ServiceDecl] = {}
            problems = _Problems()
            for _, contribution in sorted(contributions.items()):
                _merge_service(merged, _copy_service(contribution), problems)
            if problems.items:
                return False
            decl = merged[key]
        slices = [self.slices_of[key][position] for position in sorted(self.slices_of.get(key, ()))]
        labels_of: dict[tuple[str, str], Mapping[str, str]] = {}
        for endpoint_slice in slices:
            for endpoint in endpoint_slice.endpoints:
                named = self.pods_by_name.get((decl.namespace, endpoint.pod or ""))
                if named:  # two pods of one name (two files): the later one's labels, as a full build reads them
                    labels_of[(decl.namespace, endpoint.pod or "")] = self.pods[max(named)].labels
        pods: list[_PodDecl] = []
        selector = _selector_key(decl.namespace, decl.selector)
        if selector is not None and not slices and not decl.external_name:
            pods = [self.pods[position] for position in sorted(self.pods_by_label.get(selector, ()))]
        _attach_key_endpoints(decl, slices, pods, labels_of)
        group = self.table.groups.get(group_name) if group_name is not None else None
        per_port, hosts = _key_routes(decl, _port_services(decl), group, self.namespace)
        return KeyRoutes(tuple(per_port), hosts)

    # -- an update ------------------------------------------------------------------------------

    def apply(self, changes: Mapping[str, Sequence[ConfigDocument]], *, version: str) -> Built | None:
        """The table with `changes` (source -> all its documents now; none: the source is gone) applied.

        None when the update needs the full build (see the module docstring); this object is then spent.
        """
        if self.spent:
            raise RuntimeError("this incremental table is spent: start again from the full build")
        self.spent = True  # until the update is through: a None below leaves the indexes half-updated
        plan = []
        for source, documents in changes.items():
            if source in self.skipped:
                return None
            problems, unknown = _Problems(), list[ConfigProblem]()
            new: list[tuple[ConfigDocument, Declared]] = []
            for doc in documents:
                found = declare(doc, problems, unknown)
                if found is None:
                    return None
                new.append((doc, found))
            if problems.items or unknown:
                return None
            old = self.docs.get(source, [])
            if _swimlane_bodies(old) != _swimlane_bodies(new):
                return None
            if source in self.sources and {found.kind for _, found in old} != {found.kind for _, found in new}:
                return None
            plan.append((source, old, new))
        affected: set[str] = set()
        # A file's LaneEndpoints declares many services: those whose declaration is as it was stay as they are.
        declared = {f"{decl.namespace}/{decl.name}" for _, old, new in plan for _, found in (*old, *new)
                    for decl in found.services}
        before = {key: dict(self.services_of.get(key, {})) for key in declared}
        for source, old, new in plan:
            self._remove(source, old, affected, declared=True)
            self._add(source, new, affected, declared=True)
            if new:
                self.docs[source] = new
            else:
                self.docs.pop(source, None)
        affected.update(key for key in declared if not _same(before[key], self.services_of.get(key, {})))
        for key in affected:
            self._index_selector(key)
        for _source, _old, new in plan:  # a service whose selector changed picks up its pods in its own update
            for _, found in new:
                for pod in found.pods:
                    affected.update(self._keys_of_pod(pod))
        fresh: dict[str, KeyRoutes | None] = {}
        for key in sorted(affected):
            routes = self._routes_of(key)
            if routes is False:
                return None
            fresh[key] = routes  # type: ignore[assignment]
        self.table = self._splice(fresh, version)
        self.spent = False
        return Built(self.table, self.warnings, self.notices, self.skipped, self.kept_last_good)

    def _splice(self, fresh: Mapping[str, KeyRoutes | None], version: str) -> RouteTable:
        old_table = self.table
        # mappingproxy.copy() is the dict's own copy (one C call); dict(proxy) would walk it key by key.
        services = cast("MappingProxyType[str, Service]", old_table.services).copy()
        routes = cast("MappingProxyType[str, ServiceRoutes]", old_table.routes).copy()
        hosts = cast("MappingProxyType[bytes, ServiceRoutes]", old_table.hosts).copy()
        keys_changed = multi_port = False
        offered_before: dict[bytes, set[str]] = {}
        offered_now: dict[bytes, set[str]] = {}
        for key, new in fresh.items():
            old = self.keys.get(key)
            if old is not None:
                multi_port = multi_port or len(old.per_port) > 1
                for name in old.hosts:
                    offered_before.setdefault(name, set()).add(key)
            if new is None:
                keys_changed = keys_changed or old is not None
                services.pop(key, None)
                routes.pop(key, None)
                self.keys.pop(key, None)
                continue
            keys_changed = keys_changed or old is None
            multi_port = multi_port or len(new.per_port) > 1
            for name in new.hosts:
                offered_now.setdefault(name, set()).add(key)
            services[key] = new.per_port[0].service
            routes[key] = new.per_port[0]
            self.keys[key] = new
        for name in offered_before.keys() | offered_now.keys():
            current = hosts.get(name)
            offers = set(self.host_offers.get(name) or ((current.service.key,) if current is not None else ()))
            offers -= offered_before.get(name, set())
            offers |= offered_now.get(name, set())
            if len(offers) > 1:
                self.host_offers[name] = offers
            else:
                self.host_offers.pop(name, None)
            if offers:
                hosts[name] = self.keys[min(offers)].hosts[name]  # a full build keeps the first key's offer
            else:
                hosts.pop(name, None)
        if keys_changed:  # a full build lists services in key order
            services, routes = dict(sorted(services.items())), dict(sorted(routes.items()))
        other_ports: tuple[ServiceRoutes, ...] = old_table.other_ports
        if multi_port:
            other_ports = tuple(extra for key in routes for extra in self.keys[key].per_port[1:])
        return RouteTable(version=version, services=MappingProxyType(services), groups=old_table.groups,
                          routes=MappingProxyType(routes), hosts=MappingProxyType(hosts),
                          ingress_rules=old_table.ingress_rules, other_ports=other_ports)


def _discard(index: dict[Any, Any], key: Any, value: Any) -> None:
    values = index.get(key)
    if values is None:
        return
    if isinstance(values, dict):
        values.pop(value, None)
    else:
        values.discard(value)
    if not values:
        del index[key]


def _same(before: Mapping[Position, _ServiceDecl], after: Mapping[Position, _ServiceDecl]) -> bool:
    """The same declarations, endpoint labels included (an endpoint's equality leaves its labels out)."""
    if before.keys() != after.keys():
        return False
    for position, old in before.items():
        new = after[position]
        if old != new:
            return False
        for old_port, new_port in zip(old.ports, new.ports):
            if any(a.labels != b.labels for a, b in zip(old_port.endpoints, new_port.endpoints)):
                return False
    return True


def _swimlane_bodies(entries: Sequence[tuple[ConfigDocument, Declared]]) -> list[Mapping[str, Any]]:
    return [doc.body for doc, found in entries if found.kind in _SWIMLANE]

