"""Egress: the outbound listener's traffic to hosts outside the mesh, as Istio's outbound traffic policy has it.

Owns `CONNECT host:port` (apps with HTTPS_PROXY): the authority checked, the connection opened to the
host it names, `200` and a byte tunnel once it is open, the connect failure answered 503 (UF); and the
plain-HTTP proxy request (absolute-form, from apps with HTTP_PROXY) for a host no service names: a passthrough target to that host
under ALLOW_ANY (Istio's default), a 502 under REGISTRY_ONLY (Istio's BlackHoleCluster). Both are counted
on Istio's PassthroughCluster.

It never routes by lane (an egress host has no lanes), never reads the bytes of a CONNECT tunnel, and
never passes a request back to the listener it came from (a passthrough to this listener's own
address is refused, so it cannot loop).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, cast

from laneproxy.core import headers as h
from laneproxy.core.errors import DownstreamProtocolError, EgressBlockedError, NoRouteError, UpstreamConnectError
from laneproxy.core.model import Endpoint, Route
from laneproxy.dataplane.tunnel import OpeningEnd, Tunnel

if TYPE_CHECKING:
    from laneproxy.core.model import RouteTable
    from laneproxy.dataplane.downstream import DownstreamConnection
    from laneproxy.dataplane.exchange import Exchange
    from laneproxy.dataplane.listener import Listener, Role, Target

PASSTHROUGH_CLUSTER = "PassthroughCluster"  # Istio's name for traffic to destinations outside the mesh
REGISTRY_ONLY = "REGISTRY_ONLY"
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def accepts_connect(listener: Listener) -> bool:
    """CONNECT is the app's egress: only the outbound listener answers it (others: 400, as before)."""
    return listener.role.name == "outbound"


