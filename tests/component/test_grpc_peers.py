"""The gRPC peers (grpc_peers.py) against each other, with no proxy between: proof they work before they judge one.

Real grpcio servers on 127.0.0.1 port 0 and real grpcio clients: each method answers as documented, a chain
of three peers answers as the HTTP mock chain does and forwards the trace header only, deadlines expire
as DEADLINE_EXCEEDED and reach the server as a cancellation, and one channel carries 1,000 concurrent calls.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from envoyrig import unused_port
from grpc_peers import (
    GrpcPeer,
    GrpcPeerProcess,
    PeerSettings,
    channel,
    chat,
    concurrent_unary,
    server_stream,
    unary,
)


@pytest.fixture(scope="module")
def leaf():
    with GrpcPeer(app="mockc", version="v2") as peer:
        yield peer


@pytest.fixture
def to_leaf(leaf):
    chan = channel(leaf.address)
    yield chan
    chan.close()


def test_whoami_answers_with_app_version_and_address_as_the_http_mock_does(to_leaf):
    answer = unary(to_leaf, "Whoami", b"")
    assert (answer.code, answer.message) == (grpc.StatusCode.OK, b"mockc(version: v2, ip: 127.0.0.1)")


def test_echo_returns_a_4_mib_message_unchanged_with_served_by_in_headers_and_trailers(to_leaf):
    payload = bytes(range(256)) * (4 * 2**20 // 256)
    answer = unary(to_leaf, "Echo", payload)
    assert answer.code is grpc.StatusCode.OK
    assert len(answer.message) == 4 * 2**20 and answer.message == payload
    assert answer.initial["x-served-by"] == answer.trailing["x-served-by"] == "mockc(version: v2, ip: 127.0.0.1)"


def test_server_streaming_sends_the_count_asked_in_order(to_leaf):
    answer = server_stream(to_leaf, 50)
    assert answer.code is grpc.StatusCode.OK
    assert answer.messages == [f"mockc(version: v2, ip: 127.0.0.1) #{i}".encode() for i in range(50)]


def test_server_streaming_refuses_a_count_that_is_not_a_number(to_leaf):
    answer = server_stream(to_leaf, "many")  # type: ignore[arg-type]
    assert (answer.code, answer.messages) == (grpc.StatusCode.INVALID_ARGUMENT, [])
    assert "expected a count" in answer.details


def test_bidirectional_streaming_echoes_every_message_in_order(to_leaf):
    sent = [f"message {i}".encode() * (i + 1) for i in range(200)]
    answer = chat(to_leaf, sent)
    assert (answer.code, answer.messages) == (grpc.StatusCode.OK, sent)
    assert answer.initial["x-served-by"] == "mockc(version: v2, ip: 127.0.0.1)"


def test_a_deadline_shorter_than_the_slow_method_expires_and_the_server_sees_the_cancellation(leaf, to_leaf):
    before = leaf.cancelled
    answer = unary(to_leaf, "Slow", b"5", timeout=0.3)
    assert (answer.code, answer.messages) == (grpc.StatusCode.DEADLINE_EXCEEDED, [])
    # The server notices within its 10 ms polling; wait (bounded) for it rather than assume it.
    for _ in range(200):
        if leaf.cancelled > before:
            break
        time.sleep(0.01)
    assert leaf.cancelled == before + 1


def test_the_slow_method_answers_when_the_deadline_is_long_enough(to_leaf):
    answer = unary(to_leaf, "Slow", b"0.05", timeout=10)
    assert (answer.code, answer.message) == (grpc.StatusCode.OK, b"mockc(version: v2, ip: 127.0.0.1) waited 0.05s")


def test_metadata_reports_what_the_client_sent(to_leaf):
    answer = unary(to_leaf, "Metadata", b"", metadata=[("x-asm-prefer-tag", "canary"), ("my-request-id", "7")])
    received = dict(json.loads(answer.message))
    assert (received["x-asm-prefer-tag"], received["my-request-id"]) == ("canary", "7")


def test_a_chain_of_peers_answers_as_the_mock_chain_and_forwards_only_the_trace_header(leaf):
    with GrpcPeer(app="mockb", version="v1", upstream=leaf.address, authority="mockc:8000") as middle, \
            GrpcPeer(app="mocka", version="v1", upstream=middle.address, authority="mockb:8000") as head:
        before = len(leaf.calls)
        with channel(head.address) as chan:
            answer = unary(chan, "Whoami", b"", metadata=[("x-asm-prefer-tag", "canary"), ("my-request-id", "10002")])
    assert answer.code is grpc.StatusCode.OK, answer.details
    assert answer.message == (b"mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> "
                              b"mockc(version: v2, ip: 127.0.0.1)")
    (reached,) = leaf.calls[before:]
    assert reached.metadata["my-request-id"] == "10002"
    assert "x-asm-prefer-tag" not in reached.metadata  # restoring the lane is the sidecar's job
    assert middle.calls[-1].metadata["my-request-id"] == "10002"


def test_a_chain_hop_whose_upstream_is_down_answers_with_the_upstreams_status(leaf):
    dead = f"127.0.0.1:{unused_port()}"  # bound by us, then released: connection refused
    with GrpcPeer(app="mocka", upstream=dead, authority="mockb:8000") as head, channel(head.address) as chan:
        answer = unary(chan, "Whoami", b"", timeout=5)
    assert answer.code is grpc.StatusCode.UNAVAILABLE
    assert answer.details.startswith("mocka(version: v1, ip: 127.0.0.1)-> upstream error: UNAVAILABLE")


def test_one_channel_carries_a_thousand_concurrent_calls_each_answered_with_its_own_message(to_leaf):
    requests = [(f"call {i}".encode(), [("my-request-id", str(i))]) for i in range(1000)]
    answers = concurrent_unary(to_leaf, "Echo", requests)
    assert [a.code for a in answers] == [grpc.StatusCode.OK] * 1000
    assert [a.message for a in answers] == [request for request, _ in requests]


def test_a_peer_in_a_child_process_serves_and_chains_to_an_in_process_one(leaf):
    settings = PeerSettings(app="mocka", version="v3", upstream=leaf.address, authority="mockc:8000")
    with GrpcPeerProcess(settings) as process, channel(process.address) as chan:
        answer = unary(chan, "Whoami", b"", metadata=[("my-request-id", "42")])
    assert answer.code is grpc.StatusCode.OK, answer.details
    assert answer.message == b"mocka(version: v3, ip: 127.0.0.1)-> mockc(version: v2, ip: 127.0.0.1)"
    assert leaf.calls[-1].metadata["my-request-id"] == "42"
    assert process.process.returncode is not None  # stopped with the block
