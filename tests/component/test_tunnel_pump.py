"""The byte pump itself, in this process on uvloop, between real loopback sockets: what the proxy holds is measured.

A client and a destination talk through a Tunnel whose two transports were accepted and connected by the event
loop, as the listener's would be. The peers are plain blocking sockets on threads, so the test controls exactly
who reads and who does not.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvloop

from laneproxy.dataplane import tunnel as tunnel_module
from laneproxy.dataplane.tunnel import BOUND_PER_DIRECTION, Tunnel


class Sides:
    """Two connected pairs: client <-> (proxy's downstream transport) and (proxy's upstream transport) <-> destination."""

    async def open(self) -> Sides:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        self.client = socket.create_connection(listener.getsockname())
        accepted, _ = await loop.sock_accept(listener)
        self.down, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted)
        listener.close()
        destination = socket.create_server(("127.0.0.1", 0))
        self.up, _ = await loop.create_connection(asyncio.Protocol, *destination.getsockname())
        self.destination, _ = destination.accept()
        destination.close()
        for sock in (self.client, self.destination):
            sock.settimeout(5)
        return self

    def close(self) -> None:
        for sock in (self.client, self.destination):
            sock.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _bytes_pass_both_ways_and_a_half_close_reaches_the_other_side():
    sides = await Sides().open()
    ended: list[Tunnel] = []
    tunnel = Tunnel(asyncio.get_running_loop(), sides.down, sides.up, idle_timeout=0, on_closed=ended.append)
    tunnel.start(to_upstream=b"early-up ", to_downstream=b"early-down ")
    await asyncio.to_thread(sides.client.sendall, b"ping")
    assert await asyncio.to_thread(read_exactly, sides.destination, 13) == b"early-up ping"
    sides.client.shutdown(socket.SHUT_WR)  # the client is done sending, still reading
    assert await asyncio.to_thread(sides.destination.recv, 10) == b""  # its FIN went on
    await asyncio.to_thread(sides.destination.sendall, b"pong")
    assert await asyncio.to_thread(read_exactly, sides.client, 15) == b"early-down pong"
    sides.destination.shutdown(socket.SHUT_WR)
    assert await asyncio.to_thread(sides.client.recv, 10) == b""
    for _ in range(100):
        if ended:
            break
        await asyncio.sleep(0.02)
    assert ended == [tunnel] and (tunnel.received, tunnel.sent) == (13, 15)
    sides.close()


async def _a_quiet_tunnel_is_closed_after_its_idle_timeout():
    sides = await Sides().open()
    tunnel = Tunnel(asyncio.get_running_loop(), sides.down, sides.up, idle_timeout=0.3)
    tunnel.start()
    started = time.monotonic()
    await asyncio.to_thread(sides.client.sendall, b"x")
    assert await asyncio.to_thread(sides.destination.recv, 10) == b"x"
    assert await asyncio.to_thread(sides.client.recv, 10) == b""  # closed for idleness
    assert tunnel.idle_expired and time.monotonic() - started >= 0.3
    sides.close()


async def _a_destination_that_stops_reading_stops_the_client_being_read_within_the_bound():
    sides = await Sides().open()
    tunnel = Tunnel(asyncio.get_running_loop(), sides.down, sides.up, idle_timeout=0)
    tunnel.start()
    stop = threading.Event()
    sent = 0

    def flood() -> None:
        nonlocal sent
        sides.client.settimeout(0.5)
        chunk = b"z" * 65536
        while not stop.is_set() and sent < 256 * 1024 * 1024:
            try:
                sent += sides.client.send(chunk)
            except TimeoutError:
                continue
            except OSError:
                return

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    await asyncio.sleep(2)
    held = sides.up.get_write_buffer_size()
    assert not sides.down.is_reading(), "the client is still read while the destination reads nothing"
    assert held <= BOUND_PER_DIRECTION, held
    stop.set()
    writer.join(5)
    assert sent < 64 * 1024 * 1024
    tunnel.close()
    sides.close()


async def _a_side_that_reads_nothing_of_what_is_left_after_close_is_reset_after_the_grace():
    sides = await Sides().open()
    tunnel = Tunnel(asyncio.get_running_loop(), sides.down, sides.up, idle_timeout=0)
    tunnel.start()
    sides.down.write(b"q" * (8 * 1024 * 1024))  # more than the kernel takes: the rest waits in the transport
    assert sides.down.get_write_buffer_size() > 0
    tunnel.close()
    for _ in range(100):
        if tunnel.downstream.lost:
            break
        await asyncio.sleep(0.02)
    assert tunnel.downstream.lost, "the unread buffer was kept past the grace"
    sides.close()


# Run on uvloop, the proxy's own event loop (its transports are the ones the tunnel must work with).


def test_bytes_pass_both_ways_and_a_half_close_reaches_the_other_side():
    uvloop.run(_bytes_pass_both_ways_and_a_half_close_reaches_the_other_side())


def test_a_quiet_tunnel_is_closed_after_its_idle_timeout():
    uvloop.run(_a_quiet_tunnel_is_closed_after_its_idle_timeout())


def test_a_destination_that_stops_reading_stops_the_client_being_read_within_the_bound():
    uvloop.run(_a_destination_that_stops_reading_stops_the_client_being_read_within_the_bound())


def test_a_side_that_reads_nothing_of_what_is_left_after_close_is_reset_after_the_grace(monkeypatch):
    monkeypatch.setattr(tunnel_module, "FLUSH_GRACE", 0.3)
    uvloop.run(_a_side_that_reads_nothing_of_what_is_left_after_close_is_reset_after_the_grace())
