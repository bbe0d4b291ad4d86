"""Byte tunnels: two sockets joined after a `101 Switching Protocols`, a CONNECT, or a passed-through connection.

Owns the pump between two transports once HTTP is over on them: every byte read on one side is written
to the other, with backpressure both ways (a side whose peer's write buffer passes its high-water mark
stops being read until the buffer drains, so a peer that stops reading costs at most one write buffer
plus one read per direction), half-closes passed on (EOF on one side becomes a FIN on the other; the
tunnel closes once both sides ended), the idle timeout (nothing moved either way for that long: both
sides closed), and the byte counts both ways. It also owns the switch of an HTTP/1.1 exchange to a
tunnel on `101` (`switch_protocols`): the 101 head to the client, the client bytes held since the
upgrade request's head, and handing the exchange (to be recorded) and both connections' bookkeeping
back to their owners when the tunnel ends.

It never parses what goes through, never decides where a tunnel goes (the exchange's role, egress and
sniff do), and never writes a byte to one side before that side's tunnel exists: bytes a client sends
after an upgrade request's head stay with the downstream connection until the upstream answered 101.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, cast

from laneproxy.core import headers as h
from laneproxy.dataplane import codec

if TYPE_CHECKING:
    from laneproxy.dataplane.downstream import DownstreamConnection
    from laneproxy.dataplane.exchange import Exchange
    from laneproxy.observability.stats import TcpStats
    from laneproxy.dataplane.upstream import UpstreamConnection

# Per side: what may wait in a transport's write buffer before the other side stops being read.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# The most a tunnel holds in memory per direction: a full write buffer plus one read (uvloop reads up to 256 KiB).
BOUND_PER_DIRECTION = WRITE_HIGH_WATER + 256 * 1024
# A closed tunnel still flushes what it holds for a side; a side that reads none of it within this is reset.
FLUSH_GRACE = 30.0


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: what it reads goes to the other side's transport."""

    __slots__ = ("tunnel", "transport", "peer", "received", "ended", "paused", "lost")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: TunnelEnd = self  # set by the tunnel
        self.received = 0
        self.ended = False  # EOF read from this side
        self.paused = False  # this side's reading is paused for the peer's full write buffer
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        tunnel = self.tunnel
        tunnel.last_activity = tunnel.loop.time()
        stats = tunnel.stats
        if stats is not None:  # Envoy's TCP proxy counts bytes as they pass, not when the connection ends
            if self is tunnel.downstream:
                stats.rx_bytes += len(data)
            else:
                stats.tx_bytes += len(data)
        peer = self.peer.transport
        if not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        self.tunnel.note_end(self)
        peer = self.peer
        if peer.ended or not peer.transport.can_write_eof():
            self.tunnel.close()
            return False
        if not peer.transport.is_closing():
            peer.transport.write_eof()  # the half-close goes on; the other direction keeps flowing
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.note_end(self)
        self.tunnel.close(exc)

    def abort_unflushed(self) -> None:
        if not self.lost:
            self.transport.abort()  # it never read what was left for it: the memory is not kept for it any longer

    def pause_writing(self) -> None:
        # This side's write buffer is full: stop reading what would be written to it.
        peer = self.peer
        if not peer.paused and not peer.transport.is_closing():
            peer.paused = True
            peer.transport.pause_reading()
            self.tunnel.paused_total += 1

    def resume_writing(self) -> None:
        peer = self.peer
        if peer.paused and not peer.transport.is_closing():
            peer.paused = False
            peer.transport.resume_reading()


