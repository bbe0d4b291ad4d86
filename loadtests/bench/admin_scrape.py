"""One admin scrape of a huge route table: how long it takes and how long it stalls the proxy's event loop.

Owns a focused, in-process measurement: a laneproxy (outbound listener + admin) holding a table of
N services x 5 lanes (tables.py writes the same files `make bench` gives `laneproxy-big`), a share of
its clusters given counters as if they had served traffic, then each admin endpoint scraped a few
times. The scrape runs in a thread with a blocking client, so the client's own parsing never runs on
the proxy's loop; a ticker task on the loop records the longest gap between its wake-ups while each
scrape is in flight: that gap is how long a request to the proxy would have waited. Prints a table;
nothing here judges the numbers.

    python loadtests/bench/admin_scrape.py [--services 10000] [--busy 1000] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tables  # noqa: E402

from laneproxy.app import ProxyApp  # noqa: E402
from laneproxy.core.model import Endpoint  # noqa: E402
from laneproxy.settings import Address, ProxySettings  # noqa: E402

PATHS = (
    "/stats",
    "/stats?format=json",
    "/stats/prometheus",
    "/stats?format=prometheus&usedonly",
    "/stats?usedonly",
    "/stats?filter=canary&format=json",
    "/clusters",
    "/clusters?format=json",
)


class Ticker:
    """Wakes every `period` seconds and remembers the longest time between two wake-ups since reset()."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task | None = None

    def reset(self) -> None:
        self.max_gap, self.ticks = 0.0, 0

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.period)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last - self.period)
            self.ticks += 1
            last = now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def fetch(url: str) -> tuple[float, float, int, int]:
    """Seconds to the first body byte and to the last, body size, status; a blocking client in a thread."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        first = response.read(1)
        first_at = time.perf_counter()
        rest = response.read()
        return first_at - started, time.perf_counter() - started, len(first) + len(rest), response.status


def give_traffic(proxy: ProxyApp, count: int) -> None:
    """Counters on `count` clusters spread over the table, as if each had answered a few requests."""
    names = sorted({route.cluster for routes in proxy.store.current.routes.values()
                    for route in (routes.default, *routes.by_lane.values())})
    step = max(1, len(names) // count) if count else 0
    for index, name in enumerate(names[::step][:count] if count else []):
        cluster = proxy.stats.cluster(name)
        cluster.rq_total = cluster.cx_total = 3 + index % 5
        cluster.rq_by_code.update({200: 2 + index % 5, 503: 1})
        cluster.rq_time.record(1.5 + index % 7)
        host = cluster.host(Endpoint("127.0.0.1", 9))
        host.rq_total = host.rq_success = 3
    proxy.stats.lanes.requests.update({lane: 10 for lane in tables.LANES})


async def measure(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="admin-scrape-"))
    started = time.perf_counter()
    swimlanes, endpoints, _ = tables.write_table(work, "scrape", args.services, 9)
    settings = ProxySettings(outbound=Address("127.0.0.1", 0), admin=Address("127.0.0.1", 0),
                             config_files=(str(swimlanes), str(endpoints)), reload_interval=3600.0)
    proxy = ProxyApp(settings)
    await proxy.start()
    clusters = len({route.cluster for routes in proxy.store.current.routes.values()
                    for route in (routes.default, *routes.by_lane.values())})
    print(f"table: {args.services} services x {len(tables.LANES)} lanes, {clusters} clusters, "
          f"{args.busy} with traffic; ready in {time.perf_counter() - started:.1f}s", flush=True)
    give_traffic(proxy, args.busy)
    ticker = Ticker()
    ticker.start()
    loop = asyncio.get_running_loop()
    results = {}
    try:
        for path in args.paths:
            url = f"http://127.0.0.1:{proxy.bound['admin']}{path}"
            runs = []
            for _ in range(args.repeat):
                await asyncio.sleep(0.05)
                ticker.reset()
                first, total, size, status = await loop.run_in_executor(None, fetch, url)
                runs.append((total, ticker.max_gap, first, size, status))
            results[path] = {
                "seconds": statistics.median(r[0] for r in runs),
                "max_loop_gap_ms": statistics.median(r[1] for r in runs) * 1000,
                "worst_loop_gap_ms": max(r[1] for r in runs) * 1000,
                "first_byte_seconds": statistics.median(r[2] for r in runs),
                "bytes": runs[-1][3],
                "status": runs[-1][4],
            }
            row = results[path]
            print(f"{path:40s} {row['seconds'] * 1000:10,.0f} ms  first byte {row['first_byte_seconds'] * 1000:8,.0f} ms"
                  f"  max loop gap {row['max_loop_gap_ms']:8,.1f} ms (worst {row['worst_loop_gap_ms']:,.1f})"
                  f"  {row['bytes'] / 2**20:7.1f} MiB  {row['status']}", flush=True)
    finally:
        ticker.stop()
        await proxy.stop()
    return {"services": args.services, "clusters": clusters, "busy": args.busy, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--busy", type=int, default=1_000, help="clusters given counters (as if they saw traffic)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", nargs="*", default=list(PATHS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    outcome = asyncio.run(measure(args))
    if args.json:
        args.json.write_text(json.dumps(outcome, indent=1))


if __name__ == "__main__":
    main()
