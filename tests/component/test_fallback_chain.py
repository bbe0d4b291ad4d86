"""Fallback chains and partial-health spill on a real sidecar under load: lane s3 of mockb falls back to s2, then
base, as its endpoints are ejected one by one (each starts answering 503), and comes back as they heal.

Real `laneproxy run` (outbound listener) with passive outlier detection set to eject on the first 5xx
and retries on 503, real origins on 127.0.0.1. Each phase is measured after the ejection (or its
expiry) it waits for, so the lanes observed are the lanes the chain and the spill threshold imply.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml
from proxyrig import ProxyProcess, UpstreamThread, endpoints_file

from laneproxy.core.build import FALLBACK_CHAIN_ANNOTATION, SPILL_BELOW_ANNOTATION

EJECTION_SECONDS = 3.0
CONCURRENCY = 8
BATCH = 240


def swimlanes(path: Path) -> Path:
    group = {"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLaneGroup", "metadata": {"name": "rollout"},
             "spec": {"isPermissive": True, "autoUpdate": True, "services": [{"name": "mockb", "namespace": "default"}],
                      "permissiveModeConfiguration": {"routeHeader": "x-asm-prefer-tag", "fallbackTarget": "base"}}}
    lanes = []
    for name, lane_annotations in (("base", {}), ("s2", {}),
                              ("s3", {FALLBACK_CHAIN_ANNOTATION: "s2 -> base", SPILL_BELOW_ANNOTATION: "0.5"})):
        lanes.append({"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLane",
                      "metadata": {"name": name, "labels": {"swimlane-group": "rollout"}, "annotations": lane_annotations},
                      "spec": {"labelSelector": {"ASM_TRAFFIC_TAG": name}}})
    path.write_text(yaml.safe_dump_all([group, *lanes]))
    return path


class Origin:
    """An endpoint that names its lane in the body, and answers 503 while `failing`."""

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.failing = False
        self.thread = UpstreamThread(respond=self.respond)

    def respond(self, request) -> bytes:
        if self.failing:
            return b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown"
        body = self.lane.encode()
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    @property
    def requests(self) -> int:
        return len(self.thread.received)


class Load:
    """CONCURRENCY keep-alive clients asking mockb for lane s3; every answer's status and lane is counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: Counter[int] = Counter()

    async def batch(self, session: aiohttp.ClientSession, count: int) -> Counter[str]:
        lanes: Counter[str] = Counter()
        queue = iter(range(count))

        async def client() -> None:
            for _ in queue:
                async with session.get(f"http://127.0.0.1:{self.port}/b",
                                       headers={"Host": "mockb", "x-asm-prefer-tag": "s3"}) as response:
                    body = await response.text()
                    self.statuses[response.status] += 1
                    lanes[body if response.status == 200 else f"{response.status} {body}"] += 1

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        return lanes


async def until(predicate, load: Load, session, seconds: float = 15.0) -> None:
    """Keep the load running until `predicate()` holds (an ejection happened, an ejection expired)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "the expected ejection did not happen"
        await load.batch(session, CONCURRENCY)


async def test_ejecting_lane_endpoints_one_by_one_moves_traffic_along_the_chain_and_back_without_a_failed_request(
        tmp_path):
    origins = {"s3": [Origin("s3") for _ in range(4)], "s2": [Origin("s2") for _ in range(2)],
               "base": [Origin("base") for _ in range(2)]}
    every = [origin for lane in origins.values() for origin in lane]
    for origin in every:
        origin.thread.__enter__()
    proxy = None
    try:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {
            "default/mockb": {lane: [origin.thread.port for origin in group] for lane, group in origins.items()}})
        proxy = ProxyProcess(swimlanes(tmp_path / "swimlanes.yaml"), endpoints, outbound=True, extra=(
            "--outlier-consecutive-5xx", "1", "--outlier-ejection-seconds", str(EJECTION_SECONDS),
            "--outlier-max-ejection-percent", "100")).start()
        lanes = json.loads(proxy.admin("/lanes"))
        assert lanes["services"]["default/mockb"]["lanes"]["s3"]["fallback_chain"] == ["s2", "base"]
        assert lanes["groups"]["rollout"]["spill_below"] == {"s3": 0.5}
        load = Load(proxy.outbound_port)
        observed: list[tuple[str, Counter[str]]] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:

            async def phase(label: str) -> Counter[str]:
                seen = await load.batch(session, BATCH)
                observed.append((label, seen))
                print(f"{label:<34} {dict(seen)}")
                return seen

            async def eject(origin: Origin) -> None:
                origin.failing = True
                before = origin.requests
                await until(lambda: origin.requests > before, load, session)  # one 503: ejected, and retried

            async def heal(origin: Origin) -> None:
                origin.failing = False
                # Under load until its ejection expires and a pick takes it again. Load all along keeps the
                # still-failing endpoints' ejections staggered; after an idle spell longer than the ejection
                # they would all return at once, and one request could spend its two retries on them.
                healed_at = time.monotonic() + EJECTION_SECONDS
                before = origin.requests
                await until(lambda: time.monotonic() > healed_at and origin.requests > before, load, session,
                            EJECTION_SECONDS + 15)

            s3, s2 = origins["s3"], origins["s2"]
            assert await phase("s3 healthy") == {"s3": BATCH}
            await eject(s3[0])
            assert await phase("s3 3/4 healthy") == {"s3": BATCH}
            await eject(s3[1])
            assert await phase("s3 2/4 healthy (at spill-below)") == {"s3": BATCH}
            await eject(s3[2])
            spill = await phase("s3 1/4 healthy: half spills")
            assert set(spill) == {"s3", "s2"} and BATCH * 0.3 < spill["s2"] < BATCH * 0.7, spill
            await eject(s3[3])
            assert await phase("s3 ejected: s2") == {"s2": BATCH}
            await eject(s2[0])
            assert await phase("s2 1/2 healthy, no spill: s2") == {"s2": BATCH}
            await eject(s2[1])
            assert await phase("s3, s2 ejected: base") == {"base": BATCH}
            await heal(s2[1])
            assert set(await phase("s2 1/2 back: s2")) == {"s2"}
            await heal(s3[3])
            back = await phase("s3 1/4 back: half spills")
            assert set(back) == {"s3", "s2"} and BATCH * 0.3 < back["s3"] < BATCH * 0.7, back
            await heal(s3[2])
            assert await phase("s3 2/4 back: s3") == {"s3": BATCH}
        stats = proxy.admin("/stats").decode()
        route = json.loads(proxy.admin("/route?host=mockb&header=x-asm-prefer-tag:s3&listener=outbound&random=0.9"))
    finally:
        if proxy is not None:
            proxy.stop()
        for origin in every:
            origin.thread.__exit__(None, None, None)
    print(f"{sum(load.statuses.values())} requests to the client: {dict(load.statuses)}")
    assert set(load.statuses) == {200}, load.statuses
    counters = dict(line.split(": ", 1) for line in stats.splitlines() if line.startswith("laneproxy."))
    assert int(counters["laneproxy.fallback.default/mockb.s3.s2"]) > 0
    assert int(counters["laneproxy.fallback.default/mockb.s3.base"]) >= BATCH
    assert int(counters["laneproxy.spill.default/mockb.s3.s2"]) > 0
    # s3[0] and s3[1] still fail, so /route sees some s3 endpoints ejected and reports the lane's health from them.
    ejected = len(route["route"]["ejected_endpoints"])
    assert route["route"]["fallback_chain"] == ["s2", "base"]
    assert route["health"]["lanes"]["s3"] == {"healthy_fraction": (4 - ejected) / 4, "spill_below": 0.5}
