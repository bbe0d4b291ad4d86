"""The seed scenario's manifests as fresh Python objects, and small builders for variants of them.

Owns reading config/swimlanes.yaml and config/endpoints.example.yaml (once) and handing out deep
copies, so every test case edits its own documents. It never builds expectations: tests spell
those out literally, so a change in build.py cannot silently change what is asserted.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from laneproxy.core.build import ConfigDocument, build_table
from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.model import RouteTable

ROOT = Path(__file__).resolve().parents[2]
SWIMLANES = "config/swimlanes.yaml"
ENDPOINTS = "config/endpoints.example.yaml"
SEED_SOURCES = {"group": SWIMLANES, "base": SWIMLANES, "canary": SWIMLANES, "endpoints": ENDPOINTS}
DELETE = object()  # an `edit` value that removes the field


@cache
def seed_text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


@cache
def _seed_parsed() -> dict[str, dict[str, Any]]:
    group, base, canary = yaml.safe_load_all(seed_text(SWIMLANES))
    (endpoints,) = yaml.safe_load_all(seed_text(ENDPOINTS))
    return {"group": group, "base": base, "canary": canary, "endpoints": endpoints}


def seed_bodies() -> dict[str, dict[str, Any]]:
    """Fresh copies of the seed documents by role: group, base, canary (lanes) and endpoints."""
    return copy.deepcopy(_seed_parsed())


def documents(bodies: Mapping[str, Mapping[str, Any]]) -> list[ConfigDocument]:
    """Documents named by role; seed roles keep their file names, any other role `x` comes from `x.yaml`."""
    return [ConfigDocument(SEED_SOURCES.get(role, f"{role}.yaml"), body) for role, body in bodies.items()]


def build(bodies: Mapping[str, Mapping[str, Any]], *, namespace: str = "default") -> RouteTable:
    return build_table(documents(bodies), version="test", namespace=namespace)


def problems(docs: Iterable[ConfigDocument]) -> list[str]:
    """Every problem build_table reports for `docs`, as the user reads them; [] if the table builds."""
    try:
        build_table(docs, version="test", namespace="default")
    except ConfigInvalidError as exc:
        return [str(problem) for problem in exc.problems]
    return []


def edit(body: dict[str, Any], path: str, value: Any) -> None:
    """Set (or with DELETE remove) a field by dotted path; numeric parts index lists, `spec.ingressRules.0.name`."""
    *parents, last = path.split(".")
    node: Any = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value


def lane_body(
    name: str,
    *,
    group: str = "rollout",
    tag: str | None = None,
    services: Iterable[str] = (),
    rules: Iterable[dict[str, Any]] = (),
    weight: int | None = None,
    weight_host: str | None = None,
) -> dict[str, Any]:
    """An ASMSwimLane selecting pods labelled ASM_TRAFFIC_TAG=<tag or name>; services as `name` (namespace default)."""
    spec: dict[str, Any] = {
        "labelSelector": {"ASM_TRAFFIC_TAG": tag or name},
        "services": [{"name": service, "namespace": "default"} for service in services],
        "ingressRules": list(rules),
    }
    if weight is not None or weight_host is not None:
        spec["ingressWeight"] = {"weight": weight, "destination": {"host": weight_host} if weight_host else {}}
    return {
        "apiVersion": "istio.alibabacloud.com/v1",
        "kind": "ASMSwimLane",
        "metadata": {"name": name, "labels": {"swimlane-group": group}},
        "spec": spec,
    }


def rule_body(
    name: str,
    *,
    hosts: Iterable[str] = ("*",),
    uri: Mapping[str, str] | None = None,
    headers: Mapping[str, Mapping[str, str]] | None = None,
    destination: str = "mocka.default.svc.cluster.local",
    online: bool = True,
) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if uri is not None:
        match["uri"] = dict(uri)
    if headers is not None:
        match["headers"] = {key: dict(value) for key, value in headers.items()}
    return {"name": name, "hosts": list(hosts), "match": match, "online": online,
            "route": {"destination": {"host": destination}}}


def endpoints_body(services: Mapping[str, Mapping[str, list[str]]], *, port: int = 8000) -> dict[str, Any]:
    """A LaneEndpoints document: {"default/mocka": {"base": ["10.0.0.1:80"]}} with one port for all."""
    return {
        "apiVersion": "laneproxy.dev/v1",
        "kind": "LaneEndpoints",
        "services": {key: {"port": port, "lanes": {tag: list(addresses) for tag, addresses in lanes.items()}}
                     for key, lanes in services.items()},
    }
