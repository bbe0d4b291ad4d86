"""`laneproxy webhook`: a real HTTPS server, registered on a real kube-apiserver with the selectors of deploy/.

The patch it returns is compared with `laneproxy inject` output for the same pod (they must agree), applied
by a small RFC 6902 implementation here and, for real, by the API server: a pod created in an opted-in
namespace comes back with the sidecar, one in a namespace that did not opt in comes back as it was.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from laneproxy.demo import free_port  # noqa: E402
from laneproxy.inject import SIDECAR_NAME, SidecarSettings, inject_pod  # noqa: E402
from laneproxy.webhook import CertificateReloader, json_patch, review_response  # noqa: E402
from tests.image.hosttools import kubectl, make_tls  # noqa: E402
from tests.kube.fixtures import kube_apiserver  # noqa: E402, F401

IMAGE = "localhost/laneproxy:test"
SEED_APPS = _REPO / "deploy" / "examples" / "seed" / "apps.yaml"
WEBHOOK_CONFIGURATION = _REPO / "deploy" / "base" / "webhook" / "mutatingwebhookconfiguration.yaml"


def apply_patch(document: object, patch: list[dict]) -> object:
    """RFC 6902 add / remove / replace, enough to check the webhook's patches."""
    document = copy.deepcopy(document)
    for operation in patch:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if operation["op"] == "add":
                node.insert(index, operation["value"])
            elif operation["op"] == "remove":
                del node[index]
            else:
                node[index] = operation["value"]
        elif operation["op"] == "remove":
            del node[last]
        else:
            node[last] = operation["value"]
    return document


def admission_review(pod: dict, *, namespace: str = "default", api_version: str = "admission.k8s.io/v1") -> dict:
    return {"apiVersion": api_version, "kind": "AdmissionReview",
            "request": {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": namespace,
                        "operation": "CREATE", "object": pod}}


def seed_pods() -> list[dict]:
    """The pods the seed Deployments would create, as the API server sends them to the webhook."""
    pods = []
    for document in yaml.safe_load_all(SEED_APPS.read_text()):
        if document and document["kind"] == "Deployment":
            template = copy.deepcopy(document["spec"]["template"])
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"generateName": document["metadata"]["name"] + "-", **template["metadata"]},
                         "spec": template["spec"]})
    return pods


# The patch ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old, new", [
    ({"a": 1}, {"a": 1}),
    ({"a": 1}, {"a": 2, "b/c~": [1]}),
    ({"a": [1, 2, 3]}, {"a": [1]}),
    ({"a": [1]}, {"a": [1, {"x": None}, 3]}),
    ({"a": {"b": {"c": True}}}, {"a": {"b": {"c": 1}}}),  # True == 1 in Python, not in JSON
    ({"a": [{"n": 1}, {"n": 2}]}, {"a": [{"n": 1, "m": 0}]}),
])
def test_json_patch_turns_the_old_document_into_the_new_one(old, new):
    patch = json_patch(old, new)
    assert apply_patch(old, patch) == new and json.dumps(apply_patch(old, patch)) == json.dumps(new)
    assert (patch == []) == (old == new and json.dumps(old) == json.dumps(new))


@pytest.mark.parametrize("pod", seed_pods(), ids=lambda pod: pod["metadata"]["generateName"])
def test_webhook_patch_and_inject_output_agree_and_a_second_pass_patches_nothing(pod):
    sidecar = SidecarSettings(image=IMAGE)
    answer = review_response(admission_review(pod), sidecar)
    response = answer["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patched = apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    assert patched == inject_pod(pod, sidecar)
    again = review_response(admission_review(patched), sidecar)["response"]
    assert again == {"uid": again["uid"], "allowed": True}


def test_the_webhook_answers_v1beta1_reviews_and_leaves_other_kinds_and_operations_alone():
    pod = seed_pods()[0]
    beta = review_response(admission_review(pod, api_version="admission.k8s.io/v1beta1"), SidecarSettings())
    assert beta["apiVersion"] == "admission.k8s.io/v1beta1" and "patch" in beta["response"]
    update = admission_review(pod)
    update["request"]["operation"] = "UPDATE"
    assert "patch" not in review_response(update, SidecarSettings())["response"]
    service = admission_review({"kind": "Service", "spec": {}})
    service["request"]["kind"]["kind"] = "Service"
    assert "patch" not in review_response(service, SidecarSettings())["response"]


def test_a_pod_a_job_created_is_injected_only_when_it_opts_in_itself_and_its_sidecar_then_exits_with_the_app():
    pod = seed_pods()[0]
    pod["metadata"]["labels"] = {k: v for k, v in pod["metadata"]["labels"].items() if k != "laneproxy-injection"}
    pod["metadata"]["labels"]["job-name"] = "report"
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "report", "uid": "u"}]
    pod["spec"]["restartPolicy"] = "Never"
    # In a namespace that opted in, without the pod's own label: allowed, not injected.
    assert "patch" not in review_response(admission_review(pod), SidecarSettings(image=IMAGE))["response"]
    pod["metadata"]["labels"]["laneproxy-injection"] = "enabled"
    response = review_response(admission_review(pod), SidecarSettings(image=IMAGE))["response"]
    patched = apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    sidecar = patched["spec"]["containers"][0]
    assert sidecar["name"] == "laneproxy"
    assert {"name": "LANEPROXY_EXIT_WITH", "value": "default"} in sidecar["env"]


