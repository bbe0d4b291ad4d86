"""Turning the benchmark's raw runs into medians, same-round ratios, the target verdicts, markdown and a chart.

Owns the arithmetic and the presentation: every ratio is computed inside one round (laneproxy and
nginx measured minutes apart on a shared machine are not comparable; seconds apart in the same round
are), then the median over rounds is reported. Nothing here starts a process or measures anything.
"""

from __future__ import annotations

import statistics
from pathlib import Path

MiB = 2**20
PROXY = "laneproxy"
PURE = "laneproxy (pure Python)"  # the same sidecar on its pure-Python sources (bench.py: LANEPROXY_PURE=1)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cases(runs: list[dict], kind: str) -> list[str]:
    order = {"direct": 0, "nginx": 1, "envoy": 2, PROXY: 3, PURE: 4}
    names = list(dict.fromkeys(r["case"] for r in runs if r["kind"] == kind))
    return sorted(names, key=lambda name: (order.get(name, 9), names.index(name)))


def _ratio_per_round(runs: list[dict], kind: str, case: str, reference: str, field: str = "rps"):
    rounds: dict[int, dict[str, dict]] = {}
    for run in runs:
        if run["kind"] == kind:
            rounds.setdefault(run["round"], {})[run["case"]] = run
    ratios = [r[case][field] / r[reference][field] for r in rounds.values()
              if case in r and reference in r and r[reference][field]]
    return _median(ratios)


def summarise(data: dict) -> dict:
    runs = data["runs"]
    summary: dict = {"throughput": {}, "latency_1cx": {}, "table": {}, "swap": {}, "demo": {}, "memory": {},
                     "h2c": {}, "websocket": {}}
    for kind in ("h2c", "websocket"):
        for case in _cases(runs, kind):
            rows = [r for r in runs if r["kind"] == kind and r["case"] == case]
            summary[kind][case] = {
                "rps": _median(r["rps"] for r in rows), "p50_us": _median(r["p50_us"] for r in rows),
                "p99_us": _median(r["p99_us"] for r in rows),
                "cpu_us_per_request": _median(r["cpu_us_per_request"] for r in rows),
                "errors": sum(sum(r["errors"].values()) for r in rows),
                "vs_nginx": _ratio_per_round(runs, kind, case, "nginx"),
                "vs_envoy": _ratio_per_round(runs, kind, case, "envoy"),
            }
    for case in _cases(runs, "throughput"):
        rows = [r for r in runs if r["kind"] == "throughput" and r["case"] == case]
        summary["throughput"][case] = {
            "rps": _median(r["rps"] for r in rows),
            "p50_us": _median(r["p50_us"] for r in rows),
            "p99_us": _median(r["p99_us"] for r in rows),
            "cpu_us_per_request": _median(r["cpu_us_per_request"] for r in rows),
            "user_us_per_request": _median(r.get("user_us_per_request") for r in rows),
            "rss_bytes": _median(r["rss_bytes"] for r in rows),
            "errors": sum(sum(r["errors"].values()) for r in rows),
            "vs_nginx": _ratio_per_round(runs, "throughput", case, "nginx"),
            "vs_envoy": _ratio_per_round(runs, "throughput", case, "envoy"),
            "rps_per_round": [r["rps"] for r in rows],
        }
    for case in _cases(runs, "latency-1cx"):
        rows = [r for r in runs if r["kind"] == "latency-1cx" and r["case"] == case]
        direct = {r["round"]: r for r in runs if r["kind"] == "latency-1cx" and r["case"] == "direct"}
        summary["latency_1cx"][case] = {
            "rps": _median(r["rps"] for r in rows),
            "p50_us": _median(r["p50_us"] for r in rows),
            "p99_us": _median(r["p99_us"] for r in rows),
            "added_p50_us": _median(r["p50_us"] - direct[r["round"]]["p50_us"] for r in rows if r["round"] in direct),
            "cpu_us_per_request": _median(r["cpu_us_per_request"] for r in rows),
        }
    table_cases = _cases(runs, "table")
    for case in table_cases:
        rows = [r for r in runs if r["kind"] == "table" and r["case"] == case]
        summary["table"][case] = {
            "rps": _median(r["rps"] for r in rows), "p99_us": _median(r["p99_us"] for r in rows),
            "max_us": max(r["max_us"] for r in rows), "cpu_us_per_request": _median(r["cpu_us_per_request"] for r in rows),
        }
    if len(table_cases) == 2:
        summary["table_ratio"] = _ratio_per_round(runs, "table", table_cases[1], table_cases[0])
    swaps = [r for r in runs if r["kind"] == "swap"]
    if swaps:
        summary["swap"] = {
            "case": swaps[0]["case"],
            "max_us": max(r["max_us"] for r in swaps),
            "max_us_per_round": [r["max_us"] for r in swaps],
            "p99_us": _median(r["p99_us"] for r in swaps),
            "rps": _median(r["rps"] for r in swaps),
            "swap_s_per_round": [r.get("swap_s") for r in swaps],
            "errors": sum(sum(r["errors"].values()) for r in swaps),
        }
    for case in _cases(runs, "demo"):
        rows = [r for r in runs if r["kind"] == "demo" and r["case"] == case]
        summary["demo"][case] = {
            "rps": _median(r["rps"] for r in rows), "p50_us": _median(r["p50_us"] for r in rows),
            "p99_us": _median(r["p99_us"] for r in rows),
            "cpu_us_per_request": _median(r["cpu_us_per_request"] for r in rows),
            "rss_bytes": _median(r["rss_bytes"] for r in rows),
        }
    for name, idle in data["idle_rss_bytes"].items():
        held = data["hold"].get(name, {})
        summary["memory"][name] = {"idle_bytes": idle, "hold_bytes": held.get("rss_bytes"), "held": held.get("connections"),
                                   "idle_private_bytes": data.get("idle_private_bytes", {}).get(name),
                                   "hold_private_bytes": held.get("private_bytes")}
    for name, held in data["hold"].items():
        summary["memory"].setdefault(name, {"idle_bytes": None, "hold_bytes": held["rss_bytes"], "held": held["connections"],
                                            "idle_private_bytes": None, "hold_private_bytes": held.get("private_bytes")})
    summary["targets"] = targets(summary, data)
    return summary


