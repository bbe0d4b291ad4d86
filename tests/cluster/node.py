"""A real single-node Kubernetes 1.20 on this machine, for the cluster tier.

Owns the node's lifecycle: the binaries (built once by tests/kube/build_cluster.sh into the cache), the
addresses, the configuration of every component, their start in dependency order, the DNS sync, and the
teardown that puts the host back as it was (tests/cluster/hoststate.py records and checks that).

Components: etcd and kube-apiserver (tests/kube/apiserver.py, listening on the node address), containerd 1.6
from Debian (cgroupfs, `restrict_oom_score_adj` because root here lacks CAP_SYS_RESOURCE, its own root, state and
socket under WORKDIR), the CNI bridge and host-local plugins, kubelet, kube-proxy (iptables mode),
kube-controller-manager, kube-scheduler, and dnsmasq serving `<svc>.<ns>.svc.cluster.local` from a hosts file the
test process rewrites from the Services (Debian has no CoreDNS).

Addresses come from 198.18.0.0/15 (reserved for benchmarking, RFC 2544), never a private range: the node's
address sits on `lo` (the kernel here has no dummy device), pods get 198.18.0.0/24 on a bridge and a route to
198.18.0.0/15 only (no default route), Services 198.19.0.0/24. A LANEPROXY-CLUSTER chain drops forwarding of
those ranges off the machine and counts any packet to 169.254.0.0/16 (the cloud metadata address, which kubelet's
cloud code would probe) or of the cluster's ranges leaving through a non-local interface: both counts must stay 0.

One cluster per machine: callers hold LOCK_PATH. WORKDIR is fixed so that a session killed without its teardown
is cleaned up by the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster import hoststate
from tests.kube.apiserver import ADMIN_USER, KubeApiServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_SCRIPT = REPO / "tests" / "kube" / "build_cluster.sh"
CACHE_DIR = Path(os.environ.get("LANEPROXY_CACHE_DIR") or Path.home() / ".cache" / "laneproxy")
K8S_VERSION = "1.20.2"

WORKDIR = Path("/var/lib/laneproxy-cluster")
# Machine-wide, whatever the cache directory: one cluster per machine even when a run uses its own cache (a cold
# run beside warm ones), and a checkout's image build cannot swap another's tag between build and import.
LOCK_DIR = Path("/run/lock")
LOCK_PATH = LOCK_DIR / "laneproxy-cluster.lock"
LOGS_DIR = CACHE_DIR / "cluster-logs"  # the last run's component logs
NODE_NAME = "laneproxy-node"
NODE_IP = "198.19.255.1"
CLUSTER_RANGE = "198.18.0.0/15"
POD_CIDR = "198.18.0.0/24"
POD_GATEWAY = "198.18.0.1"
SERVICE_CIDR = "198.19.0.0/24"
BRIDGE = "lpcni0"
CHAIN = "LANEPROXY-CLUSTER"
METADATA_RANGE = "169.254.0.0/16"
# Directories the components create at fixed places whatever their configuration (containerd's shim sockets,
# kubelet's container logs, CRI's network namespaces, libcni's result cache): removed at teardown when the
# cluster created them.
NETNS_DIR = Path("/var/run/netns")
POD_LOGS = Path("/var/log/pods")
FIXED_PATHS = (Path("/run/containerd"), POD_LOGS, Path("/var/log/containers"), NETNS_DIR,
               Path("/var/lib/cni"), Path("/var/lib/kubelet"), Path("/etc/cni"), Path("/opt/cni"))


class ClusterError(RuntimeError):
    """The cluster could not be built, started, reached, or torn down cleanly."""


def ensure_built() -> Path:
    """The cache directory with bin/ and the pause image, building it first (about 5 minutes on 2 cores)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    log = CACHE_DIR / "build_cluster.log"
    with open(CACHE_DIR / "cluster_build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(log, "a") as stderr:
            result = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    check=False, timeout=3600)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ClusterError(f"{BUILD_SCRIPT} failed (exit {result.returncode}); {log}:\n{tail}")
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class Cluster:
    """Start with start(), stop with stop() (idempotent, also after a failed start)."""

    cache: Path
    image: str = ""  # the project's image once imported (conftest)
    timings: dict[str, float] = field(default_factory=dict)
    api: KubeApiServer | None = None
    _processes: list[_Process] = field(default_factory=list)
    _sysctls: dict[str, str] = field(default_factory=dict)
    _before: hoststate.Footprint | None = None
    _netns_before: frozenset[str] = frozenset()
    _ports_seen: set[str] = field(default_factory=set)
    _dns_stop: threading.Event = field(default_factory=threading.Event)
    _dns_thread: threading.Thread | None = None
    _added_lo_address: bool = False
    _pod_logs_before: frozenset[str] = frozenset()
    _paths_before: frozenset[Path] = frozenset()

    # -- paths and clients --------------------------------------------------------------------------------------

    def bin(self, name: str) -> str:
        return str(self.cache / "bin" / name)

    @property
    def kubeconfig(self) -> Path:
        return WORKDIR / "kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return WORKDIR / "containerd" / "containerd.sock"

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        """The cluster's own kubectl (1.20, matching the server)."""
        result = subprocess.run([self.bin("kubectl"), f"--kubeconfig={self.kubeconfig}", *args], input=stdin,
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ClusterError(f"ctr {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def stop_apiserver(self) -> None:
        """kube-apiserver stopped (etcd and every other component keep running): what the proxies must ride out."""
        if self.api is None:
            raise ClusterError("the cluster has no API server")
        self.api.stop_apiserver()

    def start_apiserver(self) -> None:
        """kube-apiserver started again as it was (same address, port, certificates, etcd), and serving."""
        if self.api is None:
            raise ClusterError("the cluster has no API server")
        self.api.start_apiserver_again()

    def import_image(self, archive: Path) -> None:
        """Import an image archive (OCI or docker-archive) into the namespace kubelet's pods use."""
        self.ctr("images", "import", str(archive))

    def firewall_counts(self) -> dict[str, int]:
        """Packets counted by the LANEPROXY-CLUSTER rules, by rule comment."""
        counts: dict[str, int] = {}
        for table in ("filter", "mangle"):
            out = subprocess.run(["iptables", "-t", table, "-L", CHAIN, "-v", "-x", "-n"], capture_output=True,
                                 text=True, check=False).stdout
            for line in out.splitlines():
                if "/*" in line:
                    comment = line.split("/*", 1)[1].split("*/", 1)[0].strip()
                    counts[comment] = counts.get(comment, 0) + int(line.split()[0])
        return counts

    def component_logs(self) -> dict[str, Path]:
        logs = {p.name: p.log for p in self._processes}
        if self.api is not None:
            logs.update({name: self.api.workdir / f"{name}.log" for name in ("etcd", "kube-apiserver")})
        return logs

    def diagnose(self, *namespaces: str) -> str:
        """The pods of these namespaces, their recent events and the last log lines of every container (and of
        its previous run), for a failure message: the cluster is gone by the time anyone reads it."""
        parts = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout]
        for namespace in namespaces:
            parts.append(self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp",
                                      check=False).stdout[-3000:])
            for pod in self.get_json("pods", "-n", namespace)["items"]:
                spec = pod["spec"]
                for container in spec.get("initContainers", []) + spec["containers"]:
                    for previous in ("--previous=false", "--previous=true"):
                        out = self.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "-c",
                                           container["name"], previous, "--tail=15", check=False)
                        if out.stdout.strip():
                            parts.append(f"--- {namespace}/{pod['metadata']['name']}/{container['name']} "
                                         f"{previous}:\n{out.stdout}")
        return "\n".join(parts)

    def rss_mib(self) -> float:
        """Resident memory of the node's processes (control plane, runtime, shims and pods), in MiB."""
        total = 0
        for pid in _descendants_of_marker(str(WORKDIR)) | {p.popen.pid for p in self._processes} | self._api_pids():
            try:
                for line in Path("/proc", str(pid), "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def _api_pids(self) -> set[int]:
        if self.api is None:
            return set()
        return {p.popen.pid for p in self.api._processes}  # noqa: SLF001 - the tier reads its own child's pids

    # -- start --------------------------------------------------------------------------------------------------

    def start(self) -> Cluster:
        started = time.monotonic()
        cleanup_stale()
        self._sysctls = hoststate.read_sysctls()
        self._netns_before = hoststate.netns_now()
        self._pod_logs_before = frozenset(os.listdir(POD_LOGS)) if POD_LOGS.is_dir() else frozenset()
        self._paths_before = frozenset(p for p in FIXED_PATHS if p.exists())
        self._before = hoststate.footprint(WORKDIR, BRIDGE, self._netns_before, frozenset())
        try:
            WORKDIR.mkdir(parents=True)
            self._network()
            self._control_plane()
            self._containerd()
            self._node()
            self._wait_ready()
        except BaseException:
            self.stop(check=False)
            raise
        self.timings["start_s"] = time.monotonic() - started
        return self

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> _Process:
        log = WORKDIR / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=WORKDIR, start_new_session=True, env={**os.environ, **(env or {})})
        proc = _Process(name, popen, log)
        self._processes.append(proc)
        return proc

    def _network(self) -> None:
        addresses = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True,
                                   check=True).stdout
        if f" {NODE_IP}/" not in addresses:
            _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
            self._added_lo_address = True
        # Our chain: count what must never happen, and drop forwarding of the cluster's ranges off the machine.
        for table in ("filter", "mangle"):
            _run("iptables", "-t", table, "-N", CHAIN)
        _run("iptables", "-t", "filter", "-I", "FORWARD", "1", "-j", CHAIN)
        for direction in ("-s", "-d"):
            _run("iptables", "-t", "filter", "-A", CHAIN, direction, CLUSTER_RANGE, "!", "-o", BRIDGE,
                 "-m", "comment", "--comment", f"drop-forward-off-node{direction}", "-j", "DROP")
        _run("iptables", "-t", "mangle", "-I", "POSTROUTING", "1", "-j", CHAIN)
        _run("iptables", "-t", "mangle", "-A", CHAIN, "-d", METADATA_RANGE,
             "-m", "comment", "--comment", "to-link-local", "-j", "RETURN")
        _run("iptables", "-t", "mangle", "-A", CHAIN, "-o", "lo", "-j", "RETURN")
        _run("iptables", "-t", "mangle", "-A", CHAIN, "-o", BRIDGE, "-j", "RETURN")
        for direction in ("-s", "-d"):
            _run("iptables", "-t", "mangle", "-A", CHAIN, direction, CLUSTER_RANGE,
                 "-m", "comment", "--comment", f"cluster-range-off-node{direction}", "-j", "RETURN")

    def _control_plane(self) -> None:
        began = time.monotonic()
        self.api = KubeApiServer(
            binary=self.cache / "bin" / "kube-apiserver",
            users=(),
            address=NODE_IP,
            service_cluster_ip_range=SERVICE_CIDR,
            full_cluster=True,
            extra_args=(
                # The node's name is not in any DNS: reach kubelet (logs, exec) by its address.
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--service-node-port-range=30000-32767",
            ),
        ).start()
        shutil.copy(self.api.kubeconfig_path, self.kubeconfig)
        self.timings["apiserver_s"] = time.monotonic() - began
        sa_key = self.api.workdir / "pki" / "sa.key"
        common = [f"--kubeconfig={self.kubeconfig}", "--v=1"]
        self._spawn("kube-controller-manager", [
            self.bin("kube-controller-manager"), *common,
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--port=0",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={self.api.ca_path}",
            "--use-service-account-credentials=false", "--leader-elect=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allocate-node-cidrs=false",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-route,-service",
            # Longer than the seed story's API-server outage (30 s), its restart and a lease renewal (10 s): the
            # kubelet cannot renew its lease while the API is down, and a shorter grace marks the node unknown and
            # every pod not ready the moment the API returns: Kubernetes' own reaction, not the proxies'.
            "--node-monitor-grace-period=90s", "--pod-eviction-timeout=1h",
            "--terminated-pod-gc-threshold=50",
        ])
        self._spawn("kube-scheduler", [
            self.bin("kube-scheduler"), *common,
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--port=0", "--leader-elect=false",
        ])

    def _containerd(self) -> None:
        root = WORKDIR / "containerd"
        cni = WORKDIR / "cni"
        (cni / "net.d").mkdir(parents=True)
        (cni / "net.d" / "10-laneproxy.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0",
            "name": "laneproxy-cluster",
            "plugins": [{
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": False,
                "ipMasq": False, "hairpinMode": True,
                "ipam": {
                    "type": "host-local", "dataDir": str(cni / "ipam"),
                    "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                    # The whole cluster range and nothing else: pods have no default route.
                    "routes": [{"dst": CLUSTER_RANGE}],
                },
            }],
        }, indent=2))
        pause = (self.cache / "pause.name").read_text().strip()
        config = root / "config.toml"
        root.mkdir(exist_ok=True)
        config.write_text(f"""version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / 'net.d'}"
""")
        proc = self._spawn("containerd", ["containerd", f"--config={config}"])
        _wait(lambda: self.containerd_socket.exists() and self.ctr("version", check=False).returncode == 0,
              60, "containerd", proc)
        self.import_image(self.cache / "pause.oci.tar")

    def _node(self) -> None:
        kubelet_dir = WORKDIR / "kubelet"
        kubelet_dir.mkdir()
        (WORKDIR / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        config = kubelet_dir / "config.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "clusterDNS": [NODE_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": str(WORKDIR / "resolv.conf"),
            "failSwapOn": False,
            "podCIDR": POD_CIDR,
            "maxPods": 40,
            # No eviction and no image garbage collection on a shared machine: the tests decide what runs.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "0%", "imagefs.available": "0%",
                             "nodefs.inodesFree": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
        }))
        self._spawn("kubelet", [
            self.bin("kubelet"), f"--config={config}", f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={kubelet_dir}", f"--cert-dir={kubelet_dir / 'pki'}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.containerd_socket}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1",
        ], env={"AWS_EC2_METADATA_DISABLED": "true"})
        proxy_config = WORKDIR / "kube-proxy.yaml"
        proxy_config.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "mode": "iptables",
            "bindAddress": NODE_IP,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # 0: leave the host's conntrack settings alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
        }))
        self._spawn("kube-proxy", [self.bin("kube-proxy"), f"--config={proxy_config}", "--v=1"])
        self._dns()

    def _dns(self) -> None:
        hosts = WORKDIR / "dns" / "hosts"
        hosts.parent.mkdir()
        hosts.write_text("")
        dnsmasq = self._spawn("dnsmasq", [
            shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            f"--listen-address={NODE_IP}", "--bind-interfaces",
            f"--addn-hosts={hosts}", "--local=/cluster.local/", "--domain-needed", "--log-facility=-",
            f"--pid-file={WORKDIR / 'dns' / 'dnsmasq.pid'}", "--user=root", "--cache-size=0",
        ])
        self._dns_thread = threading.Thread(target=self._sync_dns, args=(hosts, dnsmasq), name="cluster-dns",
                                            daemon=True)
        self._dns_thread.start()

    def _sync_dns(self, hosts: Path, dnsmasq: _Process) -> None:
        """Rewrite the hosts file from the Services every second, and reload dnsmasq when it changed."""
        written = ""
        while not self._dns_stop.wait(1.0):
            result = self.kubectl("get", "services", "--all-namespaces", "-o", "json", check=False, timeout=20)
            if result.returncode != 0:
                continue
            addresses: dict[str, str] = {}
            aliases: dict[str, str] = {}
            for svc in json.loads(result.stdout)["items"]:
                name = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
                ip = svc["spec"].get("clusterIP")
                if ip and ip != "None":
                    addresses[name] = ip
                elif svc["spec"].get("type") == "ExternalName":
                    aliases[name] = str(svc["spec"].get("externalName", "")).rstrip(".")
            # CoreDNS answers an ExternalName Service with a CNAME; a hosts file has none, so the alias gets the
            # address of its target directly, for targets inside the cluster (nothing else is reachable here).
            addresses.update({alias: addresses[target] for alias, target in aliases.items() if target in addresses})
            lines = [f"{ip} {name}" for name, ip in addresses.items()]
            text = "\n".join(sorted(lines)) + "\n"
            if text != written:
                hosts.write_text(text)
                written = text
                if dnsmasq.popen.poll() is None:
                    dnsmasq.popen.send_signal(signal.SIGHUP)

    def _wait_ready(self) -> None:
        def node_ready() -> bool:
            result = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False, timeout=20)
            if result.returncode != 0:
                return False
            conditions = json.loads(result.stdout)["status"].get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        _wait(node_ready, 180, "node Ready", *self._processes)

        def default_sa() -> bool:
            return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

        _wait(default_sa, 60, "the default service account", *self._processes)

    # -- stop ---------------------------------------------------------------------------------------------------

    def stop(self, check: bool = True) -> dict[str, list[str]]:
        """Tear everything down and put the host back; returns (and with check, raises on) leftovers."""
        began = time.monotonic()
        self._dns_stop.set()
        if self.api is not None and self._alive("kubelet"):
            self._delete_pods()
        ports = _bridge_ports()
        for name in ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "dnsmasq"):
            self._terminate(name)
        if self._dns_thread is not None:
            self._dns_thread.join(timeout=30)
        if self._alive("containerd"):
            self._remove_containers()
        self._terminate("containerd")
        self._keep_logs()
        if self.api is not None:
            self.api.stop()
        _kill_marked(str(WORKDIR))
        _release_host(self._netns_before, ports, self._added_lo_address)
        for entry in set(os.listdir(POD_LOGS)) - self._pod_logs_before if POD_LOGS.is_dir() else ():
            shutil.rmtree(POD_LOGS / entry, ignore_errors=True)
        for path in FIXED_PATHS:
            if path not in self._paths_before and path.exists() and not path.is_mount():
                if path == NETNS_DIR:
                    _rmdir(path)  # only when empty: other work on the machine may have added its own since
                else:
                    shutil.rmtree(path, ignore_errors=True)
        failed_sysctls = hoststate.restore_sysctls(self._sysctls)
        after = hoststate.footprint(WORKDIR, BRIDGE, self._netns_before, frozenset(ports))
        leftovers = after.leftovers(self._before) if self._before is not None else after.leftovers(after)
        if failed_sysctls:
            leftovers["sysctls"] = failed_sysctls
        changed = {k: f"{v} -> {hoststate.read_sysctls().get(k)}" for k, v in self._sysctls.items()
                   if hoststate.read_sysctls().get(k) != v}
        if changed:
            leftovers["sysctls changed"] = [f"{k}: {v}" for k, v in changed.items()]
        created = [str(p) for p in FIXED_PATHS if p.exists() and p not in self._paths_before and p != NETNS_DIR]
        if created:
            leftovers["paths"] = created
        if WORKDIR.exists():
            shutil.rmtree(WORKDIR, ignore_errors=True)
            if WORKDIR.exists():
                leftovers["workdir"] = [str(WORKDIR)]
        self._processes.clear()
        self.timings["teardown_s"] = time.monotonic() - began
        if check and leftovers:
            raise ClusterError(f"the cluster left traces on the host: {json.dumps(leftovers, indent=2)}")
        return leftovers

    def _keep_logs(self) -> None:
        """The last run's component logs survive the teardown, in LOGS_DIR."""
        if not self._processes:
            return  # stopped already
        shutil.rmtree(LOGS_DIR, ignore_errors=True)
        LOGS_DIR.mkdir(parents=True)
        for name, path in self.component_logs().items():
            if path.exists():
                shutil.copy(path, LOGS_DIR / f"{name}.log")

    def _alive(self, name: str) -> bool:
        return any(p.name == name and p.popen.poll() is None for p in self._processes)

    def _terminate(self, name: str) -> None:
        for proc in self._processes:
            if proc.name == name and proc.popen.poll() is None:
                proc.popen.terminate()
                try:
                    proc.popen.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait(timeout=10)

    def _delete_pods(self) -> None:
        """Delete every namespaced workload and wait until the runtime has no running task: kubelet then
        stops each pod's sandbox through CNI, which releases its address, veth and network namespace."""
        namespaces = self.get_json("namespaces")["items"]
        for ns in namespaces:
            name = ns["metadata"]["name"]
            if name not in ("kube-system", "kube-public", "kube-node-lease", "default"):
                self.kubectl("delete", "namespace", name, "--wait=false", check=False)
        for name in ("default", "kube-system"):
            self.kubectl("delete", "deployments,replicasets,daemonsets,statefulsets,jobs,pods", "--all", "-n", name,
                         "--wait=false", check=False)

        def drained() -> bool:
            pods = self.kubectl("get", "pods", "--all-namespaces", "-o", "name", check=False).stdout.split()
            tasks = [line for line in self.ctr("tasks", "ls", "-q", check=False).stdout.split() if line]
            return not pods and not tasks

        try:
            _wait(drained, 90, "pods and containers gone")
        except ClusterError:
            pass  # the runtime's leftovers are removed below, and whatever stays is reported by the check

    def _remove_containers(self) -> None:
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        time.sleep(0.5)
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "delete", "--force", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", container, check=False)


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def _wait(probe, timeout: float, what: str, *watched: _Process) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in watched:
            if proc.popen.poll() is not None:
                tail = "\n".join(proc.log.read_text(errors="replace").splitlines()[-30:])
                raise ClusterError(f"waiting for {what}: {proc.name} exited ({proc.popen.returncode}):\n{tail}")
        try:
            if probe():
                return
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


