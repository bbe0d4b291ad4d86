"""Benchmark: the controller and its xDS sidecars at cluster scale, beside the direct Kubernetes source.

Owns the issue's scale figures, all from one run against one real kube-apiserver (tests/kube; no kubelet
and no controller-manager, so this script writes pod status as the kubelet would and EndpointSlices as the
endpointslice controller would, see kube_pods.py) holding N injected-shape pods in S services:

- xDS path: one `laneproxy controller --source kubernetes --pods metadata` process; M delta-ADS streams
  from this one process (grpc.aio), each subscribing as the contract says a sidecar does (wildcard
  Clusters and SwimLaneGroups, then every `outbound|PORT||FQDN` ClusterLoadAssignment by name) and
  ACKing every response; one real `laneproxy run --source xds://` sidecar. Figures: the controller's
  RSS and CPU per pod readiness change, the time from a pod's readiness change (the kubelet's status
  write, then the slice's update) until every stream has the service's new assignment (p50/p99/max
  over streams x changes), the sidecar's RSS and CPU per change.
- direct source: a fresh `laneproxy run --source kubernetes` sidecar with whole Pods and with metadata,
  its RSS and CPU per change with the same pods (kube_pods.py's measurement).

Nothing is asserted; the figures are printed (and written with `--json`). CPU per change is the
process's CPU over a window of spaced changes less its CPU over an idle window as long, over the count.
Stream times include this process's own work reading 200 streams on one event loop.

    .venv/bin/python loadtests/bench/xds_scale.py [--pods 5000] [--services 300] [--streams 200] [--changes 20]
    .venv/bin/python loadtests/bench/xds_scale.py --smoke   # a few pods and streams, well under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from kubernetes_asyncio import client, config

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from laneproxy import __version__  # noqa: E402
from loadtests.bench import kube_pods  # noqa: E402
from loadtests.bench.processes import cpu_seconds_precise, free_port, private_bytes, rss_bytes  # noqa: E402
from tests.kube.apiserver import KubeApiServer, ensure_binary  # noqa: E402

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
GROUP = "type.googleapis.com/laneproxy.v1.SwimLaneGroup"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
MiB = 2 ** 20
CHANGE_GAP = 0.25  # seconds between two readiness changes: each is applied and pushed before the next


def whole_service(service: str) -> str:
    return f"outbound|8000||{service}.{kube_pods.NAMESPACE}.svc.cluster.local"


class Change:
    """One readiness change being waited for: the assignment and endpoint count every stream must reach."""

    def __init__(self, name: str, count: int, streams: int) -> None:
        self.name, self.count, self.started = name, count, time.monotonic()
        self.arrivals: dict[int, float] = {}
        self.done = asyncio.Event()
        self.streams = streams

    def seen(self, stream: int, name: str, count: int, at: float) -> None:
        if name == self.name and count == self.count and stream not in self.arrivals:
            self.arrivals[stream] = at - self.started
            if len(self.arrivals) == self.streams:
                self.done.set()


class Streams:
    """M delta-ADS streams on one channel each, subscribing and ACKing as a laneproxy sidecar does."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.counts: list[dict[str, int]] = [{} for _ in range(count)]
        self.change: Change | None = None
        self.nacks = 0
        self.received = 0
        self._tasks: list[asyncio.Task] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, services: list[str], timeout: float = 300.0) -> float:
        """Open every stream; returns the seconds until each holds every whole-service assignment."""
        started = time.monotonic()
        for index in range(self.count):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
            self._channels.append(channel)
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(index, channel)))
        wanted = {whole_service(service) for service in services}
        deadline = time.monotonic() + timeout
        while not all(wanted <= counts.keys() for counts in self.counts):
            if time.monotonic() > deadline:
                raise TimeoutError("the streams did not receive every assignment")
            for task in self._tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def _run(self, index: int, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(DELTA, request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                                     response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString)()
        node = base_pb2.Node(id=f"sidecar~10.200.{index // 250}.{index % 250 + 1}~bench-{index}.default~"
                                f"default.svc.cluster.local", cluster="default", user_agent_name="laneproxy",
                             user_agent_version=__version__)
        await call.write(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER))
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=GROUP))
        subscribed: set[str] = set()
        counts = self.counts[index]
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            at = time.monotonic()
            self.received += 1
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url,
                                                                 response_nonce=response.nonce))
            if response.type_url == CLUSTER:
                new = sorted({r.name for r in response.resources if "||" in r.name} - subscribed)
                subscribed.update(new)
                if new:
                    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ASSIGNMENT,
                                                                         resource_names_subscribe=new))
            elif response.type_url == ASSIGNMENT:
                for resource in response.resources:
                    assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.resource.value)
                    count = sum(len(locality.lb_endpoints) for locality in assignment.endpoints)
                    counts[resource.name] = count
                    if self.change is not None:
                        self.change.seen(index, resource.name, count, at)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


