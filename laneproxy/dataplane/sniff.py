"""Captured connections: telling the protocol from the first bytes, as Istio's protocol sniffing does.

Owns what a sidecar listener does with a connection iptables redirected to it (SO_ORIGINAL_DST): an
HTTP/1.x request line and the HTTP/2 preface go to the HTTP codec and are proxied with lanes; a TLS
ClientHello (its SNI read for the access log) and anything else are passed through as raw TCP; so is a client that says nothing for the detection timeout (server-first protocols:
MySQL, SMTP, a banner). The outbound listener passes them to their original destination
(`tcp.PassthroughCluster.*`), the inbound listener to the app's port they were sent to (a Redis or MySQL
port the app declares is captured like its HTTP port: `tcp.inbound|<port>||.*`). They are counted as
Envoy's TCP proxy counts them (connect failures on the cluster) and get one access-log line each when
they end; the listener holds each open one (`passed_through`), so a drain waits for it until its limit. A connection that was not redirected (an app using the listener as HTTP_PROXY, a direct
caller) is HTTP at once, without waiting.

The classification functions are pure and bounded: at most `SNIFF_LIMIT` bytes are held while deciding.
This module never parses HTTP itself and never reads a byte of a passed-through stream after the first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from laneproxy.core.model import Endpoint
from laneproxy.dataplane.downstream import DownstreamConnection
from laneproxy.dataplane.egress import PASSTHROUGH_CLUSTER
from laneproxy.dataplane.tunnel import OpeningEnd, Tunnel

if TYPE_CHECKING:
    from laneproxy.dataplane.listener import Listener

HTTP = "http"
HTTP2 = "h2"
TLS = "tls"
TCP = "tcp"

# The most held while deciding: a ClientHello with many extensions fits in one 16 KiB record.
SNIFF_LIMIT = 16 * 1024 + 5
_METHODS = tuple(m + b" " for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
                                    b"PATCH"))
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def classify(data: bytes) -> str | None:
    """HTTP, HTTP2, TLS or TCP for the first bytes of a connection; None while they could still be more than one."""
    if not data:
        return None
    if data[0] == 0x16:  # TLS handshake record, version 3.x (SSL 3.0 to TLS 1.3 all say 3.x here)
        if len(data) < 2:
            return None
        return TLS if data[1] == 0x03 else TCP
    head = data[:len(H2_PREFACE)]
    if H2_PREFACE.startswith(head):
        return HTTP2 if len(head) == len(H2_PREFACE) else None
    undecided = False
    for method in _METHODS:
        if data.startswith(method):
            return HTTP
        if method.startswith(data):
            undecided = True
    return None if undecided else TCP


def client_hello_sni(data: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello at the start of `data`; None if absent, cut short or malformed."""
    try:
        if len(data) < 5 or data[0] != 0x16:
            return None
        record_end = 5 + int.from_bytes(data[3:5], "big")
        body = data[5:min(record_end, len(data))]
        if len(body) < 4 or body[0] != 0x01:  # handshake type client_hello
            return None
        at = 4 + 2 + 32  # handshake header, client version, random
        at += 1 + body[at]  # session id
        at += 2 + int.from_bytes(body[at:at + 2], "big")  # cipher suites
        at += 1 + body[at]  # compression methods
        extensions_end = at + 2 + int.from_bytes(body[at:at + 2], "big")
        at += 2
        while at + 4 <= min(extensions_end, len(body)):
            kind = int.from_bytes(body[at:at + 2], "big")
            size = int.from_bytes(body[at + 2:at + 4], "big")
            at += 4
            if kind == 0:  # server_name: list length, then (type, length, name) entries
                entry = at + 2
                while entry + 3 <= at + size:
                    name_type = body[entry]
                    length = int.from_bytes(body[entry + 1:entry + 3], "big")
                    name = body[entry + 3:entry + 3 + length]
                    if name_type == 0 and len(name) == length and name:
                        text = name.decode("ascii")
                        return text if text.isprintable() else None
                    entry += 3 + length
                return None
            at += size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


@dataclass(frozen=True, slots=True)
class PassedConnection:
    """A connection passed through as TCP or TLS: once its destination connected (`closed` False), and once it
    ended, with what its access-log line says."""

    protocol: str  # tls, h2, tcp
    flags: str  # Envoy's response flags: UF (destination refused), DC (client left first), `-`
    received: int  # bytes from the client
    sent: int  # bytes to the client
    duration: float  # seconds
    upstream: str | None
    cluster: str
    sni: str | None
    client: str | None
    listener: str
    closed: bool = True


def protocol_for(listener: Listener) -> asyncio.Protocol:
    """A sidecar listener's protocol factory: captured connections are sniffed, others are HTTP at once."""
    if listener.role.name in ("outbound", "inbound"):
        return SniffingConnection(listener)
    return DownstreamConnection(listener)


def passthrough_destination(listener: Listener, original: Endpoint) -> tuple[Endpoint, str]:
    """Where a captured connection that is not HTTP goes, and the name it is counted under.

    Outbound: its original destination, Istio's PassthroughCluster. Inbound: the app's port it was sent to,
    on the app's address (as the inbound listener's HTTP goes), counted as that port's inbound cluster.
    """
    if listener.role.name == "inbound":
        app = listener.settings.app
        host = app.host if app is not None else original.host
        return Endpoint(host, original.port), f"inbound|{original.port}||"
    return original, PASSTHROUGH_CLUSTER


