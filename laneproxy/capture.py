"""Transparent traffic capture: the iptables nat rules the init container installs in a pod's network namespace.

Owns the rule set, as Istio's istio-iptables writes it: the app's outbound TCP goes to the outbound listener
(15001), TCP arriving for the app's port goes to the inbound listener (15006); the proxy's own uid and gid
(1337), loopback and chosen ports or CIDRs are exempt, so the proxy never captures itself. The rules are
text in `iptables-restore` format; `apply_rules` hands them to iptables-restore, which replaces the whole nat
table of the namespace it runs in (a pod's namespace is laneproxy's alone: never run this on a host).

IPv4 only: IPv6 traffic is not captured. DNS over TCP (port 53) and the Kubernetes API server (its address
from KUBERNETES_SERVICE_HOST, as the init container sees it) are never captured, as Istio leaves them alone.
Everything else captured reaches the outbound listener, which tells the protocol from the first bytes
(dataplane/sniff.py): HTTP/1.x is proxied with lanes, TLS and any other TCP are passed through to their
original destination (SO_ORIGINAL_DST). Ports excluded here skip the sidecar entirely.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass

from laneproxy.core.errors import LaneProxyError

PROXY_UID = 1337
INBOUND_LISTENER_PORT = 15006
OUTBOUND_LISTENER_PORT = 15001

_INBOUND = "LANEPROXY_INBOUND"
_IN_REDIRECT = "LANEPROXY_IN_REDIRECT"
_OUTPUT = "LANEPROXY_OUTPUT"
_REDIRECT = "LANEPROXY_REDIRECT"


class CaptureError(LaneProxyError):
    """The rules could not be built from the options given, or iptables-restore refused them."""


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    inbound_listener_port: int = INBOUND_LISTENER_PORT
    outbound_listener_port: int = OUTBOUND_LISTENER_PORT
    proxy_uid: int = PROXY_UID
    proxy_gid: int | None = PROXY_UID
    inbound_ports: tuple[int, ...] = ()  # the app's ports whose incoming connections go to the inbound listener
    include_outbound_ports: tuple[int, ...] = ()  # empty: every destination port is captured
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    capture_dns: bool = False  # Istio captures DNS only with its DNS proxy; laneproxy has none: port 53 goes direct
    api_server: str | None = None  # the Kubernetes API server's address, never captured

    def __post_init__(self) -> None:
        ports = (self.inbound_listener_port, self.outbound_listener_port, *self.inbound_ports,
                 *self.include_outbound_ports, *self.exclude_outbound_ports)
        for port in ports:
            if not 0 < port < 65536:
                raise CaptureError(f"port {port} is outside 1-65535")
        if self.inbound_listener_port in self.inbound_ports:
            raise CaptureError(f"inbound port {self.inbound_listener_port} is the inbound listener itself: a loop")
        for cidr in self.exclude_outbound_cidrs:
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise CaptureError(f"not a CIDR: {cidr!r}") from exc
            if network.version != 4:
                raise CaptureError(f"only IPv4 is captured, so an IPv6 exclusion means nothing: {cidr}")
        if self.api_server is not None:
            try:
                ipaddress.ip_address(self.api_server)
            except ValueError as exc:
                raise CaptureError(f"the API server address is not an IP address: {self.api_server!r}") from exc


def parse_ports(text: str | None) -> tuple[int, ...]:
    """'8000, 9090' -> (8000, 9090); empty or None -> ()."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise CaptureError(f"expected comma-separated port numbers, got {text!r}") from exc


def parse_cidrs(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(part for part in text.replace(" ", "").split(",") if part)


def nat_rules(settings: CaptureSettings) -> str:
    """The nat table, in iptables-restore format, that captures a pod's traffic for its sidecar."""
    lines = [
        "# laneproxy capture: the nat table of one pod's network namespace (iptables-restore format)",
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f":{_INBOUND} - [0:0]",
        f":{_IN_REDIRECT} - [0:0]",
        f":{_OUTPUT} - [0:0]",
        f":{_REDIRECT} - [0:0]",
        f"-A {_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {settings.inbound_listener_port}",
        f"-A {_REDIRECT} -p tcp -j REDIRECT --to-ports {settings.outbound_listener_port}",
        # Inbound: only the app's own ports. The inbound listener forwards to one app port, so capturing
        # every port would deliver, say, a metrics scrape of another port to the app's HTTP port.
        f"-A PREROUTING -p tcp -j {_INBOUND}",
    ]
    lines += [f"-A {_INBOUND} -p tcp --dport {port} -j {_IN_REDIRECT}" for port in settings.inbound_ports]
    lines += [
        f"-A OUTPUT -p tcp -j {_OUTPUT}",
        # The proxy's own connections (to endpoints, to the app, passthrough) must never come back to it.
        f"-A {_OUTPUT} -m owner --uid-owner {settings.proxy_uid} -j RETURN",
    ]
    if settings.proxy_gid is not None:
        lines.append(f"-A {_OUTPUT} -m owner --gid-owner {settings.proxy_gid} -j RETURN")
    lines += [
        # Loopback stays direct: the app reaching its sidecar (admin, HTTP_PROXY) or itself.
        f"-A {_OUTPUT} -o lo -j RETURN",
        f"-A {_OUTPUT} -d 127.0.0.1/32 -j RETURN",
    ]
    if settings.api_server is not None and ":" not in settings.api_server:  # IPv6 is never captured anyway
        lines.append(f"-A {_OUTPUT} -d {settings.api_server}/32 -j RETURN")
    lines += [f"-A {_OUTPUT} -d {cidr} -j RETURN" for cidr in settings.exclude_outbound_cidrs]
    if not settings.capture_dns:
        lines.append(f"-A {_OUTPUT} -p tcp --dport 53 -j RETURN")
    lines += [f"-A {_OUTPUT} -p tcp --dport {port} -j RETURN" for port in settings.exclude_outbound_ports]
    if settings.include_outbound_ports:
        lines += [f"-A {_OUTPUT} -p tcp --dport {port} -j {_REDIRECT}" for port in settings.include_outbound_ports]
    else:
        lines.append(f"-A {_OUTPUT} -j {_REDIRECT}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def apply_rules(rules: str, iptables_restore: str = "iptables-restore") -> None:
    """Replace the nat table of the current network namespace with `rules` (needs CAP_NET_ADMIN)."""
    try:
        result = subprocess.run([iptables_restore], input=rules, capture_output=True, text=True, check=False,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CaptureError(f"cannot run {iptables_restore}: {exc}") from exc
    if result.returncode != 0:
        raise CaptureError(f"{iptables_restore} failed (exit code {result.returncode}): {result.stderr.strip()}")
