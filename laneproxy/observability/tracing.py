"""Tracing with OpenTelemetry: one span per proxied request, continuing the caller's W3C traceparent.

Owns the tracer provider of one process (never OpenTelemetry's global one; nothing is set up at
import), the exporter choice, each span's name, kind and attributes (the lane asked and used, its
source, the cluster, Envoy's response flags), and the traceparent written upstream.

It also owns the trace-context table that keeps one trace across an application that forwards only
its business trace header (`my-request-id`), as the demo's apps do: the inbound listener remembers
the span of the request the app received under that trace key, and the outbound listener makes the
app's calls children of it when they arrive without a traceparent. This mirrors how the lane is
restored (core.propagation) and uses the same bounded LRU+TTL table.

Exporters: `none` (no tracer at all: the data plane pays one None check), `console` (JSON lines on
stdout), `file:PATH` (JSON lines appended to PATH; `{pid}` in PATH becomes the process id) and
`otlp` (OTLP/HTTP, then OTLP/gRPC, whichever exporter package is installed; its endpoint comes from
the standard OTEL_EXPORTER_OTLP_* variables).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from laneproxy.core import headers as h
from laneproxy.core.errors import LaneProxyError
from laneproxy.core.propagation import MAX_TRACE_KEY_BYTES, TraceLaneTable, trace_key

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from laneproxy.core.model import RouteTable
    from laneproxy.observability.recorder import FinishedExchange, RoutedRequest

EXPORTERS = ("none", "console", "otlp", "file:PATH")


class TracingSetupError(LaneProxyError):
    """The tracing exporter asked for cannot be set up (unknown name, package not installed, file not writable)."""


def _exporter(spec: str):
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    def one_line(span) -> str:
        return span.to_json(indent=None) + "\n"

    if spec == "console":
        return ConsoleSpanExporter(out=sys.stdout, formatter=one_line), False
    if spec.startswith("file:"):
        path = spec[len("file:"):].replace("{pid}", str(os.getpid()))
        try:
            out = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise TracingSetupError(f"tracing file {path}: {exc.strerror or exc}") from exc
        return ConsoleSpanExporter(out=out, formatter=one_line), False
    if spec == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as http_missing:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # type: ignore[no-redef]
            except ImportError as exc:
                # An installed exporter that fails to import is usually xds-protos' older copy of the
                # opentelemetry protos laid over opentelemetry-proto's: say what failed, not only "install".
                raise TracingSetupError(
                    "--tracing otlp needs opentelemetry-exporter-otlp-proto-http (or -grpc) installed: "
                    f"pip install 'laneproxy[otlp]' (the import said: {http_missing}; if it is installed, "
                    "reinstall opentelemetry-proto after xds-protos: pip install --force-reinstall --no-deps "
                    "opentelemetry-proto)") from exc
        return OTLPSpanExporter(), True
    raise TracingSetupError(f"unknown tracing exporter {spec!r}; expected one of {', '.join(EXPORTERS)}")


class Tracing:
    """The tracing of one process: provider, exporter, and the trace-key -> parent-span table."""

    def __init__(self, provider: TracerProvider, *, context_capacity: int = 100_000, context_ttl: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("laneproxy")
        # trace key -> traceparent; a key is `header NUL trace-key`, so it may be longer than a trace key
        # by its header name: the trace keys the lane table remembers must stay traceable here too.
        self.contexts = TraceLaneTable(context_capacity, context_ttl, clock, max_key_bytes=2 * MAX_TRACE_KEY_BYTES + 1)

    @classmethod
    def create(cls, spec: str, *, service_name: str, context_capacity: int = 100_000,
               context_ttl: float = 300.0) -> Tracing | None:
        """The tracing for exporter `spec`, or None for `none`. Imports the SDK only when asked to trace."""
        if spec in ("", "none", "off"):
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        exporter, batched = _exporter(spec)
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        # Console and file are for looking at: write each span as it ends. OTLP ships in batches.
        provider.add_span_processor(BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter))
        return cls(provider, context_capacity=context_capacity, context_ttl=context_ttl)

    def for_listener(self, role: str) -> ExchangeTracer:
        return ExchangeTracer(self, role)

    def shutdown(self) -> None:
        self.provider.shutdown()


def format_traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags)


def parse_traceparent(value: bytes):
    """The SpanContext a W3C traceparent names, or None when it is malformed or all zero."""
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

    parts = value.strip().lower().split(b"-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2 or parts[0] == b"ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))
    return set_span_in_context(NonRecordingSpan(context))


class ExchangeTracer:
    """Starts a span when a listener's role has routed a request, and ends it when the exchange is done."""

    def __init__(self, tracing: Tracing, role: str) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind

        self.tracing = tracing
        self.tracer = tracing.tracer
        self.role = role
        self.kind = SpanKind.CLIENT if role == "outbound" else SpanKind.SERVER
        self.empty_context = Context()

    def _parent(self, exchange: FinishedExchange, table: RouteTable | None):
        traceparent = None
        for name, value in exchange.headers:
            if name == h.TRACEPARENT:
                traceparent = value
                break
        if traceparent is not None:
            parent = parse_traceparent(traceparent)
            if parent is not None:
                return parent
        if self.role == "outbound" and table is not None:
            for key in self._trace_keys(exchange, table):
                remembered = self.tracing.contexts.lookup(key)
                if remembered is not None:
                    return parse_traceparent(remembered)
        return self.empty_context

    @staticmethod
    def _trace_keys(exchange: FinishedExchange, table: RouteTable) -> list[bytes]:
        keys = []
        for group in table.groups.values():
            if group.trace_header is None:
                continue
            header = group.trace_header.encode()
            for name, value in exchange.headers:
                if name == header:
                    key = trace_key(header, value)
                    if key is not None:
                        keys.append(b"%s\0%s" % (header, key))
                    break
        return keys

    def _start_span(self, exchange: FinishedExchange, table: RouteTable | None) -> Span:
        loop_now = exchange.listener.loop.time()
        start_ns = time.time_ns() - int((loop_now - exchange.start) * 1e9)
        authority = (exchange.host or b"").decode("latin-1")
        attributes = {
            "http.request.method": exchange.method.decode("latin-1"),
            "server.address": authority,
            "laneproxy.role": self.role,
        }
        name = f"{self.role} {exchange.method.decode('latin-1')} {authority}".rstrip()
        return self.tracer.start_span(name, context=self._parent(exchange, table), kind=self.kind,
                                      attributes=attributes, start_time=start_ns)

    def start(self, exchange: FinishedExchange, target: RoutedRequest, table: RouteTable) -> None:
        """Open the span of a routed request and write its traceparent into the upstream headers."""
        span = self._start_span(exchange, table)
        route = target.route
        span.set_attribute("url.path", target.path.decode("latin-1"))
        span.set_attribute("network.peer.address", target.endpoint.address)
        if target.request_id is not None:
            span.set_attribute("guid:x-request-id", target.request_id.decode("latin-1"))
        if route is not None:
            span.set_attribute("upstream_cluster", route.cluster)
            span.set_attribute("laneproxy.lane.fallback", route.fallback)
            if route.lane_asked is not None:
                span.set_attribute("laneproxy.lane.asked", route.lane_asked)
            if route.lane_used is not None:
                span.set_attribute("laneproxy.lane.used", route.lane_used)
        if target.lane_source is not None:
            span.set_attribute("laneproxy.lane.source", target.lane_source.value)
        context = span.get_span_context()
        traceparent = format_traceparent(context.trace_id, context.span_id, context.trace_flags)
        target.overrides[h.TRACEPARENT] = traceparent
        target.span = span
        if self.role == "inbound":
            for key in self._trace_keys(exchange, table):
                self.tracing.contexts.remember(key, traceparent)

    def finish(self, exchange: FinishedExchange) -> None:
        """The exchange observer: end the span; a request answered before routing gets a span here."""
        from opentelemetry.trace import Status, StatusCode

        routed = exchange.routed
        span = routed.span if routed is not None else None
        if span is None:
            span = self._start_span(exchange, None)
        status = exchange.response_status
        error = exchange.error
        span.set_attribute("http.response.status_code", status)
        flag = error.flag if error is not None else ("DC" if status == 0 else "-")
        span.set_attribute("response_flags", flag)
        if error is not None or status == 0 or status >= 500:
            span.set_status(Status(StatusCode.ERROR, error.body if error is not None and error.body else None))
        span.end()
