"""The mock app reports the pod's address from POD_IP (the downward API) as the seed's app does, and the address
the request arrived on without it."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from laneproxy.mock import MockSettings, build_mock_app


async def answer(settings: MockSettings) -> str:
    runner = web.AppRunner(build_mock_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as response:
            return await response.text()
    finally:
        await runner.cleanup()


async def test_the_mock_reports_the_pod_ip_from_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "198.18.0.7")
    monkeypatch.setenv("app", "mocka")
    assert await answer(MockSettings.from_environment()) == "mocka(version: v1, ip: 198.18.0.7)"


async def test_without_pod_ip_the_mock_reports_the_address_the_request_arrived_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_IP", raising=False)
    monkeypatch.setenv("app", "mocka")
    assert await answer(MockSettings.from_environment()) == "mocka(version: v1, ip: 127.0.0.1)"
