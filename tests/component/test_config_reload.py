"""Configuration files change under a running chain: good changes swap the table, bad ones are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from laneproxy.demo import DemoCluster, free_port
from proxyrig import SWIMLANES

CANARY = "mocka(version: v2, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v2, ip: 127.0.0.1)"
CANARY_WITHOUT_MOCKC = "mocka(version: v2, ip: 127.0.0.1)-> mockb(version: v1, ip: 127.0.0.1)-> mockc(version: v1, ip: 127.0.0.1)"


def chain(cluster: DemoCluster, trace: str) -> str:
    request = urllib.request.Request(cluster.gateway_url + "/mock",
                                     headers={"x-asm-prefer-tag": "canary", "my-request-id": trace})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats?format=json") as response:
        return {row["name"]: row["value"] for row in json.load(response)["stats"] if "name" in row}


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    with DemoCluster(log_level="error") as running:
        yield running


def test_removing_a_canary_endpoint_sends_its_hop_to_base_and_adding_it_back_returns(cluster):
    assert chain(cluster, "r-1") == CANARY
    without_mockc_v2 = [p for p in cluster.pods if not (p.app == "mockc" and p.lane == "canary")]
    cluster.write_endpoints(without_mockc_v2)
    assert wait_for(lambda: chain(cluster, f"r-2-{time.monotonic()}") == CANARY_WITHOUT_MOCKC)
    cluster.write_endpoints()
    assert wait_for(lambda: chain(cluster, f"r-3-{time.monotonic()}") == CANARY)


@pytest.mark.parametrize(
    "broken",
    ["services: [unclosed", "apiVersion: laneproxy.dev/v1\nkind: LaneEndpoints\nservices:\n  default/mockc:\n    lanes: {canary: [nowhere]}\n",
     "apiVersion: laneproxy.dev/v1\nkind: LaneEndpoints\nservices:\n  default/mockc:\n    lane: {canary: [127.0.0.1:1]}\n"],
    ids=["malformed-yaml", "bad-address", "misspelled-field"],
)
def test_an_invalid_change_keeps_the_running_table_and_is_counted(cluster, broken):
    gateway_admin = cluster.gateway_admin_port
    before = stats(gateway_admin)
    with urllib.request.urlopen(cluster.gateway_admin_url + "/lanes") as response:
        version = json.load(response)["version"]
    cluster.endpoints_file.write_text(broken)
    try:
        assert wait_for(lambda: stats(gateway_admin)["laneproxy.config.update_rejected"]
                        > before["laneproxy.config.update_rejected"])
        assert chain(cluster, f"bad-{time.monotonic()}") == CANARY
        with urllib.request.urlopen(cluster.gateway_admin_url + "/lanes") as response:
            assert json.load(response)["version"] == version
    finally:
        cluster.write_endpoints()


def test_a_bad_swimlanes_file_keeps_its_last_good_version_while_the_endpoints_file_still_updates(tmp_path: Path):
    """Before: one bad file refused the whole update, so the endpoints change below never took effect."""
    swimlanes = tmp_path / "swimlanes.yaml"
    good = SWIMLANES.read_text()
    swimlanes.write_text(good)
    with DemoCluster(log_level="error", swimlanes=swimlanes) as cluster:
        gateway_admin = cluster.gateway_admin_port
        assert chain(cluster, "before") == CANARY
        swimlanes.write_text(good.replace("exact: /mock\n", "regex: /mock(\n", 1))
        assert wait_for(lambda: stats(gateway_admin).get("laneproxy.config.skipped_objects") == 1)
        without_mockc_v2 = [p for p in cluster.pods if not (p.app == "mockc" and p.lane == "canary")]
        cluster.write_endpoints(without_mockc_v2)
        assert wait_for(lambda: chain(cluster, f"kept-{time.monotonic()}") == CANARY_WITHOUT_MOCKC)
        after = stats(gateway_admin)
        assert after["laneproxy.config.object_rejected"] >= 1 and after["laneproxy.config.update_rejected"] >= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway_admin}/stats") as response:
            assert 'laneproxy.config.sync.file.swimlanes.yaml: "behind"' in response.read().decode()

        swimlanes.write_text(good)
        cluster.write_endpoints()
        assert wait_for(lambda: stats(gateway_admin).get("laneproxy.config.skipped_objects") == 0)
        assert wait_for(lambda: chain(cluster, f"fixed-{time.monotonic()}") == CANARY)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("fallbackTarget: base", "fallbackTarget: stable"),
         "ASMSwimLaneGroup(rollout).spec.permissiveModeConfiguration.fallbackTarget: unknown lane 'stable'"),
        (("    routeHeader: x-asm-prefer-tag\n", ""),
         "ASMSwimLaneGroup(rollout).spec.permissiveModeConfiguration.routeHeader: required"),
        (("exact: /mock\n      name: canary", "regex: /mock(\n      name: canary"),
         "ASMSwimLane(canary).spec.ingressRules[0].match.uri.regex: invalid regular expression '/mock('"),
        (("  name: canary\nspec:", "  name: canary\nspec:\n  bad: [unclosed"),
         ": line "),
    ],
    ids=["unknown-fallback-lane", "missing-route-header", "bad-regex", "malformed-yaml"],
)
def test_validate_names_file_field_and_reason(tmp_path: Path, edit, expected):
    config = tmp_path / "swimlanes.yaml"
    config.write_text(SWIMLANES.read_text().replace(*edit, 1))
    result = subprocess.run([sys.executable, "-m", "laneproxy", "validate", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{config}: ")
    assert expected in result.stdout


def test_validate_accepts_the_seed_manifests_and_reports_what_it_read():
    result = subprocess.run([sys.executable, "-m", "laneproxy", "validate", str(SWIMLANES)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("ok: 1 group(s), 2 lane(s), 3 service(s)")


def test_run_refuses_to_start_on_invalid_configuration(tmp_path: Path):
    config = tmp_path / "swimlanes.yaml"
    config.write_text(SWIMLANES.read_text().replace("fallbackTarget: base", "fallbackTarget: stable"))
    result = subprocess.run([sys.executable, "-m", "laneproxy", "run", "--config", str(config), "--outbound", "0",
                             "--admin", "none"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "fallbackTarget: unknown lane 'stable'" in result.stderr


def test_run_refuses_a_misspelled_field_and_with_lenient_starts_and_logs_it(tmp_path: Path):
    config = tmp_path / "swimlanes.yaml"
    config.write_text(SWIMLANES.read_text().replace("isPermissive", "isPermisive"))
    line = f"{config}: ASMSwimLaneGroup(rollout).spec.isPermisive: unknown field (did you mean isPermissive?)"
    command = [sys.executable, "-m", "laneproxy", "run", "--config", str(config), "--outbound", "0"]
    refused = subprocess.run([*command, "--admin", "none"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and line in refused.stderr

    admin = free_port()
    lenient = subprocess.Popen([*command, "--admin", f"127.0.0.1:{admin}", "--lenient"], stderr=subprocess.PIPE,
                               text=True)
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return lenient.poll() is not None  # exited: stop waiting, the assertion below says why
        assert wait_for(ready) and lenient.poll() is None
    finally:
        lenient.terminate()
        _, stderr = lenient.communicate(timeout=30)
    assert f"{line} (ignored: --lenient)" in stderr


def _endpoints_yaml(services: dict[str, dict[str, list[str]]]) -> str:
    lines = ["apiVersion: laneproxy.dev/v1", "kind: LaneEndpoints", "services:"]
    for name, lanes in services.items():
        lines += [f"  test/{name}:", "    port: 8000", "    lanes:",
                  *(f"      {lane}: [{', '.join(addresses)}]" for lane, addresses in lanes.items())]
    return "\n".join(lines) + "\n"


async def test_an_endpoints_file_change_replaces_only_the_changed_service_and_equals_a_full_load(tmp_path: Path):
    from laneproxy.control.files import FileSource, load_files
    from laneproxy.core.store import RouteTableStore

    swimlanes, endpoints = tmp_path / "swimlanes.yaml", tmp_path / "endpoints.yaml"
    swimlanes.write_text(SWIMLANES.read_text())
    services = {name: {"base": [f"127.0.0.{n + 1}:80"]} for n, name in enumerate(("mocka", "mockb", "mockc"))}
    endpoints.write_text(_endpoints_yaml(services))
    paths = (str(swimlanes), str(endpoints))
    store = RouteTableStore()
    source = FileSource(paths, store, namespace="default", interval=3600)
    await source.start()
    try:
        before = store.current
        services["mockb"]["canary"] = ["127.0.0.9:80"]
        endpoints.write_text(_endpoints_yaml(services))
        assert await source.load_once()
        after = store.current
        assert source.incremental_updates == 1
        assert after == load_files(list(paths), namespace="default").table
        assert after.routes["test/mocka"] is before.routes["test/mocka"]
        assert after.routes["test/mockc"] is before.routes["test/mockc"]
        assert "127.0.0.9:80" in [e.address for e in after.routes["test/mockb"].route_for(b"canary").endpoints]

        # A swimlane change is the full load's: the lane named in a route changes with it.
        swimlanes.write_text(SWIMLANES.read_text().replace("fallbackTarget: base", "fallbackTarget: canary"))
        assert await source.load_once()
        assert source.incremental_updates == 1
        assert store.current == load_files(list(paths), namespace="default").table
        assert store.current.groups["rollout"].fallback_target == "canary"
    finally:
        await source.stop()
