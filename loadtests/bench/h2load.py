"""The h2c load generator: h2load (Debian's nghttp2-client), one thread, pinned to the upstream's core.

Owns the h2load command line (HTTP/2 with prior knowledge, several streams per connection), reading its
summary and its per-request log (exact latencies, from which the percentiles are taken), and the probe
that decides whether a listener speaks h2c at all: the client preface and an empty SETTINGS frame, answered
by a SETTINGS frame from a server that speaks HTTP/2, by anything else (an HTTP/1.1 400, a close) from one
that does not. A case whose listener fails the probe is skipped, not measured.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from wrk import WrkResult

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0
SETTINGS = 0x04


def speaks_h2c(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> bool:
    """Whether the listener answers the HTTP/2 client preface with a SETTINGS frame (RFC 9113, 3.4)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(PREFACE + EMPTY_SETTINGS)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    return head[3] == SETTINGS and int.from_bytes(head[5:9], "big") & 0x7FFFFFFF == 0


_SUMMARY = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                      r"(\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")


def _percentile(values: list[int], fraction: float) -> int:
    if not values:
        return 0
    return values[min(len(values) - 1, int(fraction * len(values)))]


def parse(output: str, log: str) -> WrkResult:
    """h2load's summary (counts, errors) and per-request log (tab-separated: start, status, microseconds)."""
    summary, statuses, finished = _SUMMARY.search(output), _STATUS.search(output), _FINISHED.search(output)
    if summary is None or statuses is None or finished is None:
        raise RuntimeError(f"h2load printed no summary:\n{output}")
    _, _, done, succeeded, failed, errored, timeouts = (int(x) for x in summary.groups())
    _, s3xx, s4xx, s5xx = (int(x) for x in statuses.groups())
    duration = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    latencies = sorted(int(line.split("\t")[2]) for line in log.splitlines() if line.count("\t") >= 2)
    return WrkResult(
        requests=succeeded, duration_s=duration, rps=succeeded / duration if duration else 0.0,
        p50_us=_percentile(latencies, 0.50), p90_us=_percentile(latencies, 0.90), p99_us=_percentile(latencies, 0.99),
        p999_us=_percentile(latencies, 0.999), max_us=latencies[-1] if latencies else 0,
        mean_us=sum(latencies) / len(latencies) if latencies else 0.0,
        errors={"failed": failed, "errored": errored, "timeout": timeouts, "status": s3xx + s4xx + s5xx,
                "not_done": max(0, done - succeeded - failed - errored)},
    )


def run(url: str, *, authority: str, headers: dict[str, str], connections: int, streams: int, duration: float,
        core: int | None, log_path: Path) -> WrkResult:
    """h2load for `duration` seconds: `connections` h2c connections, `streams` concurrent streams on each."""
    command = ["h2load", "-t1", f"-c{connections}", f"-m{streams}", f"-D{max(1, round(duration))}",
               "--warm-up-time=500ms", f"--log-file={log_path}", "-H", f":authority: {authority}",
               *(item for name, value in headers.items() for item in ("-H", f"{name}: {value}")), url]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=duration + 60)
    log = log_path.read_text() if log_path.exists() else ""
    return parse(done.stdout + done.stderr, log)
