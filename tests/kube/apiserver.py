"""Throwaway Kubernetes control plane (etcd + kube-apiserver) for tests.

This module owns everything needed to run a *real* Kubernetes API server on
127.0.0.1 for the Kubernetes config-watcher tests:

* :func:`ensure_binary` locates the cached ``kube-apiserver`` binary (built
  once per machine by ``build_apiserver.sh`` into ``~/.cache/laneproxy/``)
  and builds it if missing.
* :class:`KubeApiServer` is a context manager that starts etcd and
  kube-apiserver on free loopback ports, with a generated CA + serving
  certificate (``openssl`` CLI), static-token authentication and RBAC
  authorization, waits for ``/readyz`` and writes kubeconfig files.

Users: ``admin`` (group ``system:masters``, full access) and, by default, a
``watcher`` user with no permissions except what RBAC objects created by a
test grant it, so least-privilege RBAC rules can be tested.  Static tokens
cannot be added to a running kube-apiserver, so every user must be declared
when the server is constructed (``users=``).

Nothing listens on anything but 127.0.0.1; all state lives in a temporary
directory that is removed on exit, and both processes are stopped (terminate,
then kill) when the context exits, at interpreter exit, or - via
``PR_SET_PDEATHSIG``, when started from the main thread - when the test
process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from laneproxy.demo import free_port

__all__ = [
    "ADMIN_USER",
    "K8S_VERSION",
    "WATCHER_USER",
    "KubeApiServer",
    "KubeApiServerError",
    "TokenUser",
    "binary_path",
    "ensure_binary",
]

K8S_VERSION = "1.20.2"
ADMIN_USER = "admin"
WATCHER_USER = "watcher"

_HERE = Path(__file__).resolve().parent
_BUILD_SCRIPT = _HERE / "build_apiserver.sh"
_BINARY_ENV = "LANEPROXY_KUBE_APISERVER"
_ETCD_ENV = "LANEPROXY_ETCD"
_LOOPBACK = "127.0.0.1"


class KubeApiServerError(RuntimeError):
    """The API server could not be built, started or reached."""


@dataclass(frozen=True)
class TokenUser:
    """A user authenticated by a static bearer token."""

    name: str
    token: str
    groups: tuple[str, ...] = ()


def _cache_dir() -> Path:
    override = os.environ.get("LANEPROXY_CACHE_DIR")
    return Path(override) if override else Path.home() / ".cache" / "laneproxy"


def binary_path() -> Path:
    """Where the kube-apiserver binary is (or will be) cached.

    ``$LANEPROXY_KUBE_APISERVER`` overrides the default
    ``~/.cache/laneproxy/kube-apiserver-<version>``.
    """
    override = os.environ.get(_BINARY_ENV)
    if override:
        return Path(override)
    return _cache_dir() / f"kube-apiserver-{K8S_VERSION}"


def _etcd_binary() -> str | None:
    return os.environ.get(_ETCD_ENV) or shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )


def ensure_binary() -> Path:
    """Return the kube-apiserver binary, building it first if needed.

    Runs ``build_apiserver.sh`` (apt installs + ~10 minute Go build, once per
    machine) when the binary or etcd is missing.  Concurrent callers (e.g.
    several pytest-xdist workers) are serialised with a file lock.

    Raises:
        KubeApiServerError: if the build fails; the message points at the log.
    """
    binary = binary_path()
    if _is_executable(binary) and _etcd_binary():
        return binary
    if os.environ.get(_BINARY_ENV):
        raise KubeApiServerError(
            f"${_BINARY_ENV} points at {binary}, which is not an executable file"
        )
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / "build_apiserver.log"
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_executable(binary) and _etcd_binary():
            return binary
        print(
            f"\nBuilding kube-apiserver {K8S_VERSION} (first run on this machine, "
            f"~10-15 minutes); log: {log_path}",
            file=sys.stderr,
            flush=True,
        )
        with open(log_path, "w") as log:
            result = subprocess.run(
                ["bash", str(_BUILD_SCRIPT)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                check=False,
            )
    if result.returncode != 0 or not _is_executable(binary) or not _etcd_binary():
        raise KubeApiServerError(
            f"building kube-apiserver failed (exit code {result.returncode}); "
            f"see {log_path}:\n{_tail(log_path)}"
        )
    return binary


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _first_address(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr)[1])


def _die_with_parent() -> None:
    """Child pre-exec hook: get SIGKILLed if the test process dies."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KubeApiServerError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def describe_exit(self) -> str:
        return (
            f"{self.name} exited with code {self.popen.returncode}; "
            f"last lines of its log:\n{_tail(self.log_path)}"
        )


@dataclass
class _Pki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path


