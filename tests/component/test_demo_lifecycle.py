"""The seed's release lifecycle on a running `laneproxy demo`, driven by `laneproxy demo release|approve|undo|status`
from a second process while traffic runs: no request fails, and every chain is the one its lane implies.

Real processes throughout: the demo (gateway, sidecars, mock apps) and each gesture as its own CLI process.
A request that overlaps a gesture (started before the command returned, finished after it began) may
show the chain before or after it; any other request must show exactly the chain of its moment.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from laneproxy.demo import free_port

MAX_REQUESTS = 12000  # enough for the whole story: a stopped pod now drains before it exits
MAX_SECONDS = 150.0
_HOP = re.compile(r"(\w+)\(version: (\w+), ip: [^)]*\)")


def chain_of(body: str) -> str:
    return " -> ".join(f"{app} {version}" for app, version in _HOP.findall(body))


@dataclass
class Sample:
    lane: str
    start: float
    end: float
    status: int
    chain: str


class Traffic(threading.Thread):
    """Base and canary requests in turn on one keep-alive connection, until stopped or the bounds are reached."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[Sample] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        deadline = time.monotonic() + MAX_SECONDS
        for number in range(MAX_REQUESTS):
            if self.stopping.is_set() or time.monotonic() > deadline:
                break
            lane = ("base", "canary")[number % 2]
            start = time.monotonic()
            try:
                connection.request("GET", "/mock", headers={"x-asm-prefer-tag": lane, "my-request-id": f"7{number}"})
                response = connection.getresponse()
                status, body = response.status, response.read().decode()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                status, body = 0, f"{type(exc).__name__}: {exc}"
            self.samples.append(Sample(lane, start, time.monotonic(), status, chain_of(body) or body))
        connection.close()


def demo_cli(state: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "laneproxy", "demo", "--state", str(state), *args],
                            capture_output=True, text=True, timeout=120, env=_environment())
    assert result.returncode == 0, result.stderr
    return result.stdout


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}


@pytest.fixture
def running_demo(tmp_path):
    state = tmp_path / "demo.json"
    process = subprocess.Popen([sys.executable, "-m", "laneproxy", "demo", "--gateway-port", str(free_port()),
                                "--state", str(state)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=_environment())
    try:
        deadline = time.monotonic() + 60
        while not state.exists():
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the demo did not start in 60 s"
            time.sleep(0.1)
        yield state, json.loads(state.read_text())
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert not state.exists(), "the demo removes its state file when it stops"


BASE_V1 = "mocka v1 -> mockb v1 -> mockc v1"
SEED_CANARY = "mocka v2 -> mockb v1 -> mockc v2"

# The seed story: (gesture, the base chain after it, the canary chain after it, `status` lines after it).
STORY = [
    (("release", "mockb", "v2"), BASE_V1, "mocka v2 -> mockb v2 -> mockc v2",
     ["mockb    v1             v2"]),
    (("approve", "mockb"), "mocka v1 -> mockb v2 -> mockc v1", "mocka v2 -> mockb v2 -> mockc v2",
     ["mockb    v2             -> base (v2)"]),
    (("undo", "mocka"), "mocka v1 -> mockb v2 -> mockc v1", "mocka v1 -> mockb v2 -> mockc v2",
     ["mocka    v1             -> base (v1)"]),
    (("release", "mocka", "v3"), "mocka v1 -> mockb v2 -> mockc v1", "mocka v3 -> mockb v2 -> mockc v2",
     ["mocka    v1             v3"]),
    (("approve", "mocka"), "mocka v3 -> mockb v2 -> mockc v1", "mocka v3 -> mockb v2 -> mockc v2",
     ["mocka    v3             -> base (v3)", "mockb    v2             -> base (v2)", "mockc    v1             v2"]),
]


def test_release_approve_and_undo_under_continuous_traffic_fail_no_request_and_keep_every_chain_in_its_lane(
        running_demo):
    state, addresses = running_demo
    port = int(addresses["gateway"].rsplit(":", 1)[1])
    assert "mockb    v1             -> base (v1)" in demo_cli(state, "status")
    traffic = Traffic(port)
    traffic.start()
    # The timeline: (from, to, {lane: allowed chains}, stable). A gesture's window allows the chains before and after.
    previous = {"base": {BASE_V1}, "canary": {SEED_CANARY}}
    timeline = []
    stable_from = time.monotonic()
    try:
        time.sleep(1.0)
        for gesture, base, canary, status_lines in STORY:
            began = time.monotonic()
            print(demo_cli(state, *gesture).strip())
            ended = time.monotonic()
            after = {"base": {base}, "canary": {canary}}
            timeline.append((stable_from, began, previous, True))
            timeline.append((began, ended, {lane: previous[lane] | after[lane] for lane in after}, False))
            previous, stable_from = after, ended
            status = demo_cli(state, "status")
            print(status)
            for line in status_lines:
                assert line in status
            time.sleep(1.0)
    finally:
        traffic.stopping.set()
        traffic.join(timeout=30)
    timeline.append((stable_from, float("inf"), previous, True))

    failed = [s for s in traffic.samples if s.status != 200]
    wrong: list[str] = []
    in_phase: Counter[tuple[int, str]] = Counter()
    in_transition = 0
    for sample in traffic.samples:
        touched = [index for index, (start, end, _, _) in enumerate(timeline) if sample.start < end and sample.end > start]
        allowed = set().union(*(timeline[index][2][sample.lane] for index in touched))
        if len(touched) == 1 and timeline[touched[0]][3]:
            in_phase[(touched[0] // 2, sample.lane)] += 1
        else:
            in_transition += 1
        if sample.chain not in allowed:
            wrong.append(f"{sample.lane}: {sample.chain!r} not in {sorted(allowed)}")
    chains = Counter((s.lane, s.chain) for s in traffic.samples)
    print(f"{len(traffic.samples)} requests, {len(failed)} failed, {len(wrong)} with a wrong chain, "
          f"{in_transition} during a gesture")
    for (lane, chain), count in sorted(chains.items()):
        print(f"  {count:5d}  {lane:<6}  {chain}")
    assert not failed, failed[:5]
    assert not wrong, wrong[:5]
    # Each state of the story was observed on its own, by both lanes' traffic, not only during transitions.
    assert all(in_phase[(phase, lane)] >= 3 for phase in range(len(STORY) + 1) for lane in ("base", "canary")), in_phase
