"""The lifecycle port: what the kubelet's hooks ask an injected sidecar, on the pod's own address.

Owns `GET /wait-for-stop`, the preStop hook of the app containers and of the sidecar (see inject.py), also
as `//wait-for-stop`, the way kubelets before 1.26 ask for an HTTP hook's path. It
answers 200 once it is safe to stop: this pod's address has left every endpoint set of the sidecar's own
route table (the pod is deleted or not ready: the Kubernetes source drops it), then until no request has
arrived at the inbound listener for `stop_margin` seconds (every other proxy and kube-proxy have seen it too:
one that lags and still sends keeps the app alive) and none is in flight. `?app=1` (the sidecar's own hook) waits further until the app has closed its port and no
outbound request of it is in flight, so the sidecar gets its SIGTERM after the app has stopped. Every wait
ends at `stop_max` whatever happens: the kubelet's grace period must still cover the drain after it.

`GET /ready` is the sidecar's readiness probe, asked by the kubelet over HTTP (an exec probe starts a Python
process each time): 200 once the proxy has its first table and the app accepts connections on its port (on
loopback, which capture leaves alone), so a pod turns Ready only when a request sent to it can be answered.

It never changes the proxy (that is the admin API's, which stays on loopback): it only reads and waits,
so it may listen on the pod's address for the kubelet. The clock and the sleep are parameters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from laneproxy.admin import web

if TYPE_CHECKING:
    from laneproxy.admin.proxy import RunningProxy

log = logging.getLogger("laneproxy.lifecycle")

WAIT_FOR_STOP_PATH = "/wait-for-stop"
READY_PATH = "/ready"
MAX_WAITERS = 16  # one hook per container is all a pod sends; more are refused rather than held


class StopWaiter:
    """Decides when the pod's containers may be stopped, from what the proxy sees."""

    def __init__(self, proxy: RunningProxy, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, tick: float = 0.1) -> None:
        self.proxy = proxy
        self.pod = proxy.settings.pod
        self.clock, self.sleep, self.tick = clock, sleep, tick

    def in_endpoints(self) -> bool:
        """This pod's address is an endpoint of some service in the served table."""
        address = self.pod.pod_ip
        if not address:
            return False
        table = self.proxy.store.current
        if table is None:
            return False
        return any(endpoint.host == address for service in table.services.values() for endpoint in service.endpoints)

    def active(self, listener_name: str) -> int:
        return sum(listener.active_requests() for listener in self.proxy.listeners if listener.name == listener_name)

    def inbound_seen(self) -> tuple[int, int]:
        """Changes whenever a request arrives at or leaves the inbound listener."""
        listeners = [listener for listener in self.proxy.listeners if listener.name == "inbound"]
        return (sum(listener.stats.rq_total for listener in listeners),
                sum(listener.active_requests() for listener in listeners))

    async def app_listening(self) -> bool:
        app = self.proxy.settings.app
        if app is None:
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(app.host, app.port), timeout=1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    async def wait_for_stop(self, *, wait_for_app: bool) -> dict[str, float | bool]:
        """Wait as the module docstring says; returns what was waited for, in seconds from the start."""
        began = self.clock()
        deadline = began + self.pod.stop_max
        report: dict[str, float | bool] = {}
        while self.in_endpoints() and self.clock() < deadline:
            await self.sleep(self.tick)
        left = self.clock()
        report["left_endpoints_s"] = round(left - began, 3)
        # Quiet for the margin: a proxy whose table lags keeps sending, and each of its requests starts the margin
        # again, so the app is stopped only once nothing has arrived for that long (or at the limit).
        seen, quiet_from = self.inbound_seen(), left
        while self.clock() < deadline:
            now_seen = self.inbound_seen()
            if now_seen != seen:
                seen, quiet_from = now_seen, self.clock()
            if self.clock() - quiet_from >= self.pod.stop_margin and self.active("inbound") == 0:
                break
            await self.sleep(self.tick)
        report["inbound_idle_s"] = round(self.clock() - began, 3)
        if wait_for_app:
            while self.clock() < deadline and (await self.app_listening() or self.active("outbound") > 0):
                await self.sleep(self.tick)
            report["app_stopped_s"] = round(self.clock() - began, 3)
        report["timed_out"] = self.clock() >= deadline
        return report


class PodHooksServer:
    """The lifecycle listener: the stop wait and the readiness probe on a server of their own."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.waiter = StopWaiter(proxy)
        self.waiting = 0
        self.server: web.Server | None = None

    def build_app(self) -> web.Router:
        async def wait_for_stop(request: web.Request) -> web.Response:
            if self.waiting >= MAX_WAITERS:
                return web.Response(status=429, text="too many waiting\n")
            self.waiting += 1
            try:
                wait_for_app = request.query.get("app") in ("1", "true")
                log.info("preStop: waiting until this pod may stop%s", " (the app first)" if wait_for_app else "")
                report = await self.waiter.wait_for_stop(wait_for_app=wait_for_app)
                log.info("preStop: done %s", report)
                return web.json_response(report)
            finally:
                self.waiting -= 1

        async def ready(request: web.Request) -> web.Response:
            state = self.waiter.proxy.state
            if state != "LIVE":
                return web.Response(status=503, text=f"{state}\n")
            if self.waiter.proxy.settings.app is not None and not await self.waiter.app_listening():
                return web.Response(status=503, text="the app does not accept connections yet\n")
            return web.Response(text="LIVE\n")

        app = web.Router()
        # Kubelets before 1.26 join "http://host:port/" and the hook's path, so `/wait-for-stop` arrives as
        # `//wait-for-stop` (kubernetes#56770), and they take any answer, a 404 included, as the hook's success:
        # without the second spelling the wait never ran and the app was stopped at once.
        for path, handler in ((WAIT_FOR_STOP_PATH, wait_for_stop), (READY_PATH, ready)):
            app.add_get(path, handler)
            app.add_get("/" + path, handler)
        return app

    async def start(self, host: str, port: int) -> int:
        self.server = web.Server(self.build_app())
        return await self.server.start(host, port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
