"""Real gRPC peers for the HTTP/2 tests: grpcio servers and clients with bytes messages (no protoc).

Owns starting a grpcio server on 127.0.0.1 (port 0) that answers unary, server-streaming and
bidirectional calls on `/lanetest.Echo/*`, naming itself and the lane header it received, so a test
can tell which endpoint (lane) served each call and what crossed the proxy.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc

SERVICE = "lanetest.Echo"
TAG = "x-asm-prefer-tag"


def _identity(x: bytes) -> bytes:
    return x


class EchoServer:
    """A grpcio server named `name`: every answer starts with `name|<lane header>|`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, str]] = []  # the metadata of every call received
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024), ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ("grpc.max_concurrent_streams", 1000)])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream, _identity, _identity),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, _identity, _identity),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow, _identity, _identity),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def start(self) -> EchoServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)

    def _prefix(self, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        self.calls.append(metadata)
        return f"{self.name}|{metadata.get(TAG, '-')}|".encode()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._prefix(context) + request

    def stream(self, request: bytes, context: grpc.ServicerContext):
        prefix = self._prefix(context)
        for index in range(int(request or b"3")):
            yield prefix + b"%d" % index

    def bidi(self, requests, context: grpc.ServicerContext):
        prefix = self._prefix(context)
        for request in requests:
            yield prefix + request

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request or b"2"))
        return self._prefix(context) + request


def channel(port: int, authority: str) -> grpc.Channel:
    """A client channel to a proxy listener, calling `authority` (the Host the proxy routes by)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.default_authority", authority), ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ("grpc.max_send_message_length", 8 * 1024 * 1024), ("grpc.enable_retries", 0)])


def method(chan: grpc.Channel, name: str, kind: str = "unary"):
    path = f"/{SERVICE}/{name}"
    if kind == "stream":
        return chan.unary_stream(path, request_serializer=_identity, response_deserializer=_identity)
    if kind == "bidi":
        return chan.stream_stream(path, request_serializer=_identity, response_deserializer=_identity)
    return chan.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
