"""Where did this request go: the hops of requests that asked, as `service:lane-asked>lane-used`.

Owns the opt-in debug trail. The gateway accepts the request header `x-laneproxy-route` only when its
value is the configured token (trusted callers), starts the trail with its own hop and sends `1`
upstream. A sidecar's inbound listener that receives `1` opens a trail under the request's trace id;
its outbound listener adds a hop for each call the app makes in that trace and the hops the next
sidecar answers with; the inbound listener answers with the whole trail and forgets it. Applications
forward only the trace header, so the trail follows the trace, as the lane does, inside one process.

Bounded: at most TRAIL_LIMIT open trails per process (the oldest is dropped) and TRAIL_HOPS hops
in one trail. Never on unless configured; never keyed by anything but
the trace id the mesh already keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from laneproxy.core.model import Route

TRAIL_LIMIT = 1024
TRAIL_HOPS = 32  # hops one trail keeps: what a response header can reasonably carry


def hop(route: Route) -> str:
    """One hop as the header lists it: the service's short name, the lane asked and the lane used."""
    name = route.service.rpartition("/")[2]
    return f"{name}:{route.lane_asked or '-'}>{route.lane_used or '-'}"


class RouteTrails:
    """The open trails of one process, by trace key; shared by its inbound and outbound listeners."""

    __slots__ = ("_trails",)

    def __init__(self) -> None:
        self._trails: dict[bytes, list[str]] = {}

    def __len__(self) -> int:
        return len(self._trails)

    def open(self, key: bytes) -> list[str]:
        trail = self._trails.get(key)
        if trail is None:
            if len(self._trails) >= TRAIL_LIMIT:
                self._trails.pop(next(iter(self._trails)))
            trail = self._trails[key] = []
        return trail

    def get(self, key: bytes) -> list[str] | None:
        return self._trails.get(key)

    def close(self, key: bytes) -> None:
        self._trails.pop(key, None)