def _marked_pids(marker: str) -> set[int]:
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if marker in Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(pid))
            except OSError:
                continue
    return pids


def _descendants_of_marker(marker: str) -> set[int]:
    """Processes naming the work directory (containerd shims do) and everything below them (the pods)."""
    roots = _marked_pids(marker)
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = int(Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def _kill_marked(marker: str) -> None:
    for _ in range(3):
        pids = _descendants_of_marker(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _bridge_ports() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True,
                         check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _release_host(netns_before: frozenset[str], ports: Sequence[str], remove_lo_address: bool) -> None:
    """Undo what the runtime and the network plugins leave when they are stopped rather than asked to clean."""
    # Mounts under the work directory (overlay rootfs, secrets tmpfs, shm), deepest first.
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(str(WORKDIR))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for name in hoststate.netns_now() - netns_before:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
    for port in ports:
        subprocess.run(["ip", "link", "delete", port], capture_output=True, check=False)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
    if remove_lo_address:
        subprocess.run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"], capture_output=True, check=False)
    _flush_iptables()
    # kubelet's cgroups, deepest first (each is empty once the processes above are gone).
    for subsystem in Path("/sys/fs/cgroup").iterdir():
        for path in sorted(subsystem.glob("kubepods*"), key=lambda p: len(p.parts)):
            for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                _rmdir(sub)
            _rmdir(path)


def _rmdir(path: Path) -> None:
    for _ in range(10):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.2)


def _flush_iptables() -> None:
    """Remove every rule that jumps to the cluster's chains (KUBE-*, CNI-*, ours), then the chains."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            dump = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True, check=False).stdout
            chains = [line[1:].split()[0] for line in dump.splitlines()
                      if line.startswith(":") and (line[1:].startswith(("KUBE-", "CNI-", CHAIN)))]
            for line in dump.splitlines():
                if line.startswith("-A ") and any(f"-j {c}" in line or f"-g {c}" in line for c in chains):
                    chain = line.split()[1]
                    if chain not in chains:
                        subprocess.run([tool, "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True,
                                       check=False)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True, check=False)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True, check=False)


def cleanup_stale() -> None:
    """Remove what a session killed without its teardown left (the work directory is the sign of it)."""
    if not WORKDIR.exists() and not _marked_pids(str(WORKDIR)):
        return
    _kill_marked(str(WORKDIR))
    _release_host(frozenset(), _bridge_ports(), remove_lo_address=True)
    shutil.rmtree(WORKDIR, ignore_errors=True)


@contextmanager
def machine_lock() -> Iterator[None]:
    """One cluster per machine: the holder of this lock owns WORKDIR, the bridge and the node address."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
