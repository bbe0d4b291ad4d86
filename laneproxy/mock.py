"""The mock service: a stand-in for the seed's go-http-sample image, for demos and tests.

Owns one behaviour: answer `<app>(version: <version>, ip: <ip>)`, followed by `-> ` and the body of
a call to `upstream_url` when one is set. `<ip>` is the pod's address when `POD_IP` is set (the downward
API's `status.podIP`, as the seed's app shows it; behind a sidecar the socket's own address is 127.0.0.1),
else the address the request arrived on. Like a typical application it forwards only the trace
header it is told to (default `my-request-id`), never the lane header: restoring the lane is the
sidecar's job. Outbound calls go through HTTP_PROXY when it is set, as with any HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from laneproxy.standalone import serve_until_signalled

log = logging.getLogger("laneproxy.mock")


@dataclass(frozen=True, slots=True)
class MockSettings:
    app: str
    version: str
    upstream_url: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    trace_header: str = "my-request-id"
    proxy: str | None = None
    timeout: float = 10.0
    pod_ip: str | None = None

    @classmethod
    def from_environment(cls, **overrides) -> MockSettings:
        """Defaults from the seed Deployment's variables: `app`, `version`, `upstream_url`, `HTTP_PROXY`, `POD_IP`."""
        values = {
            "app": os.environ.get("app", "mock"),
            "version": os.environ.get("version", "v1"),
            "upstream_url": os.environ.get("upstream_url") or None,
            "proxy": os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy") or None,
            "pod_ip": os.environ.get("POD_IP") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def build_mock_app(settings: MockSettings) -> web.Application:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.timeout))

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        ip = settings.pod_ip or (sockname[0] if sockname else settings.host)
        me = f"{settings.app}(version: {settings.version}, ip: {ip})"
        if not settings.upstream_url:
            return web.Response(text=me)
        forwarded = {}
        trace = request.headers.get(settings.trace_header)
        if trace is not None:
            forwarded[settings.trace_header] = trace
        try:
            async with app["session"].get(settings.upstream_url, headers=forwarded, proxy=settings.proxy) as upstream:
                body = await upstream.text()
                status = upstream.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return web.Response(status=502, text=f"{me}-> upstream error: {type(exc).__name__}: {exc}")
        return web.Response(status=status, text=f"{me}-> {body}")

    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve_mock(settings: MockSettings) -> None:
    log.info("%s %s listening on %s:%d", settings.app, settings.version, settings.host, settings.port)
    await serve_until_signalled(build_mock_app(settings), settings.host, settings.port)
