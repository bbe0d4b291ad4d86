"""A Job's sidecar following its own pod: it exits once the app containers have ended.

Owns the one reading of the sidecar's own Pod object (GET, every `interval` seconds) and the rule: when every
container named in `exit_with` has a `terminated` state, the proxy stops, so the Job's pod completes. Before
Kubernetes 1.29 nothing else ends a sidecar in a Job (a native sidecar is stopped by the kubelet itself).
A failed read is logged and tried again: it must never stop the proxy while the app still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from laneproxy.core.errors import LaneProxyError

log = logging.getLogger("laneproxy.own_pod")

GetJson = Callable[[str, Mapping[str, str]], Awaitable[dict]]


def ended(pod: Mapping[str, Any], containers: tuple[str, ...]) -> bool:
    """Every named container has terminated (a container the pod does not report yet has not)."""
    statuses = {status.get("name"): status for status in (pod.get("status") or {}).get("containerStatuses") or []
                if isinstance(status, dict)}
    return bool(containers) and all("terminated" in ((statuses.get(name) or {}).get("state") or {})
                                    for name in containers)


async def exit_when_app_ends(get_json: GetJson, namespace: str, pod_name: str, containers: tuple[str, ...],
                             stop: Callable[[], None], *, interval: float = 2.0) -> None:
    """Poll the pod until `containers` have all ended, then call `stop` once."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod_name}"
    log.info("exiting once containers %s of pod %s/%s have ended", ",".join(containers), namespace, pod_name)
    while True:
        try:
            pod = await get_json(path, {})
        except LaneProxyError as exc:
            log.warning("reading pod %s/%s: %s", namespace, pod_name, exc)
        else:
            if ended(pod, containers):
                log.info("the app containers have ended: stopping")
                stop()
                return
        await asyncio.sleep(interval)
