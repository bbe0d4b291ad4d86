"""Test rig for component tests: a real `laneproxy run` process and a recording upstream, on 127.0.0.1.

Owns starting and stopping those processes and servers; tests say what to send and what to expect.
The recording upstream keeps every raw request head it receives, so tests can assert on exactly
what crossed the wire (hop-by-hop removal, lane header, framing) and on whether a request arrived at all.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import h11
import yaml

from laneproxy.demo import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]
SWIMLANES = REPO / "config" / "swimlanes.yaml"


@dataclass
class ReceivedRequest:
    head: bytes
    body: bytes
    connection: int = 0  # which of the upstream's accepted connections carried it, counting from 1

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def headers(self) -> list[tuple[bytes, bytes]]:
        lines = self.head.split(b"\r\n")[1:]
        return [tuple(part.strip() for part in line.split(b":", 1)) for line in lines if line]  # type: ignore[misc]

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers() if k.lower() == name]
        return values[0] if values else None


@dataclass
class RecordingUpstream:
    """An HTTP/1.1 origin that records raw requests and answers with a scripted response.

    `respond` builds the raw response bytes for a request; by default 200 with the request line as body.
    `delay` holds a recorded request's answer (a slow or hanging origin).
    It understands Content-Length and chunked request bodies (enough to find the message end).
    """

    respond: object = None
    delay: object = None  # delay(request) -> seconds to wait before answering (None: at once)
    received: list[ReceivedRequest] = field(default_factory=list)
    connections: int = 0
    accepted: int = 0  # like `connections`, but never reset: numbers connections for ReceivedRequest
    server: asyncio.AbstractServer | None = None
    port: int = 0

    async def start(self) -> RecordingUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.accepted += 1
        number = self.accepted
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request = ReceivedRequest(head, await _read_body(reader, head), number)
                self.received.append(request)
                if self.delay is not None:
                    seconds = self.delay(request)
                    if seconds:
                        await asyncio.sleep(seconds)
                response = (self.respond or default_response)(request)
                if response is None:  # scripted: drop the connection without answering
                    writer.close()
                    return
                writer.write(response)
                await writer.drain()
                if b"\r\nconnection: close\r\n" in response.split(b"\r\n\r\n", 1)[0].lower() + b"\r\n":
                    return  # a close-delimited response ends when the connection does
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def reset(self) -> None:
        self.received.clear()
        self.connections = 0


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def default_response(request: ReceivedRequest) -> bytes:
    body = request.request_line
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def endpoints_file(path: Path, services: dict[str, dict[str, list[int]]], port: int = 8000) -> Path:
    """Write a LaneEndpoints file: {"default/mockb": {"base": [port, ...]}} with 127.0.0.1 addresses."""
    document = {
        "apiVersion": "laneproxy.dev/v1",
        "kind": "LaneEndpoints",
        "services": {
            key: {"port": port, "lanes": {lane: [f"127.0.0.1:{p}" for p in ports] for lane, ports in lanes.items()}}
            for key, lanes in services.items()
        },
    }
    staged = path.with_suffix(".tmp")
    staged.write_text(yaml.safe_dump(document))
    os.replace(staged, path)
    return path


class ThreadedOrigin:
    """A blocking-socket origin on 127.0.0.1: one daemon thread accepts, one thread serves each connection.

    Subclasses implement `_serve(conn)`; `connections` counts the accepted ones.
    """

    backlog = 128

    def start_serving(self) -> None:
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(self.backlog)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class Http2Origin(ThreadedOrigin):
    """An HTTP/2 server (the `h2` library, fields as bytes) on 127.0.0.1; subclasses answer in `on_event`."""

    def _serve(self, sock: socket.socket) -> None:
        import h2.config
        import h2.connection

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        with sock:
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    self.on_event(conn, event)
                sock.sendall(conn.data_to_send())

    def on_event(self, conn, event) -> None:
        raise NotImplementedError


def wait_for(predicate, what: str, timeout: float = 20.0, interval: float = 0.05):
    """Poll until `predicate()` is truthy and return it; a wait for a state, never an assertion on time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        time.sleep(interval)


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _PortTakenError(RuntimeError):
    """The proxy could not bind a port chosen for it: another process took it first."""


