"""One real `laneproxy run` process in front of a recording upstream: what crosses the wire, byte for byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxyrig import SWIMLANES, ProxyProcess, RecordingUpstream, endpoints_file, exchange, free_port, read_response


@pytest.fixture
async def upstreams():
    base, canary = await RecordingUpstream().start(), await RecordingUpstream().start()
    yield base, canary
    await base.stop()
    await canary.stop()


@pytest.fixture
def sidecar(tmp_path: Path, upstreams):
    """A sidecar (inbound + outbound) whose mockb has only a base endpoint and mockc has base and canary."""
    base, canary = upstreams
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {
        "default/mockb": {"base": [base.port]},
        "default/mockc": {"base": [base.port], "canary": [canary.port]},
    })
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=base.port).start()
    yield proxy
    proxy.stop()


async def test_absolute_form_request_is_forwarded_in_origin_form_with_the_lane_header(sidecar, upstreams):
    base, canary = upstreams
    raw = (b"GET http://mockc:8000/path?q=1 HTTP/1.1\r\nHost: mockc:8000\r\nx-asm-prefer-tag: canary\r\n"
           b"Connection: close\r\n\r\n")
    response = await exchange(sidecar.outbound_port, raw)
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert [r.request_line for r in canary.received] == [b"GET /path?q=1 HTTP/1.1"]
    assert canary.received[0].header(b"host") == b"mockc:8000"
    assert canary.received[0].header(b"x-asm-prefer-tag") == b"canary"
    assert base.received == []


async def test_lane_without_the_service_falls_back_to_base_and_keeps_the_lane_header(sidecar, upstreams):
    base, canary = upstreams
    raw = b"GET / HTTP/1.1\r\nHost: mockb\r\nx-asm-prefer-tag: canary\r\nConnection: close\r\n\r\n"
    response = await exchange(sidecar.outbound_port, raw)
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert len(base.received) == 1 and canary.received == []
    assert base.received[0].header(b"x-asm-prefer-tag") == b"canary"
    assert sidecar.stat("laneproxy.fallback.default/mockb.canary.base") == 1


@pytest.mark.parametrize(
    ("inbound_headers", "outbound_headers", "expected_upstream"),
    [
        ([b"x-asm-prefer-tag: canary", b"my-request-id: t-1"], [b"my-request-id: t-1"], "canary"),
        ([b"x-asm-prefer-tag: canary", b"my-request-id: t-2"], [b"my-request-id: other"], "base"),
        ([b"x-asm-prefer-tag: nightly", b"my-request-id: t-3"], [b"my-request-id: t-3"], "base"),
        ([b"my-request-id: t-4"], [b"baggage: user=1, x-asm-prefer-tag=canary"], "canary"),
        ([b"x-asm-prefer-tag: canary", b"my-request-id: t-5"],
         [b"my-request-id: t-5", b"x-asm-prefer-tag: base"], "base"),
    ],
    ids=["trace-table", "other-trace-is-baseline", "unknown-lane-not-remembered", "baggage", "header-beats-table"],
)
async def test_outbound_lane_comes_from_header_then_trace_table_then_baggage(
    sidecar, upstreams, inbound_headers, outbound_headers, expected_upstream
):
    base, canary = upstreams
    inbound = b"GET / HTTP/1.1\r\nHost: mocka\r\n" + b"".join(h + b"\r\n" for h in inbound_headers) + b"Connection: close\r\n\r\n"
    assert (await exchange(sidecar.inbound_port, inbound)).startswith(b"HTTP/1.1 200")
    base.received.clear()
    outbound = b"GET / HTTP/1.1\r\nHost: mockc\r\n" + b"".join(h + b"\r\n" for h in outbound_headers) + b"Connection: close\r\n\r\n"
    assert (await exchange(sidecar.outbound_port, outbound)).startswith(b"HTTP/1.1 200")
    chosen = canary if expected_upstream == "canary" else base
    other = base if chosen is canary else canary
    assert len(chosen.received) == 1 and other.received == []
    assert chosen.received[0].header(b"x-asm-prefer-tag") == expected_upstream.encode()


async def test_hop_by_hop_headers_and_those_named_in_connection_are_not_forwarded(sidecar, upstreams):
    base, _ = upstreams
    raw = (b"GET / HTTP/1.1\r\nHost: mockb\r\nConnection: keep-alive, x-secret\r\nKeep-Alive: timeout=5\r\n"
           b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade-Insecure-Requests: 1\r\nx-secret: 1\r\n"
           b"x-kept: yes\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.outbound_port)
    writer.write(raw)
    status, _, _ = await read_response(reader)
    writer.close()
    names = {name.lower() for name, _ in base.received[0].headers()}
    assert status == 200
    assert not names & {b"connection", b"keep-alive", b"proxy-connection", b"te", b"x-secret"}
    assert {b"x-kept", b"upgrade-insecure-requests", b"host"} <= names


async def test_keep_alive_on_both_sides_reuses_one_upstream_connection(sidecar, upstreams):
    base, _ = upstreams
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.outbound_port)
    for index in range(5):
        writer.write(b"GET /%d HTTP/1.1\r\nHost: mockb\r\n\r\n" % index)
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"GET /%d HTTP/1.1" % index)
    writer.close()
    assert base.connections == 1


async def test_chunked_request_body_streams_upstream_chunked(sidecar, upstreams):
    base, _ = upstreams
    raw = (b"POST /upload HTTP/1.1\r\nHost: mockb\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    response = await exchange(sidecar.outbound_port, raw)
    assert response.startswith(b"HTTP/1.1 200")
    assert base.received[0].body == b"hello world"
    assert base.received[0].header(b"transfer-encoding") == b"chunked"


async def test_large_content_length_body_arrives_intact_both_ways(sidecar, upstreams):
    base, _ = upstreams
    payload = bytes(range(256)) * 16384  # 4 MiB
    base.respond = lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(request.body), request.body)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.outbound_port)
    writer.write(b"PUT /blob HTTP/1.1\r\nHost: mockb\r\nContent-Length: %d\r\n\r\n" % len(payload))
    writer.write(payload)
    status, headers, body = await read_response(reader)
    writer.close()
    assert status == 200 and body == payload and headers[b"content-length"] == b"%d" % len(payload)


async def test_response_without_length_is_rechunked_for_http11_and_closed_for_http10(sidecar, upstreams):
    base, _ = upstreams
    base.respond = lambda request: None if request.request_line.startswith(b"GET /never") else (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-close")
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.outbound_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: mockb\r\n\r\n")
    status, headers, body = await read_response(reader)
    writer.close()
    assert (status, headers.get(b"transfer-encoding"), body) == (200, b"chunked", b"until-close")
    response = await exchange(sidecar.outbound_port, b"GET / HTTP/1.0\r\nHost: mockb\r\n\r\n")
    assert response.endswith(b"\r\n\r\nuntil-close")
    assert b"transfer-encoding" not in response.lower()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: mockb\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: mockb\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nHost: mockb\r\nHost: mockc\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["content-length-with-transfer-encoding", "duplicate-content-length", "duplicate-host", "no-host"],
)
async def test_ambiguous_framing_gets_400_and_never_reaches_an_upstream(sidecar, upstreams, raw):
    base, canary = upstreams
    response = await exchange(sidecar.outbound_port, raw)
    assert response.startswith(b"HTTP/1.1 400 Bad Request")
    assert b"connection: close" in response
    assert base.received == [] and canary.received == []


async def test_local_replies_match_envoy_for_no_route_and_connection_failure(tmp_path):
    closed_port = free_port()
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {
        "default/mockb": {"base": [closed_port]},
        "default/mockc": {"canary": [closed_port]},
    })
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True).start()
    try:
        unknown = await exchange(proxy.outbound_port, b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
        refused = await exchange(proxy.outbound_port, b"GET / HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n"
                                                      b"x-envoy-max-retries: 0\r\n\r\n")
        retried = await exchange(proxy.outbound_port, b"GET / HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n")
        empty = await exchange(proxy.outbound_port, b"GET / HTTP/1.1\r\nHost: mocka\r\nConnection: close\r\n\r\n")
    finally:
        proxy.stop()
    assert unknown.startswith(b"HTTP/1.1 404 Not Found") and unknown.endswith(b"\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert refused.endswith(b"upstream connect error or disconnect/reset before headers. reset reason: connection failure")
    assert retried.endswith(b"upstream connect error or disconnect/reset before headers. "
                            b"retried and the latest reset reason: connection failure")
    assert empty.startswith(b"HTTP/1.1 503") and empty.endswith(b"\r\n\r\nno healthy upstream")


async def test_gateway_never_echoes_an_unknown_lane_and_writes_the_chosen_one(tmp_path, upstreams):
    base, canary = upstreams
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mocka": {"base": [base.port], "canary": [canary.port]}})
    gateway = ProxyProcess(SWIMLANES, endpoints, gateway=True).start()
    try:
        for tag in (b"nightly", b"<script>", b""):
            raw = b"GET /mock HTTP/1.1\r\nHost: example.com\r\nx-asm-prefer-tag: %s\r\nConnection: close\r\n\r\n" % tag
            assert (await exchange(gateway.gateway_port, raw)).startswith(b"HTTP/1.1 200")
        raw = b"GET /mock HTTP/1.1\r\nHost: example.com\r\nx-asm-prefer-tag: canary\r\nConnection: close\r\n\r\n"
        assert (await exchange(gateway.gateway_port, raw)).startswith(b"HTTP/1.1 200")
    finally:
        gateway.stop()
    assert [r.header(b"x-asm-prefer-tag") for r in base.received] == [b"base", b"base", b"base"]
    assert [r.header(b"x-asm-prefer-tag") for r in canary.received] == [b"canary"]


async def test_strict_mode_uses_the_sidecars_own_lane_and_never_falls_back(tmp_path, upstreams):
    base, canary = upstreams
    strict = tmp_path / "strict.yaml"
    strict.write_text(SWIMLANES.read_text().replace("isPermissive: true", "isPermissive: false"))
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {
        "default/mockb": {"base": [base.port]},
        "default/mockc": {"base": [base.port], "canary": [canary.port]},
    })
    proxy = ProxyProcess(strict, endpoints, outbound=True, extra=("--lane", "canary")).start()
    try:
        to_mockc = await exchange(proxy.outbound_port, b"GET / HTTP/1.1\r\nHost: mockc\r\nx-asm-prefer-tag: base\r\nConnection: close\r\n\r\n")
        to_mockb = await exchange(proxy.outbound_port, b"GET / HTTP/1.1\r\nHost: mockb\r\nConnection: close\r\n\r\n")
    finally:
        proxy.stop()
    assert to_mockc.startswith(b"HTTP/1.1 200") and len(canary.received) == 1 and base.received == []
    assert to_mockb.startswith(b"HTTP/1.1 503") and to_mockb.endswith(b"no healthy upstream")


async def test_traceparent_trace_header_keys_the_table_by_trace_id_only(tmp_path, upstreams):
    base, canary = upstreams
    config = tmp_path / "traceparent.yaml"
    config.write_text(SWIMLANES.read_text().replace("traceHeader: my-request-id", "traceHeader: traceparent"))
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockc": {"base": [base.port], "canary": [canary.port]}})
    proxy = ProxyProcess(config, endpoints, outbound=True, inbound_app=base.port).start()
    trace_id = b"4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        inbound = (b"GET / HTTP/1.1\r\nHost: mocka\r\nx-asm-prefer-tag: canary\r\n"
                   b"traceparent: 00-%s-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n" % trace_id)
        await exchange(proxy.inbound_port, inbound)
        # The app's outbound call carries a new span id (parent) of the same trace.
        outbound = (b"GET / HTTP/1.1\r\nHost: mockc\r\ntraceparent: 00-%s-b7ad6b7169203331-01\r\n"
                    b"Connection: close\r\n\r\n" % trace_id)
        await exchange(proxy.outbound_port, outbound)
    finally:
        proxy.stop()
    assert len(canary.received) == 1
