"""The load generator: wrk (Debian) with keep-alive, one thread, pinned to the upstream's core.

Owns the wrk command line and the Lua script that sets the request headers and reports wrk's own
numbers as one JSON line (exact microseconds, not wrk's rounded text). A run either lasts its
duration or, for the table-swap case, until the caller interrupts it (wrk reports on SIGINT).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
"""

_ROTATE = r"""
local pool, index = {}, 0
init = function(args)
  for line in io.lines(args[1]) do
    local host, lane, trace = line:match("^(%S+) (%S+) (%S+)$")
    pool[#pool + 1] = wrk.format("GET", "/", {["Host"] = host, ["x-asm-prefer-tag"] = lane, ["my-request-id"] = trace})
  end
end
request = function()
  index = index % #pool + 1
  return pool[index]
end
"""


def fixed_headers_script(headers: dict[str, str]) -> str:
    """Every request the same: wrk formats it once, so the script costs nothing per request."""
    lines = [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    return "\n".join(lines) + "\n" + _DONE


def rotating_script() -> str:
    """Requests cycle through `host lane trace` lines of a file given after `--`."""
    return _ROTATE + _DONE


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int
    mean_us: float
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def parse(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            duration = data["duration_us"] / 1e6
            lat = data["latency_us"]
            return WrkResult(
                requests=data["requests"], duration_s=duration, rps=data["requests"] / duration if duration else 0.0,
                p50_us=lat["p50"], p90_us=lat["p90"], p99_us=lat["p99"], p999_us=lat["p999"], max_us=lat["max"],
                mean_us=lat["mean"], errors=data["errors"],
            )
    raise RuntimeError(f"wrk printed no result:\n{output}")


def run(url: str, script: Path, *, connections: int, duration: float, core: int | None, script_args: tuple[str, ...] = (),
        during: Callable[[subprocess.Popen], None] | None = None, timeout: float = 2.0) -> WrkResult:
    """Run wrk; `during(process)` runs while it does and may interrupt it early (SIGINT: wrk still reports)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", f"--timeout={timeout:g}s", "--latency",
               "-s", str(script), url]
    if script_args:
        command += ["--", *script_args]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL)
    try:
        if during is not None:
            during(process)
        output, _ = process.communicate(timeout=duration + 60)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return parse(output)


def interrupt(process: subprocess.Popen) -> None:
    """Stop a wrk run early; it prints its summary as on a normal end."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
