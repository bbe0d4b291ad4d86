"""What the single-node cluster changes on the host, recorded before, put back after, and checked.

Owns the list of kernel settings the node's components write (kubelet: `kernel.panic_on_oops`, `kernel.panic`,
`vm.overcommit_memory`, ...; the CNI bridge plugin: `ip_forward`; kube-proxy: `route_localnet`, conntrack), their
restoration, and the leftover check after teardown: no process, link, network namespace, mount, iptables rule or
cgroup of the cluster may remain. Only what is the cluster's own is looked at (its names, its addresses, its work
directory), because other work on the same machine may change the host at the same time.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Every setting a component of the node writes, as far as their sources and a before/after diff of all of
# /proc/sys showed; restored whatever the outcome.
SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv4/conf/lo/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/conf/default/route_localnet",
    "net/ipv4/conf/lo/route_localnet",
    "net/ipv6/conf/all/forwarding",
    "net/ipv6/conf/default/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        try:
            values[name] = Path("/proc/sys", name).read_text().strip()
        except OSError:
            continue
    return values


def restore_sysctls(saved: dict[str, str]) -> list[str]:
    """Write back every recorded value that differs now; returns the ones that could not be restored."""
    failed = []
    for name, value in saved.items():
        path = Path("/proc/sys", name)
        try:
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
        except OSError as exc:
            failed.append(f"{name}: {exc}")
    return failed


@dataclass(frozen=True)
class Footprint:
    """The cluster's own traces on the host at one moment."""

    processes: tuple[str, ...]
    links: tuple[str, ...]
    netns: tuple[str, ...]
    mounts: tuple[str, ...]
    iptables: tuple[str, ...]
    cgroups: tuple[str, ...]

    def leftovers(self, before: Footprint) -> dict[str, list[str]]:
        """What is here now and was not at `before` (the host before the cluster started), by kind."""
        found = {}
        for name, now in vars(self).items():
            new = [item for item in now if item not in set(getattr(before, name))]
            if new:
                found[name] = new
        return found


_OUR_RULE = re.compile(r"KUBE-|CNI-|LANEPROXY-CLUSTER|198\.1[89]\.")
_COUNTERS = re.compile(r" \[\d+:\d+\]$")


def footprint(workdir: Path, bridge: str, netns_before: frozenset[str], ports: frozenset[str]) -> Footprint:
    """What of the cluster is still on the host: processes using `workdir` (or its containerd's shims), the
    bridge and the veths seen on it, CNI network namespaces created since the start, mounts under `workdir`
    or of those namespaces, iptables rules with the cluster's chains or addresses, kubelet's cgroups."""
    marker = str(workdir)
    processes = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            processes.append(f"{pid} {cmdline.strip()}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    link_names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if ":" in line}
    our_links = sorted(link_names & ({bridge} | set(ports)))
    netns = sorted(set(_netns_names()) - netns_before)
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(marker) or any(point.endswith("/netns/" + name) for name in netns):
            mounts.append(point)
    rules = []
    for tool in ("iptables-save", "ip6tables-save"):
        for table in ("filter", "nat", "mangle", "raw"):
            out = subprocess.run([tool, "-t", table], capture_output=True, text=True, check=False).stdout
            rules += [f"{tool} {table}: {_COUNTERS.sub('', line)}" for line in out.splitlines()
                      if _OUR_RULE.search(line)]
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods*"))
    return Footprint(tuple(processes), tuple(our_links), tuple(netns), tuple(mounts), tuple(rules), tuple(cgroups))


def _netns_names() -> list[str]:
    try:
        return sorted(name for name in os.listdir("/var/run/netns") if name.startswith("cni-"))
    except FileNotFoundError:
        return []


def netns_now() -> frozenset[str]:
    return frozenset(_netns_names())
