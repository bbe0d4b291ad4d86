"""deploy/: every kustomization renders with `kubectl kustomize`, every manifest passes server-side dry run on the
real kube-apiserver (tests/kube), the webhook's certificate script works there, and compose.yaml describes the
seed chain with commands laneproxy accepts.

The swimlane CRDs come from deploy/crds and are installed for real first. OpenKruise's Rollout and Istio's
Gateway kinds are not laneproxy's to ship: the test installs minimal stand-in CRDs for them (open schemas),
so the seed's Rollout and Gateway objects are dry-run against their group, version and kind.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from laneproxy.cli import build_parser  # noqa: E402
from tests.image.hosttools import kubectl  # noqa: E402
from tests.kube.fixtures import kube_apiserver  # noqa: E402, F401

DEPLOY = _REPO / "deploy"
SEED = DEPLOY / "examples" / "seed"
COMPOSE = _REPO / "compose.yaml"
KUSTOMIZATIONS = sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def stand_in_crd(group: str, version: str, kind: str, plural: str) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}", "labels": {"laneproxy-test": "stand-in"}},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                     "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


STAND_IN_CRDS = [stand_in_crd("rollouts.kruise.io", "v1beta1", "Rollout", "rollouts"),
                 stand_in_crd("networking.istio.io", "v1beta1", "Gateway", "gateways"),
                 stand_in_crd("monitoring.coreos.com", "v1", "PodMonitor", "podmonitors")]


def render(directory: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# Rendering --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_kustomization_renders(directory):
    assert render(directory)


def test_the_seed_overlay_is_the_whole_scenario_on_the_laneproxy_base():
    kinds: dict[str, list[str]] = {}
    for doc in render(SEED):
        kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert sorted(kinds["Deployment"]) == ["ingressgateway", "laneproxy-controller", "laneproxy-webhook", "mocka-v1",
                                           "mockb-v1", "mockc-v1"]
    assert sorted(kinds["Service"]) == ["ingressgateway", "laneproxy-controller", "laneproxy-webhook", "mocka",
                                        "mockb", "mockc"]
    assert sorted(kinds["Rollout"]) == ["rollouts-mocka", "rollouts-mockb", "rollouts-mockc"]
    assert kinds["Gateway"] == ["ingressgateway"] and kinds["ASMSwimLaneGroup"] == ["rollout"]
    assert sorted(kinds["ASMSwimLane"]) == ["base", "canary"]
    assert kinds["MutatingWebhookConfiguration"] == ["laneproxy"]
    assert len(kinds["CustomResourceDefinition"]) == 2 and "ClusterRole" in kinds


def test_every_manifest_in_deploy_belongs_to_a_kustomization():
    listed = set()
    for directory in KUSTOMIZATIONS:
        for entry in yaml.safe_load((directory / "kustomization.yaml").read_text()).get("resources", []):
            listed.add((directory / entry).resolve())
    manifests = {path.resolve() for path in DEPLOY.rglob("*.yaml")
                 if path.name != "kustomization.yaml" and "compose" not in path.parts}
    assert manifests - listed == set()


def test_the_seed_swimlanes_are_the_ones_in_config():
    assert documents(SEED / "swimlanes.yaml") == documents(_REPO / "config" / "swimlanes.yaml")


def test_an_overlay_changing_the_image_changes_the_image_the_webhook_injects(tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    kustomization = copy / "examples" / "seed" / "kustomization.yaml"
    text = kustomization.read_text().replace("newName: laneproxy ", "newName: registry.example.com/laneproxy ")
    kustomization.write_text(text.replace("newTag: 0.1.0", "newTag: 9.9.9"))
    webhook = next(d for d in render(copy / "examples" / "seed") if d["metadata"]["name"] == "laneproxy-webhook"
                   and d["kind"] == "Deployment")
    container = webhook["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == env["LANEPROXY_SIDECAR_IMAGE"] == "registry.example.com/laneproxy:9.9.9"


# Server-side dry run -------------------------------------------------------------------------------------------


def _kubectl(kube, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([kubectl(), "--kubeconfig", str(kube.kubeconfig_path), *args], input=stdin,
                            capture_output=True, text=True, timeout=180, check=False)
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def cluster_with_crds(kube_apiserver):
    """The API server with deploy/crds, the stand-in CRDs and the namespaces of deploy/ really created."""
    kube = kube_apiserver
    _kubectl(kube, "apply", "-k", str(DEPLOY / "crds"))
    _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(STAND_IN_CRDS))
    names = [f"crd/{d['metadata']['name']}" for d in [*render(DEPLOY / "crds"), *STAND_IN_CRDS]]
    _kubectl(kube, "wait", "--for", "condition=established", "--timeout", "60s", *names)
    namespaces = [d for d in render(DEPLOY / "base") if d["kind"] == "Namespace"]
    _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(namespaces))
    yield kube
    _kubectl(kube, "delete", "namespace", *(d["metadata"]["name"] for d in namespaces), "--wait=false", check=False)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_passes_server_side_dry_run(cluster_with_crds, directory):
    rendered = _kubectl(cluster_with_crds, "kustomize", str(directory)).stdout
    served = _kubectl(cluster_with_crds, "api-versions").stdout.split()
    if "policy/v1" not in served:  # what deploy/apply.sh does on a server older than 1.21 (the test's is 1.20)
        rendered = rendered.replace("apiVersion: policy/v1\n", "apiVersion: policy/v1beta1\n")
    result = _kubectl(cluster_with_crds, "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=rendered)
    print(result.stdout)
    assert "(server dry run)" in result.stdout


def test_the_gateway_runs_two_spread_replicas_that_a_disruption_or_a_rollout_never_takes_both_of():
    objects = render(DEPLOY / "base" / "gateway")
    deployment = next(d for d in objects if d["kind"] == "Deployment")
    budget = next(d for d in objects if d["kind"] == "PodDisruptionBudget")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)


CONTROLLER_SOURCE = "xds://laneproxy-controller.laneproxy-system.svc:15010"


def test_the_controller_runs_two_spread_replicas_behind_the_xds_service_the_proxies_dial():
    objects = {(d["kind"], d["metadata"]["name"]): d for d in render(DEPLOY / "base")}
    deployment = objects[("Deployment", "laneproxy-controller")]
    service = objects[("Service", "laneproxy-controller")]
    budget = objects[("PodDisruptionBudget", "laneproxy-controller")]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["metadata"]["namespace"] == service["metadata"]["namespace"] == "laneproxy-system"
    assert deployment["spec"]["replicas"] == 2 and budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["laneproxy-injection"] == "disabled"
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["args"][:3] == ["controller", "--source", "kubernetes"]
    args = build_parser().parse_args(container["args"])  # laneproxy accepts the command line
    assert (args.command, args.source, args.pods) == ("controller", "kubernetes", "metadata")
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-monitoring"}
    assert {"name": "http-monitoring", "containerPort": 15014, "protocol": "TCP"} in container["ports"]
    assert set(container["resources"]) == {"requests", "limits"}
    gateway = objects[("Deployment", "ingressgateway")]["spec"]["template"]["spec"]
    assert pod["spec"]["securityContext"] == gateway["securityContext"]
    assert container["securityContext"] == gateway["containers"][0]["securityContext"]
    assert pod["spec"]["serviceAccountName"] == "laneproxy-controller"
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["appProtocol"]) == ("grpc-xds", 15010, "grpc")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {"name": "grpc-xds", "containerPort": 15010, "protocol": "TCP"} in container["ports"]
    # The address in the proxies' source is this Service's.
    host, _, number = CONTROLLER_SOURCE.removeprefix("xds://").rpartition(":")
    assert (host, int(number)) == (f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc",
                                   port["port"])


def test_the_controllers_role_reads_exactly_the_lane_inputs_and_writes_only_swimlane_status():
    objects = {(d["kind"], d["metadata"]["name"]): d for d in render(DEPLOY / "base" / "controller")}
    rules = {(group, resource): sorted(rule["verbs"]) for rule in objects[("ClusterRole", "laneproxy-controller")]
             ["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    read = ["get", "list", "watch"]
    assert rules == {("istio.alibabacloud.com", "asmswimlanegroups"): read,
                     ("istio.alibabacloud.com", "asmswimlanes"): read,
                     ("istio.alibabacloud.com", "asmswimlanegroups/status"): ["get", "patch"],
                     ("istio.alibabacloud.com", "asmswimlanes/status"): ["get", "patch"],
                     ("", "services"): read, ("", "pods"): read, ("discovery.k8s.io", "endpointslices"): read}
    binding = objects[("ClusterRoleBinding", "laneproxy-controller")]
    assert binding["roleRef"]["name"] == "laneproxy-controller"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "laneproxy-controller",
                                    "namespace": "laneproxy-system"}]


def test_the_gateway_and_injected_sidecars_use_the_controller_and_hold_no_api_credentials():
    rendered = render(SEED)
    objects = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in rendered}
    gateway = objects[("Deployment", "istio-system", "ingressgateway")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in gateway["containers"][0]["env"]}
    assert env["LANEPROXY_SOURCE"] == CONTROLLER_SOURCE
    assert gateway["automountServiceAccountToken"] is False
    assert objects[("ServiceAccount", "istio-system", "laneproxy")]["automountServiceAccountToken"] is False
    # No binding names the gateway's account; the controller's names only its own.
    subjects = [(s["name"], s.get("namespace")) for d in rendered if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
                for s in d["subjects"]]
    assert ("laneproxy-controller", "laneproxy-system") in subjects
    assert not [s for s in subjects if s[1] == "istio-system"]
    webhook = objects[("Deployment", "laneproxy-system", "laneproxy-webhook")]["spec"]["template"]["spec"]
    assert {"name": "LANEPROXY_SIDECAR_SOURCE", "value": CONTROLLER_SOURCE} in webhook["containers"][0]["env"]
    # The seed's apps run under their namespace's default account: nothing of deploy/rbac's.
    for name in ("mocka-v1", "mockb-v1", "mockc-v1"):
        assert "serviceAccountName" not in objects[("Deployment", "default", name)]["spec"]["template"]["spec"]


def test_once_deployed_no_proxys_account_can_read_the_api_and_the_controllers_can(cluster_with_crds):
    """deploy/base's RBAC created for real, then asked with `kubectl auth can-i` as each workload's account."""
    kube = cluster_with_crds
    rbac = [d for d in render(DEPLOY / "base") if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                                  "Role", "RoleBinding")]
    _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    try:
        def can(account: str, verb: str, resource: str, *extra: str) -> bool:
            result = _kubectl(kube, "auth", "can-i", verb, resource, *extra, "--all-namespaces",
                              f"--as=system:serviceaccount:{account}", check=False)
            assert result.stdout.strip() in ("yes", "no"), result.stdout + result.stderr
            return result.stdout.strip() == "yes"

        reads = [("list", "pods"), ("watch", "services"), ("list", "endpointslices.discovery.k8s.io"),
                 ("watch", "asmswimlanes.istio.alibabacloud.com")]
        assert all(can("laneproxy-system:laneproxy-controller", verb, what) for verb, what in reads)
        assert can("laneproxy-system:laneproxy-controller", "patch", "asmswimlanes.istio.alibabacloud.com",
                   "--subresource=status")
        assert not can("laneproxy-system:laneproxy-controller", "get", "secrets")
        for account in ("istio-system:laneproxy", "default:default", "laneproxy-system:laneproxy-webhook"):
            assert not any(can(account, verb, what) for verb, what in reads), account
        # deploy/rbac's account (a Job's sidecar, the direct source) is a watcher of its own.
        assert can("default:laneproxy", "list", "pods")
    finally:
        _kubectl(kube, "delete", "-f", "-", "--ignore-not-found", "--wait=false", stdin=yaml.safe_dump_all(
            [d for d in rbac if d["kind"] != "ServiceAccount" or d["metadata"]["namespace"] != "default"]),
            check=False)


def test_the_seed_apps_pass_server_side_dry_run_once_injected(cluster_with_crds):
    injected = subprocess.run([sys.executable, "-m", "laneproxy", "inject", "-f", str(SEED / "apps.yaml")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    result = _kubectl(cluster_with_crds, "apply", "--dry-run=server", "--validate=strict", "-f", "-", stdin=injected)
    assert result.stdout.count("(server dry run)") == 6


def test_certs_script_gives_the_webhook_its_secret_and_the_ca_bundle(cluster_with_crds, tmp_path):
    kube = cluster_with_crds
    webhook_objects = render(DEPLOY / "base" / "webhook")
    configuration = next(d for d in webhook_objects if d["kind"] == "MutatingWebhookConfiguration")
    # Created for real, so nothing may match it meanwhile: no namespace or pod of the shared server opts in.
    _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump(configuration))
    try:
        script = DEPLOY / "base" / "webhook" / "certs.sh"
        env_path = f"{Path(kubectl()).parent}:/usr/bin:/bin"
        result = subprocess.run([str(script), "--kubeconfig", str(kube.kubeconfig_path)], capture_output=True,
                                text=True, timeout=120, env={"PATH": env_path, "HOME": str(tmp_path)})
        assert result.returncode == 0, result.stdout + result.stderr
        secret = json.loads(_kubectl(kube, "get", "secret", "laneproxy-webhook-tls", "-n", "laneproxy-system",
                                     "-o", "json").stdout)
        assert secret["type"] == "kubernetes.io/tls"
        stored = json.loads(_kubectl(kube, "get", "mutatingwebhookconfiguration", "laneproxy", "-o", "json").stdout)
        bundles = {hook["clientConfig"].get("caBundle") for hook in stored["webhooks"]}
        assert len(bundles) == 1 and None not in bundles
        (tmp_path / "ca.crt").write_bytes(base64.b64decode(bundles.pop()))
        (tmp_path / "tls.crt").write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
        verify = subprocess.run(["openssl", "verify", "-CAfile", "ca.crt", "tls.crt"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=30)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        names = subprocess.run(["openssl", "x509", "-in", "tls.crt", "-noout", "-ext", "subjectAltName"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=30).stdout
        assert "DNS:laneproxy-webhook.laneproxy-system.svc" in names
        # A later `kubectl apply` of the manifests keeps the bundle: they never set it.
        _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump(configuration))
        again = json.loads(_kubectl(kube, "get", "mutatingwebhookconfiguration", "laneproxy", "-o", "json").stdout)
        assert [h["clientConfig"].get("caBundle") for h in again["webhooks"]] == \
            [h["clientConfig"].get("caBundle") for h in stored["webhooks"]]
    finally:
        _kubectl(kube, "delete", "mutatingwebhookconfiguration", "laneproxy", "--ignore-not-found", check=False)
        _kubectl(kube, "delete", "secret", "laneproxy-webhook-tls", "-n", "laneproxy-system", "--ignore-not-found",
                 check=False)


# compose.yaml ------------------------------------------------------------------------------------------------------


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # YAML merge keys resolve the x- templates


def test_compose_runs_the_demo_topology_with_commands_laneproxy_accepts():
    services = compose_services()
    endpoints = yaml.safe_load((DEPLOY / "compose" / "endpoints.yaml").read_text())
    parser = build_parser()
    lanes_of = {}
    for key, service in endpoints["services"].items():
        for lane, addresses in service["lanes"].items():
            for address in addresses:
                container, _, port = address.rpartition(":")
                assert container in services and port == "15006", address
                lanes_of[container] = (key.split("/")[1], lane)
    # Every app has a sidecar in its network namespace, listed in the endpoints under its own service and lane.
    apps = {name: s for name, s in services.items() if s["command"][0] == "mock"}
    assert sorted(lanes_of) == sorted(apps)
    for name, app in apps.items():
        assert app["environment"]["app"] == lanes_of[name][0]
        assert app["environment"]["version"] == {"base": "v1", "canary": "v2"}[lanes_of[name][1]]
        assert app["user"] != "1337:1337"
        sidecar = services[f"{name}-sidecar"]
        assert sidecar["network_mode"] == f"service:{name}"
        args = parser.parse_args(sidecar["command"])
        assert (args.app.port, args.outbound.port, args.inbound.port) == (8000, 15001, 15006)
        if "upstream_url" in app["environment"]:
            assert app["environment"]["HTTP_PROXY"] == "http://127.0.0.1:15001"
        assert parser.parse_args(app["command"]).listen.port == 8000
    gateway = parser.parse_args(services["gateway"]["command"])
    assert gateway.gateway.port == 8080 and services["gateway"]["ports"] == ["127.0.0.1:8080:8080"]
    # The configuration the containers mount is valid as laneproxy reads it.
    mounts = [volume.split(":")[0] for volume in services["gateway"]["volumes"]]
    result = subprocess.run([sys.executable, "-m", "laneproxy", "validate", *(str(_REPO / m) for m in mounts)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for service in services.values():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