def split_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`, or a bare host with a default port) -> (host, port); DownstreamProtocolError if not."""
    text = authority.decode("latin-1")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise DownstreamProtocolError(f"invalid authority {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise DownstreamProtocolError(f"invalid authority {text!r}")
        port_text = rest[1:]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
    if not port_text and default_port is not None:
        port = default_port
    elif port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise DownstreamProtocolError(f"invalid port in authority {text!r}")
    if not _valid_host(host, bracketed=text.startswith("[")):
        raise DownstreamProtocolError(f"invalid host in authority {text!r}")
    return host, port


_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_V6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")


def _valid_host(host: str, *, bracketed: bool) -> bool:
    """A DNS name (labels of 1-63 characters, 253 in all), an IPv4 address, or a bracketed IPv6 address:
    anything else would fail in the resolver's IDNA step rather than as a clean 400."""
    if bracketed:
        return bool(_V6.fullmatch(host))
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_NAME.fullmatch(label) for label in name.split("."))


def _in_mesh(table: RouteTable, host: str, port: int) -> bool:
    hosts = table.hosts
    return (host.encode() in hosts or host.lower().encode() in hosts
            or f"{host.lower()}:{port}".encode() in hosts)


def _is_this_listener(listener: Listener, host: str, port: int) -> bool:
    # Any, not asyncio.Server: uvloop's Server.sockets is a list where typeshed says tuple, and the compiled
    # build checks a declared type when it reads the attribute.
    server: Any = listener.server
    if server is None or not server.sockets:
        return False
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    return port == bound_port and (host == bound_host or host.lower() in _LOOPBACK)


def passthrough_target(role: Role, exchange: Exchange, absolute: bytes | None, authority: bytes, path: bytes,
                       overrides: dict[bytes, bytes]) -> Target:
    """A proxy request (absolute-form target, as HTTP_PROXY clients send) for a host no service names: on to that
    host (ALLOW_ANY), or 502 (REGISTRY_ONLY). A request sent to the listener itself for an unknown Host is
    Envoy's 404: it asked this proxy for a route, not to go somewhere."""
    from laneproxy.dataplane.listener import Target

    if absolute is None:
        raise NoRouteError(f"no service for host {authority.decode('latin-1')!r}")
    listener = exchange.listener
    if listener.settings.outbound_traffic_policy == REGISTRY_ONLY:
        raise EgressBlockedError(f"{authority.decode('latin-1')} is not a mesh service")
    host, port = split_authority(authority, 80)
    if _is_this_listener(listener, host, port):
        raise NoRouteError("a request for this listener itself")
    endpoint = Endpoint(host, port)
    route = Route(PASSTHROUGH_CLUSTER, None, None, PASSTHROUGH_CLUSTER, (endpoint,))
    overrides.setdefault(h.HOST, authority)
    return Target(endpoint, path, overrides, role.stats.cluster(PASSTHROUGH_CLUSTER), route, None, None)


def connect(exchange: Exchange) -> None:
    """Answer `CONNECT host:port`: open the connection, then `200` and a tunnel; a failure is a local reply."""
    from laneproxy.dataplane.listener import Target

    listener = exchange.listener
    try:
        host, port = split_authority(exchange.target, None)
        if listener.settings.outbound_traffic_policy == REGISTRY_ONLY and \
                not _in_mesh(listener.store.current, host, port):
            raise EgressBlockedError(f"{host}:{port} is not a mesh service")
        if _is_this_listener(listener, host, port):
            raise NoRouteError("a CONNECT to this listener itself")
    except (DownstreamProtocolError, EgressBlockedError, NoRouteError) as error:
        exchange.keep_alive = False
        exchange.reply_locally(error)
        return
    endpoint = Endpoint(host, port)
    route = Route(PASSTHROUGH_CLUSTER, None, None, PASSTHROUGH_CLUSTER, (endpoint,))
    cluster = listener.proxy_stats.cluster(PASSTHROUGH_CLUSTER)
    target = exchange.routed = Target(endpoint, exchange.target, {}, cluster, route, None, None)
    target.host_stats = cluster.host(endpoint)
    target.host_stats.rq_active += 1
    cluster.rq_active += 1
    cluster.cx_total += 1
    exchange.counted_active = True
    listener.loop.create_task(_open(exchange, host, port))


async def _open(exchange: Exchange, host: str, port: int) -> None:
    listener = exchange.listener
    loop = listener.loop
    routed = exchange.routed
    assert routed is not None
    opening = OpeningEnd()
    try:
        async with asyncio.timeout(listener.settings.timeouts.connect or None):
            transport, _ = await loop.create_connection(lambda: opening, host, port)
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a name the resolver's IDNA step refuses
        routed.cluster_stats.cx_connect_fail += 1
        if exchange.finished:
            return  # the client left while the connection was being opened: recorded already
        reason = getattr(exc, "strerror", None) or str(exc) or "connect timeout"
        exchange.keep_alive = False
        exchange.reply_locally(UpstreamConnectError(f"{host}:{port}: {reason}").with_cause(exc))
        return
    downstream = cast("DownstreamConnection", exchange.downstream)  # CONNECT is HTTP/1.1's
    if exchange.finished or downstream.closed or downstream.transport is None:
        transport.close()
        if not exchange.finished:
            exchange.cancel()
        return
    routed.cluster_stats.rq_total += 1
    exchange.response_status = 200
    exchange.head_sent = True
    down_transport = downstream.transport
    down_transport.write(b"HTTP/1.1 200 OK\r\ndate: %s\r\nserver: %s\r\n\r\n"
                         % (listener.dates.value(), listener.server_name))
    early, downstream.tunnel_early = downstream.tunnel_early or b"", None
    downstream.closed = True  # handed over: the HTTP side never writes, closes or times out this socket again

    def ended(tunnel: Tunnel) -> None:
        listener.tunnel_closed(tunnel)
        exchange.end_tunnel(tunnel.received, tunnel.sent, tunnel.ended_by)  # the one record of this exchange
        downstream.connection_lost(tunnel.error)

    tunnel = Tunnel(loop, down_transport, transport, idle_timeout=listener.settings.tunnel_idle_timeout,  # type: ignore[arg-type]
                    on_closed=ended)
    listener.tunnel_opened(tunnel)
    exchange.finish_tunnelled()
    tunnel.start(to_upstream=early, to_downstream=opening.said)
    if opening.lost:
        tunnel.close()  # the destination hung up before the tunnel existed: what it said is delivered first
