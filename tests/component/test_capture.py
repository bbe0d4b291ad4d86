"""Transparent capture for real: iptables rules in network namespaces this test creates, never on the host.

Two namespaces joined by a veth pair: a client, and a "pod" holding an app (the mock, as uid 1000), its
sidecar (`laneproxy run` as uid 1337 with inbound and outbound listeners) and mockb in two lanes on loopback.
`laneproxy capture --apply` installs the rules in the pod's namespace, as the init container does. The app
calls http://mockb:8000/ with no proxy configured: mockb resolves (the namespace's own /etc/hosts, which
`ip netns exec` mounts) to a service address routed to a veth pair inside the pod namespace, whose counters
prove that not one packet went that way: the nat rules sent every connection to the outbound listener.
The client namespace also plays the world outside the mesh for protocols other than HTTP: a TLS server
(`openssl s_server`, a throwaway CA from trustme), Debian's `redis-server`, and a server-first banner
protocol (SMTP-like: the client waits for the greeting). The app's calls to them are captured like any
other: the sidecar tells them apart by their first bytes (or their silence) and passes them through.
Needs root (creating namespaces); iptables, iproute2, openssl and redis come from tests/image/install_tools.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trustme
import yaml

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from laneproxy.capture import CaptureError, CaptureSettings, nat_rules, parse_ports  # noqa: E402
from tests.image.hosttools import ensure_tools  # noqa: E402

SWIMLANES = _REPO / "config" / "swimlanes.yaml"
POD_IP, CLIENT_IP = "10.99.0.2", "10.99.0.1"
MOCKB_SERVICE_IP = "10.96.0.20"  # a Service's cluster IP: nothing listens there
APP_UID, PROXY_UID = 1000, 1337
TLS_PORT, REDIS_PORT, BANNER_PORT = 9443, 6379, 2525
APP_REDIS_PORT = 6380  # the pod's own Redis, a port the app declares: captured inbound like its HTTP ports

BANNER_SERVER = """
import socket, sys, threading
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
def serve(conn):
    with conn:
        conn.sendall(b"220 banner.outside.example ready\\r\\n")  # server-first: it speaks before the client
        line = b""
        while not line.endswith(b"\\n"):
            data = conn.recv(1024)
            if not data:
                return
            line += data
        conn.sendall(b"250 got " + line)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""

BANNER_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    banner = conn.recv(1024)
    conn.sendall(b"HELO pod\\r\\n")
    reply = b""
    while not reply.endswith(b"\\n"):
        reply += conn.recv(1024)
print(banner.decode().strip() + " | " + reply.decode().strip())
"""

TLS_CLIENT = """
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname=sys.argv[1]) as tls:
        version = tls.version()
        tls.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
print(version, answer.split(b"\\r\\n", 1)[0].decode())
"""

CLIENT = """
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
results = []
for url, headers in json.loads(sys.argv[1]):
    request = urllib.request.Request(url, headers=headers)
    try:
        with opener.open(request, timeout=20) as response:
            results.append([response.status, response.read().decode()])
    except urllib.error.HTTPError as error:
        results.append([error.code, error.read().decode()])
