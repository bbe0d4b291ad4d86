"""The benchmark's swimlane configuration: a group of N services x L lanes, every endpoint the upstream.

Owns the files laneproxy reads in the benchmark (the seed's manifest shapes and the LaneEndpoints
format of config/endpoints.example.yaml), written as text because PyYAML would take longer to dump
10,000 services than laneproxy takes to route a million requests. Also the request mix that walks
the table (host, lane, trace id) for the table-size case.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

GROUP = "bench"
LANES = ("base", "canary", "lane2", "lane3", "lane4")
TRACE_ID = "10002"
PRIMED_LANE = "canary"


def service_names(count: int) -> list[str]:
    """`bench` first (the host of the fixed-request cases), then svc00001..."""
    return ["bench", *(f"svc{index:05d}" for index in range(1, count))]


def swimlanes_text(services: list[str], lanes: tuple[str, ...] = LANES) -> str:
    lines = [
        "apiVersion: istio.alibabacloud.com/v1", "kind: ASMSwimLaneGroup", "metadata:", f"  name: {GROUP}", "spec:",
        "  isPermissive: true", "  permissiveModeConfiguration:", f"    fallbackTarget: {lanes[0]}",
        "    routeHeader: x-asm-prefer-tag", "    traceHeader: my-request-id", "  autoUpdate: true", "  services:",
    ]
    for name in services:
        lines += [f"    - name: {name}", "      namespace: default"]
    for lane in lanes:
        lines += ["---", "apiVersion: istio.alibabacloud.com/v1", "kind: ASMSwimLane", "metadata:", "  labels:",
                  f"    swimlane-group: {GROUP}", f"  name: {lane}", "spec:", "  labelSelector:",
                  f"    ASM_TRAFFIC_TAG: {lane}", "  services: []"]
    return "\n".join(lines) + "\n"


def lane_address(port: int, lane_index: int) -> str:
    """The upstream nginx listens on 127.0.0.1-5: one address per lane, so no two lanes share an endpoint."""
    return f"127.0.0.{lane_index + 1}:{port}"


def endpoints_text(services: list[str], port: int, lanes: tuple[str, ...] = LANES, marker: str | None = None) -> str:
    """Every lane of every service served by the upstream; `marker` adds one empty service (a new version)."""
    lines = ["apiVersion: laneproxy.dev/v1", "kind: LaneEndpoints", "services:"]
    per_lane = [f"      {lane}: [{lane_address(port, index)}]" for index, lane in enumerate(lanes)]
    for name in services:
        lines += [f"  default/{name}:", "    port: 8000", "    lanes:", *per_lane]
    if marker:
        lines += [f"  default/{marker}:", "    port: 8000", "    lanes: {}"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace a config file the way a ConfigMap update does: a new inode, never a half-written file."""
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text)
    os.replace(staged, path)


def write_table(directory: Path, name: str, count: int, port: int) -> tuple[Path, Path, list[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    services = service_names(count)
    swimlanes = directory / f"{name}-swimlanes.yaml"
    endpoints = directory / f"{name}-endpoints.yaml"
    write_atomically(swimlanes, swimlanes_text(services))
    write_atomically(endpoints, endpoints_text(services, port))
    return swimlanes, endpoints, services


def write_protocol_services(directory: Path, h2c_host: str, h2c_port: int, ws_host: str, ws_port: int) -> Path:
    """The h2c and WebSocket rows' services for laneproxy: outside the group, the h2c origin speaking http2."""
    path = directory / "protocols-endpoints.yaml"
    write_atomically(path, "\n".join([
        "apiVersion: laneproxy.dev/v1", "kind: LaneEndpoints", "services:",
        f"  default/{h2c_host}:", "    port: 8000", "    protocol: http2", "    lanes:", f"      base: [127.0.0.1:{h2c_port}]",
        f"  default/{ws_host}:", "    port: 8000", "    lanes:", f"      base: [127.0.0.1:{ws_port}]"]) + "\n")
    return path


def request_mix(path: Path, services: list[str], *, size: int, seed: int = 5) -> Path:
    """`size` (host, lane, trace) lines spread over the whole table, for wrk's rotating script."""
    rng = random.Random(seed)
    if len(services) * len(LANES) <= size:
        pairs = [(s, lane) for s in services for lane in LANES]
    else:
        pairs = [(rng.choice(services), rng.choice(LANES)) for _ in range(size)]
    path.write_text("".join(f"{service} {lane} {70000 + i}\n" for i, (service, lane) in enumerate(pairs)))
    return path
