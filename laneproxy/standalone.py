"""Running one small aiohttp application as a process of its own until SIGTERM or SIGINT.

Owns the serve-and-wait lifecycle shared by the mock service and the injection webhook (the proxy
itself has a richer one in app.py: readiness, draining). Nothing happens at import.
"""

from __future__ import annotations

import asyncio
import signal
import ssl

from aiohttp import web


async def serve_until_signalled(app: web.Application, host: str, port: int, *,
                                ssl_context: ssl.SSLContext | None = None) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
