"""Benchmark: one service's change on a 10,000-service table, full rebuild against the incremental update.

Owns measuring what the issue's target is about: the time to apply a one-pod readiness change to a large
table, and the longest delay a request sees while that happens. The table is Kubernetes-shaped (one
Service and two pods per service, a group of every service with five lanes), built in this process by
core.build, as the Kubernetes source builds it. Requests flow over real sockets on 127.0.0.1: a client
process sends them back to back on keep-alive connections to a server in this process whose every answer
reads `store.current` and looks the host up in it, as the data plane does; a ticker on the same loop
records how late the loop runs. Each update is applied the old way (the full build in a worker thread with
the collector paused, then publish, as control/kubernetes.py did for every change), then the new way
(core.incremental on the loop, as it does now for a change of a few objects), with requests flowing
throughout. The full build's time includes building the incremental indexes, as the source does after one. Nothing is asserted:
the figures are printed, old against new, from the same run.

    .venv/bin/python loadtests/bench/table_update.py [--services 10000] [--updates 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

from laneproxy.control.building import build_off_loop, settle_heap
from laneproxy.core.build import ConfigDocument, build_skipping
from laneproxy.core.incremental import IncrementalTable
from laneproxy.core.store import RouteTableStore

LANES = ("base", "canary", "lane2", "lane3", "lane4")
NAMESPACE = "default"

CLIENT = textwrap.dedent("""
    import signal, socket, sys, time
    port, seconds, hosts = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out, end, index = [], time.monotonic() + seconds, 0
    while not stop and time.monotonic() < end:
        host = hosts[index % len(hosts)]
        index += 1
        sent = time.monotonic()
        sock.sendall(host.encode() + b"\\n")
        data = b""
        while not data.endswith(b"\\n"):
            data += sock.recv(4096)
        out.append(f"{sent:.6f} {time.monotonic() - sent:.6f}")
    print("\\n".join(out))