def targets(summary: dict, data: dict) -> list[dict]:
    t = summary["throughput"].get(PROXY, {})
    lat = summary["latency_1cx"].get(PROXY, {})
    nginx_lat = summary["latency_1cx"].get("nginx", {})
    added, nginx_added = lat.get("added_p50_us"), nginx_lat.get("added_p50_us")
    added_ratio = added / nginx_added if added is not None and nginx_added else None
    h2 = summary["h2c"].get(PROXY, {})
    mem = summary["memory"].get(PROXY, {})
    table_ratio = summary.get("table_ratio")
    swap = summary.get("swap", {})
    big = data["meta"]["table_services"]
    lanes = data["meta"]["lanes"]
    hold = data["meta"]["hold_connections"]

    def row(name, measured, met, shown):
        return {"target": name, "measured": measured, "met": met, "shown": shown}

    def check(value, predicate):
        return None if value is None else bool(predicate(value))

    rows = [
        row("throughput >= 65% of nginx (1 worker each)", t.get("vs_nginx"), check(t.get("vs_nginx"), lambda v: v >= 0.65),
            _pct(t.get("vs_nginx"))),
        row("throughput >= 2x Envoy (--concurrency 1)", t.get("vs_envoy"), check(t.get("vs_envoy"), lambda v: v >= 2.0),
            _times(t.get("vs_envoy"))),
        row("CPU <= 25 us per proxied request", t.get("cpu_us_per_request"),
            check(t.get("cpu_us_per_request"), lambda v: v <= 25), _us(t.get("cpu_us_per_request"))),
        row("of which user space <= 8 us", t.get("user_us_per_request"),
            check(t.get("user_us_per_request"), lambda v: v <= 8), _us(t.get("user_us_per_request"))),
        row("added latency per hop at p50, one connection, <= 1.2x nginx's", added_ratio,
            check(added_ratio, lambda v: v <= 1.2),
            "n/a" if added_ratio is None else f"{added:.0f} us = {added_ratio:.2f}x nginx's {nginx_added:.0f} us"),
        row("h2c requests/s >= Envoy's (h2load, same concurrency)", h2.get("vs_envoy"),
            check(h2.get("vs_envoy"), lambda v: v >= 1.0), _times(h2.get("vs_envoy"))),
        row("RSS <= 35 MiB idle", mem.get("idle_bytes"), check(mem.get("idle_bytes"), lambda v: v <= 35 * MiB),
            _mib(mem.get("idle_bytes"))),
        row(f"RSS <= 60 MiB holding {hold:,} keep-alive connections", mem.get("hold_bytes"),
            check(mem.get("hold_bytes"), lambda v: v <= 60 * MiB and (mem.get("held") or 0) >= hold),
            _mib(mem.get("hold_bytes")) + (f" ({mem.get('held')} held)" if mem.get("held") != hold else "")),
        row(f"{big:,} services x {lanes} lanes: throughput within 5% of 3 services", table_ratio,
            check(table_ratio, lambda v: v >= 0.95), _pct(table_ratio)),
        row("no request delayed > 50 ms while that table is rebuilt and swapped", swap.get("max_us"),
            check(swap.get("max_us"), lambda v: v <= 50_000 and all(s is not None for s in swap.get("swap_s_per_round", []))),
            _ms(swap.get("max_us")) + " slowest request"),
    ]
    return rows


