"""The container image: hadolint-clean, built without a Docker daemon or network, one image for every role.

tests/image/build_image.sh builds it with podman on a debootstrap-made Debian 12 base (cached in
~/.cache/laneproxy/) from a wheelhouse pip prepares on the host, with `--network=none`. The containers run
with a read-only root filesystem and no extra tmpfs, on the host's network namespace (podman creates no
networks), listening on 127.0.0.1 only: the mock role, the sidecar role in front of it, the capture init
container's role in a network namespace of its own, and the webhook role.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from laneproxy.demo import free_port  # noqa: E402
from laneproxy.inject import SIDECAR_NAME, SidecarSettings, inject_pod  # noqa: E402
from tests.image.hosttools import PODMAN_RUN_FLAGS, build_image, hadolint, kubectl, make_tls  # noqa: E402
from tests.kube.fixtures import kube_apiserver  # noqa: E402, F401

SWIMLANES = _REPO / "config" / "swimlanes.yaml"
READ_ONLY = ("--read-only", "--read-only-tmpfs=false")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def get(url: str, headers: dict | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for(url: str, container: str, context: ssl.SSLContext | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if get(url, context=context)[0] == 200:
                return
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state not in ("running", "created", "configured") or time.monotonic() > deadline:
            raise AssertionError(f"{container} ({state}) never answered {url}:\n{podman('logs', container).stderr}")
        time.sleep(0.1)


class Containers:
    """Containers started by one test, removed at its end (by the names it gave them)."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []

    def run(self, role: str, *args: str, options: tuple[str, ...] = ()) -> str:
        name = f"laneproxy-test-{role}-{uuid.uuid4().hex[:8]}"
        podman("run", "--detach", "--name", name, *PODMAN_RUN_FLAGS, *READ_ONLY, "--network=host", *options,
               self.image, *args)
        self.names.append(name)
        return name

    def remove(self) -> None:
        for name in self.names:
            podman("rm", "--force", "--time", "5", name, check=False)


@pytest.fixture(scope="module")
def image() -> str:
    built = build_image()
    print(f"\nimage {built.name} built in {built.seconds:.1f}s\n{built.log}")
    return built.name


@pytest.fixture
def containers(image):
    started = Containers(image)
    yield started
    started.remove()


