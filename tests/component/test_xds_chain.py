"""The seed's full chain with every proxy on `--source xds://`: two real `laneproxy controller` replicas on
the file source, the gateway and five app+sidecar pairs as `laneproxy demo` starts them, the mock apps.

Lanes and fallback are those of the file source; an endpoints-file change reaches every sidecar through the
controller; with one replica killed the sidecars move to the other, with both gone they keep serving their
last table, and a controller started again where it was is followed to the next change. A sidecar that
starts before any controller answers is not ready until the first full snapshot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from laneproxy.demo import DemoCluster, free_port
from proxyrig import stop_process
from xdsrig import SWIMLANES, ControllerProcess, wait_for, write_endpoints

BASE_CHAIN = "mocka(version: v1, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v1, ip: 127.0.0.1)"
CANARY_CHAIN = "mocka(version: v2, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v2, ip: 127.0.0.1)"
CANARY_WITHOUT_MOCKC = "mocka(version: v2, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v1, ip: 127.0.0.1)"


def get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def stats(admin_port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as response:
        return dict(line.split(": ", 1) for line in response.read().decode().splitlines() if ": " in line)


@pytest.fixture
def xds_chain(tmp_path):
    cluster = DemoCluster(log_level="warning", workdir=tmp_path)
    cluster.write_endpoints()  # the ports are the cluster's own: the controllers read them before any proxy starts
    controllers = [ControllerProcess(SWIMLANES, cluster.endpoints_file).start() for _ in range(2)]
    source = "xds://" + ",".join(f"127.0.0.1:{c.xds_port}" for c in controllers)
    cluster.proxy_args = ("--source", source)
    cluster.start()
    try:
        yield cluster, controllers
    finally:
        cluster.stop()
        for controller in controllers:
            controller.stop()


def controller_of(admin_port: int) -> str:
    return stats(admin_port)["laneproxy.config.sync.xds.controller"].strip('"')


def admin_ports(cluster: DemoCluster) -> list[int]:
    return [cluster.gateway_admin_port, *(pod.admin_port for pod in cluster.pods)]


def test_the_chain_on_xds_takes_the_lanes_the_files_give_and_follows_the_controllers_through_their_loss(xds_chain):
    cluster, (first, second) = xds_chain
    mock = cluster.gateway_url + "/mock"
    assert get(mock, {"x-asm-prefer-tag": "base", "my-request-id": "x1"}) == (200, BASE_CHAIN)
    assert get(mock, {"x-asm-prefer-tag": "canary", "my-request-id": "x2"}) == (200, CANARY_CHAIN)
    assert get(mock, {"my-request-id": "x3"}) == (200, BASE_CHAIN)
    for port in admin_ports(cluster):
        numbers = stats(port)
        assert numbers["laneproxy.config.xds.connected"] == "1"
        assert numbers.get("laneproxy.config.xds.nacks.Cluster", "0") == "0"
        assert "laneproxy.config.xds.seconds_since_update.ClusterLoadAssignment" in numbers
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.pods[0].admin_port}/stats/prometheus", timeout=5) as response:
        exposition = response.read().decode()
    assert "laneproxy_config_xds_connected{} 1" in exposition
    assert 'laneproxy_config_xds_seconds_since_update{type="SwimLaneGroup"}' in exposition
    assert 'laneproxy_config_sync_info{resource="xds.controller"' in exposition

    # An endpoints-file change: mockc's canary pod leaves; the canary chain falls back to mockc v1 for that hop.
    canary_mockc = next(p for p in cluster.pods if p.app == "mockc" and p.lane == "canary")
    changed_at = time.monotonic()
    cluster.write_endpoints([p for p in cluster.pods if p is not canary_mockc])
    wait_for(lambda: get(mock, {"x-asm-prefer-tag": "canary", "my-request-id": f"y{time.monotonic()}"})
               == (200, CANARY_WITHOUT_MOCKC), "the change followed", timeout=10)
    print(f"endpoints change followed through the controller in {time.monotonic() - changed_at:.2f}s")

    # One replica killed: every proxy keeps serving, and those that followed it move to the other.
    first.stop()
    for index in range(30):
        assert get(mock, {"x-asm-prefer-tag": "base", "my-request-id": f"a{index}"}) == (200, BASE_CHAIN)
    on_second = f"connected 127.0.0.1:{second.xds_port}"
    try:
        wait_for(lambda: all(controller_of(port) == on_second for port in admin_ports(cluster)),
                   "every proxy on the second replica", timeout=20)
    except TimeoutError:
        raise AssertionError(f"not all on {on_second}: {[controller_of(port) for port in admin_ports(cluster)]}") from None
    # They came with the versions they hold, equal on both replicas: the second sent them nothing again.
    sent = second.stats()
    assert sent["controller.xds.streams_connected"] == len(admin_ports(cluster))
    assert [sent[f"controller.xds.{kind}.resources_sent"] for kind in ("cluster", "cluster_load_assignment",
                                                                         "swimlane_group")] == [0, 0, 0]

    # Both gone: the last table keeps serving, the proxies say they are not connected, and stay ready.
    second.stop()
    for index in range(30):
        lane = ("base", "canary")[index % 2]
        expected = BASE_CHAIN if lane == "base" else CANARY_WITHOUT_MOCKC
        assert get(mock, {"x-asm-prefer-tag": lane, "my-request-id": f"b{index}"}) == (200, expected)
    wait_for(lambda: all(stats(port)["laneproxy.config.xds.connected"] == "0" for port in admin_ports(cluster)),
               "every proxy disconnected")
    assert all(urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200
               for port in admin_ports(cluster))

    # mockc's canary comes back while no controller runs; a controller started again where the first was is
    # found, and the change it serves is followed.
    cluster.write_endpoints()
    restarted = ControllerProcess(SWIMLANES, cluster.endpoints_file, xds_port=first.xds_port).start()
    try:
        wait_for(lambda: get(mock, {"x-asm-prefer-tag": "canary", "my-request-id": f"z{time.monotonic()}"})
                   == (200, CANARY_CHAIN), "the change followed after the restart", timeout=30)
        wait_for(lambda: all(stats(port)["laneproxy.config.xds.connected"] == "1" for port in admin_ports(cluster)),
                   "every proxy connected again", timeout=30)
    finally:
        restarted.stop()


def test_a_controller_that_stops_answering_without_closing_is_left_for_the_other_within_a_minute(xds_chain):
    """A frozen process (SIGSTOP: a hung controller, or a node gone without a FIN) keeps its connections open
    and answers nothing; only the stream's keepalive pings notice it. The proxies keep serving meanwhile."""
    cluster, (first, second) = xds_chain
    mock = cluster.gateway_url + "/mock"
    on_first = f"connected 127.0.0.1:{first.xds_port}"
    assert all(controller_of(port) == on_first for port in admin_ports(cluster))
    os.kill(first.process.pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        canary_mockc = next(p for p in cluster.pods if p.app == "mockc" and p.lane == "canary")
        cluster.write_endpoints([p for p in cluster.pods if p is not canary_mockc])
        assert get(mock, {"x-asm-prefer-tag": "canary", "my-request-id": "f0"}) == (200, CANARY_CHAIN)
        wait_for(lambda: get(mock, {"x-asm-prefer-tag": "canary", "my-request-id": f"f{time.monotonic()}"})
                   == (200, CANARY_WITHOUT_MOCKC), "the change followed through the other replica", timeout=75)
        on_second = f"connected 127.0.0.1:{second.xds_port}"
        wait_for(lambda: all(controller_of(port) == on_second for port in admin_ports(cluster)),
                   "every proxy on the second replica", timeout=30)
        print(f"a frozen controller left for the other in {time.monotonic() - frozen_at:.1f}s")
    finally:
        os.kill(first.process.pid, signal.SIGCONT)


def test_a_sidecar_started_before_its_controller_is_not_ready_until_the_first_full_snapshot(tmp_path):
    xds_port, admin_port = free_port(), free_port()
    sidecar = subprocess.Popen([sys.executable, "-m", "laneproxy", "--log-level", "warning", "run", "--admin",
                                f"127.0.0.1:{admin_port}", "--outbound", f"127.0.0.1:{free_port()}",
                                "--source", f"xds://127.0.0.1:{xds_port}"], stdin=subprocess.DEVNULL)
    controller = None
    try:
        wait_for(lambda: ready_status(admin_port) == 503, "the admin port answering")
        time.sleep(1.0)  # reconnection attempts against nothing: still not ready
        assert ready_status(admin_port) == 503 and sidecar.poll() is None
        endpoints = write_endpoints(tmp_path / "endpoints.yaml", {"mocka": {"base": ["127.0.0.1:1"]}})
        controller = ControllerProcess(SWIMLANES, endpoints, xds_port=xds_port).start()
        wait_for(lambda: ready_status(admin_port) == 200, "ready once the controller answered", timeout=30)
        numbers = stats(admin_port)
        assert numbers["laneproxy.config.sync.xds.ClusterLoadAssignment"].strip('"') == "current"
    finally:
        stop_process(sidecar)
        if controller is not None:
            controller.stop()


def ready_status(admin_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None
