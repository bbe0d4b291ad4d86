"""Rig for the controller's xDS tests: `laneproxy controller` as a real process on the file source, and a raw
delta ADS client (a grpcio channel and the xds-protos messages) to talk to it.

The controller binds 127.0.0.1 port 0 for both its xDS and admin ports and logs the ports it got; the
rig reads them from its start-up log. The config files are the test's own, in its tmp_path.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import yaml
from envoy.service.discovery.v3 import discovery_pb2

from proxyrig import stop_process, wait_for

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
GROUP = "type.googleapis.com/laneproxy.v1.SwimLaneGroup"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
REPO = Path(__file__).resolve().parents[2]
SWIMLANES = REPO / "config" / "swimlanes.yaml"


def fqdn(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


def write_endpoints(path: Path, lanes: dict[str, dict[str, list[str]]], port: int = 8000) -> Path:
    """A LaneEndpoints file: {service: {lane: [address, ...]}} in namespace default; written whole, then renamed
    into place, so the controller never reads half a file."""
    body = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
            "services": {f"default/{name}": {"port": port, "lanes": per_lane} for name, per_lane in lanes.items()}}
    scratch = path.with_suffix(".tmp")
    scratch.write_text(yaml.safe_dump(body))
    os.replace(scratch, path)
    return path


class ControllerProcess:
    """`laneproxy controller` (files, unless `extra` says otherwise) on 127.0.0.1 with kernel-chosen ports."""

    def __init__(self, *config: Path, reload_interval: float = 0.2, extra: tuple[str, ...] = (),
                 xds_port: int = 0) -> None:
        self.config = config
        self.want_port = xds_port  # 0: the kernel chooses
        self.extra = extra  # more options: `--source kubernetes --kubeconfig FILE`
        self.reload_interval = reload_interval
        self.process: subprocess.Popen | None = None
        self.xds_port = 0
        self.admin_port = 0
        self.log: list[str] = []

    def start(self, timeout: float = 20.0) -> ControllerProcess:
        args = [sys.executable, "-m", "laneproxy", "--log-level", "info", "controller", "--xds-address", "127.0.0.1",
                "--xds-port", str(self.want_port), "--admin", "127.0.0.1:0", "--reload-interval", str(self.reload_interval)]
        for path in self.config:
            args += ["--config", str(path)]
        args += list(self.extra)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True,
                                        env={k: v for k, v in os.environ.items() if not k.startswith("LANEPROXY_")})
        deadline = time.monotonic() + timeout
        while not (self.xds_port and self.admin_port):
            line = self.process.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError("controller did not start:\n" + "".join(self.log) + self.process.stderr.read())
            self.log.append(line)
            if "xDS (delta ADS) on " in line:
                self.xds_port = int(line.rsplit(":", 1)[1])
            elif " admin on " in line:
                self.admin_port = int(line.rsplit(":", 1)[1])
        threading.Thread(target=self._drain_log, daemon=True).start()
        wait_for(lambda: self.admin("/ready")[0] == 200, "controller ready")
        return self

    def _drain_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def admin(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def stats(self) -> dict[str, object]:
        body = json.loads(self.admin("/stats?format=json")[1])
        return {entry["name"]: entry["value"] for entry in body["stats"]}

    def stop(self) -> None:
        stop_process(self.process)


class AdsStream:
    """One DeltaAggregatedResources call: requests go in through `send`, responses come out of `receive`."""

    def __init__(self, port: int, *, raw: bool = False) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._requests: queue.Queue = queue.Queue()
        serializer = None if raw else discovery_pb2.DeltaDiscoveryRequest.SerializeToString
        call = self.channel.stream_stream(DELTA, request_serializer=serializer,
                                          response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString)
        self.call = call(iter(self._requests.get, None))
        self._responses: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
        except grpc.RpcError as error:
            self._responses.put(error)
        else:
            self._responses.put(None)

    def send(self, request=None, **fields) -> None:
        self._requests.put(request if request is not None else discovery_pb2.DeltaDiscoveryRequest(**fields))

    def receive(self, timeout: float = 10.0) -> discovery_pb2.DeltaDiscoveryResponse:
        item = self._responses.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        assert item is not None, "the stream ended without a status"
        return item

    def nothing_within(self, seconds: float) -> bool:
        """True if no response arrives within `seconds` (a response that must not come, given time to come)."""
        try:
            self._responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def ack(self, response) -> None:
        self.send(type_url=response.type_url, response_nonce=response.nonce)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()


def names(response) -> set[str]:
    return {resource.name for resource in response.resources}


def node(pod_ip: str = "10.1.0.7", pod: str = "mocka-base-0") -> dict:
    return {"id": f"sidecar~{pod_ip}~{pod}.default~default.svc.cluster.local", "user_agent_name": "laneproxy",
            "user_agent_version": "0.1.0"}
