"""WebSocket echo throughput: the echo server every WebSocket row talks to, and the load client.

Run as a script. `websocket_load.py serve PORT` echoes every message (the `websockets` library on uvloop,
no compression). `websocket_load.py load PORT HOST --connections C --duration D --size S` opens C
connections through the listener on PORT (Host: HOST), and on each sends an S-byte message and waits for
its echo, again and again, for D seconds; it prints one `WSJSON {...}` line: messages echoed, duration,
latency percentiles (one message's round trip) and errors. Both run on the load core, so the Python client
and server bound the rate: a proxy row near `direct` means the proxy is not the bottleneck; the ratios
between proxies measured in the same round are the result.

`passes_websocket(port, host)` is the probe that decides whether a listener passes a WebSocket upgrade
(101 Switching Protocols) at all; a case that fails it is skipped, not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import time


def passes_websocket(port: int, host: str, timeout: float = 3.0) -> bool:
    """Whether an upgrade request through the listener is answered `101 Switching Protocols`."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return head.startswith(b"HTTP/1.1 101")


async def _serve(port: int) -> None:
    from websockets.asyncio.server import serve

    async def echo(connection) -> None:
        async for message in connection:
            await connection.send(message)

    async with serve(echo, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None):
        await asyncio.get_running_loop().create_future()


async def _load(port: int, host: str, connections: int, duration: float, size: int) -> dict:
    from websockets.asyncio.client import connect

    payload = os.urandom(size)
    latencies: list[int] = []
    errors = {"connect": 0, "closed": 0, "mismatch": 0}
    start_gate = asyncio.Event()
    deadline = [0.0]

    async def one() -> None:
        try:
            # The URI names the service (the Host a proxy routes on); the socket goes to the listener under test.
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setblocking(False)
            connection = await connect(f"ws://{host}/", sock=sock, compression=None, max_size=None,
                                       ping_interval=None, open_timeout=10)
        except Exception:  # noqa: BLE001 (refused, timed out, or a non-101 answer: a connect error)
            errors["connect"] += 1
            return
        async with connection:
            await start_gate.wait()
            try:
                while time.monotonic() < deadline[0]:
                    sent = time.perf_counter_ns()
                    await connection.send(payload)
                    answer = await connection.recv()
                    latencies.append((time.perf_counter_ns() - sent) // 1000)
                    if answer != payload:
                        errors["mismatch"] += 1
            except Exception:  # noqa: BLE001 (a connection closed under load is counted, not raised)
                errors["closed"] += 1

    tasks = [asyncio.create_task(one()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # every connection opened before the clock starts
    started = time.monotonic()
    deadline[0] = started + duration
    start_gate.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(fraction: float) -> int:
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] if latencies else 0

    return {"messages": len(latencies), "duration_us": int(elapsed * 1e6), "bytes": len(latencies) * size,
            "errors": errors, "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999),
                                             "max": latencies[-1] if latencies else 0,
                                             "mean": sum(latencies) / len(latencies) if latencies else 0.0}}


def parse(output: str):
    """The WSJSON line as the benchmark's result shape (messages counted as requests)."""
    from wrk import WrkResult

    for line in output.splitlines():
        if line.startswith("WSJSON "):
            data = json.loads(line[len("WSJSON "):])
            duration, lat = data["duration_us"] / 1e6, data["latency_us"]
            return WrkResult(requests=data["messages"], duration_s=duration,
                             rps=data["messages"] / duration if duration else 0.0, p50_us=lat["p50"],
                             p90_us=lat["p90"], p99_us=lat["p99"], p999_us=lat["p999"], max_us=lat["max"],
                             mean_us=lat["mean"], errors=data["errors"])
    raise RuntimeError(f"the WebSocket load client printed no result:\n{output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("port", type=int)
    load = sub.add_parser("load")
    load.add_argument("port", type=int)
    load.add_argument("host")
    load.add_argument("--connections", type=int, default=16)
    load.add_argument("--duration", type=float, default=5.0)
    load.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.command == "serve":
        runner(_serve(args.port))
        return 0
    result = runner(_load(args.port, args.host, args.connections, args.duration, args.size))
    print("WSJSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