def test_the_dockerfile_is_hadolint_clean():
    result = subprocess.run([hadolint(), "--failure-threshold", "info", str(_REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_laneproxy_as_uid_1337_and_is_small(image):
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    assert config["Config"]["User"] == "1337:1337"
    assert config["Config"]["Entrypoint"] == ["laneproxy"]
    size_mb = config["Size"] / 1e6
    print(f"image size {size_mb:.0f} MB")
    assert size_mb < 300
    ids = podman("run", "--rm", *PODMAN_RUN_FLAGS, *READ_ONLY, "--network=none", "--entrypoint", "id", image).stdout
    assert ids.startswith("uid=1337(laneproxy) gid=1337(laneproxy)")
    help_text = podman("run", "--rm", *PODMAN_RUN_FLAGS, *READ_ONLY, "--network=none", image).stdout
    for role in ("run", "mock", "webhook", "capture", "inject", "probe", "demo", "validate", "crds"):
        assert role in help_text


def test_the_mock_and_sidecar_roles_answer_with_a_read_only_root(containers, tmp_path):
    app_port, inbound, outbound, admin = (free_port() for _ in range(4))
    containers.run("mock", "mock", "--listen", f"127.0.0.1:{app_port}", "--app", "mockb", "--version", "v7")
    mock = f"http://127.0.0.1:{app_port}/"
    wait_for(mock, containers.names[-1])
    assert get(mock) == (200, "mockb(version: v7, ip: 127.0.0.1)")

    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(SWIMLANES, config / "swimlanes.yaml")
    (config / "endpoints.yaml").write_text(yaml.safe_dump({
        "apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
        "services": {"default/mockb": {"port": 8000, "lanes": {"base": [f"127.0.0.1:{app_port}"]}}}}))
    config.chmod(0o755)
    for path in config.iterdir():
        path.chmod(0o644)
    sidecar = containers.run(
        "sidecar", "run", "--inbound", f"127.0.0.1:{inbound}", "--app", f"127.0.0.1:{app_port}",
        "--outbound", f"127.0.0.1:{outbound}", "--admin", f"127.0.0.1:{admin}",
        options=("--volume", f"{config}:/etc/laneproxy:ro",
                 "--env", "LANEPROXY_CONFIG=/etc/laneproxy/swimlanes.yaml,/etc/laneproxy/endpoints.yaml"))
    wait_for(f"http://127.0.0.1:{admin}/ready", sidecar)
    # Inbound: in front of the app. Outbound: the app's egress, by Host as with HTTP_PROXY or capture.
    assert get(f"http://127.0.0.1:{inbound}/mock") == (200, "mockb(version: v7, ip: 127.0.0.1)")
    assert get(f"http://127.0.0.1:{outbound}/mock", {"host": "mockb:8000", "x-asm-prefer-tag": "canary"}) == \
        (200, "mockb(version: v7, ip: 127.0.0.1)")  # no mockb in canary: the baseline, for this hop
    assert get(f"http://127.0.0.1:{outbound}/", {"host": "unknown:8000"})[0] == 404
    # The readiness probe the injected sidecar uses, run inside the container as the kubelet would.
    probe = podman("exec", sidecar, "laneproxy", "probe", f"http://127.0.0.1:{admin}/ready", check=False)
    assert probe.returncode == 0, probe.stderr
    assert podman("exec", sidecar, "laneproxy", "probe", f"http://127.0.0.1:{free_port()}/ready",
                  check=False).returncode == 1
    assert "Read-only file system" in podman("exec", sidecar, "touch", "/opt/laneproxy/x", check=False).stderr


def test_the_demo_role_answers_the_seeds_three_chains_from_the_installed_package(containers):
    """`laneproxy demo` in the image finds the seed's manifests in the installed package, not in a checkout.
    It writes its endpoints file to a temporary directory: the one tmpfs it gets, the root staying read-only."""
    demo = containers.run("demo", "demo", "--gateway-port", "0", options=("--tmpfs", "/tmp"))
    deadline = time.monotonic() + 60
    gateway = None
    while gateway is None:
        logs = podman("logs", demo, check=False)
        gateway = next((line.split(": ", 1)[1] for line in logs.stdout.splitlines() if line.startswith("gateway: ")),
                       None)
        state = podman("inspect", "--format", "{{.State.Status}}", demo, check=False).stdout.strip()
        if gateway is None and (state not in ("running", "created", "configured") or time.monotonic() > deadline):
            raise AssertionError(f"the demo ({state}) printed no gateway address:\n{logs.stdout}\n{logs.stderr}")
        time.sleep(0.2)
    chain = "mocka(version: {}, ip: 127.0.0.1)-> mockb(version: {}, ip: 127.0.0.1)-> mockc(version: {}, ip: 127.0.0.1)"
    assert get(f"{gateway}/mock", {"x-asm-prefer-tag": "base", "my-request-id": "10001"}) == \
        (200, chain.format("v1", "v1", "v1"))
    assert get(f"{gateway}/mock", {"x-asm-prefer-tag": "canary", "my-request-id": "10002"}) == \
        (200, chain.format("v2", "v1", "v2"))
    assert get(f"{gateway}/mock", {"my-request-id": "10003"}) == (200, chain.format("v1", "v1", "v1"))


def test_the_injected_sidecar_starts_from_its_injected_spec_and_follows_the_real_api_server(
        image, containers, kube_apiserver, tmp_path):
    """The container `laneproxy inject` adds for the direct Kubernetes source (small clusters, Jobs), run as a
    kubelet would run it: its args, its environment (the downward-API values filled in by hand) and its
    readiness probe. Only the listeners move to free loopback ports, and credentials come from a kubeconfig
    instead of a service account token. (The default, xDS, sidecar runs from the image in the cluster tier.)"""
    kube = kube_apiserver
    subprocess.run([kubectl(), "--kubeconfig", str(kube.kubeconfig_path), "apply", "-k",
                    str(_REPO / "deploy" / "crds")], check=True, capture_output=True, timeout=120)
    pod = {"metadata": {"name": "mocka-v2-abc", "namespace": "default",
                        "labels": {"app": "mocka", "ASM_TRAFFIC_TAG": "canary"}},
           "spec": {"containers": [{"name": "default", "ports": [{"containerPort": 8000}]}]}}
    sidecar = next(c for c in inject_pod(pod, SidecarSettings(image=image, source="kubernetes"))["spec"]["containers"]
                   if c["name"] == SIDECAR_NAME)
    def downward(path: str) -> str:
        # As the kubelet fills them in: a label the pod does not carry is an empty string.
        if path in ("metadata.namespace", "metadata.name"):
            return pod["metadata"][path.split(".")[1]]
        if path == "status.podIP":
            return "127.0.0.1"  # the container shares the host's network here
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        assert label is not None, f"a downward-API field this test does not fill in: {path}"
        return pod["metadata"]["labels"].get(label.group(1), "")

    env = {e["name"]: e["value"] if "value" in e else downward(e["valueFrom"]["fieldRef"]["fieldPath"])
           for e in sidecar["env"]}
    inbound, outbound, admin, metrics, lifecycle = free_port(), free_port(), free_port(), free_port(), free_port()
    env.update(LANEPROXY_INBOUND=f"127.0.0.1:{inbound}", LANEPROXY_OUTBOUND=f"127.0.0.1:{outbound}",
               LANEPROXY_ADMIN=f"127.0.0.1:{admin}", LANEPROXY_METRICS=f"127.0.0.1:{metrics}",
               LANEPROXY_LIFECYCLE=f"127.0.0.1:{lifecycle}")
    credentials = tmp_path / "kube"
    credentials.mkdir(mode=0o755)
    shutil.copy(kube.ca_path, credentials / "ca.crt")
    kubeconfig = json.loads(kube.kubeconfig_path.read_text())
    kubeconfig["clusters"][0]["cluster"]["certificate-authority"] = "/etc/kube/ca.crt"
    (credentials / "config").write_text(json.dumps(kubeconfig))
    for path in credentials.iterdir():
        path.chmod(0o644)
    name = containers.run("injected", *sidecar["args"], options=(
        "--volume", f"{credentials}:/etc/kube:ro", "--env", "KUBECONFIG=/etc/kube/config",
        *(f"--env={key}={value}" for key, value in env.items())))
    wait_for(f"http://127.0.0.1:{admin}/ready", name)
    # The postStart hook that holds the app until the proxy is ready, run inside the image as the kubelet runs it.
    probe = [arg.replace(":15000/", f":{admin}/") for arg in sidecar["lifecycle"]["postStart"]["exec"]["command"]]
    result = podman("exec", name, *probe, check=False)
    assert result.returncode == 0, result.stderr
    logs = podman("logs", name).stderr
    assert "configuration version" in logs and "published" in logs, logs
    assert get(f"http://127.0.0.1:{outbound}/", {"host": "no-such-service:8000"})[0] == 404


def test_the_capture_role_installs_its_rules_with_net_admin_and_net_raw_only(image):
    # --network=none: a network namespace of the container's own, as a pod's; the rules die with it.
    capture = ("--rm", *PODMAN_RUN_FLAGS, *READ_ONLY, "--network=none", "--user", "0", "--cap-drop", "ALL")
    script = "laneproxy capture --apply --inbound-ports 8000 > /dev/null && iptables-save -t nat"
    result = podman("run", *capture, "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", "--entrypoint", "/bin/sh",
                    image, "-c", script)
    assert "-A LANEPROXY_OUTPUT -m owner --uid-owner 1337 -j RETURN" in result.stdout
    assert "-A LANEPROXY_INBOUND -p tcp -m tcp --dport 8000 -j LANEPROXY_IN_REDIRECT" in result.stdout
    refused = podman("run", *capture, image, "capture", "--apply", check=False)
    assert refused.returncode == 1 and "iptables-restore failed" in refused.stderr


def test_the_webhook_role_serves_tls_from_mounted_files(containers, tmp_path):
    tls = make_tls(tmp_path / "tls", "IP:127.0.0.1")
    tls.cert.parent.chmod(0o755)
    for path in (tls.cert, tls.key):
        path.chmod(0o644)  # a Secret volume's files are readable by the pod's uid
    port = free_port()
    name = containers.run("webhook", "webhook", "--listen", f"127.0.0.1:{port}", "--cert", "/tls/tls.crt",
                          "--key", "/tls/tls.key", options=("--volume", f"{tls.cert.parent}:/tls:ro"))
    context = ssl.create_default_context(cafile=str(tls.ca))
    wait_for(f"https://127.0.0.1:{port}/ready", name, context=context)
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "1", "kind": {"kind": "Pod"}, "operation": "CREATE",
                          "object": {"metadata": {"labels": {"app": "mocka"}},
                                     "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8000}]}]}}}}
    request = urllib.request.Request(f"https://127.0.0.1:{port}/inject", data=json.dumps(review).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["response"]["allowed"] is True and answer["response"]["patchType"] == "JSONPatch"


def test_podman_leaves_no_network_of_its_own_behind():
    # Every container above shared the host's namespace or had none: podman created no bridge or rules.
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert set(networks) <= {"podman"}, networks
    assert not any(name.startswith("cni-podman") for name in os.listdir("/sys/class/net"))


# compose.yaml, run as Docker would run it, without Docker ------------------------------------------------------


class ComposeChain:
    """compose.yaml's services as podman containers, each container (or shared pair) in a network namespace the
    test creates, joined by a bridge in another; container names resolve through --add-host as Docker's DNS
    would resolve them. Image, command, environment, user, read-only root, dropped capabilities, volumes and
    network_mode come from the compose file."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.tag = f"{os.getpid() % 100000}"
        self.switch = f"lpco-sw-{self.tag}"
        self.namespaces: dict[str, str] = {}  # service -> network namespace
        self.addresses: dict[str, str] = {}
        self.containers: list[str] = []
        self.services = yaml.safe_load((_REPO / "compose.yaml").read_text())["services"]

    def ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"

    def start(self) -> ComposeChain:
        self.ip("netns", "add", self.switch)
        self.ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.switch, "link", "set", "br0", "up")
        own = [name for name, service in self.services.items() if "network_mode" not in service]
        for index, name in enumerate(own):
            namespace = f"lpco-{index}-{self.tag}"
            self.ip("netns", "add", namespace)
            self.namespaces[name] = namespace
            self.addresses[name] = f"10.98.0.{10 + index}"
            self.ip("-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{index}", "netns",
                    self.switch)
            self.ip("-n", self.switch, "link", "set", f"port{index}", "master", "br0", "up")
            self.ip("-n", namespace, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
            self.ip("-n", namespace, "link", "set", "eth0", "up")
            self.ip("-n", namespace, "link", "set", "lo", "up")
        for name, service in self.services.items():
            shared = service.get("network_mode", "").removeprefix("service:")
            namespace = self.namespaces[shared or name]
            options = [*PODMAN_RUN_FLAGS, "--network", f"ns:/run/netns/{namespace}"]
            options += [f"--add-host={host}:{address}" for host, address in self.addresses.items()]
            if service.get("read_only"):
                options += list(READ_ONLY)
            if "user" in service:
                options += ["--user", service["user"]]
            options += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
            options += [f"--security-opt={opt}" for opt in service.get("security_opt", [])]
            for volume in service.get("volumes", []):
                source, target, mode = volume.split(":")
                options += ["--volume", f"{(_REPO / source).resolve()}:{target}:{mode}"]
            options += [f"--env={key}={value}" for key, value in (service.get("environment") or {}).items()]
            container = f"lpco-{name}-{self.tag}"
            podman("run", "--detach", "--name", container, *options, self.image, *service["command"])
            self.containers.append(container)
        return self

    def get(self, url: str, headers: dict) -> tuple[int, str]:
        """A request from inside the gateway's namespace (compose publishes the port on 127.0.0.1)."""
        client = ("import json, sys, urllib.request\n"
                  "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
                  "try:\n"
                  " r = o.open(urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2])), timeout=10)\n"
                  " print(json.dumps([r.status, r.read().decode()]))\n"
                  "except OSError as e:\n print(json.dumps([getattr(e, 'code', 0), str(e)]))")
        result = subprocess.run(["ip", "netns", "exec", self.namespaces["gateway"], sys.executable, "-c", client, url,
                                 json.dumps(headers)], capture_output=True, text=True, timeout=30)
        return tuple(json.loads(result.stdout))

    def wait_ready(self, timeout: float = 60) -> None:
        """Every proxy's admin /ready and every app's port, inside each namespace (before any traffic: early
        connection failures would eject endpoints for 30 seconds)."""
        check = ("import socket, sys, urllib.request\n"
                 "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
                 "o.open('http://127.0.0.1:15000/ready', timeout=1)\n"
                 "if sys.argv[1] == 'app': socket.create_connection(('127.0.0.1', 8000), timeout=1).close()")
        deadline = time.monotonic() + timeout
        for name, namespace in self.namespaces.items():
            role = "gateway" if name == "gateway" else "app"
            while subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", check, role],
                                 capture_output=True, timeout=30).returncode != 0:
                assert time.monotonic() < deadline, f"{name} never became ready\n{self.logs()}"
                time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {c}\n{podman('logs', c, check=False).stderr[-2000:]}" for c in self.containers)

    def stop(self) -> None:
        for container in self.containers:
            podman("rm", "--force", "--time", "5", container, check=False)
        for namespace in [*self.namespaces.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def test_the_compose_chain_routes_each_lane_end_to_end(image):
    if os.geteuid() != 0:
        pytest.fail("the compose test creates network namespaces: run it as root")
    chain = ComposeChain(image)
    try:
        chain.start()
        chain.wait_ready()
        gateway = "http://127.0.0.1:8080/mock"
        canary = {"x-asm-prefer-tag": "canary", "my-request-id": "10002"}
        chain_of = ("mocka(version: {}, ip: 127.0.0.1)-> mockb(version: {}, ip: 127.0.0.1)-> "
                    "mockc(version: {}, ip: 127.0.0.1)")
        assert chain.get(gateway, canary) == (200, chain_of.format("v2", "v1", "v2"))
        assert chain.get(gateway, {"x-asm-prefer-tag": "base", "my-request-id": "10001"}) == \
            (200, chain_of.format("v1", "v1", "v1"))
        assert chain.get(gateway, {"my-request-id": "10003"}) == (200, chain_of.format("v1", "v1", "v1"))
    finally:
        chain.stop()
