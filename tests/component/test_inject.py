"""`laneproxy inject`: the sidecar, the capture init container and the HTTP_PROXY alternative, on every workload kind.

The injected manifests are applied to a real kube-apiserver (tests/kube), so the API server, not this test,
says whether the downward-API fields, probes, security contexts and resources are valid.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from laneproxy.inject import (  # noqa: E402
    CAPTURE_INIT_NAME,
    INJECTED_ANNOTATION,
    SIDECAR_NAME,
    InjectionError,
    SidecarSettings,
    dump_manifests,
    inject_document,
    inject_manifests,
    inject_pod,
    injection_refusal,
    pod_template,
)
from tests.image.hosttools import kubectl  # noqa: E402
from tests.kube.fixtures import kube_apiserver  # noqa: E402, F401

SEED_APPS = _REPO / "deploy" / "examples" / "seed" / "apps.yaml"
SETTINGS = SidecarSettings(image="localhost/laneproxy:test")
NAMESPACE = "lp-inject-test"


def seed_pod_spec() -> dict:
    return {
        "metadata": {"labels": {"app": "mocka", "version": "v1", "ASM_TRAFFIC_TAG": "base"}},
        "spec": {"containers": [{"name": "default", "image": "registry.example/go-http-sample:1.0",
                                 "env": [{"name": "version", "value": "v1"}],
                                 "ports": [{"containerPort": 8000}]}]},
    }


def workload(kind: str) -> dict:
    template = seed_pod_spec()
    api = {"Pod": "v1", "Job": "batch/v1", "CronJob": "batch/v1beta1"}.get(kind, "apps/v1")
    body: dict = {"apiVersion": api, "kind": kind, "metadata": {"name": f"mocka-{kind.lower()}"}}
    selector = {"matchLabels": {"app": "mocka"}}
    if kind == "Pod":
        body["metadata"].update(template["metadata"])
        body["spec"] = template["spec"]
    elif kind == "Job":
        template["spec"]["restartPolicy"] = "Never"
        template["metadata"]["labels"]["laneproxy-injection"] = "enabled"  # a Job's pods must opt in themselves
        body["spec"] = {"template": template}
    elif kind == "CronJob":
        template["spec"]["restartPolicy"] = "Never"
        template["metadata"]["labels"]["laneproxy-injection"] = "enabled"
        body["spec"] = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}
    elif kind == "StatefulSet":
        body["spec"] = {"serviceName": "mocka", "selector": selector, "template": template}
    else:
        body["spec"] = {"selector": selector, "template": template}
    return body


def container(pod: dict, name: str, key: str = "containers") -> dict:
    return next(c for c in pod["spec"][key] if c["name"] == name)


def env_of(item: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in item.get("env", [])}


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "laneproxy", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"])
def test_every_workload_kind_gets_the_sidecar_once_however_often_it_is_injected(kind):
    once, refusal = inject_document(workload(kind), SETTINGS)
    assert refusal is None
    twice, _ = inject_document(once, SETTINGS)
    assert twice == once
    template = pod_template(once)
    assert [c["name"] for c in template["spec"]["containers"]] == [SIDECAR_NAME, "default"]
    assert [c["name"] for c in template["spec"]["initContainers"]] == [CAPTURE_INIT_NAME]
    assert template["metadata"]["annotations"][INJECTED_ANNOTATION] == SETTINGS.image


def test_the_cli_output_is_a_fixed_point_and_keeps_every_other_document():
    text = SEED_APPS.read_text()
    first = run_cli("inject", "-f", str(SEED_APPS), "--image", SETTINGS.image)
    assert first.returncode == 0, first.stderr
    second = run_cli("inject", "-f", "-", "--image", SETTINGS.image, stdin=first.stdout)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    before = [d for d in yaml.safe_load_all(text) if d]
    after = list(yaml.safe_load_all(first.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in after] == [(d["kind"], d["metadata"]["name"]) for d in before]
    services = [d for d in after if d["kind"] == "Service"]
    assert services == [d for d in before if d["kind"] == "Service"]  # untouched


def test_sidecar_learns_namespace_lane_and_service_from_the_downward_api_and_listens_for_the_app():
    pod = inject_pod(seed_pod_spec(), SETTINGS)
    env = env_of(container(pod, SIDECAR_NAME))
    assert env["LANEPROXY_SOURCE"] == "xds://laneproxy-controller.laneproxy-system.svc:15010"
    assert env["LANEPROXY_LANE"] == {"fieldRef": {"fieldPath": "metadata.labels['ASM_TRAFFIC_TAG']"}}
    assert env["LANEPROXY_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["LANEPROXY_SERVICE"] == {"fieldRef": {"fieldPath": "metadata.labels['app']"}}
    assert env["LANEPROXY_INBOUND"] == "0.0.0.0:15006"
    assert env["LANEPROXY_APP"] == "127.0.0.1:8000"  # the first containerPort of the app
    assert env["LANEPROXY_OUTBOUND"] == "127.0.0.1:15001"
    assert env["LANEPROXY_ADMIN"] == "127.0.0.1:15000"  # never beyond loopback: it can stop the proxy
    sidecar = container(pod, SIDECAR_NAME)
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
    assert sidecar["ports"] == [{"name": "lp-inbound", "containerPort": 15006, "protocol": "TCP"},
                                {"name": "lp-metrics", "containerPort": 15020, "protocol": "TCP"}]
    assert set(sidecar["resources"]) == {"requests", "limits"}


def test_sidecar_runs_as_1337_read_only_without_capabilities_and_only_the_init_container_has_net_admin():
    pod = inject_pod(seed_pod_spec(), SETTINGS)
    sidecar = container(pod, SIDECAR_NAME)["securityContext"]
    assert sidecar["runAsUser"] == 1337 and sidecar["runAsNonRoot"] is True
    assert sidecar["readOnlyRootFilesystem"] is True and sidecar["allowPrivilegeEscalation"] is False
    assert sidecar["capabilities"] == {"drop": ["ALL"]}
    init = container(pod, CAPTURE_INIT_NAME, "initContainers")
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert init["securityContext"]["privileged"] is False
    assert init["args"][:2] == ["capture", "--apply"]
    assert init["args"][init["args"].index("--inbound-ports") + 1] == "8000"


def test_annotations_choose_the_app_port_and_the_outbound_ports_and_cidrs_left_alone():
    pod = seed_pod_spec()
    pod["metadata"]["annotations"] = {"laneproxy.dev/app-port": "9080",
                                      "laneproxy.dev/exclude-outbound-ports": "5432, 6379",
                                      "laneproxy.dev/exclude-outbound-cidrs": "10.0.0.0/8"}
    injected = inject_pod(pod, SETTINGS)
    assert env_of(container(injected, SIDECAR_NAME))["LANEPROXY_APP"] == "127.0.0.1:9080"
    args = container(injected, CAPTURE_INIT_NAME, "initContainers")["args"]
    assert args[args.index("--exclude-outbound-ports") + 1] == "5432,6379"
    assert args[args.index("--exclude-outbound-cidrs") + 1] == "10.0.0.0/8"


def test_http_proxy_alternative_needs_no_init_container_and_points_the_apps_at_the_outbound_listener():
    pod = seed_pod_spec()
    pod["spec"]["containers"][0]["env"].append({"name": "NO_PROXY", "value": "db.internal"})  # the app's own wins
    injected = inject_pod(pod, SidecarSettings(image=SETTINGS.image, capture="http-proxy"))
    assert "initContainers" not in injected["spec"]
    app_env = env_of(container(injected, "default"))
    assert app_env["HTTP_PROXY"] == app_env["http_proxy"] == "http://127.0.0.1:15001"
    assert app_env["NO_PROXY"] == "db.internal"
    assert app_env["HTTPS_PROXY"] == app_env["https_proxy"] == "http://127.0.0.1:15001"  # CONNECT
    # Without the app's own: loopback, the API server and the link-local metadata addresses go direct.
    plain = env_of(container(inject_pod(seed_pod_spec(), SidecarSettings(image=SETTINGS.image, capture="http-proxy")),
                             "default"))
    direct = plain["NO_PROXY"].split(",")
    assert plain["no_proxy"] == plain["NO_PROXY"]
    assert {"127.0.0.1", "localhost", "$(KUBERNETES_SERVICE_HOST)", "kubernetes.default.svc", "169.254.169.254",
            "169.254.170.2"} <= set(direct)
    assert inject_pod(injected, SidecarSettings(image=SETTINGS.image, capture="http-proxy")) == injected
    # The same choice per pod, by annotation; switching a pod back to capture removes nothing it needs.
    pod["metadata"]["annotations"] = {"laneproxy.dev/capture": "http-proxy"}
    assert "initContainers" not in inject_pod(pod, SETTINGS)["spec"]


def test_injection_with_new_settings_updates_the_sidecar_in_place():
    old = inject_pod(seed_pod_spec(), SidecarSettings(image="laneproxy:old"))
    new = inject_pod(old, SidecarSettings(image="laneproxy:new"))
    assert [c["name"] for c in new["spec"]["containers"]] == [SIDECAR_NAME, "default"]
    assert container(new, SIDECAR_NAME)["image"] == "laneproxy:new"
    assert container(new, CAPTURE_INIT_NAME, "initContainers")["image"] == "laneproxy:new"


@pytest.mark.parametrize("change, reason", [
    (lambda p: p["metadata"]["labels"].update({"laneproxy-injection": "disabled"}), "label laneproxy-injection"),
    (lambda p: p["spec"].update({"hostNetwork": True}), "hostNetwork"),
])
def test_pods_that_opt_out_or_share_the_node_network_are_left_as_they_are(change, reason):
    document = workload("Deployment")
    change(document["spec"]["template"])
    result, refusal = inject_document(document, SETTINGS)
    assert result == document and reason in refusal
    cli = run_cli("inject", "-f", "-", stdin=yaml.safe_dump(document))
    assert cli.returncode == 0 and yaml.safe_load(cli.stdout) == document
    assert "left as it is" in cli.stderr


@pytest.mark.parametrize("change, message", [
    (lambda p: p["metadata"].update({"annotations": {"laneproxy.dev/app-port": "http"}}), "not a port number"),
    (lambda p: p["metadata"].update({"annotations": {"laneproxy.dev/capture": "ebpf"}}), "expected iptables"),
    (lambda p: p["metadata"].update({"annotations": {"laneproxy.dev/exclude-outbound-ports": "x"}}), "port numbers"),
    (lambda p: p["spec"].update({"securityContext": {"runAsUser": 1337}}), "bypass the sidecar"),
])
def test_a_pod_that_cannot_be_injected_as_asked_is_an_error_naming_the_reason(change, message):
    pod = seed_pod_spec()
    change(pod)
    with pytest.raises(InjectionError, match=message):
        inject_pod(pod, SETTINGS)
    cli = run_cli("inject", "-f", "-", stdin=yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                                                               "metadata": {"name": "x", **pod["metadata"]},
                                                               "spec": pod["spec"]}))
    assert cli.returncode == 1 and message in cli.stderr


def test_injection_adds_the_metrics_port_its_scrape_annotations_and_the_workload_identity():
    deployment, _ = inject_document(workload("Deployment"), SETTINGS)
    template = pod_template(deployment)
    assert {k: v for k, v in template["metadata"]["annotations"].items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "15020", "prometheus.io/path": "/stats/prometheus"}
    sidecar = container(template, SIDECAR_NAME)
    env = env_of(sidecar)
    assert env["LANEPROXY_METRICS"] == "0.0.0.0:15020"  # the read-only listener; the admin stays on loopback
    assert env["LANEPROXY_ADMIN"] == "127.0.0.1:15000"
    assert env["LANEPROXY_WORKLOAD"] == "mocka-deployment"  # the object holding the template
    assert env["LANEPROXY_VERSION"] == {"fieldRef": {"fieldPath": "metadata.labels['version']"}}
    assert {"name": "lp-metrics", "containerPort": 15020, "protocol": "TCP"} in sidecar["ports"]


@pytest.mark.parametrize("meta, expected", [
    ({"name": "x", "generateName": "mocka-v1-7d9f8b6c4-",
      "ownerReferences": [{"kind": "ReplicaSet", "name": "mocka-v1-7d9f8b6c4", "controller": True}]}, "mocka-v1"),
    # Kruise's canary Deployment has a name of its own: its pods are a workload of their own.
    ({"generateName": "mocka-v1-canary-5c8d-",
      "ownerReferences": [{"kind": "ReplicaSet", "name": "mocka-v1-canary-5c8d", "controller": True}]},
     "mocka-v1-canary"),
    ({"name": "web-0", "ownerReferences": [{"kind": "StatefulSet", "name": "web", "controller": True}]}, "web"),
    ({"name": "lonely"}, "lonely"),
])
def test_a_pods_workload_is_named_after_its_controller_as_istio_names_it(meta, expected):
    pod = seed_pod_spec()
    pod["metadata"].update(meta)
    assert env_of(container(inject_pod(pod, SETTINGS), SIDECAR_NAME))["LANEPROXY_WORKLOAD"] == expected


def test_the_apps_own_scrape_target_is_merged_into_the_sidecars_and_injecting_again_keeps_it():
    pod = seed_pod_spec()
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9102"}
    once = inject_pod(pod, SETTINGS)
    annotations = once["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("15020", "/stats/prometheus")
    assert annotations["laneproxy.dev/app-metrics"] == "9102/metrics"
    assert env_of(container(once, SIDECAR_NAME))["LANEPROXY_APP_METRICS"] == "http://127.0.0.1:9102/metrics"
    assert inject_pod(once, SETTINGS) == once


@pytest.mark.parametrize("annotations", [{"prometheus.io/scrape": "false"},
                                         {"prometheus.io/scrape": "true", "prometheus.io/port": "http-metrics"}])
def test_a_pod_that_asks_not_to_be_scraped_or_names_its_port_keeps_its_annotations(annotations):
    pod = seed_pod_spec()
    pod["metadata"]["annotations"] = dict(annotations)
    injected = inject_pod(pod, SETTINGS)
    assert {k: v for k, v in injected["metadata"]["annotations"].items() if k != INJECTED_ANNOTATION} == annotations
    assert "LANEPROXY_APP_METRICS" not in env_of(container(injected, SIDECAR_NAME))


def test_the_seed_overlays_apps_render_and_inject_with_the_metrics_port_and_annotations():
    from tests.component.test_deploy import render

    for overlay in ("seed", "seed-local"):
        apps = [doc for doc in render(_REPO / "deploy" / "examples" / overlay)
                if doc["kind"] == "Deployment" and doc["metadata"]["name"].startswith("mock")]
        assert len(apps) == 3
        for app in apps:
            injected, refusal = inject_document(app, SETTINGS)
            assert refusal is None
            template = pod_template(injected)
            assert template["metadata"]["annotations"]["prometheus.io/port"] == "15020"
            assert env_of(container(template, SIDECAR_NAME))["LANEPROXY_WORKLOAD"] == app["metadata"]["name"]


def test_the_sidecar_starts_first_and_holds_the_app_until_it_is_ready():
    pod = inject_pod(seed_pod_spec(), SETTINGS)
    sidecar = pod["spec"]["containers"][0]
    assert sidecar["name"] == SIDECAR_NAME  # the kubelet starts containers in order, each after its postStart
    assert sidecar["lifecycle"]["postStart"]["exec"]["command"] == [
        "laneproxy", "probe", "--wait", "120", "http://127.0.0.1:15000/ready"]


def test_every_container_stops_only_after_the_pod_left_the_endpoints_and_the_sidecar_after_the_app():
    pod = seed_pod_spec()
    pod["spec"]["containers"].append({"name": "worker", "image": "w", "lifecycle": {"preStop": {"exec": {
        "command": ["/bin/flush"]}}}})
    injected = inject_pod(pod, SETTINGS)
    hook = {"httpGet": {"path": "/wait-for-stop", "port": 15021, "scheme": "HTTP"}}
    assert container(injected, "default")["lifecycle"]["preStop"] == hook
    assert container(injected, "worker")["lifecycle"]["preStop"] == {"exec": {"command": ["/bin/flush"]}}  # its own
    assert container(injected, SIDECAR_NAME)["lifecycle"]["preStop"] == {
        "httpGet": {"path": "/wait-for-stop?app=1", "port": 15021, "scheme": "HTTP"}}
    env = env_of(container(injected, SIDECAR_NAME))
    assert env["LANEPROXY_LIFECYCLE"] == "0.0.0.0:15021"
    assert env["LANEPROXY_POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # The lifecycle port is never captured: the kubelet's hook must reach the sidecar itself.
    args = container(injected, CAPTURE_INIT_NAME, "initContainers")["args"]
    assert "15021" not in args[args.index("--inbound-ports") + 1].split(",")


def test_a_native_sidecar_is_an_always_restarting_init_container_after_the_capture_with_a_startup_probe():
    native = SidecarSettings(image=SETTINGS.image, native_sidecar=True)
    pod = seed_pod_spec()
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "m"}]
    injected = inject_pod(pod, native)
    assert [c["name"] for c in injected["spec"]["initContainers"]] == ["migrate", CAPTURE_INIT_NAME, SIDECAR_NAME]
    assert [c["name"] for c in injected["spec"]["containers"]] == ["default"]
    sidecar = container(injected, SIDECAR_NAME, "initContainers")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["exec"]["command"] == ["laneproxy", "probe", "http://127.0.0.1:15000/ready"]
    assert "postStart" not in sidecar["lifecycle"] and "preStop" in sidecar["lifecycle"]
    assert inject_pod(injected, native) == injected
    # Switching a pod back to a cluster without native sidecars moves the sidecar back among the containers.
    classic = inject_pod(injected, SETTINGS)
    assert [c["name"] for c in classic["spec"]["containers"]] == [SIDECAR_NAME, "default"]
    assert [c["name"] for c in classic["spec"]["initContainers"]] == ["migrate", CAPTURE_INIT_NAME]


def test_a_jobs_pods_are_injected_only_when_they_opt_in_and_their_sidecar_exits_with_the_app():
    job = workload("Job")
    del job["spec"]["template"]["metadata"]["labels"]["laneproxy-injection"]
    result, refusal = inject_document(job, SETTINGS)
    assert result == job and "Job" in refusal
    # A pod the Job controller created, as the webhook sees it: refused unless it has the label itself.
    pod = {**seed_pod_spec(), "metadata": {"labels": {"job-name": "x"}, "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "x", "uid": "1"}]}}
    assert "Job" in injection_refusal(pod)
    pod["metadata"]["labels"]["laneproxy-injection"] = "enabled"
    assert injection_refusal(pod) is None
    injected = inject_pod(pod, SETTINGS)
    sidecar = container(injected, SIDECAR_NAME)
    assert env_of(sidecar)["LANEPROXY_EXIT_WITH"] == "default"
    assert env_of(sidecar)["LANEPROXY_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "preStop" not in sidecar["lifecycle"] and "lifecycle" not in container(injected, "default")
    # It reads its own pod to see the app end: the direct source with its token, whatever the injector's source.
    assert env_of(sidecar)["LANEPROXY_SOURCE"] == "kubernetes"
    assert sidecar["volumeMounts"] == [{"name": "laneproxy-api-token", "readOnly": True,
                                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]


def pod_with_automatic_token() -> dict:
    """The seed's pod as the webhook sees it: the ServiceAccount admission plugin (1.20) has mounted its token."""
    pod = seed_pod_spec()
    pod["spec"]["serviceAccountName"] = "laneproxy"
    pod["spec"]["volumes"] = [{"name": "laneproxy-token-x7k2p", "secret": {"secretName": "laneproxy-token-x7k2p"}},
                              {"name": "data", "emptyDir": {}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "laneproxy-token-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
         "readOnly": True},
        {"name": "data", "mountPath": "/data"}]
    return pod


