"""`laneproxy run --workers N`: N proxy processes sharing the listening ports, one admin that adds them up.

Owns the supervisor and the worker side of it. The design, chosen to be small and to share nothing
that can corrupt:

- The supervisor (the process `laneproxy run` started) serves no traffic. It reserves every listener
  port (so `:0` means one port for all workers), starts N workers with multiprocessing's `spawn`
  (fresh interpreters: nothing of an event loop is ever forked), restarts a worker that dies, and
  on SIGTERM/SIGINT passes SIGTERM on, so every worker drains as a single process would.
- Each worker is a complete ProxyApp: its own file source, store, pools and stats. Its listeners
  are bound with SO_REUSEPORT, so the kernel spreads new connections across workers. Its admin
  listens on 127.0.0.1 on a port of its own, told to the supervisor through a pipe.
- The supervisor's admin, on the `--admin` address, answers /stats (text, JSON, Prometheus) by
  asking every worker and adding each number up by name and labels; anything that is not a number
  (a histogram's text, a version) comes from the first worker. /ready is LIVE only when every worker
  is. Other GET paths are answered by the first live worker (every worker reads the same files);
  POSTs (health check fail/ok, drain...) go to every worker.
- The trace table is per process, but a trace's inbound request and its app's outbound calls may
  land on different workers. Each worker therefore tells its siblings what its inbound listener
  learned (trace key -> lane) with one datagram per sibling on an abstract Unix socket: no shared
  memory, no locks, and a lost datagram only costs one baseline hop, never a wrong lane.

It must never serve proxy traffic in the supervisor, and never fork a process that runs an event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from laneproxy.core.propagation import DEFAULT_MAX_BYTES, TraceLaneTable
from laneproxy.settings import Address, ProxySettings

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("laneproxy.workers")

LISTENER_ROLES = ("gateway", "inbound", "outbound")
RESTART_DELAY = 1.0
STARTUP_TIMEOUT = 120.0


# ---------------------------------------------------------------------------------------------
# adding up the workers' numbers (pure: tested without processes)


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


# Numbers that describe state every worker holds a copy of (the same endpoints, config, trace table, server
# state) are not added up: N workers do not make N times the endpoints. Matched on the name with '_' read
# as '.', so the same rule covers `cluster.x.membership_total` and Prometheus' `envoy_cluster_membership_total`.
_SAME_IN_EVERY_WORKER = (".membership.", "cluster.manager.", "laneproxy.config.", "trace.table.size", "server.uptime",
                         "server.state", "server.version", "server.hot.restart")
_ALL_WORKERS_MUST = ("server.live",)  # 1 only if every worker says 1


def combine(name: str, a, b):
    """The value of stat `name` across two workers: added up, unless it is a copy of shared state."""
    dotted = name.replace("_", ".")
    if any(marker in dotted for marker in _ALL_WORKERS_MUST):
        return min(a, b)
    if any(marker in dotted for marker in _SAME_IN_EVERY_WORKER):
        return max(a, b)  # the worst state, the longest uptime, the newest copy
    total = a + b
    return int(total) if isinstance(total, float) and total.is_integer() and isinstance(a, int) else total


def sum_stats_text(bodies: Iterable[str]) -> str:
    """Envoy's text /stats (`name: value` lines) of several workers -> one, numbers added by name."""
    values: dict[str, object] = {}
    for body in bodies:
        for line in body.splitlines():
            name, sep, value = line.partition(": ")
            if not sep:
                continue
            number = _number(value.strip())
            if name not in values:
                values[name] = number if number is not None else value
            elif number is not None and isinstance(values[name], (int, float)):
                values[name] = combine(name, values[name], number)
    return "".join(f"{name}: {value}\n" for name, value in values.items())


