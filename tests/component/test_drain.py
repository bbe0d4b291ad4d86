"""Draining on SIGTERM as Istio's sidecar drains, with a real `laneproxy run` and real clients on 127.0.0.1.

For the minimum drain time every listener keeps accepting and serving, each response saying
`Connection: close`; a keep-alive connection that was idle at the signal is still served; a request
in flight at the signal is answered; after the minimum, new connections are refused and the process
exits once no request is in flight, well before its drain limit. The same under `--workers 2`.
Load is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest

from proxyrig import SWIMLANES, ProxyProcess, UpstreamThread, endpoints_file, read_response

MINIMUM = 3.0  # --drain-seconds in these tests
LIMIT = 60.0  # --drain-limit-seconds: far beyond anything the tests wait for, so an exit at the limit shows
LOAD_AFTER_SIGNAL = 2.0  # the load stops this long after SIGTERM: inside the minimum however late the signal lands
CLIENTS = 4
MAX_REQUESTS = 20000


def sidecar(tmp_path: Path, upstream_port: int, *extra: str) -> ProxyProcess:
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream_port]}})
    return ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=(
        "--drain-seconds", str(MINIMUM), "--drain-limit-seconds", str(LIMIT), *extra)).start()


def request(index: int) -> tuple[bytes, bytes]:
    """Every other request a POST with a body; returns (raw request, the request line the upstream must see)."""
    if index % 2:
        body = b"payload %d" % index
        line = b"POST /p%d HTTP/1.1" % index
        return line + b"\r\nHost: mockb\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), line
    line = b"GET /g%d HTTP/1.1" % index
    return line + b"\r\nHost: mockb\r\n\r\n", line


class Load:
    """Clients through the sidecar until `stop_at`: some open a new connection per request, some keep theirs alive
    (reconnecting after a `Connection: close`). Every request's outcome is kept with the time it ended."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.numbers = itertools.count()
        self.outcomes: list[tuple[float, object, bytes | None]] = []  # (time, status or exception, Connection)
        self.stop_at = float("inf")

    def more(self) -> bool:
        return time.monotonic() < self.stop_at and len(self.outcomes) < MAX_REQUESTS

    async def one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        raw, line = request(next(self.numbers))
        writer.write(raw)
        status, headers, body = await asyncio.wait_for(read_response(reader), 15)
        if status != 200 or body != line:
            raise AssertionError(f"{status} {body!r} for {line!r}")
        self.outcomes.append((time.monotonic(), status, headers.get(b"connection")))
        return headers.get(b"connection")

    async def new_connection_each_time(self) -> None:
        while self.more():
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                await self.one(reader, writer)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, AssertionError) as exc:
                self.outcomes.append((time.monotonic(), exc, None))
            finally:
                if writer is not None:
                    writer.close()

    async def keep_alive(self) -> None:
        while self.more():
            writer = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                while self.more():
                    if await self.one(reader, writer) == b"close":
                        break
            except (OSError, asyncio.IncompleteReadError, TimeoutError, AssertionError) as exc:
                self.outcomes.append((time.monotonic(), exc, None))
            finally:
                if writer is not None:
                    writer.close()

    def run(self) -> list[asyncio.Task]:
        clients = [self.new_connection_each_time, self.keep_alive] * (CLIENTS // 2)
        return [asyncio.create_task(client()) for client in clients]


async def sigterm_under_load(proxy: ProxyProcess) -> tuple[Load, float, tuple[int, dict, bytes], int]:
    """Load before and during the minimum drain, a keep-alive connection idle at the signal used once after it.

    Returns the load, the time of the signal, the idle connection's late response and the exit code.
    """
    load = Load(proxy.outbound_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
    writer.write(b"GET /before HTTP/1.1\r\nHost: mockb\r\n\r\n")
    assert (await read_response(reader))[0] == 200  # now idle, kept alive
    tasks = load.run()
    try:
        await asyncio.sleep(0.5)
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        load.stop_at = signalled + LOAD_AFTER_SIGNAL
        await asyncio.sleep(1.0)
        writer.write(b"GET /idle-at-sigterm HTTP/1.1\r\nHost: mockb\r\n\r\n")
        late = await asyncio.wait_for(read_response(reader), 15)
        await asyncio.gather(*tasks)
    finally:
        writer.close()
        for task in tasks:
            task.cancel()
    code = await asyncio.to_thread(proxy.process.wait, LIMIT)
    return load, signalled, late, code


def check_the_minimum_drain(load: Load, signalled: float, late: tuple[int, dict, bytes], code: int) -> None:
    failures = [outcome for outcome in load.outcomes if not isinstance(outcome[1], int)]
    after = [outcome for outcome in load.outcomes if outcome[0] > signalled + 0.2]
    print(f"{len(load.outcomes)} requests, {len(after)} of them during the drain, {len(failures)} failed")
    assert failures == [], f"{len(failures)} requests failed while the proxy drained: {failures[:3]}"
    assert len(after) >= 20, "too few requests during the drain to say anything"
    assert all(connection == b"close" for _, _, connection in after), "a response during the drain kept the connection"
    assert late[0] == 200 and late[1].get(b"connection") == b"close", late
    assert code == 0


async def test_sigterm_keeps_serving_new_and_idle_connections_for_the_minimum_drain_without_a_failure(tmp_path):
    with UpstreamThread() as upstream:
        proxy = sidecar(tmp_path, upstream.port)
        try:
            outcome = await sigterm_under_load(proxy)
        finally:
            proxy.stop()
    check_the_minimum_drain(*outcome)


async def test_sigterm_under_several_workers_keeps_serving_for_the_minimum_drain_without_a_failure(tmp_path):
    with UpstreamThread() as upstream:
        proxy = sidecar(tmp_path, upstream.port, "--workers", "2")
        try:
            outcome = await sigterm_under_load(proxy)
        finally:
            proxy.stop()
    check_the_minimum_drain(*outcome)


@pytest.mark.parametrize(("method", "workers"), [("GET", "1"), ("POST", "1"), ("POST", "2")])
async def test_a_long_request_in_flight_at_sigterm_completes_then_the_proxy_exits_without_waiting_for_its_limit(
        tmp_path, method, workers):
    slow = 6.0  # past the minimum: the proxy must wait for it, then go
    with UpstreamThread(delay=lambda request: slow if b"/slow" in request.request_line else 0) as upstream:
        proxy = sidecar(tmp_path, upstream.port, "--route-timeout", "30", "--workers", workers)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
            body = b"x" * 1000 if method == "POST" else b""
            writer.write(b"%s /slow HTTP/1.1\r\nHost: mockb\r\nContent-Length: %d\r\n\r\n%s"
                         % (method.encode(), len(body), body))
            for _ in range(200):
                if upstream.received:
                    break
                await asyncio.sleep(0.02)
            assert upstream.received, "the slow request never reached the upstream"
            signalled = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(MINIMUM + 1.0)
            assert proxy.process.poll() is None, "the proxy exited with a request in flight"
            with pytest.raises(ConnectionRefusedError):  # the minimum is over: new clients are turned away
                await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
            status, headers, answer = await asyncio.wait_for(read_response(reader), 30)
            answered = time.monotonic()
            writer.close()
            code = await asyncio.to_thread(proxy.process.wait, LIMIT)
            exited = time.monotonic()
        finally:
            proxy.stop()
    assert (status, answer) == (200, b"%s /slow HTTP/1.1" % method.encode())
    assert headers.get(b"connection") == b"close"
    assert code == 0
    # Exit follows the last answer, not the drain limit (60 s): a loaded machine still takes well under 10 s.
    assert exited - answered < 10, f"exited {exited - answered:.1f}s after the last answer ({exited - signalled:.1f}s " \
                                   f"after SIGTERM, limit {LIMIT:.0f}s)"


async def test_an_idle_proxy_exits_once_the_minimum_drain_is_over(tmp_path):
    with UpstreamThread() as upstream:
        proxy = sidecar(tmp_path, upstream.port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
            writer.write(b"GET /once HTTP/1.1\r\nHost: mockb\r\n\r\n")
            assert (await read_response(reader))[0] == 200
            signalled = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(MINIMUM / 2)
            assert proxy.process.poll() is None, "exited before the minimum drain time"
            code = await asyncio.to_thread(proxy.process.wait, LIMIT)
            exited = time.monotonic() - signalled
            closed = await asyncio.wait_for(reader.read(), 5)  # the idle keep-alive connection was closed cleanly
            writer.close()
        finally:
            proxy.stop()
    assert code == 0 and closed == b""
    assert MINIMUM <= exited < LIMIT / 2, f"exited {exited:.1f}s after SIGTERM"


async def test_pipelined_requests_received_during_the_drain_are_all_answered_the_last_one_closing(tmp_path):
    with UpstreamThread(delay=lambda request: 0.3 if b"/first" in request.request_line else 0) as upstream:
        proxy = sidecar(tmp_path, upstream.port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.outbound_port)
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            # /first is slow upstream, so /second is surely queued behind it when /first's answer is written.
            writer.write(b"GET /first HTTP/1.1\r\nHost: mockb\r\n\r\nPOST /second HTTP/1.1\r\nHost: mockb\r\n"
                         b"Content-Length: 2\r\n\r\nok")
            first = await asyncio.wait_for(read_response(reader), 10)
            second = await asyncio.wait_for(read_response(reader), 10)
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            code = await asyncio.to_thread(proxy.process.wait, LIMIT)
        finally:
            proxy.stop()
    assert (first[0], first[2]) == (200, b"GET /first HTTP/1.1") and first[1].get(b"connection") is None
    assert (second[0], second[2]) == (200, b"POST /second HTTP/1.1") and second[1].get(b"connection") == b"close"
    assert rest == b"" and code == 0
