"""dataplane.local_reply: one typed error, the reply every codec writes (HTTP/1.1 text, HTTP/2, gRPC status)."""

from __future__ import annotations

import h11
import pytest

from laneproxy.core.errors import (
    DownstreamProtocolError,
    NoHealthyUpstreamError,
    NoRouteError,
    UpstreamConnectError,
    UpstreamOverflowError,
    UpstreamResetError,
    UpstreamTimeoutError,
)
from laneproxy.dataplane import local_reply

DATE, SERVER = b"Mon, 30 Nov 2026 12:00:00 GMT", b"envoy"


def parsed(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Read the bytes back with h11, an independent HTTP/1.1 parser."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    response = conn.next_event()
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return response.status_code, dict(response.headers), body


@pytest.mark.parametrize(
    ("error", "grpc_status"),
    [(NoRouteError(), b"12"), (NoHealthyUpstreamError(), b"14"), (UpstreamConnectError(), b"14"),
     (UpstreamOverflowError(), b"14"), (UpstreamResetError(), b"14"), (UpstreamTimeoutError(), b"14"),
     (DownstreamProtocolError(), b"13")],
    ids=["no-route", "no-healthy-upstream", "connect-failure", "overflow", "reset", "route-timeout", "bad-request"],
)
def test_a_grpc_caller_gets_http_200_with_the_status_envoy_writes_in_the_headers_and_no_body(error, grpc_status):
    reply = local_reply.build(error, date=DATE, server=SERVER, grpc=True)
    status, headers, body = parsed(local_reply.http1(reply, close=False))
    assert (status, headers[b"grpc-status"], headers[b"content-type"], headers[b"content-length"], body) == (
        200, grpc_status, b"application/grpc", b"0", b"")
    assert local_reply.h2_headers(reply)[0] == (b":status", b"200")


def test_the_grpc_message_is_the_local_replys_body_percent_encoded():
    reply = local_reply.build(NoHealthyUpstreamError(), date=DATE, server=SERVER, grpc=True)
    assert dict(reply.headers)[b"grpc-message"] == b"no healthy upstream"
    reset = local_reply.build(UpstreamResetError(), date=DATE, server=SERVER, grpc=True)
    assert b"%" not in dict(reset.headers)[b"grpc-message"]
    weird = NoHealthyUpstreamError()
    weird.body = "caf\u00e9\n"
    assert dict(local_reply.build(weird, date=DATE, server=SERVER, grpc=True).headers)[b"grpc-message"] == \
        b"caf%C3%A9%0A"


@pytest.mark.parametrize(
    ("error", "status", "body"),
    [(NoRouteError(), 404, b""), (NoHealthyUpstreamError(), 503, b"no healthy upstream"),
     (UpstreamTimeoutError(), 504, b"upstream request timeout")],
)
def test_an_http_caller_gets_envoys_text_reply_with_length_date_and_server(error, status, body):
    raw = local_reply.http1(local_reply.build(error, date=DATE, server=SERVER), close=True)
    got_status, headers, got_body = parsed(raw)
    assert (got_status, got_body, headers[b"content-length"], headers[b"date"], headers[b"server"],
            headers[b"connection"]) == (status, body, b"%d" % len(body), DATE, SERVER, b"close")
    assert (b"content-type" in headers) == bool(body)


def test_an_http2_reply_has_the_same_headers_after_its_status_pseudo_header():
    reply = local_reply.build(NoHealthyUpstreamError(), date=DATE, server=SERVER)
    assert local_reply.h2_headers(reply) == [(b":status", b"503"), *reply.headers]


@pytest.mark.parametrize(
    ("error", "later_hop", "marks"),
    [(NoHealthyUpstreamError(), True, {b"x-laneproxy-failed-hop": b"UH", b"x-laneproxy-not-forwarded": b"UH"}),
     (NoHealthyUpstreamError(), False, {b"x-laneproxy-not-forwarded": b"UH"}),
     (UpstreamTimeoutError(), True, {b"x-laneproxy-failed-hop": b"UT"}),
     (NoRouteError(), True, {})],
)
def test_mesh_marks_say_whose_failure_it_is_and_whether_anything_went_on(error, later_hop, marks):
    assert dict(local_reply.marks(error, about_later_hop=later_hop)) == marks


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [(b"application/grpc", True), (b"application/grpc+proto", True), (b"Application/GRPC", True),
     (b"application/json", False), (None, False)],
)
def test_a_request_is_grpc_by_its_content_type(content_type, grpc):
    headers = [(b"host", b"x")] + ([(b"content-type", content_type)] if content_type else [])
    assert local_reply.is_grpc(headers) is grpc