def sum_stats_json(documents: list[dict], workers: int | None) -> dict:
    """JSON /stats of several workers -> one: each `stats` entry's numeric `value` combined by `name`."""
    if not documents:
        return {"stats": []}
    merged: dict[str, dict] = {}
    unnamed: list[dict] = []  # Envoy's {"histograms": ...} entry: quantiles do not add up; the first worker's
    for position, document in enumerate(documents):
        for entry in document.get("stats", []):
            name = entry.get("name")
            if name is None:
                if position == 0:
                    unnamed.append(entry)
                continue
            current = merged.get(name)
            if current is None:
                merged[name] = dict(entry)
            elif isinstance(entry.get("value"), (int, float)) and isinstance(current.get("value"), (int, float)):
                current["value"] = combine(name, current["value"], entry["value"])
    result = {key: value for key, value in documents[0].items() if key != "stats"}
    versions = {document.get("config_version") for document in documents}
    if len(versions) > 1:
        result["config_version"] = sorted(str(v) for v in versions)  # workers disagree for a moment during a reload
    # Envoy's server.concurrency counts worker threads; each worker reports its own 1, so the sum is N.
    if workers is not None:
        merged.setdefault("server.concurrency", {"name": "server.concurrency", "value": workers})
    result["stats"] = list(merged.values()) + unnamed
    return result


def sum_prometheus(bodies: Iterable[str]) -> str:
    """Prometheus text of several workers -> one: samples with the same name and labels added up."""
    order: list[str] = []
    samples: dict[str, object] = {}
    for body in bodies:
        for line in body.splitlines():
            if not line or line.startswith("#"):
                if line and line not in samples:
                    samples[line] = None
                    order.append(line)
                continue
            key, _, value = line.rpartition(" ")
            number = _number(value)
            if key not in samples:
                samples[key] = number if number is not None else value
                order.append(key)
            elif number is not None and isinstance(samples[key], (int, float)):
                samples[key] = combine(key.split("{", 1)[0], samples[key], number)
    lines = [key if samples[key] is None else f"{key} {samples[key]}" for key in order]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the trace table shared by datagrams


def sibling_address(supervisor_pid: int, index: int) -> bytes:
    return f"\0laneproxy-{supervisor_pid}-trace-{index}".encode()


class SharedTraceLaneTable(TraceLaneTable):
    """This worker's trace table; what the inbound listener learns is also sent to every sibling.

    A datagram is `len(key) (2 bytes) | key | lane`. Sending never blocks: a full or missing sibling
    socket (a worker restarting) drops the datagram, which costs that trace a baseline hop there.
    """

    __slots__ = ("_socket", "_siblings")

    def __init__(self, capacity: int, ttl: float, clock, *, own: bytes, siblings: list[bytes],
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(capacity, ttl, clock, max_bytes=max_bytes)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(own)
        self._socket.setblocking(False)
        self._siblings = siblings

    def remember(self, key: bytes, lane: bytes) -> bool:
        if not super().remember(key, lane):
            return False  # too long for any table: the siblings would refuse it too
        message = struct.pack("!H", len(key)) + key + lane
        for address in self._siblings:
            try:
                self._socket.sendto(message, address)
            except OSError:  # BlockingIOError, ConnectionRefusedError, FileNotFoundError: the sibling is busy or gone
                pass
        return True

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self._socket.fileno(), self._receive)

    def _receive(self) -> None:
        while True:
            try:
                message = self._socket.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(message) < 2:
                continue
            (size,) = struct.unpack_from("!H", message)
            key, lane = message[2:2 + size], message[2 + size:]
            if key and lane:
                TraceLaneTable.remember(self, key, lane)  # learned from a sibling: do not send it on

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._socket.fileno())
        self._socket.close()


# ---------------------------------------------------------------------------------------------
# a worker process


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    index: int
    count: int
    supervisor_pid: int
    settings: ProxySettings
    log_level: str


