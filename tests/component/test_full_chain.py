"""The seed scenario end to end: gateway, five app+sidecar pairs and the mock apps as real processes."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest

BASE_CHAIN = "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v1, ip: 127.0.0.1)"
CANARY_CHAIN = "mocka(version: v2, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v2, ip: 127.0.0.1)"


def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-asm-prefer-tag": "base", "my-request-id": "10001"}, BASE_CHAIN),
        ({"x-asm-prefer-tag": "canary", "my-request-id": "10002"}, CANARY_CHAIN),
        ({"my-request-id": "10003"}, BASE_CHAIN),
        ({"x-asm-prefer-tag": "nightly", "my-request-id": "10004"}, BASE_CHAIN),
        # The gateway gives a request without a trace id one, so the sidecars can restore its lane.
        ({"x-asm-prefer-tag": "canary"}, CANARY_CHAIN),
    ],
    ids=["base", "canary-falls-back-for-mockb-only", "no-tag", "unknown-tag", "canary-without-trace-id-gets-one"],
)
def test_seed_requests_take_the_chain_their_lane_implies(demo_cluster, headers, expected):
    status, body = get(demo_cluster.gateway_url + "/mock", headers)
    assert (status, body) == (200, expected)


def test_request_outside_the_ingress_rules_gets_envoy_no_route_404(demo_cluster):
    with pytest.raises(urllib.error.HTTPError) as caught:
        get(demo_cluster.gateway_url + "/elsewhere", {"x-asm-prefer-tag": "canary"})
    assert caught.value.code == 404


async def test_a_thousand_concurrent_requests_never_leak_between_lanes(demo_cluster):
    lanes = ["canary", "base", None]
    count = 1200

    async def one(session: aiohttp.ClientSession, index: int) -> tuple[str | None, int, str]:
        lane = lanes[index % len(lanes)]
        headers = {"my-request-id": f"load-{index}"}
        if lane:
            headers["x-asm-prefer-tag"] = lane
        async with session.get(demo_cluster.gateway_url + "/mock", headers=headers) as response:
            return lane, response.status, await response.text()

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        results = await asyncio.gather(*(one(session, index) for index in range(count)))
    wrong = [(lane, status, body) for lane, status, body in results
             if (status, body) != (200, CANARY_CHAIN if lane == "canary" else BASE_CHAIN)]
    assert not wrong, f"{len(wrong)} of {count} requests left their lane, e.g. {wrong[:3]}"
    per_lane = {lane: sum(1 for r in results if r[0] == lane) for lane in lanes}
    assert per_lane == {"canary": 400, "base": 400, None: 400}


def test_every_sidecar_restores_the_lane_from_the_trace_table(demo_cluster):
    """mocka v2 forwards only my-request-id; its sidecar's trace table must have supplied the lane."""
    get(demo_cluster.gateway_url + "/mock", {"x-asm-prefer-tag": "canary", "my-request-id": "trace-check"})
    canary_mocka = next(p for p in demo_cluster.pods if p.app == "mocka" and p.lane == "canary")
    with urllib.request.urlopen(f"http://127.0.0.1:{canary_mocka.admin_port}/stats") as response:
        stats = dict(line.split(": ") for line in response.read().decode().splitlines())
    assert int(stats["laneproxy.trace_table.hits"]) >= 1
    assert int(stats["laneproxy.lane_source.trace-table"]) >= 1


def test_gateway_admin_lanes_shows_fallback_of_canary_mockb(demo_cluster):
    with urllib.request.urlopen(demo_cluster.gateway_admin_url + "/lanes") as response:
        lanes = json.load(response)
    mockb_canary = lanes["services"]["default/mockb"]["lanes"]["canary"]
    assert (mockb_canary["lane_used"], mockb_canary["fallback"]) == ("base", True)
    assert lanes["services"]["default/mockc"]["lanes"]["canary"]["fallback"] is False
