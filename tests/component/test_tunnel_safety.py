"""Tunnels at the wire: raw bytes from a client, a scripted raw-socket upstream that records what reached it.

The h2c-smuggling trap: bytes a client sends right behind an upgrade request's head must not reach the
upstream before it said 101, and must reach it, in order, after. An upstream's 101 ends HTTP on both
connections at once: what it sends behind the 101 in the same write reaches the client. CONNECT is the
outbound listener's alone. (A 101 nobody asked for is test_upstream_safety's; CONNECT authorities and a
tunnel whose peer stops reading are test_egress's.)
"""

from __future__ import annotations

import socket

import pytest

from proxyrig import SWIMLANES, ProxyProcess, ScriptedOrigin, endpoints_file, exchange_until_close

UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: mockb\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
EARLY = b"\x81\x85early" + b"GET /smuggled HTTP/1.1\r\nHost: mockb\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


class SlowSwitch:
    """Waits half a second after the head, noting anything that arrives, then says 101 (and a first frame)."""

    def __init__(self) -> None:
        self.before_101 = b""
        self.after_101 = b""

    def __call__(self, sock: socket.socket) -> bool:
        sock.settimeout(0.5)
        try:
            self.before_101 = sock.recv(65536)
        except TimeoutError:
            pass
        sock.sendall(SWITCH + b"\x81\x05hello")
        sock.settimeout(3)
        try:
            while len(self.after_101) < len(EARLY):
                data = sock.recv(65536)
                if not data:
                    break
                self.after_101 += data
        except TimeoutError:
            pass
        sock.sendall(b"\x81\x03bye")
        return False


@pytest.fixture(scope="module")
def origin():
    server = ScriptedOrigin()
    yield server
    server.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, origin):
    endpoints = endpoints_file(tmp_path_factory.mktemp("tunnel-safety") / "endpoints.yaml",
                               {"default/mockb": {"base": [origin.port]}, "default/mocka": {"base": [origin.port]}})
    process = ProxyProcess(SWIMLANES, endpoints, outbound=True, gateway=True).start()
    yield process
    process.stop()


async def test_bytes_behind_an_upgrade_head_reach_the_upstream_only_after_its_101(proxy, origin):
    switch = SlowSwitch()
    origin.script = lambda head, number: switch
    origin.reset()
    response, closed = await exchange_until_close(proxy.outbound_port, UPGRADE + EARLY, timeout=10)
    assert switch.before_101 == b"", f"sent upstream before the 101: {switch.before_101!r}"
    assert switch.after_101 == EARLY
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), response
    head, _, rest = response.partition(b"\r\n\r\n")
    assert b"\r\nupgrade: websocket\r\n" in head.lower() + b"\r\n" and b"\r\nconnection: upgrade" in head.lower()
    assert rest == b"\x81\x05hello\x81\x03bye" and closed  # the frame sent with the 101, then the upstream's close
    assert len(origin.requests) == 1  # the smuggled request inside the tunnel was never parsed as a request


async def test_connect_to_the_gateway_is_still_a_400_and_opens_nothing(proxy, origin):
    origin.reset()
    before = origin.connections
    raw = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (origin.port, origin.port)
    response, closed = await exchange_until_close(proxy.gateway_port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 400 ") and closed, response
    assert origin.connections == before


async def test_an_upgrade_the_proxy_does_not_tunnel_has_its_upgrade_headers_stripped(proxy, origin):
    origin.script = lambda head, number: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    origin.reset()
    raw = UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: irc/6.9") + EARLY
    response, closed = await exchange_until_close(proxy.outbound_port, raw, timeout=5)
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"ok") and closed, response
    ((_, head, _),) = origin.requests
    assert b"upgrade" not in head.lower().split(b"\r\n", 1)[1] and b"early" not in head
