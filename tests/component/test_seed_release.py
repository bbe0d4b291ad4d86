"""The seed's release gesture in a cluster with the laneproxy image's mock role: `kubectl set env
deployment/mocka-v1 version=v2` changes what the app reports, as the seed's image patch to go-http-sample:2.0 does.

Reads the seed Deployments in deploy/examples/seed, applies the gesture to each pod template as kubectl
would (the env entry `version` replaced), and runs the container's own arguments as a real process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from laneproxy.demo import free_port

APPS = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "seed" / "apps.yaml"
DEPLOYMENTS = [doc for doc in yaml.safe_load_all(APPS.read_text()) if doc and doc["kind"] == "Deployment"]


def set_env(container: dict, name: str, value: str) -> None:
    """`kubectl set env`: replace the variable's value in the pod template."""
    entries = container["env"]
    assert [entry["name"] for entry in entries].count(name) == 1, f"{name} is not set once in {container['name']}"
    next(entry for entry in entries if entry["name"] == name)["value"] = value


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["metadata"]["name"])
def test_setting_the_version_variable_on_a_seed_deployment_changes_the_version_its_app_reports(deployment):
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "default"]
    assert container["args"][0] == "mock"
    set_env(container, "version", "v2")
    port = free_port()
    args = [f"127.0.0.1:{port}" if arg.startswith("0.0.0.0:") else arg for arg in container["args"]]
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env.update({entry["name"]: entry["value"] for entry in container["env"]})
    env["upstream_url"] = ""  # the next hop's Service name resolves only in the cluster: answer alone
    process = subprocess.Popen([sys.executable, "-m", "laneproxy", *args], env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"http://127.0.0.1:{port}/", timeout=2) as response:
                    body = response.read().decode()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the mock did not start"
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=10)
    app = deployment["spec"]["template"]["metadata"]["labels"]["app"]
    assert body == f"{app}(version: v2, ip: 127.0.0.1)"
