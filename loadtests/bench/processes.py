"""The processes under test: starting them pinned to a core, and reading their own accounting from /proc.

Owns CPU pinning (taskset), readiness (a TCP port that accepts), CPU time and RSS of a process and
its descendants (nginx's master and worker, laneproxy's supervisor and workers), and stopping
exactly the processes this benchmark started, by pid. It never touches a process it did not start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from laneproxy.demo import free_port  # noqa: F401  (the benchmark's processes take their ports from the demo's picker)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, ()))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all threads), from the kernel's own accounting."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / CLOCK_TICKS


def cpu_seconds_precise(pids: list[int]) -> float:
    """Time on a CPU of these processes' threads in nanoseconds (/proc/PID/task/TID/schedstat), in seconds:
    for a figure of a millisecond or less, where utime and stime count 10 ms ticks."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile: its time is lost with it
    return total / 1e9


def user_seconds(pids: list[int]) -> float:
    """utime alone: the proxy's own code (interpreter, extensions, libraries), without the kernel's share."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11])
    return ticks / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * PAGE_SIZE
    return total


def private_bytes(pids: list[int]) -> int:
    """Memory only these processes hold (Private_Clean + Private_Dirty): what one more sidecar costs a node,
    where RSS also counts the shared libraries every Python process maps (libpython, OpenSSL...)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def wait_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Service:
    """One process (tree) started by the benchmark, pinned to `core`."""

    name: str
    command: list[str]
    core: int | None
    port: int
    env: dict[str, str] | None = None
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    stop_signal: int = signal.SIGTERM  # nginx stops gracefully on SIGQUIT
    extra_pids: list[int] = field(default_factory=list)  # processes it owns that are not its children

    def start(self, timeout: float = 30.0) -> Service:
        command = self.command if self.core is None else ["taskset", "-c", str(self.core), *self.command]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        environment = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
        environment.update(self.env or {})
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=environment,
                                            start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        wait_port(self.port, timeout, self.process)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        found = descendants(self.pid)
        for pid in self.extra_pids:
            found.extend(descendants(pid))
        return found

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def private(self) -> int:
        return private_bytes(self.pids())

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # The signal goes to the one pid we started, which stops its own children.
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
