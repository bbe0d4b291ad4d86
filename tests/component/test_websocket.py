"""WebSocket through the gateway and the outbound listener, with the `websockets` library on both ends.

Two real WebSocket servers play mocka and mockb in two lanes each (base and canary); every one answers
`lane?` with its lane and the lane header it was asked with, echoes everything else, and on `/flood`
sends 1 MiB messages for as long as the proxy takes them. The upgrade is routed by lane like any
request, then both connections become a byte tunnel: 1,000 messages each way, a 1 MiB message, a
client that stops reading (the proxy's memory stays within its stated bound while the server is held
back), and close handshakes in both directions.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from proxyrig import SWIMLANES, LoopThread, ProxyProcess, RssWatch, endpoints_file, rss_bytes

MIB = 1024 * 1024
LANES = ("base", "canary")


class LaneServers(LoopThread):
    """Four WebSocket servers (mocka and mockb, base and canary) on one event loop in a thread."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: dict[tuple[str, str], int] = {}
        self.flood_sent = 0  # bytes the /flood handler got past `send` (the proxy or the kernel took them)
        self.closes: list[tuple[str, int | None]] = []  # (path, close code the server received)

    async def serve(self, stop: asyncio.Future) -> None:
        servers = []
        for service in ("mocka", "mockb"):
            for lane in LANES:
                server = await serve(self._handler(service, lane), "127.0.0.1", 0, max_size=2 * MIB, compression=None)
                servers.append(server)
                self.ports[(service, lane)] = server.sockets[0].getsockname()[1]
        self.ready.set()
        await stop
        for server in servers:
            server.close()
            await server.wait_closed()

    def _handler(self, service: str, lane: str):
        async def handle(ws) -> None:
            path = ws.request.path
            if path == "/flood":
                chunk = b"x" * MIB
                try:
                    for _ in range(256):  # bounded: 256 MiB at most, far more than any buffer on the way
                        await ws.send(chunk)
                        self.flood_sent += len(chunk)
                except websockets.ConnectionClosed:
                    pass
                return
            try:
                async for message in ws:
                    if message == "lane?":
                        await ws.send(f"{service} {lane} {ws.request.headers.get('x-asm-prefer-tag', '-')}")
                    elif message == "close-from-server":
                        await ws.close(4001, "server says bye")
                    else:
                        await ws.send(message)
            except websockets.ConnectionClosed:
                pass
            self.closes.append((path, ws.close_code))
        return handle


@pytest.fixture(scope="module")
def servers():
    with LaneServers() as lane_servers:
        yield lane_servers


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, servers):
    """mockb's canary pod's sidecar: its inbound listener in front of the app (the canary WebSocket server)."""
    services = {f"default/{service}": {lane: [servers.ports[(service, lane)]] for lane in LANES}
                for service in ("mocka", "mockb")}
    endpoints = endpoints_file(tmp_path_factory.mktemp("websocket-inbound") / "endpoints.yaml", services)
    process = ProxyProcess(SWIMLANES, endpoints, inbound_app=servers.ports[("mockb", "canary")]).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, servers):
    services = {f"default/{service}": {lane: [servers.ports[(service, lane)]] for lane in LANES}
                for service in ("mocka", "mockb")}
    endpoints = endpoints_file(tmp_path_factory.mktemp("websocket") / "endpoints.yaml", services)
    process = ProxyProcess(SWIMLANES, endpoints, gateway=True, outbound=True).start()
    yield process
    process.stop()


def via(proxy: ProxyProcess, listener: str, path: str = "/ws", **options):
    """A client to mocka through the gateway, or to mockb:8000 through the sidecar's outbound listener (the app's
    own URL, on a socket connected to the listener, as transparent capture would connect it)."""
    if listener == "gateway":
        return connect(f"ws://127.0.0.1:{proxy.gateway_port}/mock", **options)
    sock = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    return connect(f"ws://mockb:8000{path}", sock=sock, **options)


