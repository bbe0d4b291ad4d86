"""The mutating admission webhook: pods created in opted-in namespaces (or opting in themselves) get the sidecar.

Owns the AdmissionReview exchange (admission.k8s.io v1 and v1beta1), the JSON patch, which is only the diff
between the pod and `inject.inject_pod` of it (so `laneproxy inject` and the webhook cannot disagree, and a
second injection patches nothing), and the TLS server with certificates reloaded when their files change
(a Secret volume is updated in place). Which pods are sent here is the MutatingWebhookConfiguration's
business (namespace and object selectors on the `laneproxy-injection` label, see deploy/base/webhook/); the
server still honours `laneproxy-injection: disabled` on the pod. It needs no Kubernetes API access at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
from dataclasses import dataclass, field

from aiohttp import web

from laneproxy.standalone import serve_until_signalled

from laneproxy.core.errors import LaneProxyError
from laneproxy.inject import InjectionError, SidecarSettings, inject_pod, injection_refusal

log = logging.getLogger("laneproxy.webhook")

INJECT_PATH = "/inject"
READY_PATH = "/ready"


class WebhookRequestError(LaneProxyError):
    """The request body is not an AdmissionReview this webhook can answer."""


class CertificateError(LaneProxyError):
    """The serving certificate or key cannot be loaded."""


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    cert_file: str
    key_file: str
    host: str = "127.0.0.1"
    port: int = 9443
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    cert_check_interval: float = 30.0


# JSON patch --------------------------------------------------------------------------------------------------


def _pointer(path: str, key: str | int) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def json_patch(old: object, new: object, path: str = "") -> list[dict]:
    """RFC 6902 operations turning `old` into `new`; [] when they are equal.

    Lists are compared element by element: a list that grew gets `add`s at its end, one that shrank gets
    `remove`s from its end (highest index first), so appended containers become small, readable patches.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        operations: list[dict] = []
        for key in old:
            if key not in new:
                operations.append({"op": "remove", "path": _pointer(path, key)})
        for key, value in new.items():
            if key not in old:
                operations.append({"op": "add", "path": _pointer(path, key), "value": value})
            else:
                operations.extend(json_patch(old[key], value, _pointer(path, key)))
        return operations
    if isinstance(old, list) and isinstance(new, list):
        operations = []
        for index in range(min(len(old), len(new))):
            operations.extend(json_patch(old[index], new[index], _pointer(path, index)))
        for index in range(len(old) - 1, len(new) - 1, -1):
            operations.append({"op": "remove", "path": _pointer(path, index)})
        for index in range(len(old), len(new)):
            operations.append({"op": "add", "path": _pointer(path, index), "value": new[index]})
        return operations
    if type(old) is type(new) and old == new:
        return []
    return [{"op": "replace", "path": path, "value": new}]


# AdmissionReview ---------------------------------------------------------------------------------------------


def review_response(review: object, sidecar: SidecarSettings) -> dict:
    """The AdmissionReview answering `review`: allowed, with the injection patch when there is one."""
    if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
        raise WebhookRequestError("expected an AdmissionReview with a request")
    request = review["request"]
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise WebhookRequestError("the AdmissionReview request has no uid")
    api_version = review.get("apiVersion") or "admission.k8s.io/v1"
    response: dict = {"uid": uid, "allowed": True}
    answer = {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}
    kind = (request.get("kind") or {}).get("kind")
    pod = request.get("object")
    if kind != "Pod" or request.get("operation", "CREATE") != "CREATE" or request.get("subResource") \
            or not isinstance(pod, dict):
        return answer
    name = _describe(pod, request)
    refusal = injection_refusal(pod)
    if refusal is not None:
        log.info("pod %s not injected: %s", name, refusal)
        return answer
    try:
        injected = inject_pod(pod, sidecar)
    except InjectionError as exc:
        log.warning("pod %s refused: %s", name, exc)
        response["allowed"] = False
        response["status"] = {"code": 400, "message": f"laneproxy injection: {exc}"}
        return answer
    patch = json_patch(pod, injected)
    if patch:
        log.info("pod %s injected (%d patch operations)", name, len(patch))
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return answer


def _describe(pod: dict, request: dict) -> str:
    meta = pod.get("metadata") or {}
    name = meta.get("name") or (meta.get("generateName", "") + "*")
    return f"{request.get('namespace') or meta.get('namespace') or '?'}/{name}"


# Server ------------------------------------------------------------------------------------------------------


class CertificateReloader:
    """One SSLContext whose certificate follows the files: rotation without a restart."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple | None = None
        self.reload_if_changed()

    def _current_stamp(self) -> tuple:
        stats = [os.stat(path) for path in (self.cert_file, self.key_file)]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def reload_if_changed(self) -> bool:
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"cannot load {self.cert_file} / {self.key_file}: {exc}") from exc
        self._stamp = stamp
        return True

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if self.reload_if_changed():
                    log.info("serving certificate reloaded from %s", self.cert_file)
            except CertificateError as exc:  # a half-written rotation: keep the old one, try again later
                log.warning("%s; keeping the current certificate", exc)


def build_webhook_app(sidecar: SidecarSettings) -> web.Application:
    async def inject(request: web.Request) -> web.Response:
        try:
            review = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
        try:
            return web.json_response(review_response(review, sidecar))
        except WebhookRequestError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="LIVE\n")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post(INJECT_PATH, inject)
    app.router.add_get(READY_PATH, ready)
    return app


async def serve_webhook(settings: WebhookSettings) -> None:
    """Serve HTTPS until SIGTERM or SIGINT, picking up renewed certificates as their files change."""
    certificates = CertificateReloader(settings.cert_file, settings.key_file)
    app = build_webhook_app(settings.sidecar)

    async def watch_certificates(app: web.Application):
        watcher = asyncio.get_running_loop().create_task(certificates.watch(settings.cert_check_interval))
        yield
        watcher.cancel()

    app.cleanup_ctx.append(watch_certificates)
    log.info("webhook on https://%s:%d%s, injecting %s", settings.host, settings.port, INJECT_PATH,
             settings.sidecar.image)
    await serve_until_signalled(app, settings.host, settings.port, ssl_context=certificates.context)
