"""Misspelled and unknown fields at every level of ASMSwimLaneGroup, ASMSwimLane and LaneEndpoints.

Owns the table both tiers check: tests/unit/test_schema.py (what `laneproxy validate` says) and
tests/kube/test_crd_schema.py (what the API server says with deploy/crds installed). Each case names the
seed document it spoils, where, how, and the one problem line the validator must print for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from .manifests import ENDPOINTS, SWIMLANES

RENAME = "rename"  # a real typo: the field's value moves to the misspelled key
ADD = "add"  # a field that does not exist anywhere in the schema


@dataclass(frozen=True)
class Typo:
    role: str  # group, base, canary, endpoints (tests/unit/manifests.py)
    parent: tuple[Any, ...]  # keys and list indices from the document's root to the mapping that gets the key
    how: str  # RENAME or ADD
    right: str | None  # the field renamed (RENAME)
    wrong: str
    where: str  # the path the problem names, after the document's name
    reason: str

    def apply(self, body: dict[str, Any]) -> None:
        node: Any = body
        for part in self.parent:
            node = node[part]
        node[self.wrong] = node.pop(self.right) if self.how == RENAME else "x"

    @property
    def line(self) -> str:
        source = ENDPOINTS if self.role == "endpoints" else SWIMLANES
        name = {"group": "ASMSwimLaneGroup(rollout)", "base": "ASMSwimLane(base)", "canary": "ASMSwimLane(canary)",
                "endpoints": "LaneEndpoints"}[self.role]
        return f"{source}: {name}.{self.where}: {self.reason}"


def _typo(role, parent, right, wrong, where, suggestion=None, *, known=None) -> Any:
    reason = f"unknown field (did you mean {suggestion}?)" if suggestion else f"unknown field (known: {known})"
    how = RENAME if right else ADD
    return pytest.param(Typo(role, tuple(parent), how, right, wrong, where, reason), id=f"{role}-{where}")


MATCH_FIELDS = "exact, prefix, regex"
CASES = [
    # ASMSwimLaneGroup, from the top down
    _typo("group", [], "spec", "sepc", "sepc", "spec"),
    _typo("group", ["spec"], "isPermissive", "isPermisive", "spec.isPermisive", "isPermissive"),
    _typo("group", ["spec"], "autoUpdate", "autoupdate", "spec.autoupdate", "autoUpdate"),
    _typo("group", ["spec"], None, "color", "spec.color",
          known="autoUpdate, ingress, isPermissive, permissiveModeConfiguration, services"),
    _typo("group", ["spec", "ingress"], "gateway", "gatway", "spec.ingress.gatway", "gateway"),
    _typo("group", ["spec", "ingress", "gateway"], "namespace", "namepsace", "spec.ingress.gateway.namepsace",
          "namespace"),
    _typo("group", ["spec", "ingress", "ingressRouting"], "ingressRoutingStrategy", "ingressRoutingStrategie",
          "spec.ingress.ingressRouting.ingressRoutingStrategie", "ingressRoutingStrategy"),
    _typo("group", ["spec", "ingress", "ingressRouting", "weightedRoutingRule"], "hosts", "host",
          "spec.ingress.ingressRouting.weightedRoutingRule.host", "hosts"),
    _typo("group", ["spec", "ingress", "ingressRouting", "weightedRoutingRule", "requestMatches", 0], "uri", "url",
          "spec.ingress.ingressRouting.weightedRoutingRule.requestMatches[0].url", "uri"),
    _typo("group", ["spec", "ingress", "ingressRouting", "weightedRoutingRule", "requestMatches", 0, "uri"], "exact",
          "exactly", "spec.ingress.ingressRouting.weightedRoutingRule.requestMatches[0].uri.exactly", "exact"),
    _typo("group", ["spec", "permissiveModeConfiguration"], "traceHeader", "traceHeadr",
          "spec.permissiveModeConfiguration.traceHeadr", "traceHeader"),
    _typo("group", ["spec", "permissiveModeConfiguration"], "fallbackTarget", "fallbacktarget",
          "spec.permissiveModeConfiguration.fallbacktarget", "fallbackTarget"),
    _typo("group", ["spec", "services", 1], "namespace", "namespce", "spec.services[1].namespce", "namespace"),
    _typo("group", ["spec", "services", 0, "cluster"], "id", "ids", "spec.services[0].cluster.ids", "id"),
    # ASMSwimLane
    _typo("canary", [], None, "specs", "specs", "spec"),
    _typo("canary", ["spec"], "labelSelector", "labelSelectors", "spec.labelSelectors", "labelSelector"),
    _typo("canary", ["spec", "ingressRules", 0], "online", "onlin", "spec.ingressRules[0].onlin", "online"),
    _typo("canary", ["spec", "ingressRules", 0], None, "weight", "spec.ingressRules[0].weight",
          known="hosts, match, name, online, route"),
    _typo("canary", ["spec", "ingressRules", 0, "match"], "headers", "header", "spec.ingressRules[0].match.header",
          "headers"),
    _typo("canary", ["spec", "ingressRules", 0, "match", "headers", "x-asm-prefer-tag"], "exact", "exat",
          "spec.ingressRules[0].match.headers.x-asm-prefer-tag.exat", "exact"),
    _typo("canary", ["spec", "ingressRules", 0, "match", "uri"], None, "suffix",
          "spec.ingressRules[0].match.uri.suffix", known=MATCH_FIELDS),
    _typo("canary", ["spec", "ingressRules", 0, "route"], "destination", "destinaton",
          "spec.ingressRules[0].route.destinaton", "destination"),
    _typo("canary", ["spec", "ingressRules", 0, "route", "destination"], "host", "hosts",
          "spec.ingressRules[0].route.destination.hosts", "host"),
    _typo("base", ["spec"], "ingressWeight", "ingresWeight", "spec.ingresWeight", "ingressWeight"),
    _typo("base", ["spec", "ingressWeight", "destination"], None, "hots", "spec.ingressWeight.destination.hots",
          "host"),
    _typo("base", ["spec", "ingressWeight"], None, "wieght", "spec.ingressWeight.wieght", "weight"),
    _typo("base", ["spec", "services", 2, "cluster"], "name", "nmae", "spec.services[2].cluster.nmae", "name"),
    # LaneEndpoints
    _typo("endpoints", [], "services", "service", "service", "services"),
    _typo("endpoints", ["services", "default/mocka"], "port", "ports", "services.default/mocka.ports", "port"),
    _typo("endpoints", ["services", "default/mockc"], "lanes", "lane", "services.default/mockc.lane", "lanes"),
]
