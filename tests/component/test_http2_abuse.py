"""Raw HTTP/2 frames against a real `laneproxy run`: floods, bombs and malformed frames end in GOAWAY or a stream
reset, with bounded memory, and a rejected stream never becomes an upstream request.

The client is the `h2` library driven by hand over a blocking socket, so the tests can send what no
well-behaved client sends (more streams than allowed, a reset right after every request, PINGs it
never reads the answers to). The upstream is a real grpcio server that records every call it gets.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from grpcrig import EchoServer, channel, method
from proxyrig import SWIMLANES, ProxyProcess, RssWatch, endpoints_file

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
UNARY = b"/lanetest.Echo/Unary"
MESSAGE = b"\x00\x00\x00\x00\x02hi"


@pytest.fixture(scope="module")
def upstream():
    server = EchoServer("mockc").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, upstream):
    endpoints = endpoints_file(tmp_path_factory.mktemp("h2abuse") / "endpoints.yaml",
                               {"default/mockc": {"base": [upstream.port]}})
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=upstream.port).start()
    yield proxy
    proxy.stop()


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


def headers(path: bytes = UNARY, extra: list[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"mockc"), (b":path", path),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *extra]


def read_until_closed(sock: socket.socket, conn: h2.connection.H2Connection, timeout: float = 10.0) -> list:
    """Every event until the proxy closes the connection (or `timeout`); the client answers what h2 must."""
    events: list = []
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            try:
                events += conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
    except (TimeoutError, ConnectionError, OSError):
        pass
    return events


def goaway(events: list) -> h2.events.ConnectionTerminated | None:
    return next((event for event in events if isinstance(event, h2.events.ConnectionTerminated)), None)


def test_an_hpack_bomb_is_answered_with_goaway_and_never_reaches_the_upstream(sidecar, upstream):
    calls = len(upstream.calls)
    conn = client()
    # 200 copies of one 4 KiB header: a few KiB on the wire (HPACK indexes it once), 800 KiB decoded.
    conn.send_headers(1, headers(extra=[(b"x-bomb", b"a" * 4096)] * 200), end_stream=False)
    conn.send_data(1, MESSAGE, end_stream=True)
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    sock.sendall(conn.data_to_send())
    terminated = goaway(read_until_closed(sock, conn))
    sock.close()
    assert terminated is not None and terminated.error_code != ErrorCodes.NO_ERROR
    assert len(upstream.calls) == calls
    assert sidecar.stat("http.outbound.http2.header_overflow") >= 1


def test_more_streams_than_the_limit_end_the_connection_and_no_stream_past_the_limit_is_forwarded(sidecar, upstream):
    calls = len(upstream.calls)
    before = sidecar.stat("http.outbound.http2.too_many_streams")
    conn = client()
    # The client has not read the proxy's SETTINGS (at most 100 streams), so h2 lets it open 150.
    for stream_id in range(1, 2 * 150, 2):
        conn.send_headers(stream_id, headers(), end_stream=False)
        conn.send_data(stream_id, MESSAGE, end_stream=True)
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    sock.sendall(conn.data_to_send())
    events = read_until_closed(sock, conn)
    sock.close()
    terminated = goaway(events)
    assert terminated is not None and terminated.error_code != ErrorCodes.NO_ERROR
    answered = {event.stream_id for event in events if isinstance(event, h2.events.StreamEnded)}
    assert all(stream_id < 2 * 100 for stream_id in answered), "a stream past the limit was answered"
    assert len(upstream.calls) - calls <= 100
    assert sidecar.stat("http.outbound.http2.too_many_streams") == before + 1


def test_rapid_reset_ends_the_connection_with_goaway_and_leaves_no_upstream_call_behind(sidecar, upstream):
    calls = len(upstream.calls)
    before = sidecar.stat("http.outbound.http2.premature_reset")
    conn = client()
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    for stream_id in range(1, 2 * 1000, 2):
        conn.send_headers(stream_id, headers(), end_stream=False)
        conn.reset_stream(stream_id, ErrorCodes.CANCEL)
    try:
        sock.sendall(conn.data_to_send())
    except ConnectionError:
        pass  # cut off while still sending: that is the point
    terminated = goaway(read_until_closed(sock, conn))
    sock.close()
    assert terminated is not None and terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sidecar.stat("http.outbound.http2.premature_reset") - before >= 50
    time.sleep(0.5)
    assert len(upstream.calls) == calls, "a reset stream became a complete upstream call"
    # The proxy goes on serving other clients.
    conn = client()
    conn.send_headers(1, headers(), end_stream=False)
    conn.send_data(1, MESSAGE, end_stream=True)
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    sock.sendall(conn.data_to_send())
    events = []
    sock.settimeout(10)
    while not any(isinstance(event, h2.events.StreamEnded) for event in events):
        events += conn.receive_data(sock.recv(65536))
        sock.sendall(conn.data_to_send())
    sock.close()
    assert len(upstream.calls) == calls + 1


@pytest.mark.parametrize("control_frame", [
    pytest.param(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678", id="PING"),  # 8 opaque bytes
    pytest.param(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", id="SETTINGS"),  # empty, still to be acknowledged
])
def test_a_control_frame_flood_from_a_client_that_reads_nothing_is_cut_off_with_memory_bounded(sidecar, control_frame):
    before = sidecar.stat("http.outbound.http2.outbound_control_flood")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's window for the ACKs stays tiny
    sock.connect(("127.0.0.1", sidecar.outbound_port))
    conn = client()
    sock.sendall(conn.data_to_send())
    ping = control_frame
    watch = RssWatch(sidecar.process.pid)
    cut = False
    sock.settimeout(5)
    try:
        for _ in range(100):  # at most 100 x 10,000 frames (17 MB); the proxy must stop it long before
            sock.sendall(ping * 10_000)
    except (ConnectionError, TimeoutError, OSError):
        cut = True
    peak = watch.stop()
    sock.close()
    assert cut, "the proxy kept reading control frames whose ACKs the client never read"
    assert sidecar.stat("http.outbound.http2.outbound_control_flood") == before + 1
    assert peak < 200 * 1024 * 1024


def test_a_malformed_frame_is_a_protocol_error_answered_with_goaway(sidecar, upstream):
    before = sidecar.stat("http.outbound.http2.rx_messaging_error")
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    conn = client()
    sock.sendall(conn.data_to_send())
    sock.sendall(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")  # DATA on stream 0: a connection error
    terminated = goaway(read_until_closed(sock, conn))
    sock.close()
    assert terminated is not None and terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert sidecar.stat("http.outbound.http2.rx_messaging_error") == before + 1


MALFORMED_BLOCKS = {
    "uppercase name": headers(extra=[(b"X-Lane", b"canary")]),
    "connection-specific field": headers(extra=[(b"connection", b"close")]),
    "te other than trailers": [(n, b"gzip" if n == b"te" else v) for n, v in headers()],
    "LF in a value": headers(extra=[(b"x-trace", b"a\nx-lane: canary")]),
    "no :path": [(n, v) for n, v in headers() if n != b":path"],
    "empty :path": headers(path=b""),
    "pseudo-header after a field": headers() + [(b":protocol", b"x")],
}


@pytest.mark.parametrize("block", MALFORMED_BLOCKS.values(), ids=MALFORMED_BLOCKS.keys())
def test_a_malformed_header_block_is_answered_with_goaway_and_never_reaches_the_upstream(sidecar, upstream, block):
    calls = len(upstream.calls)
    before = sidecar.stat("http.outbound.http2.rx_messaging_error")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, block, end_stream=False)
    conn.send_data(1, MESSAGE, end_stream=True)
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    sock.sendall(conn.data_to_send())
    terminated = goaway(read_until_closed(sock, conn))
    sock.close()
    assert terminated is not None and terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert len(upstream.calls) == calls
    assert sidecar.stat("http.outbound.http2.rx_messaging_error") == before + 1


def test_malformed_request_trailers_end_the_connection_before_they_go_upstream(sidecar, upstream):
    before = sidecar.stat("http.outbound.http2.rx_messaging_error")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers(), end_stream=False)
    conn.send_data(1, MESSAGE)
    conn.send_headers(1, [(b":path", b"/other")], end_stream=True)  # a pseudo-header in trailers
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    sock.sendall(conn.data_to_send())
    terminated = goaway(read_until_closed(sock, conn))
    sock.close()
    assert terminated is not None and terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert sidecar.stat("http.outbound.http2.rx_messaging_error") == before + 1


@pytest.mark.parametrize("block", [
    b"\xff" + b"\xff" * 40 + b"\x01",  # an index whose integer never ends within the bound
    b"\x3f\xe1\xff\xff\x07",  # a dynamic table of about 16 MiB, past our SETTINGS
    b"\x00\x7f\xff\xff\xff\x0f",  # a literal name of about 256 MiB in a 6-byte block
], ids=["endless integer", "table size past the settings", "string past the block"])
def test_a_hostile_hpack_block_is_a_protocol_error_and_reaches_no_upstream(sidecar, upstream, block):
    calls = len(upstream.calls)
    before = sidecar.stat("http.outbound.http2.rx_messaging_error")
    conn = client()
    sock = socket.create_connection(("127.0.0.1", sidecar.outbound_port))
    sock.sendall(conn.data_to_send())
    # HEADERS, END_STREAM | END_HEADERS, stream 1
    sock.sendall(len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block)
    terminated = goaway(read_until_closed(sock, conn))
    sock.close()
    assert terminated is not None and terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert len(upstream.calls) == calls
    assert sidecar.stat("http.outbound.http2.rx_messaging_error") == before + 1


def test_draining_sends_goaway_and_the_call_in_flight_still_completes(tmp_path, upstream):
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockc": {"base": [upstream.port]}})
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=upstream.port).start()
    try:
        chan = channel(proxy.outbound_port, "mockc")
        in_flight = method(chan, "Slow").future(b"1", timeout=10)
        time.sleep(0.3)
        request = urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}/drain_listeners", method="POST")
        urllib.request.urlopen(request, timeout=5).read()
        assert in_flight.result() == b"mockc|base|1"
        assert proxy.stat("http.outbound.http2.goaway_sent") == 1
        # The client took the GOAWAY: its next call goes on a new connection, which the draining listener serves.
        assert method(chan, "Unary")(b"again", timeout=10) == b"mockc|base|again"
        assert proxy.stat("http.outbound.downstream_cx_http2_total") == 2
        chan.close()
    finally:
        proxy.stop()
