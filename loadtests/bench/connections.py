"""Hold N keep-alive connections open on a proxy: each sends one request, reads the response, and stays.

Run as a script: `connections.py PORT COUNT HOST [HEADER: VALUE ...]`. Prints `ready <n held>` once
every connection has had its answer, then keeps them until stdin closes. The benchmark reads the
proxy's RSS while this holds them. All requests go out at once, as 1,000 clients would send them.
"""

from __future__ import annotations

import asyncio
import sys


async def _one(port: int, request: bytes, held: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
    held.append(writer)


async def main(port: int, count: int, host: str, headers: list[str]) -> int:
    request = ("GET / HTTP/1.1\r\n" f"Host: {host}\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()
    held: list[asyncio.StreamWriter] = []
    results = await asyncio.gather(*(_one(port, request, held) for _ in range(count)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    print(f"ready {len(held)}" + (f" ({len(failures)} failed: {failures[0]!r})" if failures else ""), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])))
