"""Benchmark: a sidecar's cost for one pod's change, on xDS against the direct Kubernetes source, in one run.

Owns measuring the sidecar's side of issue 17's targets. The world is table_update.py's (N Services with two
pods each, one group of every service with five lanes). The direct source's way: the changed Pod object
applied by core.incremental to the table built from every object (what control/kubernetes.py does for a
change of a few objects). The xDS way: the controller's encoder (laneproxy.xds.resources) turns the table
after the change into resources; the sidecar decodes the one whole-service assignment that changed, from its
bytes, and applies it to its view (control.xds.decode_resource + core.xds_view, what control/xds.py does for
a response of a few assignments). Also the full build, as a source does on a start or a group change. CPU
time per update (median of --updates), printed side by side with the ratios; then each way's resident memory
with the table, each in a fresh process (only the source's own imports loaded). Nothing is asserted.

    .venv/bin/python loadtests/bench/xds_update.py [--services 10000] [--pods 20000] [--updates 20]
"""

from __future__ import annotations

import argparse
import gc
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from table_update import LANES, NAMESPACE, _pod  # noqa: E402
from table_update import documents as two_pod_documents  # noqa: E402

from laneproxy.control.xds import decode_resource  # noqa: E402
from laneproxy.core.build import ConfigDocument, build  # noqa: E402
from laneproxy.core.incremental import IncrementalTable  # noqa: E402
from laneproxy.core.xds_view import ASSIGNMENT_TYPE, CLUSTER_TYPE, GROUP_TYPE, Update, XdsView  # noqa: E402
from laneproxy.xds.resources import ResourceEncoder  # noqa: E402

RSS_PROBE = """
import gc, pickle, re, sys
sys.path.insert(0, {bench!r})
if {xds}:
    import laneproxy.control.xds as source  # grpcio and the messages, as --source xds:// loads them
    from laneproxy.core.xds_view import ASSIGNMENT_TYPE, CLUSTER_TYPE, GROUP_TYPE, Update, XdsView
    with open({resources!r}, "rb") as saved:
        resources = pickle.load(saved)  # type URL -> [(name, bytes)], as the controller sent them
    view = XdsView(namespace="default")
    for type_url in (CLUSTER_TYPE, GROUP_TYPE, ASSIGNMENT_TYPE):
        view.apply(Update(type_url, {{name: source.decode_resource(type_url, name, value)
                                     for name, value in resources[type_url]}}), version="0", build_table=False)
    del resources
    view.rebuild("0")
else:
    import kubernetes_asyncio  # the direct source's client, loaded by --source kubernetes
    from xds_update import NAMESPACE, documents
    from laneproxy.core.build import build
    from laneproxy.core.incremental import IncrementalTable
    docs = documents({services}, {pods})  # the source keeps every object it watches
    built = build([docs[s] for s in sorted(docs)], version="0", namespace=NAMESPACE)
    keep = (docs, IncrementalTable(built, namespace=NAMESPACE, rank=lambda s: s))
gc.collect()
print(int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)))
"""


def documents(services: int, pods: int = 0) -> dict[str, ConfigDocument]:
    """table_update.py's world; with `pods`, that many pods in all (the first two of each service as there,
    the others spread over the services and the five lanes)."""
    docs = two_pod_documents(services)
    for extra in range(max(0, pods - 2 * services)):
        index = 2 * services + extra
        service = f"svc{extra % services:05d}"
        body = _pod(service, LANES[extra % len(LANES)], index, True)
        body["metadata"]["name"] = f"{service}-{extra}"
        source = f"kubernetes:Pod/{NAMESPACE}/{service}-{extra}"
        docs[source] = ConfigDocument(source, body)
    return docs


def cpu(action) -> float:
    started = time.process_time()
    action()
    return time.process_time() - started


