"""Tracing across the demo's full chain: one span per hop, all in one trace, with the lanes on them.

The demo's apps forward only `my-request-id`, never `traceparent`; each sidecar keeps the chain in one
trace by remembering, per trace id, the span of the request its app received (observability.tracing).
Spans are exported by every laneproxy process as JSON lines to a file of its own (`file:...{pid}...`).
"""

from __future__ import annotations

import glob
import json
import time
import urllib.request

import pytest

from laneproxy.demo import DemoCluster


def spans_in(directory) -> list[dict]:
    spans = []
    for path in glob.glob(str(directory / "spans-*.jsonl")):
        with open(path, encoding="utf-8") as lines:
            spans += [json.loads(line) for line in lines if line.strip()]
    return spans


@pytest.fixture(scope="module")
def traced_demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spans")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LANEPROXY_TRACING", f"file:{directory}/spans-{{pid}}.jsonl")
        with DemoCluster(log_level="warning") as cluster:
            yield cluster, directory


def test_the_canary_chain_is_one_trace_with_one_span_per_hop(traced_demo):
    cluster, directory = traced_demo
    request = urllib.request.Request(cluster.gateway_url + "/mock",
                                     headers={"x-asm-prefer-tag": "canary", "my-request-id": "trace-me"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.read().decode().count("->") == 2
    hops = 6  # gateway; mocka v2 in, out; mockb v1 in, out; mockc v2 in
    deadline = time.monotonic() + 20
    spans = spans_in(directory)
    while len(spans) < hops and time.monotonic() < deadline:  # spans are written as each one ends
        time.sleep(0.1)
        spans = spans_in(directory)
    assert len(spans) == hops
    assert len({span["context"]["trace_id"] for span in spans}) == 1
    by_id = {span["context"]["span_id"]: span for span in spans}
    (root,) = [span for span in spans if span["parent_id"] is None]
    chain = [root]
    while len(chain) < hops:
        children = [span for span in spans if span["parent_id"] == chain[-1]["context"]["span_id"]]
        assert len(children) == 1, f"span {chain[-1]['name']} has {len(children)} children"
        chain.append(children[0])
    assert set(by_id) == {span["context"]["span_id"] for span in chain}
    roles = [span["attributes"]["laneproxy.role"] for span in chain]
    assert roles == ["gateway", "inbound", "outbound", "inbound", "outbound", "inbound"]
    outbound = [span["attributes"] for span in chain if span["attributes"]["laneproxy.role"] == "outbound"]
    assert [(a["laneproxy.lane.asked"], a["laneproxy.lane.used"], a["laneproxy.lane.fallback"]) for a in outbound] == [
        ("canary", "base", True),  # mocka v2 -> mockb: no canary mockb, one hop in base
        ("canary", "canary", False),  # mockb v1 -> mockc: back in canary
    ]
    assert all(span["attributes"]["http.response.status_code"] == 200 for span in chain)
