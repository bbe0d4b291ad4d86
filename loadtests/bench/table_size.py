"""Benchmark: why a 10,000-service table slows every request, the table-size case of bench.py taken apart.

Owns telling apart the two things bench.py's table case changes at once: the size of the table the
sidecar holds, and how many distinct (service, lane, trace id) combinations the requests walk. Three
cases, interleaved round by round on the same pinned cores as bench.py (wrk and an nginx upstream on
one core, the sidecar under test on the other): a 3-service table walked by its 15 combinations (bench's
baseline), the 10,000-service table walked by 15 combinations of its own (only the table differs), and
the 10,000-service table walked by 10,000 combinations (bench's case: every request a different service,
lane and trace id, so also a different cluster's stats, Istio series and trace-table entry). Prints
req/s, CPU per request and each case against the baseline of the same round; `--profile` adds a py-spy
profile of each case. Nothing is asserted.

    .venv/bin/python loadtests/bench/table_size.py [--services 10000] [--rounds 3] [--duration 5] [--profile]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.bench import tables, wrk  # noqa: E402
from loadtests.bench.bench import LOAD_CORE, NGINX, PROXY_CORE, http_get, render  # noqa: E402
from loadtests.bench.processes import Service, free_port  # noqa: E402


def sidecar(work: Path, name: str, services: int, upstream_port: int) -> tuple[Service, list[str]]:
    swimlanes, endpoints, names = tables.write_table(work, name, services, upstream_port)
    port, admin = free_port(), free_port()
    service = Service(name, [sys.executable, "-m", "laneproxy", "--log-level", "warning", "run",
                             "--outbound", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                             "--config", str(swimlanes), "--config", str(endpoints)], PROXY_CORE, port)
    service.admin = admin  # type: ignore[attr-defined]
    return service, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="py-spy the wide case once more at the end")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="laneproxy-table-size-"))
    upstream_port = free_port()
    conf = render("nginx-upstream.conf", work / "nginx-upstream.conf", prefix=work, port=upstream_port,
                  h2c_port=free_port())
    upstream = Service("upstream", [NGINX, "-p", str(work), "-e", str(work / "upstream.error.log"), "-c", str(conf)],
                       LOAD_CORE, upstream_port, stop_signal=signal.SIGQUIT)
    small, small_names = sidecar(work, "small", 3, upstream_port)
    big, big_names = sidecar(work, "big", args.services, upstream_port)
    script = work / "rotate.lua"
    script.write_text(wrk.rotating_script())
    mixes = {
        "3 services, 15 combinations": (small, tables.request_mix(work / "small.txt", small_names, size=10_000)),
        f"{args.services} services, 15 combinations": (big, tables.request_mix(work / "narrow.txt", big_names[:3],
                                                                                 size=10_000)),
        f"{args.services} services, 10,000 combinations": (big, tables.request_mix(work / "wide.txt", big_names,
                                                                                    size=10_000)),
    }
    started = [upstream.start(), small.start(), big.start(timeout=300)]
    results: dict[str, list[tuple[float, float]]] = {case: [] for case in mixes}
    ratios: dict[str, list[float]] = {case: [] for case in mixes}
    try:
        for service in (small, big):
            status, _ = http_get(f"http://127.0.0.1:{service.port}/", {"Host": "bench"})
            if status != 200:
                raise RuntimeError(f"{service.name} answered {status}")
        for case, (service, mix) in mixes.items():  # warm-up: every cluster's stats exist before timing
            wrk.run(f"http://127.0.0.1:{service.port}/", script, connections=args.connections, duration=2,
                    core=LOAD_CORE, script_args=(str(mix),))
        cases = list(mixes)
        for index in range(args.rounds):
            order = cases[index % len(cases):] + cases[:index % len(cases)]
            rps = {}
            for case in order:
                service, mix = mixes[case]
                before = service.cpu()
                result = wrk.run(f"http://127.0.0.1:{service.port}/", script, connections=args.connections,
                                 duration=args.duration, core=LOAD_CORE, script_args=(str(mix),))
                if result.error_count:
                    raise RuntimeError(f"{case}: {result.errors}")
                cpu_us = (service.cpu() - before) / max(1, result.requests) * 1e6
                results[case].append((result.rps, cpu_us))
                rps[case] = result.rps
            for case in cases:
                ratios[case].append(rps[case] / rps[cases[0]])
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()} {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.duration:.0f} s, "
              f"{args.connections} connections")
        print(f"| case | req/s | CPU us/req | vs 3 services, same round |")
        print("|---|---:|---:|---:|")
        for case in cases:
            print(f"| {case} | {statistics.median(r for r, _ in results[case]):,.0f} "
                  f"| {statistics.median(c for _, c in results[case]):.1f} "
                  f"| {statistics.median(ratios[case]) * 100:.0f}% |")
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if args.profile and Path(spy).exists():
            for number, case in enumerate(cases):
                service, mix = mixes[case]
                raw = work / f"profile-{number}.txt"
                recorder = subprocess.Popen([spy, "record", "--format", "raw", "--output", str(raw), "--pid",
                                             str(service.pid), "--duration", str(int(args.duration)), "--rate", "1000", "--nonblocking"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wrk.run(f"http://127.0.0.1:{service.port}/", script, connections=args.connections,
                        duration=args.duration + 1, core=LOAD_CORE, script_args=(str(mix),))
                recorder.wait(timeout=60)
                print(f"py-spy profile of {case} (collapsed stacks): {raw}")
    finally:
        for service in reversed(started):
            service.stop()


if __name__ == "__main__":
    main()
