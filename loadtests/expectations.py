"""The load test's oracle: which chain each lane must produce right now, and the verdict on one response.

Owns two inputs that are deliberately independent of each other:

- the *deployment truth*, an expectations document: the call chain's services in order and the
  version the pods of each service run in each lane (the pods' `version` and `ASM_TRAFFIC_TAG`
  labels). For the demo, `run.py` writes it from the processes it started.
- the *routing state*, `/lanes` documents from the proxies' admin: for each service and lane, whose
  endpoints a hop goes to at the moment (the lane's own, or the fallback lane's).

The expected version of a hop is `versions[service][lane_used]`. An address -> version map would
have been the obvious alternative, and it is wrong for this purpose: it takes the membership under
test as the oracle, so a canary endpoint pointed at a base pod would make the oracle expect v1 and the
leak would pass unseen. Here `/lanes` only says *which lane* a hop resolves to; *what that lane
runs* comes from outside the routing configuration.

Membership may change during a run. Every proxy swaps its table independently, so during a reload
each hop is decided by either the old or the new table. `MembershipHistory` keeps the observed states
with their poll times; a response is checked against the states observed from the last poll before
it started to the first poll after it finished. When one state covers that window (the steady case)
the check is exact; across a change each hop may take the version of either state, and nothing else.

Pure: no locust, no gevent, no sockets, no clock; times are passed in.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

# The user lanes of the load test and the route-header value each sends (None: no header).
DEFAULT_TAGS: Mapping[str, str | None] = {"base": "base", "canary": "canary", "untagged": None}
DEFAULT_ROUTE_HEADER = "x-asm-prefer-tag"
DEFAULT_TRACE_HEADER = "my-request-id"

# One expected version per hop of the chain; None: no pod of that lane is known, so any answer leaks.
ExpectedChain = tuple["str | None", ...]

_HOP = re.compile(r"([A-Za-z0-9_.-]+)\(version: ([^,()]*), ip: [^()]*\)")


class LaneLeak(Exception):
    """A response from a version its lane does not imply. locust reports failures by repr()."""

    def __repr__(self) -> str:
        return f"lane leak: {self.args[0]}"

    __str__ = __repr__


class BadResponse(Exception):
    """A response that is not a chain at all: a non-200 status, an unreadable body, a wrong service."""

    def __repr__(self) -> str:
        return f"bad response: {self.args[0]}"

    __str__ = __repr__


class MembershipError(ValueError):
    """A `/lanes` document or an expectations document the oracle cannot use."""


@dataclass(frozen=True)
class Expectations:
    """The deployment truth: the chain's services in call order and the version per (service, lane)."""

    chain: tuple[str, ...]
    versions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    lane_versions: Mapping[str, str] = field(default_factory=dict)
    path: str = "/mock"
    tags: Mapping[str, str | None] = field(default_factory=lambda: dict(DEFAULT_TAGS))

    @classmethod
    def from_document(cls, document: Mapping) -> Expectations:
        chain = document.get("chain")
        if not chain or not all(isinstance(s, str) and "/" in s for s in chain):
            raise MembershipError("expectations: `chain` must list services as namespace/name, in call order")
        versions = document.get("versions", {})
        lane_versions = document.get("lane_versions", {})
        if not isinstance(versions, Mapping) or not all(isinstance(v, Mapping) for v in versions.values()):
            raise MembershipError("expectations: `versions` must map service -> {lane: version}")
        if not isinstance(lane_versions, Mapping):
            raise MembershipError("expectations: `lane_versions` must map lane -> version")
        tags = dict(document.get("tags", DEFAULT_TAGS))
        return cls(tuple(chain), {s: dict(v) for s, v in versions.items()}, dict(lane_versions),
                   document.get("path", "/mock"), tags)

    @classmethod
    def load(cls, path: str | Path) -> Expectations:
        return cls.from_document(json.loads(Path(path).read_text()))

    def to_document(self) -> dict:
        return {"path": self.path, "chain": list(self.chain),
                "versions": {service: dict(lanes) for service, lanes in self.versions.items()},
                "lane_versions": dict(self.lane_versions), "tags": dict(self.tags)}

    def version(self, service: str, lane: str | None) -> str | None:
        if lane is None:
            return None
        own = self.versions.get(service, {})
        return own.get(lane, self.lane_versions.get(lane))

    def apps(self) -> tuple[str, ...]:
        return tuple(service.rsplit("/", 1)[-1] for service in self.chain)


def request_lane(lanes: Mapping, expectations: Expectations, tag: str | None) -> str | None:
    """The lane the gateway puts a request with this route-header value in, as its group defines it."""
    entry = _service(lanes, expectations.chain[0])
    group = lanes.get("groups", {}).get(entry.get("group")) if entry.get("group") else None
    if group is None:
        return None
    if tag is not None and tag in group.get("lanes", ()):
        return tag
    return group.get("fallback_target")


def expected_chain(lanes: Mapping, expectations: Expectations, tag: str | None) -> ExpectedChain:
    """Per hop, the version of the pods whose lane the hop resolves to under this `/lanes` document."""
    lane = request_lane(lanes, expectations, tag)
    versions = []
    for service in expectations.chain:
        routes = _service(lanes, service)
        route = (routes.get("lanes", {}).get(lane) if lane is not None else None) or routes.get("default")
        if not route:
            raise MembershipError(f"/lanes has no route for {service}")
        versions.append(expectations.version(service, route.get("lane_used")))
    return tuple(versions)


def expected_chains(lanes: Mapping, expectations: Expectations) -> dict[str, ExpectedChain]:
    """The expected chain of every user lane under one `/lanes` document."""
    return {name: expected_chain(lanes, expectations, tag) for name, tag in expectations.tags.items()}