def worker_main(spec: WorkerSpec, channel: Connection) -> None:
    """The entry point of a spawned worker: run one ProxyApp with shared ports until told to stop."""
    import uvloop

    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[w{spec.index}]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:
        uvloop.run(_worker_serve(spec, channel))
    except Exception as exc:  # noqa: BLE001 - reported to the supervisor, which prints it and exits 2
        try:
            channel.send(("error", f"worker {spec.index}: {exc}"))
        except OSError:
            pass
        sys.exit(2)


async def _worker_serve(spec: WorkerSpec, channel: Connection) -> None:
    from laneproxy.app import ProxyApp

    settings = dataclasses.replace(spec.settings, admin=Address("127.0.0.1", 0))
    app = ProxyApp(settings, reuse_port=True)
    loop = asyncio.get_running_loop()
    siblings = [sibling_address(spec.supervisor_pid, i) for i in range(spec.count) if i != spec.index]
    app.traces = SharedTraceLaneTable(settings.trace_table_capacity, settings.trace_table_ttl, time.monotonic,
                                      own=sibling_address(spec.supervisor_pid, spec.index), siblings=siblings,
                                      max_bytes=settings.trace_table_bytes)
    app.traces.attach(loop)
    loop.add_signal_handler(signal.SIGTERM, app.begin_shutdown)
    # The supervisor gone (killed, crashed) closes this pipe: drain and go rather than live on unsupervised.
    loop.add_reader(channel.fileno(), lambda: _on_supervisor_message(channel, app))
    try:
        await app.start()
        channel.send(("ready", dict(app.bound)))
        await app.wait_stopped()
    finally:
        loop.remove_reader(channel.fileno())
        await app.stop()
        app.traces.close(loop)


def _on_supervisor_message(channel: Connection, app) -> None:
    try:
        channel.recv()
    except (EOFError, OSError):
        asyncio.get_running_loop().remove_reader(channel.fileno())
        app.begin_shutdown()


# ---------------------------------------------------------------------------------------------
# the supervisor


def reserve_ports(settings: ProxySettings) -> tuple[ProxySettings, list[socket.socket]]:
    """Bind (not listen) a SO_REUSEPORT socket on each listener address: `:0` becomes one concrete port
    shared by every worker, and the port stays ours while a worker restarts."""
    changes: dict[str, Address] = {}
    held = []
    for role in LISTENER_ROLES:
        address: Address | None = getattr(settings, role)
        if address is None:
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as exc:
            sock.close()
            for other in held:
                other.close()
            raise OSError(exc.errno, f"{role} listener on {address}: {exc.strerror}") from exc
        held.append(sock)
        changes[role] = Address(address.host, sock.getsockname()[1])
    return dataclasses.replace(settings, **changes), held


class Worker:
    __slots__ = ("spec", "process", "channel", "admin_port", "bound", "ready", "restarts")

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.process: multiprocessing.process.BaseProcess | None = None
        self.channel: Connection | None = None
        self.admin_port: int | None = None
        self.bound: dict[str, int] = {}
        self.ready = asyncio.Event()
        self.restarts = 0


