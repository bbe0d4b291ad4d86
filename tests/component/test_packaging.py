"""The built wheel, installed (not editable) into a fresh virtual environment with the runtime dependencies
only, runs `laneproxy demo` from a directory outside the source tree, and the seed's three chains answer.

The wheelhouse is made the way tests/image/build_image.sh makes the image's: pip wheel of a clean copy of
the sources, pinned to this environment's versions; the install then runs with --no-index from it.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
CHAIN = "mocka(version: {}, ip: 127.0.0.1)-> mockb(version: {}, ip: 127.0.0.1)-> mockc(version: {}, ip: 127.0.0.1)"
SEED_REQUESTS = [({"x-asm-prefer-tag": "base", "my-request-id": "10001"}, CHAIN.format("v1", "v1", "v1")),
                 ({"x-asm-prefer-tag": "canary", "my-request-id": "10002"}, CHAIN.format("v2", "v1", "v2")),
                 ({"my-request-id": "10003"}, CHAIN.format("v1", "v1", "v1"))]


def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return response.status, response.read().decode()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheelhouse")
    source = work / "src"
    source.mkdir()
    # A clean copy: a build/ directory left in the checkout could put deleted files into the wheel.
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(_REPO / name, source)
    shutil.copytree(_REPO / "laneproxy", source / "laneproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "compiled.json"))
    frozen = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable")
    pins = [line for line in frozen.splitlines() if not line.lower().startswith(("laneproxy==", "pip==", "setuptools=="))]
    (work / "constraints.txt").write_text("\n".join(pins) + "\n")
    wheels = work / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--wheel-dir", str(wheels),
        "--constraint", str(work / "constraints.txt"), str(source))
    return wheels


def test_the_installed_wheel_runs_the_demo_outside_the_source_tree(wheelhouse, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
        "--find-links", str(wheelhouse), "laneproxy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    location = run(str(python), "-c", "import laneproxy; print(laneproxy.__file__)", cwd=elsewhere, env=env)
    assert Path(location.strip()).is_relative_to(venv)
    # The wheel carries the compiled hot path (this machine has a C compiler), unless the build was asked
    # for the pure one; either way the installed package runs the build it names.
    wheel = next(wheelhouse.glob("laneproxy-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        extensions = [name for name in archive.namelist() if name.endswith(".so")]
    pure = os.environ.get("LANEPROXY_PURE", "") not in ("", "0")
    assert bool(extensions) == (not pure and shutil.which("cc") is not None), extensions
    build = run(str(python), "-m", "laneproxy", "--version", cwd=elsewhere, env=env)
    assert ("compiled" in build) == bool(extensions) and ("pure-Python" in build) == (not extensions), build
    # Runtime dependencies only: nothing of the test extra came along.
    missing = subprocess.run([str(python), "-c", "import pytest"], cwd=elsewhere, env=env, capture_output=True)
    assert missing.returncode != 0
    # The OTLP exporter is the `otlp` extra's, not the default install's.
    otlp = subprocess.run([str(python), "-c", "import opentelemetry.exporter.otlp.proto.http"], cwd=elsewhere, env=env,
                          capture_output=True)
    assert otlp.returncode != 0

    demo = subprocess.Popen([str(venv / "bin" / "laneproxy"), "demo", "--gateway-port", "0"], cwd=elsewhere, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in demo.stdout:
            lines.put(line)
        lines.put(None)  # the demo exited

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        gateway = None
        deadline = time.monotonic() + 60
        while gateway is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail("the demo printed no gateway address:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("gateway: "):
                gateway = line.split(": ", 1)[1].strip()
        for headers, chain in SEED_REQUESTS:
            assert get(f"{gateway}/mock", headers) == (200, chain)
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=30)
    assert code == 0, "".join(seen)
