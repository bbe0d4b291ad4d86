"""`--tracing otlp` with the `laneproxy[otlp]` extra: spans reach a real OTLP/HTTP receiver under the right
service.name (OTEL_SERVICE_NAME when set, else the workload's canonical service and namespace)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import pytest

from proxyrig import SWIMLANES, ProxyProcess, UpstreamThread, endpoints_file, exchange

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2",
                                    reason="needs the otlp extra (opentelemetry-exporter-otlp-proto-http)")


class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps every request body."""

    def __init__(self) -> None:
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                bodies.append(self.rfile.read(int(self.headers["content-length"])))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def service_names(self, timeout: float = 15.0) -> set[str]:
        deadline = time.monotonic() + timeout
        while not self.bodies and time.monotonic() < deadline:
            time.sleep(0.05)
        names = set()
        for body in self.bodies:
            request = trace_service.ExportTraceServiceRequest.FromString(body)
            for spans in request.resource_spans:
                for attribute in spans.resource.attributes:
                    if attribute.key == "service.name":
                        names.add(attribute.value.string_value)
        return names

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("extra, env, expected", [
    (("--workload", "mocka-v2", "--workload-app", "mocka", "--namespace", "shop"), {}, "mocka.shop"),
    (("--workload", "mocka-v2", "--workload-app", "mocka"), {"OTEL_SERVICE_NAME": "checkout"}, "checkout"),
])
def test_spans_are_exported_over_otlp_under_the_workloads_service_name(tmp_path, monkeypatch, extra, env, expected):
    receiver = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        process = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=("--tracing", "otlp", *extra)).start()
        try:
            raw = b"GET / HTTP/1.1\r\nHost: mockb.default.svc.cluster.local\r\nConnection: close\r\n\r\n"
            assert asyncio.run(exchange(process.outbound_port, raw)).startswith(b"HTTP/1.1 200")
            assert receiver.service_names() == {expected}
        finally:
            process.stop()
            receiver.close()
