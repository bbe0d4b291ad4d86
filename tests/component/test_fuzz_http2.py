"""Fuzzing the HTTP/2 listener: random and mutated frames after a valid connection preface, through a real proxy.

Each example opens one connection to a real `laneproxy run` (its outbound listener, in front of a real grpcio
server) and sends the client preface, a valid SETTINGS frame, then a few frames that are either random (any
type, including unknown ones, any flags, any stream id, a length that may lie about the payload) or a valid
gRPC request built by the `h2` library and then mutated (bytes flipped, cut or inserted). Whatever arrives,
the proxy must not hang on to it beyond its timeouts, must stay alive and keep serving real gRPC calls,
must not grow beyond a bound, and must never log an unhandled exception. The upstream never receives more
calls than the valid-looking requests the client sent: the proxy never makes one out of random frames.
"""

from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpcrig import EchoServer, channel, method
from proxyrig import SWIMLANES, ProxyProcess, RssWatch, endpoints_file, rss_bytes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
PATHS = (b"/lanetest.Echo/Unary", b"/lanetest.Echo/Other")
MAX_GROWTH = 64 * 1024 * 1024  # RSS the whole fuzz run may add (the proxy's stated per-connection bounds are far below)


@pytest.fixture(scope="module")
def upstream():
    server = EchoServer("mockc").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, upstream):
    endpoints = endpoints_file(tmp_path_factory.mktemp("h2fuzz") / "endpoints.yaml",
                               {"default/mockc": {"base": [upstream.port]}})
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=upstream.port).start()
    proxy.start_rss = rss_bytes(proxy.process.pid)
    proxy.requests_sent = 0  # mutated requests sent by the fuzz: the most upstream calls it may cause
    yield proxy
    proxy.stop()


def frame(kind: int, flags: int, stream_id: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id & 0x7FFFFFFF) + payload


random_frames = st.builds(
    frame,
    kind=st.integers(0, 15),  # DATA..CONTINUATION, and unknown types the proxy must ignore
    flags=st.integers(0, 255),
    stream_id=st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]) | st.integers(0, 2**31 - 1),
    payload=st.binary(max_size=64),
    length=st.none() | st.integers(0, 2**14 + 16),
)


@st.composite
def mutated_requests(draw) -> bytes:
    """A valid gRPC request's frames (HEADERS, DATA with END_STREAM), then a few bytes flipped, cut or inserted."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    conn.data_to_send()  # the preface and SETTINGS are sent by the test itself
    path = draw(st.sampled_from(PATHS))
    extra = draw(st.lists(st.tuples(st.sampled_from([b"x-asm-prefer-tag", b"my-request-id", b"te", b"connection",
                                                        b"content-length", b"grpc-timeout"]),
                                    st.binary(min_size=0, max_size=12)), max_size=3))
    conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"mockc"), (b":path", path),
                          (b"content-type", b"application/grpc"), *extra], end_stream=False)
    conn.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    data = bytearray(conn.data_to_send())
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:position + draw(st.integers(1, 8))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def exchange(port: int, payload: bytes) -> None:
    """Send the bytes and read what comes back until the proxy closes, or 1.5 s of silence (a valid but unfinished
    stream legitimately waits for more: the test then leaves, as a client that gives up does)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(PREFACE + EMPTY_SETTINGS + payload)
        sock.settimeout(1.5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return
    except (TimeoutError, ConnectionError, OSError):
        return
    finally:
        sock.close()
    pytest.fail("the proxy kept talking for 10 s to a client that sent a few frames")


def grpc_call_works(port: int) -> bool:
    with channel(port, "mockc") as chan:
        return method(chan, "Unary")(b"ping", timeout=10).startswith(b"mockc|")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(frames=st.lists(st.tuples(st.just(False), random_frames) | st.tuples(st.just(True), mutated_requests()),
                       min_size=1, max_size=5))
def test_random_and_mutated_frames_never_crash_or_hang_the_proxy(sidecar, upstream, frames):
    sidecar.requests_sent += sum(1 for is_request, _ in frames if is_request)
    exchange(sidecar.outbound_port, b"".join(data for _, data in frames))
    assert sidecar.process.poll() is None, "the proxy exited"


def test_after_the_fuzz_the_proxy_still_serves_within_its_memory_bound_and_logged_no_crash(sidecar, upstream):
    # Runs after the fuzz above (file order): the same process, after every example.
    assert sidecar.requests_sent > 0, "the fuzz did not run first"
    calls_from_fuzz = len(upstream.calls)
    watch = RssWatch(sidecar.process.pid)
    assert grpc_call_works(sidecar.outbound_port)
    peak = watch.stop()
    assert peak < sidecar.start_rss + MAX_GROWTH
    assert calls_from_fuzz <= sidecar.requests_sent
    sidecar.stop()
    log = sidecar.process.stderr.read().decode(errors="replace")
    assert "Traceback" not in log, log[-4000:]