def collapse_profile(raw: str, top: int = 25) -> dict:
    """py-spy's raw (collapsed) stacks -> the functions with the most samples, on their own and with callees."""
    import re

    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    strip_line = re.compile(r":\d+\)$")
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [strip_line.sub(")", frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples

    def ranked(counts, ceiling=1.0):
        kept = [(f, n) for f, n in counts.items() if total and n / total <= ceiling]
        return [{"function": f, "percent": round(100 * n / total, 1)} for f, n in sorted(kept, key=lambda item: -item[1])[:top]]

    # With callees, the entry frames (runpy, main, the event loop's run) are ~100%: say nothing; leave them out.
    return {"samples": total, "self": ranked(own), "inclusive": ranked(inclusive, ceiling=0.9)}


def syscalls_per_request(strace_summary: str, requests: int) -> dict:
    """`strace -c` table -> calls per proxied request, by system call."""
    calls: dict[str, float] = {}
    for line in strace_summary.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            # % time, seconds, usecs/call, calls, [errors,] syscall
            calls[parts[-1]] = int(parts[3])
    per = {name: round(count / requests, 3) for name, count in sorted(calls.items(), key=lambda i: -i[1]) if requests}
    return {"requests": requests, "total": round(sum(calls.values()) / requests, 2) if requests else None, "per_request": per}


def _pct(v):
    return "n/a" if v is None else f"{v * 100:.0f}%"


def _times(v):
    return "n/a" if v is None else f"{v:.2f}x"


def _us(v):
    return "n/a" if v is None else f"{v:.0f} us"


def _ms(v):
    return "n/a" if v is None else f"{v / 1000:.1f} ms"


def _mib(v):
    return "n/a" if v is None else f"{v / MiB:.1f} MiB"


def _num(v):
    return "n/a" if v is None else f"{v:.1f}"


def _k(v):
    return "n/a" if v is None else f"{v:,.0f}"


def markdown(data: dict, *, chart_name: str | None = None) -> str:
    meta, s = data["meta"], data["summary"]
    out = [
        f"## laneproxy benchmark, {meta['date']}",
        "",
        f"Machine: {meta['cpus']} x {meta['cpu_model']}, {meta['memory_mb']:,} MB RAM, Linux {meta['kernel']}, "
        f"Python {meta['python']}; {meta['nginx']}; Envoy {meta['envoy']}; {meta['wrk']}. "
        f"Load average at start {', '.join(f'{x:.1f}' for x in meta['load_average'])} "
        "(a shared machine: absolute numbers are noisy, same-round ratios are the result).",
        "",
        f"wrk (1 thread, keep-alive) and the nginx static upstream pinned to core {meta['pinning']['load_and_upstream_core']}, "
        f"the proxy under test to core {meta['pinning']['proxy_core']}; {meta['rounds']} interleaved rounds, "
        f"{meta['duration_s']:g} s per throughput case at {meta['connections']} connections, "
        f"{meta['latency_duration_s']:g} s per one-connection case; medians, ratios computed within each round. "
        f"Requests: `GET /`, `Host: bench`, `my-request-id: 10002`; the laneproxy sidecar learned 10002 -> canary on its "
        "inbound listener, so each request is resolved through the trace table, routed to the canary lane and "
        "forwarded with `x-asm-prefer-tag: canary` added; Envoy routes on the Host and the lane header.",
        "",
        "Builds: " + "; ".join(f"`{name}` runs {b['detail']}" for name, b in data.get("builds", {}).items()) + ".",
        "",
        "### Throughput, one worker each",
        "",
        "| case | req/s | vs nginx | vs Envoy | p50 ms | p99 ms | CPU us/req | of it user us/req | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in s["throughput"].items():
        out.append(f"| {case} | {_k(r['rps'])} | {_pct(r['vs_nginx'])} | {_times(r['vs_envoy'])} | "
                   f"{r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | {r['cpu_us_per_request']:.1f} | "
                   f"{_num(r.get('user_us_per_request'))} | {r['rss_bytes'] / MiB:.1f} |")
    for case, r in s["demo"].items():
        out.append(f"| {case}, informational | {_k(r['rps'])} | | | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | "
                   f"{r['cpu_us_per_request']:.0f} (11 processes) | | {r['rss_bytes'] / MiB:.0f} |")
    out += ["", "`direct` is wrk against the upstream itself: the limit; its CPU column is the upstream nginx's. "
            "CPU is utime+stime of the proxy's processes from /proc over the run, divided by the requests wrk completed; "
            "user is utime alone (the proxy's own code; the rest is the kernel's). "
            "The demo rows go through the gateway and three sidecar pairs with aiohttp mock apps (CPU summed over all "
            "eleven processes, on the proxy core).", ""]
    for kind, title, unit, item, note in (
            ("h2c", "h2c (HTTP/2 with prior knowledge), one worker each", "req/s", "req",
             f"h2load (1 thread) with {meta.get('h2_connections')} connections x {meta.get('h2_streams')} concurrent "
             "streams, pinned with the upstream; the upstream is nginx's h2c server; nginx proxies with `grpc_pass` "
             "(its only HTTP/2 upstream), Envoy with an HTTP/2 cluster; `:authority: bench-h2`, a service outside "
             "the swimlane group."),
            ("websocket", "WebSocket echo, one worker each", "messages/s", "message",
             f"{meta.get('ws_connections')} connections, each sending a {meta.get('ws_size')}-byte message and waiting "
             "for its echo, over and over; the Python client and echo server share the load core and bound the rate, "
             "so a proxy near `direct` is not the bottleneck.")):
        if not s.get(kind) and not any(key.startswith(kind + " ") for key in data.get("skipped", {})):
            continue
        out += [f"### {title}", "", f"| case | {unit} | vs nginx | vs Envoy | p50 ms | p99 ms | CPU us/{item} |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for case, r in s.get(kind, {}).items():
            cpu = r["cpu_us_per_request"]
            out.append(f"| {case} | {_k(r['rps'])} | {_pct(r['vs_nginx'])} | {_times(r['vs_envoy'])} | "
                       f"{r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | {'n/a' if cpu is None else f'{cpu:.1f}'} |"
                       + (f" {r['errors']} errors" if r["errors"] else ""))
        for key, why in data.get("skipped", {}).items():
            if key.startswith(kind + " "):
                out.append(f"| {key.split(' ', 1)[1]} | skipped: {why} | | | | | |")
        out += ["", note, ""]
    out += ["### One connection: latency added per hop", "",
            "| case | p50 us | added p50 vs direct us | p99 us | CPU us/req |", "|---|---:|---:|---:|---:|"]
    for case, r in s["latency_1cx"].items():
        out.append(f"| {case} | {r['p50_us']:.0f} | {r['added_p50_us']:.0f} | {r['p99_us']:.0f} | "
                   f"{r['cpu_us_per_request']:.1f} |")
    out += ["", "### Memory", "", f"| process | RSS idle MiB | RSS holding {meta['hold_connections']:,} keep-alive connections MiB "
            "| private idle MiB | private holding them MiB |", "|---|---:|---:|---:|---:|"]

    def mib(value):
        return "" if value is None else f"{value / MiB:.1f}"

    for name, r in s["memory"].items():
        hold = mib(r["hold_bytes"])
        if r.get("held") is not None and r["held"] != meta["hold_connections"]:
            hold += f" ({r['held']} held)"
        out.append(f"| {name} | {mib(r['idle_bytes'])} | {hold} | {mib(r.get('idle_private_bytes'))} | "
                   f"{mib(r.get('hold_private_bytes'))} |")
    out += ["", "RSS of the process and its children (nginx: master and worker; `--workers`: supervisor, workers and "
            "multiprocessing's tracker). Private: pages no other process shares (RSS also counts shared libraries). "
            "`laneproxy-big` holds the large table; `upstream` is the nginx static responder. Idle: after start-up, "
            "before any request.", ""]
    if s["table"]:
        out += ["### Route table size", "", "| table | req/s | p99 ms | slowest ms | CPU us/req |", "|---|---:|---:|---:|---:|"]
        for case, r in s["table"].items():
            out.append(f"| {case} x {meta['lanes']} lanes | {_k(r['rps'])} | {r['p99_us'] / 1000:.2f} | "
                       f"{r['max_us'] / 1000:.1f} | {r['cpu_us_per_request']:.1f} |")
        swap = s.get("swap") or {}
        if swap:
            out.append(f"| {swap['case']} (file replaced under load) | {_k(swap['rps'])} | {swap['p99_us'] / 1000:.2f} | "
                       f"{swap['max_us'] / 1000:.1f} | |")
        out += ["", f"Requests walk the table: wrk cycles through 10,000 (host, lane, trace) combinations drawn from every "
                f"service and lane (all 15 for 3 services). Big/small throughput, same round: {_pct(s.get('table_ratio'))}. "
                f"Swap: the endpoints file is atomically replaced 1 s into the run, with one service more (a new version of "
                f"the whole table); the run ends 0.5 s after a request for that service stops getting 404; new table serving after "
                f"{', '.join('n/a' if x is None else f'{x:.1f} s' for x in swap.get('swap_s_per_round', []))} "
                f"(per round); slowest request per round "
                f"{', '.join(f'{x / 1000:.0f} ms' for x in swap.get('max_us_per_round', []))}.", ""]
    if data.get("admin_scrape_ms"):
        scrapes = ", ".join(f"{k}: {v:,.0f} ms" for k, v in data["admin_scrape_ms"].items())
        out += [f"One admin scrape, during which the proxy's event loop serves nothing: {scrapes}.", ""]
    out += ["### Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for t in s["targets"]:
        verdict = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        out.append(f"| {t['target']} | {t['shown']} | {verdict} |")
    profile = data.get("profile") or {}
    if profile:
        out += ["", "### Profile of the sidecar under the throughput load", ""]
        if profile.get("syscalls"):
            out += ["| process | system calls per request | top calls per request |", "|---|---:|---|"]
            for name, sc in profile["syscalls"].items():
                tops = ", ".join(f"{k} {v:.2f}" for k, v in list(sc["per_request"].items())[:5])
                out.append(f"| {name} | {sc['total']} | {tops} |")
            out.append("")
        if profile.get("perf_dso"):
            shares = ", ".join(f"{k} {v:.1f}%" for k, v in list(profile["perf_dso"].items())[:6])
            out += [f"perf, CPU samples by binary: {shares}.", ""]
        spy = profile.get("py_spy")
        if spy:
            out += [f"py-spy, {spy['samples']:,} samples (time in C code, uvloop and the kernel, is charged to the Python "
                    "frame that called it):", "", "| % own | function | | % with callees | function |", "|---:|---|---|---:|---|"]
            for own, inc in zip(spy["self"][:15], spy["inclusive"][:15]):
                out.append(f"| {own['percent']} | `{own['function']}` | | {inc['percent']} | `{inc['function']}` |")
    if data.get("sidecar_counters"):
        counters = ", ".join(f"{k} = {v:,}" for k, v in sorted(data["sidecar_counters"].items()))
        out += ["", f"Sidecar counters at the end (evidence of the work done): {counters}."]
    if data.get("notes"):
        out += ["", "Notes: " + "; ".join(data["notes"])]
    if chart_name:
        out += ["", f"![benchmark chart]({chart_name})"]
    out += ["", f"Reproduce: `make bench` ({meta['command']}; took {meta['elapsed_s']:.0f} s).", ""]
    return "\n".join(out)


def chart(data: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = data["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    colors = {"direct": "#9e9e9e", "nginx": "#2e7d32", "envoy": "#c62828", PROXY: "#1565c0"}

    def bars(ax, labels, values, title, unit, fmt="{:,.0f}"):
        shown = [v or 0 for v in values]
        rects = ax.bar(range(len(labels)), shown, color=[colors.get(label, "#64b5f6") for label in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=9)
        for rect, value in zip(rects, shown):
            ax.annotate(fmt.format(value), (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=8)

    through = s["throughput"]
    labels = list(through) + list(s["demo"])
    bars(axes[0][0], labels, [through[c]["rps"] for c in through] + [s["demo"][c]["rps"] for c in s["demo"]],
         "requests/s (median of rounds)", "req/s")
    proxies = [c for c in through if c != "direct"]
    bars(axes[0][1], proxies, [through[c]["cpu_us_per_request"] for c in proxies], "CPU per request (target <= 50 us)",
         "us", "{:.1f}")
    axes[0][1].axhline(50, color="black", linestyle="--", linewidth=0.8)
    lat = s["latency_1cx"]
    bars(axes[1][0], list(lat), [lat[c]["p50_us"] for c in lat], "p50 latency, one connection", "us")
    mem = {k: v for k, v in s["memory"].items() if k != "upstream"}
    names = list(mem)
    ax = axes[1][1]
    width = 0.4
    idle = [(mem[n]["idle_bytes"] or 0) / MiB for n in names]
    held = [(mem[n]["hold_bytes"] or 0) / MiB for n in names]
    ax.bar([i - width / 2 for i in range(len(names))], idle, width, label="idle", color="#90caf9")
    ax.bar([i + width / 2 for i in range(len(names))], held, width, label="1,000 keep-alive connections", color="#1565c0")
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax.set_title("RSS (targets: 35 / 60 MiB)", fontsize=10)
    ax.set_ylabel("MiB", fontsize=9)
    ax.axhline(35, color="#90caf9", linestyle="--", linewidth=0.8)
    ax.axhline(60, color="#1565c0", linestyle="--", linewidth=0.8)
    ax.legend(fontsize=8)
    meta = data["meta"]
    fig.suptitle(f"laneproxy vs nginx vs Envoy, {meta['date'][:10]}, {meta['cpus']} x {meta['cpu_model']}, "
                 f"{meta['rounds']} rounds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