class ProxyProcess:
    """`laneproxy run` as a real process with the given listeners; waits for /ready."""

    def __init__(self, *config: Path, gateway: bool = False, outbound: bool = False, inbound_app: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self._listeners = (config, gateway, outbound, inbound_app, extra)
        self._choose_ports()
        self.process: subprocess.Popen | None = None

    def _choose_ports(self) -> None:
        config, gateway, outbound, inbound_app, extra = self._listeners
        self.admin_port = free_port()
        self.gateway_port = free_port() if gateway else None
        self.outbound_port = free_port() if outbound else None
        self.inbound_port = free_port() if inbound_app else None
        # No minimum drain unless a test asks for one (`extra` comes later and wins): stopping a proxy at the
        # end of a test need not wait the 5 s a pod's sidecar keeps serving after SIGTERM.
        args = [sys.executable, "-m", "laneproxy", "--log-level", "warning", "run", "--admin", f"127.0.0.1:{self.admin_port}",
                "--reload-interval", "0.2", "--drain-seconds", "0"]
        for path in config:
            args += ["--config", str(path)]
        if gateway:
            args += ["--gateway", f"127.0.0.1:{self.gateway_port}"]
        if outbound:
            args += ["--outbound", f"127.0.0.1:{self.outbound_port}"]
        if inbound_app:
            args += ["--inbound", f"127.0.0.1:{self.inbound_port}", "--app", f"127.0.0.1:{inbound_app}"]
        self.args = args + list(extra)
        self._chosen_args = list(self.args)

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        # free_port() closes the port before the proxy binds it: another process may take it in between. Then
        # the proxy exits with "address already in use", and new ports are chosen (a few times at most), unless
        # the test set its own ports or arguments.
        for _ in range(3):
            try:
                return self._start(timeout)
            except _PortTakenError:
                if self.args != self._chosen_args:
                    raise
                self._choose_ports()
        return self._start(timeout)

    def _start(self, timeout: float) -> ProxyProcess:
        self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode()
                if "address already in use" in stderr:
                    raise _PortTakenError(stderr)
                raise RuntimeError(f"laneproxy exited {self.process.returncode}: {stderr}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("laneproxy not ready")

    def admin(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as response:
            return response.read()

    def stat(self, name: str) -> int:
        for line in self.admin("/stats").decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise KeyError(name)

    def stop(self) -> None:
        stop_process(self.process)


async def exchange(port: int, raw: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(read_timeout):
            while data := await reader.read(65536):
                chunks.append(data)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One response from a keep-alive connection: status, headers (lowercase names), decoded body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    else:
        body = await reader.read()
    return status, headers, body


# --- additions for the hardening suites (protocol safety, fuzz, resilience) ----------------------------





class LoopThread:
    """Servers on their own event loop in a daemon thread, usable from sync and module fixtures, as a context
    manager. A subclass's `serve(stop)` starts them, sets `self.ready` once they listen, and returns when `stop`
    (a future of that loop) is done."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc_info) -> None:
        self.loop.call_soon_threadsafe(self.stop.set_result, None)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop = self.loop.create_future()
        self.loop.run_until_complete(self.serve(self.stop))

    async def serve(self, stop: asyncio.Future) -> None:
        raise NotImplementedError


class UpstreamThread:
    """Runs a RecordingUpstream on its own event loop in a daemon thread (usable from sync and module fixtures).

    `respond` and `delay` are called on that thread. Use as a context manager; attributes of the
    upstream (port, received, connections, respond, delay, reset) are reachable on this object.
    """

    def __init__(self, respond=None, delay=None) -> None:
        import threading

        self.upstream = RecordingUpstream(respond=respond, delay=delay)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="upstream", daemon=True)

    def __enter__(self) -> UpstreamThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self.loop).result(timeout=5)
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.stop(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def __getattr__(self, name: str):
        return getattr(self.upstream, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("respond", "delay"):
            setattr(self.upstream, name, value)
        else:
            object.__setattr__(self, name, value)


async def exchange_ending(port: int, raw: bytes, *, timeout: float = 5.0) -> tuple[bytes, str]:
    """Send raw bytes on a new connection; read until the server ends it. Returns (bytes, "eof" | "reset" | "timeout")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    chunks = []
    ending = "timeout"
    try:
        await writer.drain()
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                chunks.append(data)
            ending = "eof"
    except TimeoutError:
        pass
    except ConnectionError:
        ending = "reset"
    writer.close()
    return b"".join(chunks), ending


async def exchange_until_close(port: int, raw: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes on a new connection; read until EOF or `timeout`. Returns (bytes, the server closed)."""
    data, ending = await exchange_ending(port, raw, timeout=timeout)
    return data, ending != "timeout"


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


class RssWatch:
    """Samples a process's RSS every 50 ms on a thread; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.running = pid, rss_bytes(pid), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except FileNotFoundError:  # the process ended (a failed test stopped it first)
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def status_lines(data: bytes) -> list[bytes]:
    """The status lines ("HTTP/1.1 200 OK") in a raw byte stream; test-sized bodies only (not parsed, only searched)."""
    import re

    return re.findall(rb"HTTP/1\.[01] \d{3} [^\r\n]*", data)


class ScriptedOrigin(ThreadedOrigin):
    """A raw-socket origin that records exactly what each connection carried and sends exactly what a test scripts.

    Requests are read as heads (up to the blank line; bodies with Content-Length are read too), and
    `script(head, connection)` answers each: bytes to send as they are, `None` to close without a
    word, or a callable `(sock) -> bool` that does its own sending (dribbling, sending later) and
    returns whether the connection stays open. Bytes only, never parsed or repaired: the point is
    to send what a broken or hostile upstream would. `requests` holds (connection number, head, body)
    in arrival order; `raw[n]` every byte connection n received; `closed_by_peer` the connections
    the proxy closed (EOF or reset seen).
    """

    def __init__(self, script=None) -> None:
        self.script = script or (lambda head, connection: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.requests: list[tuple[int, bytes, bytes]] = []
        self.raw: dict[int, bytes] = {}
        self.closed_by_peer: set[int] = set()
        self.lock = threading.Lock()
        self.numbered = 0
        self.start_serving()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.numbered += 1
            number = self.numbered
            self.raw[number] = b""
        buffer = b""
        conn.settimeout(60)
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        with self.lock:
                            self.closed_by_peer.add(number)
                        return
                    with self.lock:
                        self.raw[number] += data
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.lower().split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    with self.lock:
                        self.raw[number] += data
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                with self.lock:
                    self.requests.append((number, head + b"\r\n\r\n", body))
                answer = self.script(head + b"\r\n\r\n", number)
                if answer is None:
                    return
                if callable(answer):
                    if not answer(conn):
                        return
                else:
                    conn.sendall(answer)
        except ConnectionError:
            with self.lock:
                self.closed_by_peer.add(number)
        except OSError:
            pass
        finally:
            conn.close()

    def connection_of(self, path: bytes) -> list[int]:
        """The connections that carried requests for `path` (request target), in arrival order."""
        with self.lock:
            return [number for number, head, _ in self.requests if head.split(b" ", 2)[1] == path]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()


def responses(data: bytes) -> tuple[list[tuple[int, dict[bytes, bytes], bytes]], bytes]:
    """Every complete response h11 finds in what a client received (then EOF), and the bytes it could not use."""
    client = h11.Connection(h11.CLIENT)
    found: list[tuple[int, dict[bytes, bytes], bytes]] = []
    client.send(h11.Request(method="GET", target="/", headers=[("host", "mockb")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    status, headers, body = 0, {}, b""
    try:
        while True:
            event = client.next_event()
            if isinstance(event, h11.Response):
                status, headers, body = event.status_code, dict(event.headers), b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                found.append((status, headers, body))
                return found, client.trailing_data[0]
            elif event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return found, client.trailing_data[0]
    except h11.RemoteProtocolError:
        return found, data