@dataclass
class KubeApiServer:
    """etcd + kube-apiserver on 127.0.0.1; use as a context manager.

    Example::

        with KubeApiServer() as kube:
            await config.load_kube_config(config_file=str(kube.kubeconfig_path))
            watcher_cfg = kube.kubeconfig_for(WATCHER_USER)

    Args:
        binary: kube-apiserver binary (default: :func:`ensure_binary`).
        etcd_binary: etcd binary (default: ``$LANEPROXY_ETCD`` or ``etcd``).
        users: extra token users besides ``admin``.  Entries may be names
            (a random token is generated, no groups) or :class:`TokenUser`.
            Defaults to a single ``watcher`` user without any permissions.
        startup_timeout: seconds to wait for etcd and for ``/readyz``.
        extra_args: additional kube-apiserver flags (a flag given twice: the later wins).
        address: where the API server listens and what it advertises (etcd stays on
            127.0.0.1); the cluster tier uses its node's address, which pods can reach.
        service_cluster_ip_range: the Service range; its first address is in the
            serving certificate, as the ``kubernetes`` Service's ClusterIP.
        full_cluster: a controller-manager and kubelets will run (tests/cluster):
            keep the ServiceAccount admission plugin and the ``kubernetes``
            Service's endpoints, which the bare server turns off.
    """

    binary: Path | None = None
    etcd_binary: str | None = None
    users: Sequence[str | TokenUser] = (WATCHER_USER,)
    startup_timeout: float = 120.0
    extra_args: Sequence[str] = ()
    address: str = _LOOPBACK
    service_cluster_ip_range: str = "10.0.0.0/24"
    full_cluster: bool = False

    port: int = field(init=False, default=0)
    etcd_url: str = field(init=False, default="")
    workdir: Path = field(init=False, default=Path())
    ca_path: Path = field(init=False, default=Path())
    _users: dict[str, TokenUser] = field(init=False, default_factory=dict)
    _processes: list[_Process] = field(init=False, default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(init=False, default=None)
    _atexit: Callable[[], None] | None = field(init=False, default=None)

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the API server, e.g. ``https://127.0.0.1:41234``."""
        return f"https://{self.address}:{self.port}"

    @property
    def token(self) -> str:
        """Bearer token of the ``admin`` user (group ``system:masters``)."""
        return self._users[ADMIN_USER].token

    @property
    def kubeconfig_path(self) -> Path:
        """Kubeconfig file for the ``admin`` user."""
        return self.workdir / "kubeconfig-admin.json"

    @property
    def user_names(self) -> list[str]:
        """All token users known to the server (including ``admin``)."""
        return list(self._users)

    def token_for(self, user: str) -> str:
        """Bearer token of a user declared at construction time."""
        try:
            return self._users[user].token
        except KeyError:
            raise KeyError(
                f"unknown user {user!r}; static token users must be passed to "
                f"KubeApiServer(users=...) before start (known: {self.user_names})"
            ) from None

    def kubeconfig_for(self, user: str, namespace: str | None = None) -> Path:
        """Write (or rewrite) and return a kubeconfig file for ``user``."""
        path = self.workdir / f"kubeconfig-{user}.json"
        context: dict[str, str] = {"cluster": "laneproxy-test", "user": user}
        if namespace:
            context["namespace"] = namespace
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "laneproxy-test",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": str(self.ca_path),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": self.token_for(user)}}],
            "contexts": [{"name": user, "context": context}],
            "current-context": user,
        }
        # JSON is valid YAML, so every kubeconfig loader accepts it.
        path.write_text(json.dumps(kubeconfig, indent=2))
        return path

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context trusting the server's CA (for raw HTTP clients)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def start(self) -> KubeApiServer:
        """Start etcd and kube-apiserver and wait until the API is ready."""
        if self._processes:
            raise KubeApiServerError("already started")
        binary = self.binary or ensure_binary()
        etcd = self.etcd_binary or _etcd_binary()
        if not etcd:
            raise KubeApiServerError("etcd not found; run tests/kube/build_apiserver.sh")
        self._tmp = tempfile.TemporaryDirectory(prefix="laneproxy-kube-")
        self.workdir = Path(self._tmp.name)
        self._atexit = self.stop
        atexit.register(self._atexit)
        try:
            self._init_users()
            pki = self._make_pki()
            self._start_etcd(etcd)
            self._start_apiserver(binary, pki)
            self.kubeconfig_for(ADMIN_USER)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both processes (terminate, then kill) and remove all state."""
        for proc in reversed(self._processes):
            _stop_process(proc.popen)
        self._processes.clear()
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (SIGTERM, as an operator or a crash would), keeping etcd and every file:
        clients see refused connections until start_apiserver_again()."""
        proc = self._apiserver_process()
        _stop_process(proc.popen)

    def start_apiserver_again(self) -> None:
        """Start kube-apiserver again with the same command line (same port, certificates and etcd) and wait
        for /readyz; its log goes on in the same file."""
        proc = self._apiserver_process()
        if proc.popen.poll() is None:
            raise KubeApiServerError("kube-apiserver is still running")
        self._processes.remove(proc)
        again = self._spawn(proc.name, list(proc.popen.args), append=True)  # type: ignore[arg-type]
        context = self.ssl_context()

        def ready() -> bool:
            request = urllib.request.Request(
                f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            with urllib.request.urlopen(request, timeout=5, context=context) as resp:
                return bool(resp.status == 200 and resp.read().strip() == b"ok")

        self._wait_until(again, ready, "kube-apiserver /readyz after a restart")

    def _apiserver_process(self) -> _Process:
        for proc in self._processes:
            if proc.name == "kube-apiserver":
                return proc
        raise KubeApiServerError("kube-apiserver was never started")

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------

    def _init_users(self) -> None:
        users: dict[str, TokenUser] = {
            ADMIN_USER: TokenUser(ADMIN_USER, secrets.token_hex(16), ("system:masters",))
        }
        for entry in self.users:
            user = entry if isinstance(entry, TokenUser) else TokenUser(
                entry, secrets.token_hex(16)
            )
            if user.name in users:
                raise ValueError(f"duplicate token user {user.name!r}")
            users[user.name] = user
        self._users = users
        lines = []
        for uid, user in enumerate(users.values(), start=1):
            # token,user,uid[,"group1,group2"]
            row = f"{user.token},{user.name},uid-{uid}"
            if user.groups:
                row += ',"' + ",".join(user.groups) + '"'
            lines.append(row)
        token_file = self.workdir / "tokens.csv"
        token_file.write_text("\n".join(lines) + "\n")
        token_file.chmod(0o600)

    def _make_pki(self) -> _Pki:
        pki_dir = self.workdir / "pki"
        pki_dir.mkdir()
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=laneproxy-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=pki_dir,
        )
        _openssl(
            "req", "-new", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
            "-subj", "/CN=kube-apiserver",
            cwd=pki_dir,
        )
        (pki_dir / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName=IP:127.0.0.1,IP:{self.address},IP:{_first_address(self.service_cluster_ip_range)},"
            "DNS:localhost,"
            "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
        )
        _openssl(
            "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "apiserver.ext",
            "-out", "apiserver.crt",
            cwd=pki_dir,
        )
        # Service-account signing key; the private key also serves as the
        # verification key (kube-apiserver derives the public half).
        _openssl("genrsa", "-traditional", "-out", "sa.key", "2048", cwd=pki_dir)
        self.ca_path = pki_dir / "ca.crt"
        return _Pki(
            ca_cert=self.ca_path,
            serving_cert=pki_dir / "apiserver.crt",
            serving_key=pki_dir / "apiserver.key",
            sa_key=pki_dir / "sa.key",
        )

    def _spawn(self, name: str, argv: Sequence[str], append: bool = False) -> _Process:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab" if append else "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                # PR_SET_PDEATHSIG fires when the spawning *thread* exits, so
                # only use it when started from the main thread.
                preexec_fn=(
                    _die_with_parent
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        proc = _Process(name, popen, log_path)
        self._processes.append(proc)
        return proc

    def _start_etcd(self, etcd: str) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://{_LOOPBACK}:{client_port}"
        peer_url = f"http://{_LOOPBACK}:{peer_port}"
        proc = self._spawn(
            "etcd",
            [
                etcd,
                "--name=laneproxy-test",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=laneproxy-test={peer_url}",
                "--initial-cluster-state=new",
                "--log-level=warn",
                "--logger=zap",
            ],
        )

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                return bool(json.load(resp).get("health") == "true")

        self._wait_until(proc, etcd_healthy, "etcd /health")

    def _start_apiserver(self, binary: Path, pki: _Pki) -> None:
        self.port = free_port()
        proc = self._spawn(
            "kube-apiserver",
            [
                str(binary),
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--token-auth-file={self.workdir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                *(() if self.full_cluster else ("--disable-admission-plugins=ServiceAccount",)),
                f"--service-account-key-file={pki.sa_key}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={self.service_cluster_ip_range}",
                # Without controller-manager and kubelets: keep the server quiet.
                f"--endpoint-reconciler-type={'lease' if self.full_cluster else 'none'}",
                "--profiling=false",
                "--v=1",
                *self.extra_args,
            ],
        )
        context = self.ssl_context()

        def ready() -> bool:
            request = urllib.request.Request(
                f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            with urllib.request.urlopen(request, timeout=5, context=context) as resp:
                return bool(resp.status == 200 and resp.read().strip() == b"ok")

        self._wait_until(proc, ready, "kube-apiserver /readyz")

        def default_namespace() -> bool:
            # /readyz answers before the bootstrap controller has created `default`; tests put objects there.
            request = urllib.request.Request(
                f"{self.url}/api/v1/namespaces/default", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as resp:
                    return resp.status == 200
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return False
                raise

        self._wait_until(proc, default_namespace, "the default namespace")

    def _wait_until(self, proc: _Process, probe: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise KubeApiServerError(f"waiting for {what}: {proc.describe_exit()}")
            try:
                if probe():
                    return
                last_error = "not ready"
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise KubeApiServerError(
            f"timed out after {self.startup_timeout}s waiting for {what} "
            f"({last_error}); last lines of the {proc.name} log:\n{_tail(proc.log_path)}"
        )


def _stop_process(popen: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it does not exit in time.

    Signals are only sent while the leader is unreaped, so its process-group id
    cannot have been recycled by an unrelated process.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=wait)

