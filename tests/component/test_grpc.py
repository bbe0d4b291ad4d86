"""gRPC through laneproxy with real grpcio clients and servers: every call kind, lanes per stream, deadlines, replies.

The servers are grpcio (grpcrig.EchoServer); each answer names the server that served it and the lane
header it received, so a test sees which lane each stream took and what the proxy sent on.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from grpcrig import TAG, EchoServer, channel, method
from proxyrig import SWIMLANES, Http2Origin, ProxyProcess, endpoints_file, free_port


@pytest.fixture(scope="module")
def servers():
    started = {name: EchoServer(name).start() for name in ("mockb-base", "mockc-base", "mockc-canary")}
    yield started
    for server in started.values():
        server.stop()


class SilentHttp2Server(Http2Origin):
    """An HTTP/2 server that takes every stream and never answers: a gRPC server that ignores `grpc-timeout`.

    A fake, because grpcio servers enforce the deadline themselves and so answer before the proxy's
    route timeout can be seen; this one is what an upstream that does not do that looks like.
    """

    streams = 0

    def on_event(self, conn, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.streams += 1


@pytest.fixture(scope="module")
def silent():
    server = SilentHttp2Server()
    server.start_serving()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, servers, silent):
    """The outbound listener: mockb has only a base endpoint, mockc has base and canary."""
    endpoints = endpoints_file(tmp_path_factory.mktemp("grpc") / "endpoints.yaml", {
        "default/mockb": {"base": [servers["mockb-base"].port]},
        "default/mockc": {"base": [servers["mockc-base"].port], "canary": [servers["mockc-canary"].port]},
        "default/mocka": {"base": [free_port()]},  # nobody listens: connect failures
        "default/mockd": {"base": [silent.port]},  # never answers
    })
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=servers["mockb-base"].port).start()
    yield proxy
    proxy.stop()


def test_unary_server_streaming_bidi_and_a_4_mib_message_reach_the_lanes_endpoint(sidecar):
    chan = channel(sidecar.outbound_port, "mockc")
    canary = [(TAG, "canary")]
    assert method(chan, "Unary")(b"hi", metadata=canary, timeout=10) == b"mockc-canary|canary|hi"
    assert list(method(chan, "Stream", "stream")(b"3", metadata=canary, timeout=10)) == [
        b"mockc-canary|canary|0", b"mockc-canary|canary|1", b"mockc-canary|canary|2"]
    messages = [b"m%d" % index for index in range(50)]
    assert list(method(chan, "Bidi", "bidi")(iter(messages), metadata=canary, timeout=10)) == [
        b"mockc-canary|canary|" + message for message in messages]
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    assert method(chan, "Unary")(big, metadata=canary, timeout=30) == b"mockc-canary|canary|" + big
    chan.close()


def test_a_thousand_concurrent_calls_on_one_connection_each_keep_their_own_lane_or_fall_back_alone(sidecar, servers):
    before = sidecar.stat("http.outbound.downstream_cx_http2_total")
    mockc = channel(sidecar.outbound_port, "mockc")
    unary = method(mockc, "Unary")
    cases = []
    for index in range(1000):
        lane = ("canary", "base")[index % 2]
        cases.append((lane, index, unary.future(b"%d" % index, metadata=[(TAG, lane)], timeout=60)))
    answers = [(lane, index, call.result()) for lane, index, call in cases]
    leaks = [(lane, index, answer) for lane, index, answer in answers
             if answer != f"mockc-{lane}|{lane}|{index}".encode()]
    assert leaks == []
    assert sidecar.stat("http.outbound.downstream_cx_http2_total") == before + 1
    mockc.close()


def test_a_stream_for_a_lane_the_service_lacks_falls_back_to_base_and_keeps_asking_for_its_lane(sidecar):
    chan = channel(sidecar.outbound_port, "mockb")
    assert method(chan, "Unary")(b"x", metadata=[(TAG, "canary")], timeout=10) == b"mockb-base|canary|x"
    chan.close()


def test_a_status_the_app_returns_without_a_message_reaches_the_caller_as_the_app_sent_it(sidecar):
    # grpcio answers an unknown method with Trailers-Only (one HEADERS frame with END_STREAM), as apps answer
    # NOT_FOUND or PERMISSION_DENIED without a message: the proxy must keep it one frame, or the caller reads
    # UNKNOWN "Stream removed" instead of the app's status (found by tests/component/test_fuzz_http2.py).
    chan = channel(sidecar.outbound_port, "mockc")
    with pytest.raises(grpc.RpcError) as raised:
        method(chan, "NoSuchMethod")(b"hi", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, raised.value
    assert method(chan, "Unary")(b"after", timeout=10).endswith(b"|after")  # the stream's end left nothing behind
    chan.close()


def test_a_deadline_that_expires_is_deadline_exceeded(sidecar):
    chan = channel(sidecar.outbound_port, "mockc")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        method(chan, "Slow")(b"3", timeout=0.5)
    # The caller's own deadline fires first, unless a loaded host delays it past the proxy's timer for the same
    # grpc-timeout, which answers as Envoy does (14, `upstream request timeout`): either way, well before 3 s.
    error = raised.value
    assert (error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            or (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, "upstream request timeout")), error
    assert time.monotonic() - started < 2.0
    chan.close()


def raw_call(port: int, headers: list[tuple[bytes, bytes]], body: bytes = b"", timeout: float = 10.0):
    """One HTTP/2 stream with exactly these headers, from a client that never times out on its own."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    started = time.monotonic()
    response: dict[bytes, bytes] = {}
    trailers: dict[bytes, bytes] = {}
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response = dict(event.headers)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return response, trailers, data, time.monotonic() - started
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return response, trailers, data, time.monotonic() - started