class Supervisor:
    def __init__(self, settings: ProxySettings, count: int, log_level: str) -> None:
        self.settings = settings
        self.count = count
        self.log_level = log_level
        self.context = multiprocessing.get_context("spawn")
        self.workers = [Worker(WorkerSpec(i, count, os.getpid(), settings, log_level)) for i in range(count)]
        self.stopping = False
        self.failure: str | None = None
        self.admin_runner = None
        self.session = None
        self._done = asyncio.Event()

    # workers -----------------------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = self.context.Pipe(duplex=True)
        process = self.context.Process(target=worker_main, args=(worker.spec, child_end),
                                       name=f"laneproxy-worker-{worker.spec.index}", daemon=False)
        process.start()
        child_end.close()
        worker.process, worker.channel = process, parent_end
        worker.ready.clear()
        worker.admin_port = None
        loop.add_reader(parent_end.fileno(), lambda: self._on_message(worker))

    def _on_message(self, worker: Worker) -> None:
        try:
            kind, payload = worker.channel.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.channel.fileno())
            return
        if kind == "ready":
            worker.bound = payload
            worker.admin_port = payload.get("admin")
            worker.ready.set()
            log.info("worker %d (pid %d) ready", worker.spec.index, worker.process.pid)
        elif kind == "error":
            self.failure = payload

    async def _watch(self) -> None:
        """Notice workers that exited. Polling waitpid five times a second is simpler and sturdier than
        watching each process's sentinel pipe, and a dead worker is replaced within a second anyway."""
        while True:
            await asyncio.sleep(0.2)
            for worker in self.workers:
                process = worker.process
                if process is not None and process.exitcode is not None:  # exitcode polls (and reaps) the child
                    worker.process = None
                    self._on_exit(worker, process)

    def _on_exit(self, worker: Worker, process) -> None:
        loop = asyncio.get_running_loop()
        if worker.channel is not None:
            try:
                loop.remove_reader(worker.channel.fileno())
            except (ValueError, OSError):
                pass
            worker.channel.close()
            worker.channel = None
        process.join(0)
        worker.admin_port = None
        worker.ready.clear()
        if self.stopping:
            if all(w.process is None for w in self.workers):
                self._done.set()
            return
        if self.failure is not None and not any(w.ready.is_set() for w in self.workers):
            self._done.set()  # a start-up failure: restarting would fail the same way
            return
        worker.restarts += 1
        log.error("worker %d (pid %d) exited with %s; restarting in %.0fs", worker.spec.index, process.pid,
                  process.exitcode, RESTART_DELAY)
        loop.call_later(RESTART_DELAY, lambda: None if self.stopping or worker.process is not None else self._spawn(worker))

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping %d workers (each drains for at least %.1fs, at most %.1fs)", self.count,
                 self.settings.drain_seconds, max(self.settings.drain_seconds, self.settings.drain_limit_seconds))
        alive = False
        for worker in self.workers:
            if worker.process is not None and worker.process.exitcode is None:
                alive = True
                os.kill(worker.process.pid, signal.SIGTERM)
        if not alive:
            self._done.set()

    # the aggregating admin ----------------------------------------------------------------------

    def _live_ports(self) -> list[int]:
        return [w.admin_port for w in self.workers if w.admin_port is not None]

    async def _fetch_all(self, path: str, query: dict[str, str]) -> list[tuple[int, str]]:
        import aiohttp

        async def one(port: int) -> tuple[int, str] | None:
            try:
                async with self.session.get(f"http://127.0.0.1:{port}{path}", params=query) as response:
                    return response.status, await response.text()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None

        results = await asyncio.gather(*(one(port) for port in self._live_ports()))
        return [r for r in results if r is not None]

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        import json

        from aiohttp import web

        query = dict(request.query)
        if "worker" in query:  # one worker's own numbers, for debugging an imbalance
            index = int(query.pop("worker"))
            port = self.workers[index].admin_port if 0 <= index < self.count else None
            if port is None:
                return web.Response(status=503, text=f"worker {index} is not running\n")
            async with self.session.get(f"http://127.0.0.1:{port}/stats", params=query) as response:
                return web.Response(status=response.status, body=await response.read(),
                                    content_type=response.content_type)
        results = [(status, body) for status, body in await self._fetch_all("/stats", query) if status == 200]
        if not results:
            return web.Response(status=503, text="no worker answered\n")
        if query.get("format") == "json":
            documents = [json.loads(body) for _, body in results]
            return web.json_response(sum_stats_json(documents, None if query.get("filter") else self.count))
        if query.get("format") == "prometheus":
            return web.Response(text=sum_prometheus(body for _, body in results), content_type="text/plain")
        text = sum_stats_text(body for _, body in results)
        if "server.concurrency: " not in text and not query.get("filter"):
            text += f"server.concurrency: {self.count}\n"
        return web.Response(text=text)

    async def _prometheus(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        results = [(s, b) for s, b in await self._fetch_all(request.path, dict(request.query)) if s == 200]
        if not results:
            return web.Response(status=503, text="no worker answered\n")
        return web.Response(text=sum_prometheus(body for _, body in results), content_type="text/plain")

    async def _ready(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        if self.stopping:
            return web.Response(status=503, text="DRAINING\n")
        answers = await self._fetch_all("/ready", {})
        states = [body.strip() for _, body in answers]
        if len(answers) == self.count and all(status == 200 for status, _ in answers):
            return web.Response(text="LIVE\n")
        worst = next((s for s in states if s != "LIVE"), "PRE_INITIALIZING")
        return web.Response(status=503, text=f"{worst}\n")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        ports = self._live_ports()
        if not ports:
            return web.Response(status=503, text="no worker is running\n")
        if request.method == "POST" and request.path == "/quitquitquit":
            self.stopping = True  # the workers stop without a drain; do not restart them
        body = await request.read()
        targets = ports if request.method != "GET" else ports[:1]
        first = None
        for port in targets:
            try:
                async with self.session.request(request.method, f"http://127.0.0.1:{port}{request.path_qs}",
                                                data=body or None) as response:
                    answer = (response.status, await response.read(), response.content_type)
            except (asyncio.TimeoutError, OSError) as exc:
                answer = (503, f"worker admin on {port}: {exc}\n".encode(), "text/plain")
            first = first or answer
        status, payload, content_type = first
        return web.Response(status=status, body=payload, content_type=content_type)

    async def _start_admin(self) -> None:
        import aiohttp
        from aiohttp import web

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), trust_env=False)
        admin = self.settings.admin
        if admin is None:
            return
        app = web.Application()
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/stats/prometheus", self._prometheus)
        app.router.add_get("/ready", self._ready)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.admin_runner = web.AppRunner(app, access_log=None)
        await self.admin_runner.setup()
        site = web.TCPSite(self.admin_runner, admin.host, admin.port, reuse_address=True)
        await site.start()
        log.info("admin (sum of %d workers) on %s:%d", self.count, admin.host,
                 site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    # the whole life ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        watcher = loop.create_task(self._watch(), name="worker-watch")
        try:
            for worker in self.workers:
                self._spawn(worker)
            waiters = {asyncio.ensure_future(asyncio.gather(*(w.ready.wait() for w in self.workers))),
                       asyncio.ensure_future(self._done.wait())}
            await asyncio.wait(waiters, timeout=STARTUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            if not all(w.ready.is_set() for w in self.workers):
                self.failure = self.failure or f"workers not ready after {STARTUP_TIMEOUT:.0f}s"
                self.stop()
                await self._wait_workers()
                print(f"laneproxy: {self.failure}", file=sys.stderr)
                return 2
            await self._start_admin()
            ports = ", ".join(f"{name} {port}" for name, port in self.workers[0].bound.items() if name != "admin")
            log.info("%d workers serving (%s)", self.count, ports)
            await self._done.wait()
            await self._wait_workers()
            return 0
        finally:
            watcher.cancel()
            if self.admin_runner is not None:
                await self.admin_runner.cleanup()
            if self.session is not None:
                await self.session.close()

    async def _wait_workers(self) -> None:
        deadline = time.monotonic() + max(self.settings.drain_seconds, self.settings.drain_limit_seconds) + 10
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.is_alive():
                process.kill()
            process.join(1)
            worker.process = None


def supervise(settings: ProxySettings, count: int, log_level: str = "info") -> int:
    """Run `count` workers until SIGTERM/SIGINT; the exit code of `laneproxy run --workers N`."""
    import uvloop

    try:
        settings, held = reserve_ports(settings)
    except OSError as exc:
        print(f"laneproxy: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(Supervisor(settings, count, log_level).run())
    finally:
        for sock in held:
            sock.close()