class SniffingConnection(asyncio.Protocol):
    """A connection accepted by the outbound listener until its protocol is known."""

    __slots__ = ("listener", "transport", "original", "buffer", "timer", "client_ended", "decided", "destination",
                 "cluster")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.original: Endpoint | None = None
        self.destination: Endpoint | None = None
        self.cluster = PASSTHROUGH_CLUSTER
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.client_ended = False
        self.decided = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from laneproxy.dataplane.listener import original_destination

        self.transport = transport  # type: ignore[assignment]
        self.original = original_destination(transport)
        if self.original is None:
            self._to_http()  # not captured: an app that uses this listener as its HTTP proxy, or a direct caller
            return
        self.destination, self.cluster = passthrough_destination(self.listener, self.original)
        timeout = self.listener.settings.protocol_detection_timeout
        self.timer = self.listener.loop.call_later(timeout, self._decide, TCP) if timeout > 0 else None

    def data_received(self, data: bytes) -> None:
        if self.decided:
            # Passing through, its destination still connecting: kept for it (reading is paused, so one read at most).
            self.buffer += data
            return
        self.buffer += data
        kind = classify(self.buffer)
        if kind == TLS and len(self.buffer) < SNIFF_LIMIT and client_hello_sni(self.buffer) is None \
                and not _record_complete(self.buffer):
            return  # the SNI may be in the rest of the ClientHello record
        if kind is None and len(self.buffer) < SNIFF_LIMIT:
            return
        self._decide(kind or TCP)

    def eof_received(self) -> bool:
        self.client_ended = True
        if not self.decided:
            self._decide(classify(self.buffer) or TCP)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.decided = True

    def _decide(self, kind: str) -> None:
        if self.decided:
            return
        self.decided = True
        if self.timer is not None:
            self.timer.cancel()
        if kind in (HTTP, HTTP2) and not self.client_ended:
            self._to_http()  # the HTTP codec tells HTTP/2's preface from HTTP/1.x and proxies either with lanes
        else:
            # TLS is opaque here; a half-closed HTTP client is passed on as it is.
            sni = client_hello_sni(self.buffer) if kind == TLS else None
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()  # nothing more is read until the destination is there to take it
            self.listener.loop.create_task(self._pass_through(kind, sni))

    def _to_http(self) -> None:
        transport = self.transport
        assert transport is not None
        self.decided = True
        connection = DownstreamConnection(self.listener)
        transport.set_protocol(connection)
        connection.connection_made(transport)
        if self.buffer:
            connection.data_received(self.buffer)

    async def _pass_through(self, kind: str, sni: str | None) -> None:
        listener, transport, destination = self.listener, self.transport, self.destination
        assert transport is not None and destination is not None
        loop = listener.loop
        stats = listener.proxy_stats
        tcp = stats.tcp(self.cluster)
        cluster = stats.cluster(self.cluster)
        tcp.cx_total += 1
        tcp.cx_active += 1
        cluster.cx_total += 1
        started = loop.time()
        opening = OpeningEnd()
        try:
            async with asyncio.timeout(listener.settings.timeouts.connect or None):
                upstream, _ = await loop.create_connection(lambda: opening, destination.host, destination.port)
        except (OSError, TimeoutError):
            cluster.cx_connect_fail += 1
            tcp.cx_active -= 1
            transport.abort()  # as Envoy's TCP proxy resets a client whose destination cannot be reached
            self._report(kind, sni, started, 0, 0, "UF")
            return
        if transport.is_closing():
            upstream.close()
            tcp.cx_active -= 1
            self._report(kind, sni, started, 0, 0, "DC")
            return

        def ended(tunnel: Tunnel) -> None:
            listener.passed_through.discard(tunnel)
            tcp.cx_active -= 1
            if tunnel.idle_expired:
                tcp.idle_timeout += 1
            self._report(kind, sni, started, tunnel.received, tunnel.sent, "-")

        tunnel = Tunnel(loop, transport, upstream, idle_timeout=listener.settings.tunnel_idle_timeout,  # type: ignore[arg-type]
                        on_closed=ended)
        tunnel.stats = tcp
        listener.passed_through.add(tunnel)  # a drain waits for it, as for any request in flight, until its limit
        self._report(kind, sni, started, 0, 0, "-", closed=False)  # opened: Istio's connections_opened
        tunnel.start(to_upstream=self.buffer, to_downstream=opening.said)
        self.buffer = b""
        if self.client_ended:
            tunnel.downstream.eof_received()
        if opening.lost:
            tunnel.close()  # the destination hung up before the tunnel existed: what it said is delivered first

    def _report(self, kind: str, sni: str | None, started: float, received: int, sent: int, flags: str, *,
             closed: bool = True) -> None:
        observers = self.listener.connection_observers
        if not observers:
            return
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        record = PassedConnection(
            protocol=kind, flags=flags, received=received, sent=sent, duration=self.listener.loop.time() - started,
            upstream=self.destination.address if self.destination is not None else None, cluster=self.cluster,
            sni=sni, client=f"{peer[0]}:{peer[1]}" if peer else None, listener=self.listener.name, closed=closed)
        for observer in observers:
            observer(record)


def _record_complete(data: bytes) -> bool:
    return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