class Process:
    """A laneproxy process this benchmark started (controller or sidecar), stopped by its pid."""

    def __init__(self, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LANEPROXY_") and k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        self.process = subprocess.Popen([sys.executable, "-m", "laneproxy", "--log-level", "warning", *args],
                                        env=env, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    async def wait_ready(self, admin: int, timeout: float = 300.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.process.args} exited with {self.process.returncode}")
            status, _ = await asyncio.to_thread(kube_pods._get, f"http://127.0.0.1:{admin}/ready")
            if status == 200:
                return time.monotonic() - self.started
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.process.args} did not turn ready")

    def cpu(self) -> float:
        return cpu_seconds_precise([self.process.pid])

    def memory(self) -> tuple[int, int]:
        return rss_bytes([self.process.pid]), private_bytes([self.process.pid])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def xds_path(cluster: kube_pods.Cluster, kubeconfig: Path, services: list[str], streams: int,
                   changes: int) -> dict:
    xds_port, controller_admin = free_port(), free_port()
    controller = Process(["controller", "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--namespace",
                          kube_pods.NAMESPACE, "--pods", "metadata", "--xds-address", "127.0.0.1",
                          "--xds-port", str(xds_port), "--admin", f"127.0.0.1:{controller_admin}"])
    sidecar_admin, sidecar_gateway = free_port(), free_port()
    sidecar: Process | None = None
    clients = Streams(xds_port, streams)
    figures: dict = {"streams": streams}
    try:
        figures["controller_ready_seconds"] = await controller.wait_ready(controller_admin)
        figures["controller_rss_alone"] = controller.memory()[0]
        figures["streams_synced_seconds"] = await clients.start(services)
        sidecar = Process(["run", "--source", f"xds://127.0.0.1:{xds_port}", "--namespace", kube_pods.NAMESPACE,
                           "--drain-seconds", "0", "--gateway", f"127.0.0.1:{sidecar_gateway}",
                           "--admin", f"127.0.0.1:{sidecar_admin}"])
        figures["sidecar_ready_seconds"] = await sidecar.wait_ready(sidecar_admin)
        await asyncio.sleep(2.0)
        figures["controller_rss"], figures["controller_private"] = controller.memory()
        figures["sidecar_rss"], figures["sidecar_private"] = sidecar.memory()
        window = changes * CHANGE_GAP + 1.5
        idle = (controller.cpu(), sidecar.cpu())
        await asyncio.sleep(window)
        idle = (controller.cpu() - idle[0], sidecar.cpu() - idle[1])
        names = sorted(cluster.pods)[::max(1, len(cluster.pods) // max(1, changes))][:changes]
        before = (controller.cpu(), sidecar.cpu())
        started = time.monotonic()
        latencies: list[float] = []
        missed = 0
        for number, name in enumerate(names):
            service, _, ready = cluster.pods[name]
            expected = sum(1 for app, _, up in cluster.pods.values() if app == service and up) + (-1 if ready else 1)
            clients.change = Change(whole_service(service), expected, streams)
            await cluster.set_ready(name, not ready)
            try:
                await asyncio.wait_for(clients.change.done.wait(), 10.0)
            except TimeoutError:
                missed += streams - len(clients.change.arrivals)
            latencies.extend(clients.change.arrivals.values())
            clients.change = None
            await asyncio.sleep(max(0.0, started + CHANGE_GAP * (number + 1) - time.monotonic()))
        await asyncio.sleep(max(0.0, started + window - time.monotonic()))
        busy = (controller.cpu() - before[0], sidecar.cpu() - before[1])
        figures["controller_cpu_per_change_ms"] = max(0.0, busy[0] - idle[0]) / len(names) * 1000
        figures["sidecar_cpu_per_change_ms"] = max(0.0, busy[1] - idle[1]) / len(names) * 1000
        figures["changes"] = len(names)
        figures["missed"] = missed
        latencies.sort()
        figures["push_p50_ms"] = statistics.median(latencies) * 1000 if latencies else None
        figures["push_p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else None
        figures["push_max_ms"] = latencies[-1] * 1000 if latencies else None
        figures["controller_rss_after"] = controller.memory()[0]
        for name in names:  # as they were
            await cluster.set_ready(name, not cluster.pods[name][2])
        return figures
    finally:
        await clients.close()
        if sidecar is not None:
            sidecar.stop()
        controller.stop()


async def run(args: argparse.Namespace) -> dict:
    services = kube_pods.service_names(args.services)
    results: dict = {"pods": args.pods, "services": len(services), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}",
                     "load_before": os.getloadavg()[0]}
    with KubeApiServer(binary=ensure_binary(), service_cluster_ip_range="10.96.0.0/16") as kube:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(kube.kubeconfig_path), client_configuration=configuration)
        async with client.ApiClient(configuration=configuration) as api:
            cluster = kube_pods.Cluster(api)
            await cluster.install(services)
            started = time.monotonic()
            await cluster.create_pods(args.pods, services)
            results["create_seconds"] = time.monotonic() - started
            results["xds"] = await xds_path(cluster, kube.kubeconfig_path, services, args.streams, args.changes)
            results["direct"] = {}
            for mode in ("full", "metadata"):
                figures = await kube_pods.measure(kube.kubeconfig_path, mode)
                if not args.smoke:
                    figures.update(await kube_pods.cpu_per_change(cluster, kube.kubeconfig_path, mode, args.changes))
                results["direct"][mode] = figures
    results["load_after"] = os.getloadavg()[0]
    return results


def report(results: dict) -> str:
    x = results["xds"]
    ms = lambda value: "-" if value is None else f"{value:.1f}"  # noqa: E731
    lines = [
        f"{results['date']}; {results['machine']}; load average {results['load_before']:.1f} before, "
        f"{results['load_after']:.1f} after",
        f"{results['pods']:,} injected-shape pods in {results['services']} services on a real kube-apiserver "
        f"(created in {results['create_seconds']:.0f} s); pod changes: the kubelet's status write, then the "
        f"EndpointSlice's update; {x['changes']} readiness changes {CHANGE_GAP * 1000:.0f} ms apart",
        "",
        f"xDS path: laneproxy controller --source kubernetes --pods metadata, {x['streams']} delta-ADS streams from "
        "one process, one laneproxy run --source xds:// sidecar",
        "| figure | measured | target |",
        "|---|---:|---:|",
        f"| controller RSS, {x['streams']} streams subscribed | {x['controller_rss'] / MiB:.1f} MiB "
        f"({x['controller_rss_alone'] / MiB:.1f} before the streams) | |",
        f"| controller CPU per pod readiness change | {ms(x['controller_cpu_per_change_ms'])} ms | |",
        f"| pod readiness change -> every stream has the assignment, p50 / p99 / max | {ms(x['push_p50_ms'])} / "
        f"{ms(x['push_p99_ms'])} / {ms(x['push_max_ms'])} ms ({x['missed']} missed) | p99 < 1,000 ms |",
        f"| sidecar RSS with that table | {x['sidecar_rss'] / MiB:.1f} MiB | < 60 MiB |",
        f"| sidecar CPU per pod change | {ms(x['sidecar_cpu_per_change_ms'])} ms | < 1 ms |",
        f"| streams holding every assignment after | {x['streams_synced_seconds']:.1f} s | |",
        "",
        "direct Kubernetes source, one sidecar, the same pods:",
        "| pods read as | sidecar RSS MiB | first table s | CPU per pod change ms |",
        "|---|---:|---:|---:|",
    ]
    for mode, figures in results["direct"].items():
        lines.append(f"| {mode} | {figures['rss'] / MiB:.1f} | {figures['ready_seconds']:.1f} "
                     f"| {ms(figures.get('cpu_per_change_ms'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--services", type=int, default=300)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="60 pods, 6 services, 5 streams, 3 changes; the direct source's memory only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.smoke:
        args.pods, args.services, args.streams, args.changes = 60, 6, 5, 3
    results = asyncio.run(run(args))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
