"""Real gRPC peers for the HTTP/2 and gRPC tests: grpcio servers and clients, bytes in and out, no protoc.

Owns one test service, `laneproxy.test.Mock`, served by a real `grpc.server` on 127.0.0.1 port 0 (in this
process, or as a child process for proxy tests, `python grpc_peers.py --app mocka ...`), and the client
calls the tests make. Its methods, every one answering as the HTTP mock (laneproxy/mock.py) does:

- `Whoami` (unary): `<app>(version: <version>, ip: <ip>)`, followed by `-> ` and the upstream's answer when
  the peer has an upstream. Like a typical application it forwards only the trace header (default
  `my-request-id`) as metadata, never the lane header (restoring the lane is the sidecar's job), and passes
  its remaining deadline on. An upstream failure is answered with the upstream's status code.
- `Echo` (unary): the request message back, unchanged (up to MAX_MESSAGE bytes: a 4 MiB message fits);
  `x-served-by` in the initial and the trailing metadata.
- `Stream` (server-streaming): the request is a count n (ASCII digits); n messages `<me> #i` come back.
- `Chat` (bidirectional): each message back as it arrives, in order.
- `Slow` (unary): waits the seconds the request names (ASCII, at most SLOW_LIMIT), or until the call is
  cancelled (a deadline that expired), which the peer counts.
- `Metadata` (unary): the metadata it received, as JSON `[[name, value], ...]` (binary values omitted).

An in-process peer records every call (method and metadata) in `calls`, so a test can check what reached
it. Every address is 127.0.0.1 (or one the test gives); channels never use an HTTP proxy from the
environment (gRPC would tunnel through `http_proxy` with CONNECT otherwise). It never fakes a protocol
fault: the real grpcio library produces every byte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc

SERVICE = "laneproxy.test.Mock"
MAX_MESSAGE = 16 * 2**20
SLOW_LIMIT = 30.0
CHANNEL_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.enable_http_proxy", 0))

Metadata = Sequence[tuple[str, str | bytes]]


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


@dataclass(frozen=True)
class PeerSettings:
    """One peer: who it says it is, and where Whoami goes next (`upstream` host:port, `authority` the name asked)."""

    app: str = "mock"
    version: str = "v1"
    host: str = "127.0.0.1"
    port: int = 0
    upstream: str | None = None
    authority: str | None = None  # the :authority of upstream calls, e.g. `mockb:8000` through a sidecar
    trace_header: str = "my-request-id"
    max_workers: int = 64


@dataclass
class Call:
    method: str
    metadata: dict[str, str | bytes]


@dataclass
class _Servicer:
    settings: PeerSettings
    calls: list[Call] = field(default_factory=list)
    cancelled: int = 0
    upstream_channel: grpc.Channel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def me(self) -> str:
        return f"{self.settings.app}(version: {self.settings.version}, ip: {self.settings.host})"

    def _record(self, name: str, context: grpc.ServicerContext) -> dict[str, str | bytes]:
        received = {item.key: item.value for item in context.invocation_metadata()}
        with self.lock:
            self.calls.append(Call(name, received))
        return received

    def whoami(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        received = self._record("Whoami", context)
        if self.upstream_channel is None:
            return self.me.encode()
        trace = received.get(self.settings.trace_header)
        forwarded = [(self.settings.trace_header, trace)] if isinstance(trace, str) else []
        remaining = context.time_remaining()
        try:
            answer = self.upstream_channel.unary_unary(method("Whoami"))(
                request, metadata=forwarded, timeout=remaining if remaining is not None and remaining < 1e6 else 30.0)
        except grpc.RpcError as error:
            context.abort(error.code(), f"{self.me}-> upstream error: {error.code().name}: {error.details()}")
        return f"{self.me}-> ".encode() + answer

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Echo", context)
        context.send_initial_metadata((("x-served-by", self.me),))
        context.set_trailing_metadata((("x-served-by", self.me),))
        return request

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Stream", context)
        context.send_initial_metadata((("x-served-by", self.me),))
        if not request.isdigit():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected a count in ASCII digits, got {request[:40]!r}")
        for index in range(int(request)):
            yield f"{self.me} #{index}".encode()

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Chat", context)
        context.send_initial_metadata((("x-served-by", self.me),))
        yield from requests

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Slow", context)
        try:
            seconds = min(float(request), SLOW_LIMIT)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected seconds, got {request[:40]!r}")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not context.is_active():
                with self.lock:
                    self.cancelled += 1
                return b""
            time.sleep(0.01)
        return f"{self.me} waited {seconds:g}s".encode()

    def metadata(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        received = self._record("Metadata", context)
        return json.dumps([[name, value] for name, value in received.items() if isinstance(value, str)]).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Whoami": grpc.unary_unary_rpc_method_handler(self.whoami),
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Metadata": grpc.unary_unary_rpc_method_handler(self.metadata),
        })


def channel(target: str, authority: str | None = None) -> grpc.Channel:
    """An insecure (h2c) channel to host:port; `authority` is the name asked (the service, through a sidecar)."""
    options = list(CHANNEL_OPTIONS)
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(target, options=options)


class GrpcPeer:
    """A gRPC peer served in this process (threads), for as long as the `with` block lasts."""

    def __init__(self, settings: PeerSettings | None = None, **values) -> None:
        self.settings = settings or PeerSettings(**values)
        self.servicer = _Servicer(self.settings)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.settings.max_workers),
                                  options=list(CHANNEL_OPTIONS[:2]))
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if not self.port:
            raise OSError(f"grpc could not bind {self.settings.host}:{self.settings.port}")

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def calls(self) -> list[Call]:
        with self.servicer.lock:
            return list(self.servicer.calls)

    @property
    def cancelled(self) -> int:
        with self.servicer.lock:
            return self.servicer.cancelled

    def start(self) -> GrpcPeer:
        if self.settings.upstream:
            self.servicer.upstream_channel = channel(self.settings.upstream, self.settings.authority)
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None).wait(10)
        if self.servicer.upstream_channel is not None:
            self.servicer.upstream_channel.close()

    def __enter__(self) -> GrpcPeer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class GrpcPeerProcess:
    """A gRPC peer in a child process (as an app beside a sidecar is), started from this file's command line."""

    def __init__(self, settings: PeerSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> GrpcPeerProcess:
        s = self.settings
        command = [sys.executable, str(Path(__file__).resolve()), "--app", s.app, "--version", s.version,
                   "--listen", f"{s.host}:{s.port}", "--trace-header", s.trace_header]
        if s.upstream:
            command += ["--upstream", s.upstream] + (["--authority", s.authority] if s.authority else [])
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        # The first line says where it listens; a reader thread keeps the pipe drained after it.
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = found[0] if found else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"gRPC peer {s.app} did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> GrpcPeerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# Clients --------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One finished call: its status and what came back (messages, initial and trailing metadata)."""

    code: grpc.StatusCode
    details: str | None
    messages: list[bytes]
    initial: dict[str, str | bytes]
    trailing: dict[str, str | bytes]

    @property
    def message(self) -> bytes:
        assert len(self.messages) == 1, self.messages
        return self.messages[0]


def _metadata(items: Iterable | None) -> dict[str, str | bytes]:
    return {item.key: item.value for item in items or ()}


def unary(chan: grpc.Channel, name: str, request: bytes, *, metadata: Metadata = (),
          timeout: float = 10.0) -> Answer:
    """A unary call that never raises for a gRPC status: the status is in the answer."""
    call = chan.unary_unary(method(name))
    try:
        response, state = call.with_call(request, metadata=metadata, timeout=timeout)
        return Answer(state.code(), state.details(), [response], _metadata(state.initial_metadata()),
                      _metadata(state.trailing_metadata()))
    except grpc.RpcError as error:
        return Answer(error.code(), error.details(), [], _metadata(error.initial_metadata()),
                      _metadata(error.trailing_metadata()))


def server_stream(chan: grpc.Channel, count: int, *, metadata: Metadata = (), timeout: float = 10.0) -> Answer:
    call = chan.unary_stream(method("Stream"))(str(count).encode(), metadata=metadata, timeout=timeout)
    messages: list[bytes] = []
    try:
        messages.extend(call)
    except grpc.RpcError:
        pass  # the status is read below, as for a stream that ended well
    return Answer(call.code(), call.details(), messages, _metadata(call.initial_metadata()),
                  _metadata(call.trailing_metadata()))


def chat(chan: grpc.Channel, messages: Iterable[bytes], *, metadata: Metadata = (), timeout: float = 10.0) -> Answer:
    call = chan.stream_stream(method("Chat"))(iter(messages), metadata=metadata, timeout=timeout)
    received: list[bytes] = []
    try:
        received.extend(call)
    except grpc.RpcError:
        pass
    return Answer(call.code(), call.details(), received, _metadata(call.initial_metadata()),
                  _metadata(call.trailing_metadata()))


def concurrent_unary(chan: grpc.Channel, name: str, requests: Sequence[tuple[bytes, Metadata]], *,
                     timeout: float = 30.0) -> list[Answer]:
    """Every request started at once on one channel (one HTTP/2 connection), answers in request order."""
    call = chan.unary_unary(method(name))
    pending = [call.future(request, metadata=metadata, timeout=timeout) for request, metadata in requests]
    answers = []
    for future in pending:
        try:
            response = future.result()
            answers.append(Answer(future.code(), future.details(), [response], _metadata(future.initial_metadata()),
                                  _metadata(future.trailing_metadata())))
        except grpc.RpcError as error:
            answers.append(Answer(error.code(), error.details(), [], _metadata(error.initial_metadata()),
                                  _metadata(error.trailing_metadata())))
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a gRPC peer for laneproxy's tests")
    parser.add_argument("--app", default="mock")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--upstream")
    parser.add_argument("--authority")
    parser.add_argument("--trace-header", default="my-request-id")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    settings = PeerSettings(app=args.app, version=args.version, host=host, port=int(port), upstream=args.upstream,
                            authority=args.authority, trace_header=args.trace_header)
    peer = GrpcPeer(settings).start()
    print(f"listening on {peer.address}", flush=True)
    try:
        peer.server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