print(json.dumps(results))
"""


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the capture tests create network namespaces and iptables rules: run them as root")


# The rules ------------------------------------------------------------------------------------------------------


def test_rules_exempt_the_proxy_and_loopback_before_redirecting_the_rest():
    rules = nat_rules(CaptureSettings(inbound_ports=(8000,), exclude_outbound_ports=(5432,),
                                      exclude_outbound_cidrs=("10.0.0.0/8",), api_server="10.96.0.1"))
    lines = rules.splitlines()
    output = [line for line in lines if line.startswith("-A LANEPROXY_OUTPUT")]
    assert output == [
        "-A LANEPROXY_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A LANEPROXY_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A LANEPROXY_OUTPUT -o lo -j RETURN",
        "-A LANEPROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A LANEPROXY_OUTPUT -d 10.96.0.1/32 -j RETURN",  # the API server
        "-A LANEPROXY_OUTPUT -d 10.0.0.0/8 -j RETURN",
        "-A LANEPROXY_OUTPUT -p tcp --dport 53 -j RETURN",  # DNS over TCP
        "-A LANEPROXY_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-A LANEPROXY_OUTPUT -j LANEPROXY_REDIRECT",
    ]
    dns = nat_rules(CaptureSettings(capture_dns=True, api_server="fd00::1"))
    assert "--dport 53" not in dns and "fd00::1" not in dns
    assert "-A LANEPROXY_INBOUND -p tcp --dport 8000 -j LANEPROXY_IN_REDIRECT" in lines
    assert "-A LANEPROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in lines
    assert "-A LANEPROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in lines
    assert lines[1] == "*nat" and lines[-1] == "COMMIT"
    only = nat_rules(CaptureSettings(include_outbound_ports=(80, 8000)))
    assert "-A LANEPROXY_OUTPUT -p tcp --dport 8000 -j LANEPROXY_REDIRECT" in only
    assert "-A LANEPROXY_OUTPUT -j LANEPROXY_REDIRECT" not in only


@pytest.mark.parametrize("settings, message", [
    (dict(inbound_ports=(15006,)), "loop"),
    (dict(exclude_outbound_ports=(70000,)), "outside"),
    (dict(exclude_outbound_cidrs=("fd00::/8",)), "IPv6"),
    (dict(exclude_outbound_cidrs=("ten/8",)), "not a CIDR"),
    (dict(api_server="kubernetes.default"), "not an IP address"),
])
def test_settings_that_would_loop_or_mean_nothing_are_refused(settings, message):
    with pytest.raises(CaptureError, match=message):
        CaptureSettings(**settings)
    with pytest.raises(CaptureError, match="port numbers"):
        parse_ports("80,http")


def test_iptables_restore_accepts_every_variant_of_the_rules():
    require_root()
    ensure_tools()
    namespace = f"lpcap-check-{os.getpid()}"
    run("ip", "netns", "add", namespace)
    try:
        for settings in (CaptureSettings(), CaptureSettings(inbound_ports=(8000, 9090), proxy_gid=None),
                         CaptureSettings(include_outbound_ports=(80,), exclude_outbound_cidrs=("169.254.169.254/32",))):
            run("ip", "netns", "exec", namespace, "iptables-restore", "--test", input=nat_rules(settings))
    finally:
        run("ip", "netns", "del", namespace, check=False)


# Capture in a pod's network namespace ----------------------------------------------------------------------------


class CapturedPod:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.pod, self.client = f"lpcap-pod-{tag}", f"lpcap-cli-{tag}"
        self.workdir = Path(tempfile.mkdtemp(prefix="laneproxy-capture-"))
        self.workdir.chmod(0o755)  # the app and the proxy run as other users
        self.hosts_dir = Path("/etc/netns") / self.pod
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def exec_argv(self, namespace: str, *argv: str, uid: int | None = None, env: dict | None = None) -> list[str]:
        # A clean environment (no HTTP_PROXY, nothing of the test process's configuration), then the user.
        prefix = ["ip", "netns", "exec", namespace, "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                  *(f"{key}={value}" for key, value in (env or {}).items())]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return prefix + list(argv)

    def spawn(self, name: str, namespace: str, *argv: str, uid: int | None = None, env: dict | None = None) -> None:
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(self.exec_argv(namespace, *argv, uid=uid, env=env), stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes.append((name, process))

    def laneproxy(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "laneproxy", *args]

    def start(self) -> CapturedPod:
        pod, client = self.pod, self.client
        for namespace in (pod, client):
            run("ip", "netns", "add", namespace)
        # The pod's link to the client, created inside the namespaces: nothing appears in the host's.
        run("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client)
        run("ip", "-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        run("ip", "-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        # Where service addresses are routed: a veth pair whose both ends are in the pod namespace (this
        # kernel has no dummy devices). A packet that escaped capture would be counted on svc0.
        run("ip", "-n", pod, "link", "add", "svc0", "type", "veth", "peer", "name", "svc1")
        for namespace, device in ((pod, "lo"), (pod, "eth0"), (client, "lo"), (client, "eth0")):
            run("ip", "-n", namespace, "link", "set", device, "up")
        for device in ("svc0", "svc1"):
            run("ip", "netns", "exec", pod, "sysctl", "-q", "-w", f"net.ipv6.conf.{device}.disable_ipv6=1")
            run("ip", "-n", pod, "link", "set", device, "up")
        run("ip", "-n", pod, "route", "add", "10.96.0.0/16", "dev", "svc0")
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        (self.hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{MOCKB_SERVICE_IP} mockb\n"
                                              f"{CLIENT_IP} outside.example tls.outside.example\n")

        endpoints = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints", "services": {
            "default/mockb": {"port": 8000, "lanes": {"base": ["127.0.0.1:18001"], "canary": ["127.0.0.1:18002"]}}}}
        (self.workdir / "endpoints.yaml").write_text(yaml.safe_dump(endpoints))
        shutil.copy(SWIMLANES, self.workdir / "swimlanes.yaml")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.workdir / "ca.pem"))
        issued = ca.issue_cert("tls.outside.example")
        issued.cert_chain_pems[0].write_to_path(str(self.workdir / "tls.pem"))
        issued.private_key_pem.write_to_path(str(self.workdir / "tls.key"))
        for path in self.workdir.iterdir():
            path.chmod(0o644)
        # The world outside the mesh, beyond the pod's eth0: TLS, Redis and a server-first banner protocol.
        self.spawn("tls-server", client, "openssl", "s_server", "-accept", f"{CLIENT_IP}:{TLS_PORT}", "-www",
                   "-cert", str(self.workdir / "tls.pem"), "-key", str(self.workdir / "tls.key"))
        self.spawn("redis", client, "redis-server", "--bind", CLIENT_IP, "--port", str(REDIS_PORT), "--save", "",
                   "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.workdir))
        self.spawn("banner", client, sys.executable, "-c", BANNER_SERVER, CLIENT_IP, str(BANNER_PORT))
        self.spawn("app-redis", pod, "redis-server", "--bind", "0.0.0.0", "--port", str(APP_REDIS_PORT), "--save", "",
                   "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.workdir))

        self.spawn("mockb-v1", pod, *self.laneproxy("mock", "--listen", "127.0.0.1:18001"),
                   env={"app": "mockb", "version": "v1"})
        self.spawn("mockb-v2", pod, *self.laneproxy("mock", "--listen", "127.0.0.1:18002"),
                   env={"app": "mockb", "version": "v2"})
        self.spawn("outside", client, *self.laneproxy("mock", "--listen", f"{CLIENT_IP}:9000"),
                   env={"app": "outside", "version": "v0"})
        self.spawn("mocka", pod, *self.laneproxy("mock", "--listen", "0.0.0.0:8000"), uid=APP_UID,
                   env={"app": "mocka", "version": "v1", "upstream_url": "http://mockb:8000/"})
        # A second port of the app (a metrics or admin port a second Service targets).
        self.spawn("mocka-metrics", pod, *self.laneproxy("mock", "--listen", "0.0.0.0:9090"), uid=APP_UID,
                   env={"app": "mocka-metrics", "version": "v1"})
        self.spawn("sidecar", pod, *self.laneproxy(
            "run", "--config", str(self.workdir / "swimlanes.yaml"), "--config", str(self.workdir / "endpoints.yaml"),
            "--inbound", "0.0.0.0:15006", "--app", "127.0.0.1:8000", "--app-ports", f"8000,9090,{APP_REDIS_PORT}",
            "--outbound", "127.0.0.1:15001", "--admin", "127.0.0.1:15000", "--access-log", "stdout"), uid=PROXY_UID)
        # The init container's job, with the ports injection finds in the app containers.
        applied = run(*self.exec_argv(pod, *self.laneproxy("capture", "--apply", "--inbound-ports",
                                                            f"8000,9090,{APP_REDIS_PORT}")))
        self.rules = applied.stdout
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        probe = [sys.executable, "-c", "import socket, sys\nfor a in sys.argv[1:]:\n h, p = a.rsplit(':', 1)\n"
                                       " socket.create_connection((h, int(p)), timeout=1).close()"]
        deadline = time.monotonic() + 30
        while True:
            ready = run(*self.exec_argv(self.pod, *probe, "127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:8000", "127.0.0.1:9090",
                                        "127.0.0.1:15006", "127.0.0.1:15001", f"127.0.0.1:{APP_REDIS_PORT}"), check=False).returncode == 0
            ready = ready and run(*self.exec_argv(self.client, *probe, f"{CLIENT_IP}:{TLS_PORT}",
                                                  f"{CLIENT_IP}:{REDIS_PORT}", f"{CLIENT_IP}:{BANNER_PORT}"),
                                  check=False).returncode == 0
            ready = ready and self.admin("/ready")[0] == 200
            if ready:
                return
            for name, process in self.processes:
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited:\n{(self.workdir / f'{name}.log').read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("the pod never became ready:\n" + self.logs())
            time.sleep(0.1)

    def requests(self, namespace: str, calls: list[tuple[str, dict]], uid: int | None = None) -> list[list]:
        result = run(*self.exec_argv(namespace, sys.executable, "-c", CLIENT, json.dumps(calls), uid=uid))
        return json.loads(result.stdout)

    def admin(self, path: str) -> list:
        return self.requests(self.pod, [(f"http://127.0.0.1:15000{path}", {})])[0]

    def stats(self) -> dict[str, int]:
        text = self.admin("/stats")[1]
        return {name: int(value) for name, _, value in (line.partition(": ") for line in text.splitlines())
                if value.strip().isdigit()}

    def svc_packets(self) -> int:
        link = json.loads(run("ip", "-n", self.pod, "-s", "-j", "link", "show", "svc0").stdout)[0]
        return link["stats64"]["tx"]["packets"]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.workdir / f'{name}.log').read_text()}" for name, _ in self.processes)

    def stop(self) -> None:
        for _, process in self.processes:
            if process.poll() is None:
                process.terminate()
        for _, process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace in (self.pod, self.client):
            run("ip", "netns", "del", namespace, check=False)
        shutil.rmtree(self.hosts_dir, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def captured_pod():
    require_root()
    ensure_tools()
    pod = CapturedPod()
    try:
        yield pod.start()
    finally:
        pod.stop()


def test_the_apps_call_to_mockb_goes_through_the_outbound_listener_and_stays_in_its_lane(captured_pod):
    pod = captured_pod
    assert "-A LANEPROXY_OUTPUT -j LANEPROXY_REDIRECT" in pod.rules
    before_stats, before_packets = pod.stats(), pod.svc_packets()
    app = f"http://{POD_IP}:8000/mock"
    answers = pod.requests(pod.client, [
        (app, {"x-asm-prefer-tag": "canary", "my-request-id": "30002"}),
        (app, {"x-asm-prefer-tag": "base", "my-request-id": "30001"}),
        (app, {"my-request-id": "30002"}),  # the trace id alone: the sidecar remembers its lane
        (app, {}),
    ])
    print(pod.logs())
    assert answers == [
        [200, "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v2, ip: 127.0.0.1)"],
        [200, "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)"],
        [200, "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v2, ip: 127.0.0.1)"],
        [200, "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)"],
    ]
    after = pod.stats()
    # The client's connections to the app were captured into the inbound listener, the app's into the outbound.
    assert after["http.inbound.downstream_rq_total"] - before_stats.get("http.inbound.downstream_rq_total", 0) == 4
    assert after["http.outbound.downstream_rq_total"] - before_stats.get("http.outbound.downstream_rq_total", 0) == 4
    canary = "cluster.outbound|8000|canary|mockb.default.svc.cluster.local.upstream_rq_total"
    assert after[canary] - before_stats.get(canary, 0) == 2
    assert pod.svc_packets() == before_packets, "a packet for the service address left the pod's namespace"
    counters = run("ip", "netns", "exec", pod.pod, "iptables-save", "-c", "-t", "nat").stdout
    redirected = [line for line in counters.splitlines() if line.endswith("-j REDIRECT --to-ports 15001")]
    assert redirected and not redirected[0].startswith("[0:"), counters


def test_a_captured_request_for_no_known_service_passes_through_to_its_original_destination(captured_pod):
    pod = captured_pod
    before = pod.stats()
    # The app's uid, no proxy configured: the connection to outside.example:9000 is captured like any other.
    answers = pod.requests(pod.pod, [("http://outside.example:9000/anything", {})], uid=APP_UID)
    assert answers == [[200, f"outside(version: v0, ip: {CLIENT_IP})"]]
    after = pod.stats()
    assert after["cluster.PassthroughCluster.upstream_rq_total"] - before.get(
        "cluster.PassthroughCluster.upstream_rq_total", 0) == 1


def test_every_captured_app_port_reaches_its_own_port_through_the_inbound_listener(captured_pod):
    before = captured_pod.stats()
    answers = captured_pod.requests(captured_pod.client, [(f"http://{POD_IP}:8000/", {}),
                                                          (f"http://{POD_IP}:9090/", {})])
    assert answers[0][0] == 200 and answers[0][1].startswith("mocka(version: v1"), answers
    assert answers[1][0] == 200 and answers[1][1].startswith("mocka-metrics(version: v1"), answers
    after = captured_pod.stats()
    for port in (8000, 9090):  # both went through the sidecar, each to its own app port
        name = f"cluster.inbound|{port}||.upstream_rq_completed"
        assert after.get(name, 0) - before.get(name, 0) == 1, {k: v for k, v in after.items() if "inbound|" in k}


def test_the_proxys_own_uid_is_never_captured(captured_pod):
    pod = captured_pod
    before = pod.stats()
    # Run as the proxy's uid, the same call reaches outside.example directly: the outbound listener sees nothing.
    answers = pod.requests(pod.pod, [("http://outside.example:9000/direct", {})], uid=PROXY_UID)
    assert answers == [[200, f"outside(version: v0, ip: {CLIENT_IP})"]]
    assert pod.stats()["http.outbound.downstream_rq_total"] == before["http.outbound.downstream_rq_total"]


def test_the_outbound_listener_used_as_http_proxy_passes_hosts_outside_the_mesh_through(captured_pod):
    pod = captured_pod
    # Not captured (loopback): a proxy request (absolute-form) for a host no service names goes to that host
    # (ALLOW_ANY); one whose name resolves nowhere (no DNS in this namespace) is a connect failure, 503.
    proxy = "import urllib.request, sys\n" \
            "o = urllib.request.build_opener(urllib.request.ProxyHandler({'http': 'http://127.0.0.1:15001'}))\n" \
            "print(o.open('http://outside.example:9000/', timeout=10).read().decode())\n" \
            "try:\n o.open('http://nowhere.example:9000/', timeout=20)\nexcept urllib.error.HTTPError as e:\n" \
            " print(e.code)"
    result = run(*pod.exec_argv(pod.pod, sys.executable, "-c", proxy, uid=APP_UID))
    assert result.stdout.split("\n")[:2] == [f"outside(version: v0, ip: {CLIENT_IP})", "503"], result


# Other protocols, captured and told apart by their first bytes ---------------------------------------------------


def tcp_numbers(pod: CapturedPod) -> tuple[int, int, int]:
    stats = pod.stats()
    return tuple(stats.get(f"tcp.PassthroughCluster.downstream_cx_{name}", 0)
                 for name in ("total", "rx_bytes_total", "tx_bytes_total"))


def test_tls_from_python_and_openssl_s_client_passes_through_with_its_sni_in_the_access_log(captured_pod):
    pod = captured_pod
    (connections, received, sent), packets = tcp_numbers(pod), pod.svc_packets()
    ca = str(pod.workdir / "ca.pem")
    python = run(*pod.exec_argv(pod.pod, sys.executable, "-c", TLS_CLIENT, "tls.outside.example", str(TLS_PORT), ca,
                                uid=APP_UID))
    assert python.stdout.split()[:3] == ["TLSv1.3", "HTTP/1.0", "200"], python
    openssl = run(*pod.exec_argv(pod.pod, "openssl", "s_client", "-connect", f"tls.outside.example:{TLS_PORT}",
                                 "-servername", "tls.outside.example", "-CAfile", ca, "-verify_return_error",
                                 "-brief", "-ign_eof", uid=APP_UID), input="GET / HTTP/1.0\r\n\r\n")
    assert "Verification: OK" in openssl.stderr and openssl.stdout.startswith("HTTP/1.0 200 ok"), openssl
    after = tcp_numbers(pod)
    assert after[0] - connections == 2, "both TLS connections went through the sidecar"
    assert after[1] - received > 500 and after[2] - sent > 1000  # ClientHellos and requests; certificates and pages
    deadline = time.monotonic() + 5
    while (log := (pod.workdir / "sidecar.log").read_text()).count('"tls.outside.example"') < 2:
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    line = [line for line in log.splitlines() if '"tls.outside.example"' in line][-1]
    assert '"- - TLS" 0 - ' in line and f'"{CLIENT_IP}:{TLS_PORT}"' in line, line
    assert pod.svc_packets() == packets


def test_redis_cli_against_redis_server_passes_through_as_tcp(captured_pod):
    pod = captured_pod
    connections, received, sent = tcp_numbers(pod)
    answers = [run(*pod.exec_argv(pod.pod, "redis-cli", "-h", "outside.example", "-p", str(REDIS_PORT), *command,
                                  uid=APP_UID)).stdout.strip()
               for command in (["PING"], ["SET", "lane", "canary"], ["GET", "lane"])]
    assert answers == ["PONG", "OK", "canary"]
    after = tcp_numbers(pod)
    assert after[0] - connections == 3
    assert after[1] - received >= len("*1\r\n$4\r\nPING\r\n") and after[2] - sent >= len("+PONG\r\n")
    log = (pod.workdir / "sidecar.log").read_text()
    assert '"- - TCP" 0 - ' in log and f'"{CLIENT_IP}:{REDIS_PORT}"' in log
    # Istio's TCP metrics, as the sidecar's Prometheus endpoint reports them (on by default).
    closed = [line for line in pod.admin("/stats/prometheus")[1].splitlines()
              if line.startswith("istio_tcp_connections_closed_total{") and 'reporter="source"' in line
              and 'destination_service="PassthroughCluster"' in line and 'response_flags="-"' in line]
    assert closed and float(closed[0].rsplit(" ", 1)[1]) >= 3, closed


def test_a_server_first_protocol_passes_through_once_the_silent_client_times_out_detection(captured_pod):
    pod = captured_pod
    connections, _, _ = tcp_numbers(pod)
    result = run(*pod.exec_argv(pod.pod, sys.executable, "-c", BANNER_CLIENT, "outside.example", str(BANNER_PORT),
                                uid=APP_UID))
    assert result.stdout.strip() == "220 banner.outside.example ready | 250 got HELO pod", result
    assert tcp_numbers(pod)[0] - connections == 1


def test_an_http2_preface_is_taken_by_the_http2_codec_not_passed_through_as_tcp(captured_pod):
    pod = captured_pod
    connections, _, _ = tcp_numbers(pod)
    client = ("import socket, sys\n"
              "with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:\n"
              "    conn.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n"
              "    answer = b''\n"
              "    while len(answer) < 9:\n"
              "        answer += conn.recv(1024)\n"
              "print(answer[3])")
    result = run(*pod.exec_argv(pod.pod, sys.executable, "-c", client, "outside.example", str(BANNER_PORT),
                                uid=APP_UID))
    # The sidecar spoke HTTP/2 first (a SETTINGS frame, type 4); the banner server never heard of this connection.
    assert result.stdout.strip() == "4", result
    assert tcp_numbers(pod)[0] - connections == 0


def test_a_non_http_port_the_app_declares_is_captured_inbound_and_passed_to_the_app_as_tcp(captured_pod):
    pod = captured_pod
    name = f"tcp.inbound|{APP_REDIS_PORT}||.downstream_cx_total"
    before = pod.stats().get(name, 0)
    answers = [run(*pod.exec_argv(pod.client, "redis-cli", "-h", POD_IP, "-p", str(APP_REDIS_PORT), *command)).stdout.strip()
               for command in (["PING"], ["SET", "pod", "mocka"], ["GET", "pod"])]
    assert answers == ["PONG", "OK", "mocka"]
    assert pod.stats()[name] - before == 3, "the client's connections did not go through the inbound listener"


HELD_REDIS_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as conn:
    def ping():
        conn.sendall(b"*1\\r\\n$4\\r\\nPING\\r\\n")
        reply = b""
        while not reply.endswith(b"\\r\\n"):
            chunk = conn.recv(1024)
            if not chunk:
                return "closed"
            reply += chunk
        return reply.decode().strip()
    print(ping(), flush=True)
    sys.stdin.readline()  # held open until the test says
    print(ping(), flush=True)
"""
DEFAULT_MINIMUM_DRAIN = 5.0  # `run --drain-seconds`, which the pod's sidecar leaves at its default


