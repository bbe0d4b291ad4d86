"""Benchmark: a `laneproxy run --source kubernetes` sidecar holding many pods, with whole Pods and metadata only.

Owns measuring what the direct Kubernetes source costs a sidecar as the cluster grows, against a real
kube-apiserver (tests/kube: etcd and kube-apiserver, no kubelet, no controller-manager): RSS and private
memory of a fresh sidecar once it is ready (its first table is built from a complete list) with no pods
and with N pods, so the difference over N is the memory per cached pod; the time to that first table;
and the CPU the sidecar spends per pod readiness change. Pods have the injected shape: the seed's
Deployment template run through `laneproxy inject`, with the metadata a ReplicaSet gives its pods and
the status a kubelet writes. This script plays the kubelet and the endpointslice controller (slices of
at most 100 endpoints, as that controller cuts them). Nothing is asserted; the figures are printed, and
`--json` writes them for loadtests/bench/xds_scale.py.

    .venv/bin/python loadtests/bench/kube_pods.py [--pods 2000] [--services 3] [--changes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes_asyncio import client, config

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from laneproxy.inject import SidecarSettings, inject_pod  # noqa: E402
from loadtests.bench.processes import cpu_seconds_precise, free_port, private_bytes, rss_bytes  # noqa: E402
from tests.kube.apiserver import KubeApiServer, ensure_binary  # noqa: E402

NAMESPACE = "default"
MiB = 2 ** 20
SLICE_SIZE = 100  # the endpointslice controller's default --max-endpoints-per-slice


def service_names(count: int) -> list[str]:
    seed = ["mocka", "mockb", "mockc"]
    return seed[:count] if count <= 3 else [f"svc{index:04d}" for index in range(count)]


def swimlane_documents(services: list[str]) -> list[dict]:
    group = {"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLaneGroup", "metadata": {"name": "rollout"},
             "spec": {"isPermissive": True, "autoUpdate": True,
                      "permissiveModeConfiguration": {"routeHeader": "x-asm-prefer-tag", "fallbackTarget": "base"},
                      "services": [{"name": name, "namespace": NAMESPACE} for name in services]}}
    lanes = [{"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLane",
              "metadata": {"name": lane, "labels": {"swimlane-group": "rollout"}},
              "spec": {"labelSelector": {"ASM_TRAFFIC_TAG": lane}, "services": []}} for lane in ("base", "canary")]
    return [group, *lanes]


def injected_pod(name: str, app: str, tag: str, index: int) -> dict:
    """The seed's mocka-v1 template, injected, as its ReplicaSet creates the pod."""
    template = {"metadata": {"labels": {"app": app, "version": "v1", "ASM_TRAFFIC_TAG": tag}},
                "spec": {"containers": [{"name": "default", "image": "go-http-sample:1.0",
                                         "env": [{"name": "version", "value": "v1"}, {"name": "app", "value": app},
                                                 {"name": "upstream_url", "value": "http://mockb:8000/"}],
                                         "ports": [{"containerPort": 8000}]}]}}
    pod = inject_pod(template, SidecarSettings(), workload=f"{app}-v1")
    meta = pod["metadata"]
    meta["name"] = name
    meta["generateName"] = f"{app}-v1-7c9d8f6b5-"
    meta["labels"]["pod-template-hash"] = "7c9d8f6b5"
    meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-v1-7c9d8f6b5",
                                "uid": "6b1f8f5e-5d0c-4b5a-9c1e-%012d" % index, "controller": True,
                                "blockOwnerDeletion": True}]
    pod["spec"]["nodeName"] = f"node-{index % 50}"
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def kubelet_status(pod: dict, ip: str, ready: bool) -> dict:
    """What a kubelet writes for a running pod: phase, IPs, the four conditions, one status per container."""
    now = "2026-11-30T12:00:00Z"
    flag = "True" if ready else "False"

    def container_status(container: dict) -> dict:
        return {"name": container["name"], "image": container.get("image", ""), "imageID": "docker-pullable://"
                + container.get("image", "") + "@sha256:" + "0" * 64, "containerID": "containerd://" + "a" * 64,
                "ready": ready, "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}},
                "lastState": {}}

    return {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "10.128.0.10", "startTime": now,
        "qosClass": "Burstable",
        "conditions": [{"type": kind, "status": "True" if kind in ("Initialized", "PodScheduled") else flag,
                        "lastProbeTime": None, "lastTransitionTime": now}
                       for kind in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
        "containerStatuses": [container_status(c) for c in pod["spec"]["containers"]],
        "initContainerStatuses": [{**container_status(c), "ready": True, "state": {"terminated": {
            "exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}}
            for c in pod["spec"].get("initContainers", [])],
    }}


class Cluster:
    """The administrator, the kubelet and the endpointslice controller of the measured cluster."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.pods: dict[str, tuple[str, str, bool]] = {}  # name -> (service, ip, ready)
        self.slices_path = f"/apis/discovery.k8s.io/v1beta1/namespaces/{NAMESPACE}/endpointslices"
        self.limit = asyncio.Semaphore(16)

    async def install(self, services: list[str]) -> None:
        ext = client.ApiextensionsV1Api(self.api)
        for path in sorted((ROOT / "deploy" / "crds").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    await ext.create_custom_resource_definition(doc)
        for _ in range(200):
            crds = (await ext.list_custom_resource_definition()).items
            if len(crds) >= 2 and all(any(c.type == "Established" and c.status == "True"
                                          for c in crd.status.conditions or []) for crd in crds):
                break
            await asyncio.sleep(0.05)
        for doc in swimlane_documents(services):
            plural = "asmswimlanegroups" if doc["kind"] == "ASMSwimLaneGroup" else "asmswimlanes"
            await self.custom.create_cluster_custom_object("istio.alibabacloud.com", "v1", plural, doc)
        await asyncio.gather(*(self._bounded(self.core.create_namespaced_service(NAMESPACE, {
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}))
            for name in services))

    async def _bounded(self, coroutine):
        async with self.limit:
            return await coroutine

    async def create_pods(self, count: int, services: list[str]) -> None:
        async def one(index: int) -> None:
            app = services[index % len(services)]
            name = f"{app}-v1-7c9d8f6b5-{index:05d}"
            tag = "canary" if index % 10 == 0 else "base"
            pod = injected_pod(name, app, tag, index)
            ip = f"10.{64 + index // 65000}.{index // 250 % 250}.{index % 250 + 1}"
            async with self.limit:
                await self.core.create_namespaced_pod(NAMESPACE, pod)
                await self.core.patch_namespaced_pod_status(name, NAMESPACE, kubelet_status(pod, ip, True))
            self.pods[name] = (app, ip, True)

        await asyncio.gather(*(one(index) for index in range(count)))
        for service in services:
            await self.write_slices(service)

    def _slices(self, service: str) -> list[dict]:
        members = sorted((name, ip, ready) for name, (app, ip, ready) in self.pods.items() if app == service)
        chunks = [members[start:start + SLICE_SIZE] for start in range(0, len(members), SLICE_SIZE)] or [[]]
        return [{"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "addressType": "IPv4",
                 "metadata": {"name": f"{service}-{index:03d}", "namespace": NAMESPACE, "labels": {
                     "kubernetes.io/service-name": service,
                     "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                 "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                 "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": "node-0",
                                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": name}}
                               for name, ip, ready in chunk]}
                for index, chunk in enumerate(chunks)]

    async def _call(self, path: str, method: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if body is not None else {})}
        response = await self.api.call_api(path, method, body=body, auth_settings=["BearerToken"],
                                           header_params=headers, _preload_content=False)
        text = await response.read()
        return response.status, json.loads(text) if text else {}

    async def write_slices(self, service: str, only: str | None = None) -> None:
        for body in self._slices(service):
            name = body["metadata"]["name"]
            if only is not None and not any(e["targetRef"]["name"] == only for e in body["endpoints"]):
                continue
            status, current = await self._call(f"{self.slices_path}/{name}", "GET")
            if status == 404:
                await self._call(self.slices_path, "POST", body)
                continue
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self._call(f"{self.slices_path}/{name}", "PUT", body)

    async def set_ready(self, name: str, ready: bool) -> None:
        """The kubelet reports a readiness change; the endpointslice controller updates the pod's slice."""
        app, ip, _ = self.pods[name]
        self.pods[name] = (app, ip, ready)
        flag = "True" if ready else "False"
        await self.core.patch_namespaced_pod_status(name, NAMESPACE, {"status": {"conditions": [
            {"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}]}})
        await self.write_slices(app, only=name)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class Sidecar:
    """One `laneproxy run --source kubernetes` process with an admin port and a gateway, nothing else."""

    def __init__(self, kubeconfig: Path, pods: str) -> None:
        self.admin, self.gateway = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "laneproxy", "--log-level", "warning", "run", "--source", "kubernetes",
             "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE, "--pods", pods, "--drain-seconds", "0",
             "--gateway", f"127.0.0.1:{self.gateway}", "--admin", f"127.0.0.1:{self.admin}"],
            env=env, stdin=subprocess.DEVNULL)
        self.ready_after: float | None = None

    async def wait_ready(self, timeout: float = 180.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {self.process.returncode}")
            status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{self.admin}/ready")
            if status == 200:
                self.ready_after = time.monotonic() - self.started
                return self.ready_after
            await asyncio.sleep(0.05)
        raise TimeoutError("the sidecar did not turn ready")

    async def settled_memory(self) -> tuple[int, int]:
        """RSS and private bytes once the first table's garbage is gone (two quiet seconds)."""
        await asyncio.sleep(2.0)
        pids = [self.process.pid]
        return rss_bytes(pids), private_bytes(pids)

    def cpu(self) -> float:
        return cpu_seconds_precise([self.process.pid])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def measure(kubeconfig: Path, mode: str) -> dict:
    sidecar = Sidecar(kubeconfig, mode)
    try:
        ready = await sidecar.wait_ready()
        rss, private = await sidecar.settled_memory()
        return {"ready_seconds": ready, "rss": rss, "private": private}
    finally:
        sidecar.stop()


async def cpu_per_change(cluster: Cluster, kubeconfig: Path, mode: str, changes: int) -> dict:
    """CPU the sidecar spends per pod readiness change, less what it spends idle over as long."""
    sidecar = Sidecar(kubeconfig, mode)
    try:
        await sidecar.wait_ready()
        await asyncio.sleep(2.0)
        window = changes * 0.25 + 1.5
        before = sidecar.cpu()
        await asyncio.sleep(window)
        idle = sidecar.cpu() - before
        names = sorted(cluster.pods)[:changes]
        before = sidecar.cpu()
        started = time.monotonic()
        for name in names:
            ready = cluster.pods[name][2]
            await cluster.set_ready(name, not ready)
            await asyncio.sleep(max(0.0, started + 0.25 * (names.index(name) + 1) - time.monotonic()))
        await asyncio.sleep(max(0.0, started + window - time.monotonic()))
        busy = sidecar.cpu() - before
        rss, private = rss_bytes([sidecar.process.pid]), private_bytes([sidecar.process.pid])
        for name in names:  # as they were
            await cluster.set_ready(name, not cluster.pods[name][2])
        return {"cpu_per_change_ms": max(0.0, busy - idle) / changes * 1000, "idle_cpu_ms": idle * 1000,
                "rss_after_changes": rss, "private_after_changes": private}
    finally:
        sidecar.stop()


async def run(pods: int, service_count: int, changes: int) -> dict:
    services = service_names(service_count)
    with KubeApiServer(binary=ensure_binary(), service_cluster_ip_range="10.96.0.0/16") as kube:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(kube.kubeconfig_path), client_configuration=configuration)
        async with client.ApiClient(configuration=configuration) as api:
            cluster = Cluster(api)
            await cluster.install(services)
            await cluster.write_slices(services[0])  # an empty slice: the API answers, as it will with pods
            results: dict = {"pods": pods, "services": len(services), "modes": {}}
            for mode in ("full", "metadata"):
                results["modes"][mode] = {"empty": await measure(kube.kubeconfig_path, mode)}
            started = time.monotonic()
            await cluster.create_pods(pods, services)
            results["create_seconds"] = time.monotonic() - started
            for mode in ("full", "metadata"):
                figures = results["modes"][mode]
                figures["loaded"] = await measure(kube.kubeconfig_path, mode)
                figures["per_pod_bytes"] = (figures["loaded"]["rss"] - figures["empty"]["rss"]) / pods
                figures["per_pod_private_bytes"] = (figures["loaded"]["private"] - figures["empty"]["private"]) / pods
                if changes:
                    figures.update(await cpu_per_change(cluster, kube.kubeconfig_path, mode, changes))
            return results


def report(results: dict) -> str:
    lines = [f"direct Kubernetes source, {results['pods']:,} injected-shape pods in {results['services']} services "
             f"(created in {results['create_seconds']:.0f} s), real kube-apiserver:",
             "| pods read as | RSS empty MiB | RSS loaded MiB | per pod KiB (RSS) | per pod KiB (private) "
             "| first table s | CPU per pod change ms |",
             "|---|---|---|---|---|---|---|"]
    for mode, figures in results["modes"].items():
        cpu = figures.get("cpu_per_change_ms")
        lines.append(f"| {mode} | {figures['empty']['rss'] / MiB:.1f} | {figures['loaded']['rss'] / MiB:.1f} "
                     f"| {figures['per_pod_bytes'] / 1024:.1f} | {figures['per_pod_private_bytes'] / 1024:.1f} "
                     f"| {figures['loaded']['ready_seconds']:.2f} | {'-' if cpu is None else f'{cpu:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--services", type=int, default=3)
    parser.add_argument("--changes", type=int, default=20, help="pod readiness changes timed per mode (0: none)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = asyncio.run(run(args.pods, args.services, args.changes))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
