"""The demo's port picker: ports handed to processes it starts are never ones an outgoing connection can take.

A mock once failed to start in the suite because the port picked for it (bound to 0, then released) was taken
by some other connection's source port before the mock bound it.
"""

from __future__ import annotations

import random
import socket

from laneproxy import demo
from laneproxy.demo import PICKED_PORTS_HIGH, PICKED_PORTS_LOW, free_port


def test_picked_ports_are_distinct_and_outside_the_ephemeral_range():
    ephemeral_low, ephemeral_high = (int(part) for part in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(PICKED_PORTS_LOW <= port < PICKED_PORTS_HIGH for port in ports)
    assert not any(ephemeral_low <= port <= ephemeral_high for port in ports)


def test_outgoing_connections_never_take_a_port_from_the_picked_range():
    with socket.create_server(("127.0.0.1", 0), backlog=256) as listener:
        clients = [socket.create_connection(listener.getsockname(), timeout=2) for _ in range(200)]
        try:
            sources = [client.getsockname()[1] for client in clients]
        finally:
            for client in clients:
                client.close()
    assert not [port for port in sources if PICKED_PORTS_LOW <= port < PICKED_PORTS_HIGH]


def test_a_port_something_listens_on_is_drawn_past(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        free = next(port for port in range(PICKED_PORTS_LOW, PICKED_PORTS_HIGH) if port not in demo._handed_out
                    and _bindable(port))
        draws = iter([held, free])
        monkeypatch.setattr(random, "randrange", lambda low, high: next(draws))
        assert free_port() == free


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