# The server -----------------------------------------------------------------------------------------------------


class WebhookProcess:
    def __init__(self, workdir: Path) -> None:
        self.tls = make_tls(workdir / "tls", "IP:127.0.0.1,DNS:localhost")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = workdir / "webhook.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LANEPROXY_") or k == "LANEPROXY_PURE"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "laneproxy", "webhook", "--listen", f"127.0.0.1:{self.port}",
                 "--cert", str(self.tls.cert), "--key", str(self.tls.key), "--image", IMAGE],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.context = ssl.create_default_context(cafile=str(self.tls.ca))
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/ready", context=self.context, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"webhook did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def post(self, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}/inject", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    server = WebhookProcess(tmp_path_factory.mktemp("webhook"))
    yield server
    server.stop()


def test_the_server_patches_over_tls_as_inject_does_and_refuses_what_it_cannot_inject(webhook):
    pod = seed_pods()[1]
    status, answer = webhook.post(json.dumps(admission_review(pod)).encode())
    assert status == 200
    patched = apply_patch(pod, json.loads(base64.b64decode(answer["response"]["patch"])))
    assert patched == inject_pod(pod, SidecarSettings(image=IMAGE))
    bad = copy.deepcopy(pod)
    bad["metadata"]["annotations"] = {"laneproxy.dev/capture": "ebpf"}
    status, answer = webhook.post(json.dumps(admission_review(bad)).encode())
    assert status == 200 and answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 400 and "ebpf" in answer["response"]["status"]["message"]
    opted_out = copy.deepcopy(pod)
    opted_out["metadata"]["labels"]["laneproxy-injection"] = "disabled"
    status, answer = webhook.post(json.dumps(admission_review(opted_out)).encode())
    assert status == 200 and answer["response"]["allowed"] is True and "patch" not in answer["response"]
    assert webhook.post(b"{not json")[0] == 400
    assert webhook.post(b'{"kind": "AdmissionReview"}')[0] == 400


async def test_a_rotated_certificate_is_served_without_a_restart(tmp_path):
    first = make_tls(tmp_path / "first", "IP:127.0.0.1")
    second = make_tls(tmp_path / "second", "IP:127.0.0.1")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("tls.crt", "tls.key"):
        (live / name).write_bytes((tmp_path / "first" / name).read_bytes())
    certificates = CertificateReloader(str(live / "tls.crt"), str(live / "tls.key"))
    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="LIVE")

    app = web.Application()
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=certificates.context).start()
    watcher = asyncio.create_task(certificates.watch(0.05))

    async def served_by(ca: Path) -> bool:
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/ready",
                                       ssl=ssl.create_default_context(cafile=str(ca))) as response:
                    return response.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False

    try:
        assert await served_by(first.ca) and not await served_by(second.ca)
        for name in ("tls.crt", "tls.key"):  # a Secret volume update, file by file
            staged = live / f".{name}"
            staged.write_bytes((tmp_path / "second" / name).read_bytes())
            os.replace(staged, live / name)
        deadline = asyncio.get_running_loop().time() + 10
        while not await served_by(second.ca):
            assert asyncio.get_running_loop().time() < deadline, "the new certificate was never served"
            await asyncio.sleep(0.05)
        assert not await served_by(first.ca)
    finally:
        watcher.cancel()
        await runner.cleanup()


