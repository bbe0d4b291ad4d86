"""observability.tracing: one span per request, W3C traceparent continued, and one trace across an app
that forwards only its business trace header."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from laneproxy.core.errors import NoRouteError
from laneproxy.core.model import Endpoint, Route
from laneproxy.core.propagation import MAX_TRACE_KEY_BYTES, LaneSource
from laneproxy.observability.tracing import Tracing, TracingSetupError, format_traceparent, parse_traceparent

from .manifests import build, seed_bodies

INCOMING = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ROUTE = Route("default/mockb", "canary", "base", "outbound|8000|base|mockb.default.svc.cluster.local",
              (Endpoint("10.0.2.1", 8000),))


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, clock=lambda: 0.0)
    yield tracing, exporter
    provider.shutdown()


def exchange(headers, *, status=200, error=None):
    loop = SimpleNamespace(time=lambda: 10.5)
    return SimpleNamespace(headers=list(headers), start=10.0, method=b"GET", host=b"mockb:8000",
                           listener=SimpleNamespace(loop=loop), routed=None, response_status=status, error=error)


def target():
    return SimpleNamespace(path=b"/", endpoint=ROUTE.endpoints[0], request_id=b"rid", route=ROUTE,
                           lane_source=LaneSource.TRACE_TABLE, overrides={}, span=None)


def run(tracing, role, headers, table=None, **finish):
    tracer = tracing.for_listener(role)
    ex, t = exchange(headers, **finish), target()
    tracer.start(ex, t, table or build(seed_bodies()))
    ex.routed = t
    tracer.finish(ex)
    return t


def test_a_traceparent_from_the_caller_is_continued_and_a_child_goes_upstream(spans):
    tracing, exporter = spans
    sent = run(tracing, "outbound", [(b"traceparent", INCOMING)]).overrides[b"traceparent"]
    (span,) = exporter.get_finished_spans()
    assert (span.context.trace_id, span.parent.span_id) == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    assert sent == format_traceparent(span.context.trace_id, span.context.span_id, 1)
    assert span.kind is SpanKind.CLIENT


def test_span_carries_the_lanes_cluster_and_envoy_tags(spans):
    tracing, exporter = spans
    run(tracing, "outbound", [])
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes)
    assert {key: attributes[key] for key in ("laneproxy.lane.asked", "laneproxy.lane.used", "laneproxy.lane.fallback",
                                             "laneproxy.lane.source", "upstream_cluster", "guid:x-request-id",
                                             "http.response.status_code", "response_flags")} == {
        "laneproxy.lane.asked": "canary", "laneproxy.lane.used": "base", "laneproxy.lane.fallback": True,
        "laneproxy.lane.source": "trace-table", "upstream_cluster": ROUTE.cluster, "guid:x-request-id": "rid",
        "http.response.status_code": 200, "response_flags": "-",
    }
    assert span.end_time - span.start_time == pytest.approx(0.5e9, abs=0.2e9)  # started at exchange.start


def test_an_apps_calls_join_the_trace_of_the_request_it_received_by_its_trace_header(spans):
    tracing, exporter = spans
    inbound = run(tracing, "inbound", [(b"traceparent", INCOMING), (b"my-request-id", b"10002")])
    run(tracing, "outbound", [(b"my-request-id", b"10002")])  # the app forwarded only my-request-id
    run(tracing, "outbound", [(b"my-request-id", b"other")])
    received, call, unrelated = exporter.get_finished_spans()
    assert call.context.trace_id == received.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert call.parent.span_id == received.context.span_id
    assert inbound.overrides[b"traceparent"].split(b"-")[2] == b"%016x" % received.context.span_id
    assert unrelated.context.trace_id != received.context.trace_id and unrelated.parent is None


def test_the_longest_trace_id_the_lane_table_remembers_still_joins_the_apps_calls_to_the_trace(spans):
    tracing, exporter = spans
    longest = b"t" * MAX_TRACE_KEY_BYTES
    run(tracing, "inbound", [(b"traceparent", INCOMING), (b"my-request-id", longest)])
    run(tracing, "outbound", [(b"my-request-id", longest)])
    received, call = exporter.get_finished_spans()
    assert call.parent is not None and call.parent.span_id == received.context.span_id


@pytest.mark.parametrize("value", [b"garbage", b"00-" + b"0" * 32 + b"-b7ad6b7169203331-01",
                                   b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
def test_an_invalid_traceparent_starts_a_new_trace(spans, value):
    assert parse_traceparent(value) is None
    tracing, exporter = spans
    run(tracing, "gateway", [(b"traceparent", value)])
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.kind is SpanKind.SERVER


def test_a_request_answered_before_routing_still_gets_a_span_with_its_flag(spans):
    tracing, exporter = spans
    tracing.for_listener("gateway").finish(exchange([], status=404, error=NoRouteError("no rule")))
    (span,) = exporter.get_finished_spans()
    assert (span.attributes["response_flags"], span.attributes["http.response.status_code"]) == ("NR", 404)
    assert span.status.status_code is StatusCode.ERROR


def test_exporter_none_means_no_tracing_and_an_unknown_one_is_refused():
    assert Tracing.create("none", service_name="t") is None
    with pytest.raises(TracingSetupError, match="unknown tracing exporter"):
        Tracing.create("zipkin", service_name="t")


def test_otlp_without_its_package_says_what_to_install(monkeypatch):
    # The test extra installs the exporter: make both exporter modules unimportable, as in a default install.
    for module in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                   "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(TracingSetupError, match=r"opentelemetry-exporter-otlp.*laneproxy\[otlp\]"):
        Tracing.create("otlp", service_name="t")


def test_importing_laneproxy_sets_up_no_opentelemetry():
    code = ("import sys, laneproxy.app, laneproxy.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