""")


def _pod(service: str, lane: str, index: int, ready: bool) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{service}-{lane}", "namespace": NAMESPACE, "resourceVersion": "1",
                         "labels": {"app": service, "ASM_TRAFFIC_TAG": lane}},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": f"10.{index // 60000}.{index // 250 % 240}.{index % 250 + 1}",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def documents(count: int) -> dict[str, ConfigDocument]:
    names = [f"svc{n:05d}" for n in range(count)]
    bodies = [{"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLaneGroup", "metadata": {"name": "bench"},
               "spec": {"isPermissive": True, "autoUpdate": True,
                        "permissiveModeConfiguration": {"routeHeader": "x-asm-prefer-tag", "fallbackTarget": "base"},
                        "services": [{"name": name, "namespace": NAMESPACE} for name in names]}}]
    bodies += [{"apiVersion": "istio.alibabacloud.com/v1", "kind": "ASMSwimLane",
                "metadata": {"name": lane, "labels": {"swimlane-group": "bench"}},
                "spec": {"labelSelector": {"ASM_TRAFFIC_TAG": lane}, "services": []}} for lane in LANES]
    for index, name in enumerate(names):
        bodies.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
                       "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}})
        bodies += [_pod(name, "base", 2 * index, True), _pod(name, "canary", 2 * index + 1, True)]
    docs = {}
    for body in bodies:
        meta = body["metadata"]
        where = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        source = f"kubernetes:{body['kind']}/{where}"
        docs[source] = ConfigDocument(source, body)
    return docs


class Server(asyncio.Protocol):
    """One line in (a Host), one line out: the route's first endpoint, read from the current table."""

    store: RouteTableStore

    def connection_made(self, transport):  # type: ignore[override]
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            host, _, self.buffer = self.buffer.partition(b"\n")
            routes = self.store.current.hosts.get(host)
            route = routes.route_for(b"canary") if routes is not None else None
            answer = route.endpoints[0].address.encode() if route is not None and route.endpoints else b"-"
            self.transport.write(answer + b"\n")


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    docs = documents(args.services)
    ordered = lambda: [docs[source] for source in sorted(docs)]  # noqa: E731
    store = RouteTableStore()
    started = time.perf_counter()
    built = await build_off_loop(lambda: build_skipping(ordered(), version="0", namespace=NAMESPACE))
    first_build = time.perf_counter() - started
    store.publish(built.table)
    settle_heap()
    incremental = IncrementalTable(built, namespace=NAMESPACE, rank=lambda source: source)
    print(f"{args.services} services, {len(docs)} objects; first full build {first_build:.2f} s", flush=True)

    Server.store = store
    server = await loop.create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lags: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append((before, time.monotonic() - before - 0.001))

    tick = loop.create_task(ticker())
    seconds = 3600.0  # a bound; the client is stopped when the updates are done
    hosts = ",".join(f"svc{n:05d}.default.svc.cluster.local:8000" for n in range(0, args.services, max(1, args.services // 50)))
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(port), str(seconds), hosts,
                                                  stdout=subprocess.PIPE)
    await asyncio.sleep(2)
    windows: dict[str, list[tuple[float, float]]] = {"full": [], "incremental": []}
    apply_times: dict[str, list[float]] = {"full": [], "incremental": []}
    version = 0
    # All full updates first, as the source did them (each also builds the indexes, before publishing, as the
    # Kubernetes source does now after a full build), then the incremental ones in steady state.
    for mode in ("full", "incremental"):
        for round_index in range(args.updates):
            version += 1
            name = f"svc{(round_index * 7919) % args.services:05d}"
            source = f"kubernetes:Pod/{NAMESPACE}/{name}-canary"
            ready = docs[source].body["status"]["conditions"][0]["status"] != "True"
            index = int(name[3:]) * 2 + 1
            docs[source] = ConfigDocument(source, _pod(name, "canary", index, ready))
            began = time.monotonic()
            if mode == "full":
                full = await build_off_loop(lambda: build_skipping(ordered(), version=str(version), namespace=NAMESPACE))
                incremental = await build_off_loop(lambda: IncrementalTable(full, namespace=NAMESPACE,
                                                                            rank=lambda source: source))
                table = full.table
            else:
                result = incremental.apply({source: (docs[source],)}, version=str(version))
                assert result is not None, "a pod's readiness is an incremental update"
                table = result.table
            store.publish(table)
            settle_heap()
            ended = time.monotonic()
            apply_times[mode].append(ended - began)
            windows[mode].append((began, ended))
            await asyncio.sleep(args.gap)
    await asyncio.sleep(1)
    client.terminate()
    out, _ = await client.communicate()
    stop.set()
    await tick
    server.close()
    requests = [tuple(map(float, line.split())) for line in out.decode().split("\n") if line]

    def worst(items: list[tuple[float, float]], spans: list[tuple[float, float]]) -> float:
        """The longest delay among the items that overlap an update (started before it ended, ended after it began)."""
        found = [delay for at, delay in items for began, ended in spans if at <= ended + 0.001 and at + delay >= began]
        return max(found, default=0.0)

    quiet = [delay for at, delay in requests
             if not any(at <= ended + 0.05 and at + delay >= began - 0.05 for spans in windows.values() for began, ended in spans)]
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{len(requests)} requests; without an update: p99 "
          f"{statistics.quantiles(quiet, n=100)[98] * 1000:.2f} ms, max {max(quiet) * 1000:.2f} ms")
    print(f"{'one pod readiness change':<28}{'apply median':>14}{'apply max':>12}{'worst request':>16}{'worst loop lag':>16}")
    for mode in ("full", "incremental"):
        times = apply_times[mode]
        print(f"{mode:<28}{statistics.median(times) * 1000:>12.2f}ms{max(times) * 1000:>10.2f}ms"
              f"{worst(requests, windows[mode]) * 1000:>14.2f}ms{worst(lags, windows[mode]) * 1000:>14.2f}ms")
    full_median, incremental_median = statistics.median(apply_times["full"]), statistics.median(apply_times["incremental"])
    print(f"incremental apply is {full_median / incremental_median:.0f}x faster than the full build "
          f"({args.updates} updates each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=10, help="updates of each kind")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between updates")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