# Registered on the real API server -------------------------------------------------------------------------------


def _kubectl(kube, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([kubectl(), "--kubeconfig", str(kube.kubeconfig_path), *args], input=stdin,
                            capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_pods_in_opted_in_namespaces_or_opting_in_themselves_come_back_from_the_api_server_with_the_sidecar(
        kube_apiserver, webhook):
    kube = kube_apiserver
    # deploy/'s MutatingWebhookConfiguration with its selectors as they are; only the address differs: the API
    # server reaches this webhook at 127.0.0.1 with the test CA instead of through the in-cluster Service.
    configuration = yaml.safe_load(WEBHOOK_CONFIGURATION.read_text())
    configuration["metadata"]["name"] = "laneproxy-test"
    bundle = base64.b64encode(webhook.tls.ca.read_bytes()).decode()
    for hook in configuration["webhooks"]:
        hook["clientConfig"] = {"url": f"{webhook.url}/inject", "caBundle": bundle}
    namespaces = {"lp-webhook-enabled": "enabled", "lp-webhook-silent": None, "lp-webhook-disabled": "disabled"}
    try:
        for name, label in namespaces.items():
            labels = {"laneproxy-injection": label} if label else {}
            _kubectl(kube, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                                                 "metadata": {"name": name, "labels": labels}}))
        _kubectl(kube, "apply", "-f", "-", stdin=json.dumps(configuration))

        def create(namespace: str, name: str, pod_label: str | None) -> dict:
            pod = copy.deepcopy(seed_pods()[0])
            pod["metadata"] = {"name": name, "namespace": namespace,
                               "labels": {"app": "mocka", "ASM_TRAFFIC_TAG": "canary"}}
            if pod_label:
                pod["metadata"]["labels"]["laneproxy-injection"] = pod_label
            _kubectl(kube, "create", "-f", "-", stdin=json.dumps(pod))
            return json.loads(_kubectl(kube, "get", "pod", name, "-n", namespace, "-o", "json").stdout)

        def containers(pod: dict) -> list[str]:
            return [c["name"] for c in pod["spec"]["containers"]] + [c["name"] for c in pod["spec"].get(
                "initContainers", [])]

        # The webhook configuration takes a moment to reach the API server's admission chain.
        deadline = time.monotonic() + 30
        attempt = 0
        while True:
            attempt += 1
            pod = create("lp-webhook-enabled", f"mocka-{attempt}", None)
            if SIDECAR_NAME in containers(pod) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert containers(pod) == [SIDECAR_NAME, "default", "laneproxy-capture"]
        sidecar = pod["spec"]["containers"][0]
        assert sidecar["image"] == IMAGE and sidecar["securityContext"]["runAsUser"] == 1337
        assert pod["metadata"]["annotations"]["laneproxy.dev/injected"] == IMAGE
        # What the server stored is a fixed point: injecting it again patches nothing.
        assert "patch" not in review_response(admission_review(pod), SidecarSettings(image=IMAGE))["response"]

        assert containers(create("lp-webhook-enabled", "opted-out", "disabled")) == ["default"]
        assert containers(create("lp-webhook-silent", "silent", None)) == ["default"]
        assert containers(create("lp-webhook-silent", "opted-in", "enabled")) == [SIDECAR_NAME, "default",
                                                                                  "laneproxy-capture"]
        assert containers(create("lp-webhook-disabled", "overruled", "enabled")) == ["default"]
        # Server-side dry run goes through the webhook too, and a pre-injected pod is left as it is.
        dry = json.loads(_kubectl(kube, "create", "-f", "-", "--dry-run=server", "-o", "json",
                                  stdin=json.dumps({**pod, "metadata": {"name": "again",
                                                                        "namespace": "lp-webhook-enabled",
                                                                        "labels": pod["metadata"]["labels"],
                                                                        "annotations": pod["metadata"]["annotations"]},
                                                    "status": {}})).stdout)
        assert containers(dry) == containers(pod)
        print(Path(webhook.log).read_text())
    finally:
        _kubectl(kube, "delete", "mutatingwebhookconfiguration", "laneproxy-test", "--ignore-not-found", check=False)
        for name in namespaces:
            _kubectl(kube, "delete", "namespace", name, "--wait=false", check=False)
