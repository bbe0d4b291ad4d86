"""observability.access_log: Envoy's default line, its response flags, JSON, and one write per loop turn."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest

from laneproxy.core.errors import NoHealthyUpstreamError, NoRouteError, UpstreamConnectError, UpstreamTimeoutError
from laneproxy.core.model import Endpoint, Route
from laneproxy.core.propagation import LaneSource
from laneproxy.observability.access_log import AccessLog, access_entry, envoy_time, format_json, format_text

# Envoy's default format, field by field, then laneproxy's two lane fields.
ENVOY_DEFAULT = re.compile(
    r'^\[(?P<start>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" '
    r'(?P<code>\d+) (?P<flags>\S+) (?P<rx>\d+|-) (?P<tx>\d+|-) (?P<duration>\d+) (?P<service_time>\d+|-) '
    r'"(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<request_id>[^"]*)" "(?P<authority>[^"]*)" "(?P<upstream>[^"]*)"'
    r'(?: "(?P<lane_asked>[^"]*)" "(?P<lane_used>[^"]*)")?\n$'
)

ROUTE = Route("default/mockb", "canary", "base", "outbound|8000|base|mockb.default.svc.cluster.local",
              (Endpoint("10.0.2.1", 8000),))


def exchange(*, status=200, error=None, routed=True, headers=(), has_body=False, start=100.0, request_bytes=0,
             response_bytes=0):
    target = None
    if routed:
        target = SimpleNamespace(
            endpoint=ROUTE.endpoints[0], path=b"/mock?q=1", overrides={b"x-request-id": b"rid-1"}, route=ROUTE,
            lane_source=LaneSource.TRACE_TABLE, request_id=b"rid-1", service_time_ms=12 if error is None else None)
    return SimpleNamespace(
        routed=target, headers=[(b"user-agent", b"curl/8"), *headers], error=error, has_body=has_body,
        request_complete=True, start=start, method=b"GET", target=b"/mock?q=1", protocol="HTTP/1.1",
        response_status=status, tunnel_flag=None, host=b"mockb:8000", listener=SimpleNamespace(name="outbound"),
        request_bytes=request_bytes, response_bytes=response_bytes,
        response_started=error is None and status > 0)


def entry(ex):
    return access_entry(ex, wall_now=1_790_000_000.5, loop_now=ex.start + 0.25)


def test_a_proxied_request_logs_every_envoy_default_field_and_the_lanes():
    line = format_text(entry(exchange(response_bytes=5)))
    fields = ENVOY_DEFAULT.match(line).groupdict()
    assert fields == {
        "start": "2026-09-21T14:13:20.250Z", "method": "GET", "path": "/mock?q=1", "protocol": "HTTP/1.1",
        "code": "200", "flags": "-", "rx": "0", "tx": "5", "duration": "250", "service_time": "12", "xff": "-",
        "ua": "curl/8", "request_id": "rid-1", "authority": "mockb:8000", "upstream": "10.0.2.1:8000",
        "lane_asked": "canary", "lane_used": "base",
    }


@pytest.mark.parametrize(
    ("error", "routed", "status", "flags", "tx", "upstream"),
    [
        (NoRouteError(), False, 404, "NR", "0", "-"),
        (NoHealthyUpstreamError(), False, 503, "UH", "19", "-"),
        (UpstreamConnectError(), True, 503, "UF", str(len(UpstreamConnectError.body)), "10.0.2.1:8000"),
        (UpstreamTimeoutError(), True, 504, "UT", "24", "10.0.2.1:8000"),
        (None, True, 0, "DC", "0", "10.0.2.1:8000"),  # the client left before a response
    ],
)
def test_local_replies_log_envoys_response_flag_and_body_length(error, routed, status, flags, tx, upstream):
    fields = ENVOY_DEFAULT.match(format_text(entry(exchange(status=status, error=error, routed=routed)))).groupdict()
    assert (fields["code"], fields["flags"], fields["tx"], fields["upstream"]) == (str(status), flags, tx, upstream)


@pytest.mark.parametrize(
    ("headers", "has_body", "request_bytes", "received"),
    [
        ((), False, 0, "0"),
        (((b"content-length", b"42"),), True, 42, "42"),
        (((b"transfer-encoding", b"chunked"),), True, 11, "11"),  # decoded body bytes, as Envoy counts them
    ],
)
def test_bytes_received_counts_the_request_body_as_decoded(headers, has_body, request_bytes, received):
    ex = exchange(headers=headers, has_body=has_body, request_bytes=request_bytes)
    fields = ENVOY_DEFAULT.match(format_text(entry(ex))).groupdict()
    assert fields["rx"] == received


def test_json_format_uses_istios_field_names_plus_the_lanes():
    document = json.loads(format_json(entry(exchange())))
    assert {key: document[key] for key in ("method", "path", "response_code", "response_flags", "upstream_host",
                                          "upstream_cluster", "lane_asked", "lane_used", "lane_source")} == {
        "method": "GET", "path": "/mock?q=1", "response_code": 200, "response_flags": "-",
        "upstream_host": "10.0.2.1:8000", "upstream_cluster": ROUTE.cluster, "lane_asked": "canary",
        "lane_used": "base", "lane_source": "trace-table",
    }


def test_start_time_is_utc_with_milliseconds():
    assert envoy_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert envoy_time(1.9995) == "1970-01-01T00:00:01.999Z"


class FakeLoop:
    def __init__(self) -> None:
        self.scheduled = []

    def time(self) -> float:
        return 100.25

    def call_soon(self, callback) -> None:
        self.scheduled.append(callback)


def test_lines_of_one_loop_turn_are_written_with_one_call():
    sink, loop = io.StringIO(), FakeLoop()
    writes = []
    sink.write = lambda text: writes.append(text) or len(text)  # type: ignore[method-assign]
    log = AccessLog(sink, loop, wall_clock=lambda: 1_790_000_000.5)  # type: ignore[arg-type]
    for _ in range(3):
        log.record(exchange())
    assert len(loop.scheduled) == 1 and writes == []
    loop.scheduled[0]()
    assert len(writes) == 1 and writes[0].count("\n") == 3


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        AccessLog(io.StringIO(), FakeLoop(), log_format="xml")  # type: ignore[arg-type]