@pytest.mark.parametrize("listener", ["gateway", "outbound"])
@pytest.mark.parametrize("lane", LANES)
async def test_a_websocket_is_routed_by_lane_and_keeps_it_for_the_whole_conversation(proxy, listener, lane):
    service = "mocka" if listener == "gateway" else "mockb"
    async with via(proxy, listener, additional_headers={"x-asm-prefer-tag": lane}) as ws:
        for _ in range(3):
            await ws.send("lane?")
            assert await ws.recv() == f"{service} {lane} {lane}"


async def test_the_inbound_sidecar_tunnels_a_websocket_to_its_app_and_passes_the_lane_on(sidecar):
    sock = socket.create_connection(("127.0.0.1", sidecar.inbound_port))
    async with connect("ws://mockb:8000/ws", sock=sock, additional_headers={"x-asm-prefer-tag": "canary"}) as ws:
        await ws.send("lane?")
        assert await ws.recv() == "mockb canary canary"
        big = bytes(range(256)) * (4 * 1024)
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 10) == big
    assert ws.close_code == 1000


@pytest.mark.parametrize("listener", ["gateway", "outbound"])
async def test_a_thousand_messages_each_way_and_a_one_mib_message_arrive_intact_and_in_order(proxy, listener):
    async with via(proxy, listener, additional_headers={"x-asm-prefer-tag": "canary"}, max_size=2 * MIB) as ws:
        async def send_all() -> None:
            for i in range(1000):
                await ws.send(f"message {i}")

        sender = asyncio.create_task(send_all())
        received = [await asyncio.wait_for(ws.recv(), 10) for _ in range(1000)]
        await sender
        assert received == [f"message {i}" for i in range(1000)]
        big = bytes(range(256)) * (4 * 1024)  # 1 MiB, not one repeated byte
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 10) == big
        await ws.send("lane?")
        assert (await ws.recv()).startswith(("mocka canary", "mockb canary"))


@pytest.mark.parametrize("listener", ["gateway", "outbound"])
async def test_close_handshakes_from_either_side_reach_the_other_side(proxy, servers, listener):
    async with via(proxy, listener) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.close(4000, "client says bye")
    assert ws.close_code == 4000
    async with via(proxy, listener) as ws:
        await ws.send("close-from-server")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert (ws.close_code, ws.close_reason) == (4001, "server says bye")
    deadline = time.monotonic() + 5
    while [code for _, code in servers.closes[-2:]] != [4000, 4001] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [code for _, code in servers.closes[-2:]] == [4000, 4001]


async def test_a_client_that_stops_reading_holds_the_server_back_and_the_proxy_memory_stays_bounded(proxy, servers):
    """The bound: per direction one write buffer (256 KiB high-water) plus one read (256 KiB), whatever the
    server sends; the kernel's socket buffers on both sides hold a few MiB more, outside the proxy."""
    baseline = rss_bytes(proxy.process.pid)
    watch = RssWatch(proxy.process.pid)
    servers.flood_sent = 0
    async with via(proxy, "outbound", "/flood", max_size=2 * MIB) as ws:
        await asyncio.wait_for(ws.recv(), 10)  # the flood has begun
        ws.transport.pause_reading()  # then the client reads nothing more (uncompressed: the server says so)
        previous, stalled_since = -1, time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if servers.flood_sent != previous:
                previous, stalled_since = servers.flood_sent, time.monotonic()
            elif time.monotonic() - stalled_since > 1.5:
                break
        peak = watch.stop()
        sent = servers.flood_sent
    print(f"server held back after {sent / MIB:.0f} MiB; proxy RSS grew {(peak - baseline) / MIB:.1f} MiB")
    assert sent < 64 * MIB, f"the server sent {sent / MIB:.0f} MiB to a client that reads nothing: no backpressure"
    assert peak - baseline < 16 * MIB, f"the proxy grew by {(peak - baseline) / MIB:.1f} MiB"