def rss_mib(services: int, pods: int, xds: bool, resources: str = "") -> float:
    probe = RSS_PROBE.format(bench=str(Path(__file__).resolve().parent), services=services, pods=pods, xds=xds,
                             resources=resources)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--pods", type=int, default=0, help="pods in all (default: two per service)")
    args = parser.parse_args()
    docs = documents(args.services, args.pods)
    ordered = lambda: [docs[source] for source in sorted(docs)]  # noqa: E731
    # Both full builds as the sources run them (control/building.py): with the cyclic collector paused.
    gc.disable()
    started = time.process_time()
    built = build(ordered(), version="0", namespace=NAMESPACE)
    full_build = time.process_time() - started
    direct = IncrementalTable(built, namespace=NAMESPACE, rank=lambda source: source)
    encoder = ResourceEncoder()
    resources = encoder.encode(built.table)
    view = XdsView(namespace=NAMESPACE)
    started = time.process_time()
    for type_url in (CLUSTER_TYPE, GROUP_TYPE, ASSIGNMENT_TYPE):  # as control/xds.py: kept, then one build
        names = view.service_clusters if type_url == ASSIGNMENT_TYPE else resources.by_type[type_url]
        view.apply(Update(type_url, {n: decode_resource(type_url, n, resources.by_type[type_url][n].resource()
                                                        .resource.value) for n in names}), version="0",
                   build_table=False)
    view.rebuild("0")
    first_snapshot = time.process_time() - started
    gc.enable()
    gc.freeze()  # settle_heap, as after a publish
    print(f"{platform_line()}\n{args.services} services, {max(args.pods, 2 * args.services)} pods, {len(docs)} objects")
    print(f"full build {full_build * 1000:.0f} ms CPU; the sidecar's first xDS snapshot (decode and build) "
          f"{first_snapshot * 1000:.0f} ms CPU")
    timings: dict[str, list[float]] = {"direct": [], "xds": []}
    for update in range(args.updates):
        index = (update * 7919) % args.services
        name = f"svc{index:05d}"
        ready = update % 2 == 1  # the canary pod goes unready, then ready again
        pod = _pod(name, "canary", 2 * index + 1, ready)
        source = f"kubernetes:Pod/{NAMESPACE}/{name}-canary"
        docs[source] = ConfigDocument(source, pod)
        version = str(update + 1)
        timings["direct"].append(cpu(lambda s=source, v=version: direct.apply({s: [docs[s]]}, version=v)))
        table = direct.table
        resources = encoder.encode(table)  # the controller's side, not timed
        cluster = f"outbound|8000||{name}.{NAMESPACE}.svc.cluster.local"
        value = resources.by_type[ASSIGNMENT_TYPE][cluster].resource().resource.value

        def on_xds(cluster: str = cluster, value: bytes = value, version: str = version) -> None:
            view.apply(Update(ASSIGNMENT_TYPE, {cluster: decode_resource(ASSIGNMENT_TYPE, cluster, value)}),
                       version=version)

        timings["xds"].append(cpu(on_xds))
    direct_ms, xds_ms = (statistics.median(timings[key]) * 1000 for key in ("direct", "xds"))
    print(f"one pod's change, median of {args.updates}: direct source {direct_ms:.2f} ms CPU, xDS sidecar "
          f"{xds_ms:.2f} ms CPU ({xds_ms / direct_ms:.2f}x the direct source's, "
          f"{full_build * 1000 / xds_ms:.0f}x less than a full build)")
    with tempfile.TemporaryDirectory(prefix="xds-bench-") as scratch:
        saved = Path(scratch) / "resources.pickle"
        wanted = {ASSIGNMENT_TYPE: view.service_clusters}
        saved.write_bytes(pickle.dumps({type_url: [(name, encoded.resource().resource.value)
                                                   for name, encoded in resources.by_type[type_url].items()
                                                   if type_url not in wanted or name in wanted[type_url]]
                                        for type_url in (CLUSTER_TYPE, GROUP_TYPE, ASSIGNMENT_TYPE)}))
        xds_rss = rss_mib(args.services, args.pods, True, str(saved))
    print(f"resident memory with the table: direct source {rss_mib(args.services, args.pods, False):.1f} MiB "
          f"(every object, the table, the indexes), xDS sidecar {xds_rss:.1f} MiB (grpcio, the view and the table)")


def platform_line() -> str:
    model = ""
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return f"python {sys.version.split()[0]}, {model}"


if __name__ == "__main__":
    main()