def grpc_headers(authority: bytes, path: bytes, extra: list[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", authority), (b":path", path),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *extra]


def test_grpc_timeout_is_the_route_timeout_and_expiry_is_answered_unavailable_as_envoy_does(sidecar, silent):
    cluster = "cluster.outbound|8000||mockd.default.svc.cluster.local"
    streams = silent.streams
    response, trailers, data, elapsed = raw_call(
        sidecar.outbound_port, grpc_headers(b"mockd", b"/lanetest.Echo/Slow", [(b"grpc-timeout", b"300m")]),
        b"\x00\x00\x00\x00\x01x")
    assert (response[b":status"], response[b"grpc-status"], response[b"grpc-message"], trailers, data) == (
        b"200", b"14", b"upstream request timeout", {}, b"")
    assert silent.streams == streams + 1
    assert elapsed < 2.0, "the proxy waited the 15 s route timeout instead of the caller's deadline"
    assert sidecar.stat(f"{cluster}.upstream_rq_timeout") == 1


@pytest.mark.parametrize(("authority", "code", "status"), [
    ("nowhere", grpc.StatusCode.UNIMPLEMENTED, b"12"),
    ("mocka", grpc.StatusCode.UNAVAILABLE, b"14"),
], ids=["no-route", "connect-failure"])
def test_local_replies_to_grpc_callers_are_grpc_statuses_as_envoy_writes_them(sidecar, authority, code, status):
    chan = channel(sidecar.outbound_port, authority)
    with pytest.raises(grpc.RpcError) as raised:
        method(chan, "Unary")(b"x", timeout=10)
    assert raised.value.code() == code
    chan.close()
    response, _, data, _ = raw_call(sidecar.outbound_port, grpc_headers(authority.encode(), b"/lanetest.Echo/Unary"),
                                    b"\x00\x00\x00\x00\x01x")
    assert (response[b":status"], response[b"grpc-status"], data) == (b"200", status, b"")


def test_trailers_and_per_stream_stats_are_envoys(sidecar):
    response, trailers, data, _ = raw_call(sidecar.outbound_port, grpc_headers(b"mockc", b"/lanetest.Echo/Unary"),
                                           b"\x00\x00\x00\x00\x02ok")
    assert (response[b":status"], trailers[b"grpc-status"]) == (b"200", b"0")
    assert data == b"\x00\x00\x00\x00\x12mockc-base|base|ok"
    assert sidecar.stat("http.outbound.downstream_rq_http2_total") >= 1


def test_http2_upstream_connections_count_in_clusters_and_cluster_stats_as_http1_ones_do(sidecar, servers):
    chan = channel(sidecar.outbound_port, "mockc")
    assert method(chan, "Unary")(b"hi", metadata=[(TAG, "canary")], timeout=10) == b"mockc-canary|canary|hi"
    chan.close()
    cluster = "outbound|8000|canary|mockc.default.svc.cluster.local"
    host = f"127.0.0.1:{servers['mockc-canary'].port}"
    lines = sidecar.admin("/clusters").decode().splitlines()
    cx_active = [int(line.rsplit("::", 1)[1]) for line in lines if line.startswith(f"{cluster}::{host}::cx_active::")]
    assert cx_active and cx_active[0] >= 1, lines  # the pooled connection the call went on
    assert sidecar.stat(f"cluster.{cluster}.upstream_cx_active") == cx_active[0]
    assert sidecar.stat(f"cluster.{cluster}.upstream_cx_rx_bytes_total") > 0
    assert sidecar.stat(f"cluster.{cluster}.upstream_cx_tx_bytes_total") > 0


@pytest.fixture
def chain(tmp_path: Path):
    """client -> gateway -> mocka's sidecar (inbound) -> mocka app -> its outbound -> mockb/mockc, all gRPC."""
    bodies = list(yaml.safe_load_all(SWIMLANES.read_text()))
    for lane in bodies[1:]:
        for rule in lane["spec"]["ingressRules"]:
            rule["match"]["uri"] = {"prefix": "/lanetest."}
    swimlanes = tmp_path / "swimlanes.yaml"
    swimlanes.write_text(yaml.safe_dump_all(bodies))
    mockc_base, mockc_canary = EchoServer("mockc-base").start(), EchoServer("mockc-canary").start()
    outbound_port = free_port()

    class Relay(EchoServer):
        """mocka's app: calls mockc through its sidecar's outbound listener, passing on only the trace id."""

        def unary(self, request, context):
            trace = dict(context.invocation_metadata()).get("my-request-id", "")
            with channel(outbound_port, "mockc") as out:
                answer = method(out, "Unary")(request, metadata=[("my-request-id", trace)], timeout=10)
            return self._prefix(context) + answer

    app = Relay("mocka").start()
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {
        "default/mockc": {"base": [mockc_base.port], "canary": [mockc_canary.port]},
    })
    sidecar = ProxyProcess(swimlanes, endpoints, outbound=True, inbound_app=app.port)
    sidecar.outbound_port = outbound_port
    sidecar.args[sidecar.args.index("--outbound") + 1] = f"127.0.0.1:{outbound_port}"
    sidecar.start()
    gateway_endpoints = endpoints_file(tmp_path / "gateway-endpoints.yaml", {
        "default/mocka": {"base": [sidecar.inbound_port]},  # one sidecar serves both lanes: canary falls back
    }, port=80)
    gateway = ProxyProcess(swimlanes, gateway_endpoints, gateway=True).start()
    yield gateway, sidecar
    gateway.stop()
    sidecar.stop()
    for server in (app, mockc_base, mockc_canary):
        server.stop()


def test_through_gateway_and_sidecar_the_trace_table_keeps_each_call_in_its_lane_on_the_next_hop(chain):
    gateway, sidecar = chain
    chan = channel(gateway.gateway_port, "shop")
    unary = method(chan, "Unary")
    calls = [(lane, unary.future(lane.encode(), metadata=[(TAG, lane)], timeout=30))
             for lane in ("canary", "base") * 20]
    answers = {(lane, call.result()) for lane, call in calls}
    assert answers == {("canary", b"mocka|canary|mockc-canary|canary|canary"),
                       ("base", b"mocka|base|mockc-base|base|base")}
    assert sidecar.stat("laneproxy.lane_source.trace-table") == 40
    chan.close()



@pytest.mark.parametrize("value", [b"zz", b"\x01\x02"])
def test_a_value_the_app_refuses_fails_that_call_alone_and_not_the_calls_after_it(sidecar, value):
    # grpc-core refuses such a grpc-timeout without keeping it in its HPACK table; had the proxy's encoder kept
    # it, every later call on the shared upstream connection would decode wrongly (found by test_fuzz_http2).
    response, trailers, _, _ = raw_call(sidecar.outbound_port, grpc_headers(
        b"mockc", b"/lanetest.Echo/Unary", [(b"grpc-timeout", value), (b"my-request-id", b"bad-" + value.hex().encode())]),
        b"\x00\x00\x00\x00\x02hi")
    assert (trailers or response).get(b"grpc-status") != b"0"
    chan = channel(sidecar.outbound_port, "mockc")
    for index in range(5):
        assert method(chan, "Unary")(b"%d" % index, timeout=10).endswith(b"|%d" % index)
    chan.close()