def test_a_sidecar_on_the_xds_source_holds_no_api_token_and_the_app_keeps_one_only_when_it_asks():
    pod = pod_with_automatic_token()
    injected = inject_pod(pod, SETTINGS)
    spec = injected["spec"]
    assert env_of(container(injected, SIDECAR_NAME))["LANEPROXY_SOURCE"].startswith("xds://")
    assert spec["automountServiceAccountToken"] is False
    assert container(injected, "default")["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    # No token volume of any kind; the sidecar's token path is an empty in-memory directory.
    assert spec["volumes"] == [{"name": "data", "emptyDir": {}},
                               {"name": "laneproxy-no-token", "emptyDir": {"medium": "Memory", "sizeLimit": "1Ki"}}]
    assert container(injected, SIDECAR_NAME)["volumeMounts"] == [
        {"name": "laneproxy-no-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}]
    assert inject_pod(injected, SETTINGS) == injected
    # An app that asks for its token keeps it; the sidecar's token path stays the empty directory, so a token the
    # admission plugin adds when it runs again after the webhook cannot land in the proxy.
    pod["spec"]["automountServiceAccountToken"] = True
    kept = inject_pod(pod, SETTINGS)
    assert container(kept, "default")["volumeMounts"] == pod["spec"]["containers"][0]["volumeMounts"]
    assert [v["name"] for v in kept["spec"]["volumes"]] == ["laneproxy-token-x7k2p", "data", "laneproxy-no-token"]
    assert container(kept, SIDECAR_NAME)["volumeMounts"][0]["name"] == "laneproxy-no-token"


def test_injecting_again_with_the_other_source_swaps_the_token_volume():
    direct = SidecarSettings(image=SETTINGS.image, source="kubernetes")
    on_direct = inject_pod(pod_with_automatic_token(), direct)
    on_xds = inject_pod(on_direct, SETTINGS)
    assert on_xds == inject_pod(pod_with_automatic_token(), SETTINGS)
    assert inject_pod(on_xds, direct) == on_direct


@pytest.mark.parametrize("source", ["xds://", "xds://controller", "xds://controller:0", "xds://a:1,b",
                                    "grpc://controller:15010", "files"])
def test_a_sidecar_source_that_is_neither_an_xds_address_nor_kubernetes_is_refused(source):
    with pytest.raises(InjectionError, match="xds://HOST:PORT"):
        SidecarSettings(source=source)
    result = run_cli("inject", "-f", str(SEED_APPS), "--sidecar-source", source)
    assert result.returncode == 2 and "xds://HOST:PORT" in result.stderr and not result.stdout


def test_on_the_direct_source_only_the_sidecar_gets_an_api_token():
    pod = pod_with_automatic_token()
    settings = SidecarSettings(image=SETTINGS.image, source="kubernetes")
    injected = inject_pod(pod, settings)
    spec = injected["spec"]
    assert env_of(container(injected, SIDECAR_NAME))["LANEPROXY_SOURCE"] == "kubernetes"
    assert spec["automountServiceAccountToken"] is False
    assert container(injected, "default")["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert [v["name"] for v in spec["volumes"]] == ["data", "laneproxy-api-token"]
    sources = spec["volumes"][1]["projected"]["sources"]
    assert {"serviceAccountToken", "configMap", "downwardAPI"} == {key for source in sources for key in source}
    assert container(injected, SIDECAR_NAME)["volumeMounts"] == [
        {"name": "laneproxy-api-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
         "readOnly": True}]
    assert inject_pod(injected, settings) == injected
    # An app that asks for its token keeps it; the sidecar then gets the one the admission plugin mounts.
    pod["spec"]["automountServiceAccountToken"] = True
    kept = inject_pod(pod, settings)
    assert container(kept, "default")["volumeMounts"] == pod["spec"]["containers"][0]["volumeMounts"]
    assert "volumeMounts" not in container(kept, SIDECAR_NAME)


def test_every_port_the_app_containers_declare_is_captured_inbound_and_reaches_its_own_port():
    pod = seed_pod_spec()
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 8000, "name": "http"},
                                             {"containerPort": 9090, "name": "metrics"},
                                             {"containerPort": 5353, "protocol": "UDP"}]
    pod["spec"]["containers"].append({"name": "admin", "image": "a", "ports": [{"containerPort": 8081}]})
    injected = inject_pod(pod, SETTINGS)
    args = container(injected, CAPTURE_INIT_NAME, "initContainers")["args"]
    assert args[args.index("--inbound-ports") + 1] == "8000,9090,8081"
    env = env_of(container(injected, SIDECAR_NAME))
    assert env["LANEPROXY_APP"] == "127.0.0.1:8000"
    assert env["LANEPROXY_APP_PORTS"] == "8000,9090,8081"
    # The annotation names them when a Service targets a port no container declares.
    pod["metadata"]["annotations"] = {"laneproxy.dev/inbound-ports": "8000,7000"}
    args = container(inject_pod(pod, SETTINGS), CAPTURE_INIT_NAME, "initContainers")["args"]
    assert args[args.index("--inbound-ports") + 1] == "8000,7000"
    pod["metadata"]["annotations"] = {"laneproxy.dev/inbound-ports": "8000,15006"}
    with pytest.raises(InjectionError, match="sidecar's own ports"):
        inject_pod(pod, SETTINGS)


def test_input_is_never_modified():
    pod = seed_pod_spec()
    snapshot = copy.deepcopy(pod)
    inject_pod(pod, SETTINGS)
    list(inject_manifests(yaml.safe_dump(workload("Deployment")), SETTINGS))
    assert pod == snapshot


# Against the real API server -------------------------------------------------------------------------------------


def _kubectl(kube, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run([kubectl(), "--kubeconfig", str(kube.kubeconfig_path), *args], input=stdin,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_injected_workloads_and_pods_are_accepted_by_the_real_api_server(kube_apiserver):
    kube = kube_apiserver
    _kubectl(kube, "create", "namespace", NAMESPACE, "--dry-run=client", "-o", "yaml")
    _kubectl(kube, "apply", "-f", "-", stdin=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                              "metadata": {"name": NAMESPACE}}))
    try:
        documents = [workload(kind) for kind in ("Pod", "Deployment", "StatefulSet", "DaemonSet", "Job")]
        for document in documents:
            document["metadata"]["namespace"] = NAMESPACE
        seed = [d for d in yaml.safe_load_all(SEED_APPS.read_text()) if d]
        for document in seed:
            document["metadata"]["namespace"] = NAMESPACE
        injected = [doc for doc, _ in inject_manifests(dump_manifests(documents + seed), SETTINGS)]
        http_proxy = inject_document({**workload("Pod"), "metadata": {"name": "mocka-http-proxy",
                                                                       "namespace": NAMESPACE,
                                                                       "labels": {"app": "mocka"}}},
                                     SidecarSettings(image=SETTINGS.image, capture="http-proxy"))[0]
        print(_kubectl(kube, "apply", "-f", "-", stdin=dump_manifests([*injected, http_proxy])))
        stored = json.loads(_kubectl(kube, "get", "pod", "mocka-pod", "-n", NAMESPACE, "-o", "json"))
        sidecar = container(stored, SIDECAR_NAME)
        assert env_of(sidecar)["LANEPROXY_LANE"]["fieldRef"]["fieldPath"] == "metadata.labels['ASM_TRAFFIC_TAG']"
        assert sidecar["securityContext"]["runAsUser"] == 1337
        assert container(stored, CAPTURE_INIT_NAME, "initContainers")["securityContext"]["capabilities"]["add"] == \
            ["NET_ADMIN", "NET_RAW"]
        deployment = json.loads(_kubectl(kube, "get", "deployment", "mocka-v1", "-n", NAMESPACE, "-o", "json"))
        assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == [SIDECAR_NAME, "default"]
        # The projected token, the hooks and the Job's exit survive the server's validation and defaults.
        template = deployment["spec"]["template"]["spec"]
        assert template["automountServiceAccountToken"] is False
        assert container(deployment["spec"]["template"], SIDECAR_NAME)["lifecycle"]["preStop"]["httpGet"]["port"] \
            == 15021
        job = json.loads(_kubectl(kube, "get", "job", "mocka-job", "-n", NAMESPACE, "-o", "json"))
        assert env_of(container(job["spec"]["template"], SIDECAR_NAME))["LANEPROXY_EXIT_WITH"] == "default"
        # Injecting what the server stored changes nothing the server would see.
        again = inject_document(deployment, SETTINGS)[0]
        assert again["spec"]["template"] == deployment["spec"]["template"]
    finally:
        _kubectl(kube, "delete", "namespace", NAMESPACE, "--wait=false")


def test_the_probe_a_sidecars_hooks_run_accepts_the_environment_injection_gives_it():
    """The postStart hook runs `laneproxy probe` inside the sidecar, whose environment names an xds:// source:
    every command parses that environment, so a command that rejected it would hold the app's start forever."""
    sidecar = container(inject_pod(seed_pod_spec(), SETTINGS), SIDECAR_NAME)
    env = {e["name"]: e["value"] for e in sidecar["env"] if "value" in e}
    assert env["LANEPROXY_SOURCE"].startswith("xds://")
    hook = sidecar["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["laneproxy", "probe"]
    result = subprocess.run([sys.executable, "-m", "laneproxy", "probe", "--timeout", "0.5",
                             "http://127.0.0.1:9/ready"], env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=60)
    # Refused (1: nothing listens there), not a rejected environment (2).
    assert result.returncode == 1 and "Connection refused" in result.stderr, result.stderr