def test_a_passed_through_connection_open_at_sigterm_is_served_through_the_drain_and_logged_at_its_close(
        captured_pod):
    """Last in this module: it stops the pod's sidecar, as a kubelet does on a pod's deletion."""
    pod = captured_pod
    sidecar = dict(pod.processes)["sidecar"]
    client = subprocess.Popen(pod.exec_argv(pod.pod, sys.executable, "-c", HELD_REDIS_CLIENT, "outside.example",
                                            str(REDIS_PORT), uid=APP_UID),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "+PONG"
        lines_before = (pod.workdir / "sidecar.log").read_text().count(f'"{CLIENT_IP}:{REDIS_PORT}"')
        sidecar.terminate()
        time.sleep(DEFAULT_MINIMUM_DRAIN + 1.5)
        assert sidecar.poll() is None, "the sidecar exited with a passed-through connection open"
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "+PONG", "the connection did not outlive the minimum drain"
        assert client.wait(10) == 0
        assert sidecar.wait(10) == 0, "the sidecar did not exit once nothing was in flight"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    closes = [line for line in (pod.workdir / "sidecar.log").read_text().splitlines()
              if f'"{CLIENT_IP}:{REDIS_PORT}"' in line][lines_before:]
    assert len(closes) == 1 and '"- - TCP" 0 - 28 14 ' in closes[0], closes  # two PINGs in, two PONGs out