def _service(lanes: Mapping, service: str) -> Mapping:
    try:
        return lanes["services"][service]
    except (KeyError, TypeError):
        raise MembershipError(f"/lanes has no service {service}") from None


def headers_of(lanes: Mapping, expectations: Expectations) -> tuple[str, str]:
    """(route header, trace header) of the group the chain's entry service belongs to."""
    entry = _service(lanes, expectations.chain[0])
    group = lanes.get("groups", {}).get(entry.get("group") or "", {})
    return group.get("route_header") or DEFAULT_ROUTE_HEADER, group.get("trace_header") or DEFAULT_TRACE_HEADER


def parse_chain(body: str) -> tuple[tuple[str, str], ...]:
    """`a(version: v2, ip: x)-> b(version: v1, ip: y)` -> (("a", "v2"), ("b", "v1")); BadResponse if unreadable."""
    hops = []
    for text in body.strip().split("-> "):
        match = _HOP.fullmatch(text.strip())
        if match is None:
            raise BadResponse(f"unreadable hop {text.strip()[:60]!r}")
        hops.append((match.group(1), match.group(2)))
    return tuple(hops)


def format_chain(apps: Iterable[str], versions: Iterable) -> str:
    """`mocka v2 -> mockb v1|v2 -> mockc v2`; a hop with a set of versions shows them joined by `|`."""
    parts = []
    for app, version in zip(apps, versions):
        if isinstance(version, (set, frozenset)):
            version = "|".join(sorted("(none)" if v is None else v for v in version))
        parts.append(f"{app} {'(none)' if version is None else version}")
    return " -> ".join(parts)


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str  # "ok", "leak" or "error"
    observed: str  # the chain as `format_chain` writes it; empty when unreadable
    failure: Exception | None = None


def judge(expectations: Expectations, status: int, body: str, accepted: tuple[frozenset, ...]) -> Verdict:
    """The verdict on one response given the versions each hop may have (see `MembershipHistory.accepted`)."""
    if status != 200:
        first_line = (body or "").strip().splitlines()[0][:80] if (body or "").strip() else ""
        return Verdict("error", "", BadResponse(f"HTTP {status} {first_line}".rstrip()))
    try:
        hops = parse_chain(body or "")
    except BadResponse as exc:
        return Verdict("error", "", exc)
    apps = tuple(app for app, _ in hops)
    observed = format_chain(apps, (version for _, version in hops))
    if apps != expectations.apps():
        wanted = " -> ".join(expectations.apps())
        return Verdict("error", observed, BadResponse(f"chain {' -> '.join(apps)} is not {wanted}"))
    if all(version in allowed for (_, version), allowed in zip(hops, accepted)):
        return Verdict("ok", observed)
    expected = format_chain(apps, (next(iter(a)) if len(a) == 1 else a for a in accepted))
    return Verdict("leak", observed, LaneLeak(f"expected {expected}, got {observed}"))


@dataclass(frozen=True, slots=True)
class Observation:
    """One poll of every membership source: when it began and ended, and per lane the chains seen."""

    begun: float
    ended: float
    chains: Mapping[str, frozenset[ExpectedChain]]


@dataclass(frozen=True, slots=True)
class Accepted:
    hops: tuple[frozenset, ...]  # per hop, the versions the window allows
    states: int  # distinct expected chains in the window: 1 means the check was exact
    complete: bool  # whether a poll that began after the response (plus grace) is in the window


class MembershipHistory:
    """The membership states observed over time, for checking a response against its own time window.

    `grace` widens every window on both sides, for sources that do not include every proxy (only the
    gateway's admin of a real cluster): a sidecar may hold a state up to `grace` seconds before or
    after the polled proxies do. With every proxy polled it is 0 and the check is as exact as the
    poll interval allows.
    """

    def __init__(self, grace: float = 0.0, keep: float = 300.0) -> None:
        self.grace = grace
        self.keep = keep
        self._observations: list[Observation] = []
        self._begun: list[float] = []
        self._ended: list[float] = []

    def __len__(self) -> int:
        return len(self._observations)

    @property
    def latest(self) -> Observation | None:
        return self._observations[-1] if self._observations else None

    def record(self, begun: float, ended: float, states: Iterable[Mapping[str, ExpectedChain]]) -> bool:
        """Add one poll (one state per source that answered); True if the set of chains changed."""
        chains: dict[str, set] = {}
        for state in states:
            for lane, chain in state.items():
                chains.setdefault(lane, set()).add(chain)
        observation = Observation(begun, ended, {lane: frozenset(c) for lane, c in chains.items()})
        previous = self.latest
        self._observations.append(observation)
        self._begun.append(begun)
        self._ended.append(ended)
        stale = bisect.bisect_left(self._ended, ended - self.keep) - 1
        if stale > 64:  # trim in batches; a window never reaches back further than `keep`
            del self._observations[:stale], self._begun[:stale], self._ended[:stale]
        return previous is None or previous.chains != observation.chains

    def accepted(self, lane: str, started: float, finished: float) -> Accepted:
        """Per hop, the versions any state observed in [last poll ended before start, first poll begun after end]."""
        if not self._observations:
            raise MembershipError("no membership observed yet")
        low = bisect.bisect_right(self._ended, started - self.grace) - 1
        high = bisect.bisect_left(self._begun, finished + self.grace)
        complete = high < len(self._observations)
        window = [self._observations[i] for i in range(max(low, 0), min(high, len(self._observations) - 1) + 1)]
        chains = set().union(*(o.chains.get(lane, ()) for o in window))
        if not chains:
            raise MembershipError(f"no membership observed for lane {lane}")
        hops = tuple(frozenset(chain[i] for chain in chains) for i in range(len(next(iter(chains)))))
        return Accepted(hops, len(chains), complete)