class Tunnel:
    """Two transports joined: `downstream` is the client's side, `upstream` the destination's."""

    __slots__ = ("loop", "downstream", "upstream", "idle_timeout", "last_activity", "started", "timer", "closed",
                 "on_closed", "error", "paused_total", "idle_expired", "stats", "ended_by")

    def __init__(self, loop: asyncio.AbstractEventLoop, downstream: asyncio.Transport, upstream: asyncio.Transport, *,
                 idle_timeout: float, on_closed: Callable[[Tunnel], None] | None = None) -> None:
        self.loop = loop
        self.downstream = TunnelEnd(self, downstream)
        self.upstream = TunnelEnd(self, upstream)
        self.downstream.peer, self.upstream.peer = self.upstream, self.downstream
        self.idle_timeout = idle_timeout
        self.started = self.last_activity = loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.on_closed = on_closed
        self.error: Exception | None = None
        self.paused_total = 0  # times a side stopped being read for the other's full buffer
        self.idle_expired = False
        self.ended_by: str | None = None  # "downstream" or "upstream": the side whose EOF or reset came first
        self.stats: TcpStats | None = None  # tcp.<prefix>.* of a passed-through connection

    @property
    def received(self) -> int:
        """Bytes the client sent through the tunnel."""
        return self.downstream.received

    @property
    def sent(self) -> int:
        """Bytes sent to the client through the tunnel."""
        return self.upstream.received

    def note_end(self, end: TunnelEnd) -> None:
        if self.ended_by is None and not self.closed:
            self.ended_by = "downstream" if end is self.downstream else "upstream"

    def start(self, to_upstream: bytes = b"", to_downstream: bytes = b"") -> None:
        """Take both transports over, send what each side said before the tunnel existed, and read both."""
        for end in (self.downstream, self.upstream):
            end.transport.set_protocol(end)
            end.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if to_upstream:
            self.downstream.data_received(to_upstream)
        if to_downstream:
            self.upstream.data_received(to_downstream)
        for end in (self.downstream, self.upstream):
            if not end.paused and not end.transport.is_closing():
                end.transport.resume_reading()
        if self.idle_timeout > 0:
            self.timer = self.loop.call_later(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per tunnel, re-armed for the rest of the period rather than moved on every read.
        if self.closed:
            return
        quiet = self.loop.time() - self.last_activity
        if quiet >= self.idle_timeout:
            self.idle_expired = True
            self.close()
            return
        self.timer = self.loop.call_later(self.idle_timeout - quiet, self._check_idle)

    def close(self, exc: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = exc
        if self.timer is not None:
            self.timer.cancel()
        for end in (self.downstream, self.upstream):
            if end.lost:
                continue
            flushing = end.transport.get_write_buffer_size() > 0
            end.transport.close()
            if flushing:
                self.loop.call_later(FLUSH_GRACE, end.abort_unflushed)
        if self.on_closed is not None:
            self.on_closed(self)


class OpeningEnd(asyncio.Protocol):
    """A destination's side while its connection opens, before its tunnel exists: what it says first (a server-first
    banner) is kept for the tunnel, and reading stops after that read. (uvloop starts reading a new outgoing
    connection after `connection_made` whatever it asked there: the first read cannot be refused, only kept.)"""

    def __init__(self) -> None:
        self.lost = False
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    @property
    def said(self) -> bytes:
        return b"".join(self.early)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()  # bounded: nothing more until the tunnel takes over

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


# -- HTTP/1.1 upgrades ------------------------------------------------------------------------------------------


def upgrade_token(value: bytes | None, allowed: tuple[str, ...]) -> bytes | None:
    """The protocol an `Upgrade` header asks for, if it is one this proxy tunnels (Envoy's `upgrade_configs`).

    Anything else (h2c above all, which Envoy ignores too) is stripped as an ordinary hop-by-hop header.
    """
    if value is None:
        return None
    token = value.strip().lower()
    return value.strip() if token.decode("latin-1") in allowed else None


def ask_upgrade(exchange: Exchange) -> None:
    """The upgrade request goes upstream with its `Connection: upgrade` and `Upgrade` (else hop-by-hop)."""
    routed = exchange.routed
    if routed is not None and exchange.upgrade is not None:
        routed.overrides[h.CONNECTION] = b"upgrade"
        routed.overrides[h.UPGRADE] = exchange.upgrade


def switch_protocols(exchange: Exchange, connection: UpstreamConnection,
                     from_upstream: bytes) -> Callable[[], None] | None:
    """The upstream answered an upgrade request with 101: send the 101 on and prepare the tunnel.

    Returns what starts the tunnel, once the exchange's HTTP part is done; None if the client is gone
    (the exchange is then recorded as any other). When the tunnel ends, the exchange is recorded (status
    101, the tunnel's bytes, its whole duration) and the client's and the upstream's connection objects get
    their `connection_lost`, so listener and pool count them until then.
    """
    downstream = cast("DownstreamConnection", exchange.downstream)  # upgrades are HTTP/1.1's
    listener = exchange.listener
    down_transport, up_transport = downstream.transport, connection.transport
    connection.sink = None
    exchange.upstream = None
    if down_transport is None or up_transport is None or downstream.closed:
        connection.close()
        return None
    upgrade = exchange.upgrade or b""
    for name, value in connection.headers:
        if name == h.UPGRADE:
            upgrade = value
    exchange.response_status = 101
    exchange.head_sent = True
    overrides = listener.response_overrides(exchange)
    overrides[h.CONNECTION] = b"upgrade"
    overrides[h.UPGRADE] = upgrade
    parts = [b"HTTP/1.1 101 ", connection.reason or codec.reason_phrase(101), codec.CRLF]
    codec.write_response_headers(parts, connection.headers, overrides)
    parts.append(codec.CRLF)
    down_transport.write(b"".join(parts))
    early, downstream.tunnel_early = downstream.tunnel_early or b"", None
    downstream.closed = True  # handed over: the HTTP side never writes, closes or times out this socket again

    def ended(tunnel: Tunnel) -> None:
        connection.pool.tx_bytes += tunnel.received
        connection.pool.rx_bytes += tunnel.sent
        listener.tunnel_closed(tunnel)
        exchange.end_tunnel(tunnel.received, tunnel.sent, tunnel.ended_by)  # the one record of this exchange
        downstream.connection_lost(tunnel.error)
        connection.connection_lost(tunnel.error)

    tunnel = Tunnel(listener.loop, down_transport, up_transport, idle_timeout=listener.settings.tunnel_idle_timeout,
                    on_closed=ended)
    listener.tunnel_opened(tunnel)
    return lambda: tunnel.start(to_upstream=early, to_downstream=from_upstream)
