"""Sidecar injection: the pod a laneproxy sidecar lives in, computed once for `laneproxy inject` and the webhook.

Owns what injection adds to a pod (the sidecar container with its port, readiness probe on the admin /ready,
resources, security context and the environment naming its namespace, service and lane; the capture init
container, or HTTP_PROXY in the app containers when capture is off; the annotation recording it), the labels
and annotations that steer it, and where the pod template sits in each workload kind. `inject_pod` is pure and
idempotent: injecting an injected pod returns an equal pod, so the webhook's JSON patch (a diff of its
result, see webhook.py) is empty the second time. Nothing here reads files or talks to a cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata

import yaml

from laneproxy.capture import (
    INBOUND_LISTENER_PORT,
    OUTBOUND_LISTENER_PORT,
    PROXY_UID,
    CaptureError,
    parse_cidrs,
    parse_ports,
)
from laneproxy.core.errors import LaneProxyError

# Opt-in and opt-out, on a namespace or a pod (like istio-injection): `laneproxy-injection: enabled|disabled`.
INJECTION_LABEL = "laneproxy-injection"
# Set by injection; its value names the laneproxy that injected.
INJECTED_ANNOTATION = "laneproxy.dev/injected"
# Per-pod choices, as annotations on the pod (template).
CAPTURE_ANNOTATION = "laneproxy.dev/capture"  # iptables (default) | http-proxy
APP_PORT_ANNOTATION = "laneproxy.dev/app-port"  # default: the first TCP containerPort of the first app container
EXCLUDE_OUTBOUND_PORTS_ANNOTATION = "laneproxy.dev/exclude-outbound-ports"  # "5432,6379": non-HTTP traffic
EXCLUDE_OUTBOUND_CIDRS_ANNOTATION = "laneproxy.dev/exclude-outbound-cidrs"

SIDECAR_NAME = "laneproxy"
CAPTURE_INIT_NAME = "laneproxy-capture"
LANE_LABEL = "ASM_TRAFFIC_TAG"  # the pod label that places a pod in a lane (what Kruise Rollout patches)
SERVICE_LABEL = "app"
ADMIN_PORT = 15000
METRICS_PORT = 15020  # Istio's merged-metrics port
CAPTURE_IPTABLES = "iptables"
CAPTURE_HTTP_PROXY = "http-proxy"

# kind -> path of the pod template inside the object (a Pod is its own template).
POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "CloneSet": ("spec", "template"),  # OpenKruise
}


class InjectionError(LaneProxyError):
    """A pod cannot be injected as asked: a bad annotation, or an input that is not a Kubernetes object."""


def _version() -> str:
    try:
        return metadata.version("laneproxy")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def default_image() -> str:
    return f"laneproxy:{_version()}"


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """What every injected pod gets; per-pod choices come from the pod's annotations."""

    image: str = field(default_factory=default_image)
    image_pull_policy: str = "IfNotPresent"
    capture: str = CAPTURE_IPTABLES
    proxy_uid: int = PROXY_UID
    inbound_port: int = INBOUND_LISTENER_PORT
    outbound_port: int = OUTBOUND_LISTENER_PORT
    admin_port: int = ADMIN_PORT
    metrics_port: int = METRICS_PORT
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "2"
    memory_limit: str = "1Gi"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.capture not in (CAPTURE_IPTABLES, CAPTURE_HTTP_PROXY):
            raise InjectionError(f"capture must be {CAPTURE_IPTABLES} or {CAPTURE_HTTP_PROXY}, not {self.capture!r}")


def injection_refusal(pod: dict) -> str | None:
    """Why a pod (or pod template) must not get a sidecar, or None when it may."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(INJECTION_LABEL) == "disabled":
        return f"label {INJECTION_LABEL}: disabled"
    if (pod.get("spec") or {}).get("hostNetwork"):
        return "hostNetwork pod: capture would rewrite the node's own traffic"
    return None


def inject_pod(pod: dict, settings: SidecarSettings, workload: str | None = None) -> dict:
    """The pod (or pod template: metadata and spec) with the sidecar; the input is not modified.

    `workload` names the object holding a template (its pods' workload); a pod's comes from its owner.

    Containers and init containers laneproxy owns are found by name and updated in place, so injecting
    again with the same settings changes nothing and injecting with new settings updates them.
    """
    if not isinstance(pod, dict) or not isinstance(pod.get("spec"), dict):
        raise InjectionError("a pod needs a spec")
    injected = copy.deepcopy(pod)
    meta = injected.setdefault("metadata", {}) or {}
    injected["metadata"] = meta
    annotations = meta.get("annotations") or {}
    spec = injected["spec"]
    containers = spec.get("containers") or []
    if not containers:
        raise InjectionError("a pod needs at least one container")
    app_containers = [c for c in containers if c.get("name") != SIDECAR_NAME]
    capture = annotations.get(CAPTURE_ANNOTATION, settings.capture)
    if capture not in (CAPTURE_IPTABLES, CAPTURE_HTTP_PROXY):
        raise InjectionError(f"annotation {CAPTURE_ANNOTATION}: expected {CAPTURE_IPTABLES} or {CAPTURE_HTTP_PROXY}, "
                             f"got {capture!r}")
    app_port = _app_port(app_containers, annotations)
    if capture == CAPTURE_IPTABLES:
        _refuse_proxy_uid(spec, app_containers, settings.proxy_uid)

    sidecar = sidecar_container(settings, app_port)
    add_telemetry(sidecar, annotations, settings, workload or workload_of_pod(pod))
    _put_named(spec, "containers", sidecar)
    if capture == CAPTURE_IPTABLES:
        _put_named(spec, "initContainers", capture_init_container(settings, app_port, annotations))
    else:
        _remove_named(spec, "initContainers", CAPTURE_INIT_NAME)
        proxy_url = f"http://127.0.0.1:{settings.outbound_port}"
        for container in spec["containers"]:
            if container.get("name") != SIDECAR_NAME:
                _ensure_env(container, {"HTTP_PROXY": proxy_url, "http_proxy": proxy_url,
                                        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    annotations[INJECTED_ANNOTATION] = settings.image
    meta["annotations"] = annotations
    return injected


def sidecar_container(settings: SidecarSettings, app_port: int | None) -> dict:
    env = [
        {"name": "LANEPROXY_SOURCE", "value": "kubernetes"},
        {"name": "LANEPROXY_OUTBOUND", "value": f"127.0.0.1:{settings.outbound_port}"},
        {"name": "LANEPROXY_ADMIN", "value": f"127.0.0.1:{settings.admin_port}"},
        {"name": "LANEPROXY_LOG_LEVEL", "value": settings.log_level},
        # Short host names (`mockb`) resolve in the pod's own namespace.
        {"name": "LANEPROXY_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The pod's lane: its ASM_TRAFFIC_TAG label (empty when it has none), used in strict mode.
        {"name": "LANEPROXY_LANE", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LANE_LABEL}']"}}},
        # The service this sidecar fronts, by the seed's convention (the `app` label); informational.
        {"name": "LANEPROXY_SERVICE", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{SERVICE_LABEL}']"}}},
    ]
    ports = []
    if app_port is not None:
        # 0.0.0.0: captured connections arrive on the pod's address (REDIRECT in PREROUTING keeps it).
        env[1:1] = [{"name": "LANEPROXY_INBOUND", "value": f"0.0.0.0:{settings.inbound_port}"},
                    {"name": "LANEPROXY_APP", "value": f"127.0.0.1:{app_port}"}]
        ports.append({"name": "lp-inbound", "containerPort": settings.inbound_port, "protocol": "TCP"})
    container = {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["run"],
        "env": env,
        "ports": ports,
        # The admin API stays on loopback (it can drain and stop the proxy), so the kubelet cannot reach it
        # with an httpGet probe; the probe runs inside the container and asks the admin /ready.
        "readinessProbe": {
            "exec": {"command": ["laneproxy", "probe", f"http://127.0.0.1:{settings.admin_port}/ready"]},
            "initialDelaySeconds": 1,
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"cpu": settings.cpu_limit, "memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsUser": settings.proxy_uid,
            "runAsGroup": settings.proxy_uid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if not ports:
        del container["ports"]
    return container


def capture_init_container(settings: SidecarSettings, app_port: int | None, annotations: dict) -> dict:
    try:
        exclude_ports = parse_ports(annotations.get(EXCLUDE_OUTBOUND_PORTS_ANNOTATION))
        exclude_cidrs = parse_cidrs(annotations.get(EXCLUDE_OUTBOUND_CIDRS_ANNOTATION))
    except CaptureError as exc:
        raise InjectionError(f"annotation: {exc}") from exc
    args = ["capture", "--apply",
            "--inbound-listener-port", str(settings.inbound_port),
            "--outbound-listener-port", str(settings.outbound_port),
            "--proxy-uid", str(settings.proxy_uid)]
    if app_port is not None:
        args += ["--inbound-ports", str(app_port)]
    if exclude_ports:
        args += ["--exclude-outbound-ports", ",".join(map(str, exclude_ports))]
    if exclude_cidrs:
        args += ["--exclude-outbound-cidrs", ",".join(exclude_cidrs)]
    return {
        "name": CAPTURE_INIT_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
        # Root with NET_ADMIN and NET_RAW only, and only for the few milliseconds of iptables-restore.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _app_port(app_containers: list[dict], annotations: dict) -> int | None:
    value = annotations.get(APP_PORT_ANNOTATION)
    if value is not None:
        try:
            port = int(value)
        except ValueError as exc:
            raise InjectionError(f"annotation {APP_PORT_ANNOTATION}: not a port number: {value!r}") from exc
        if not 0 < port < 65536:
            raise InjectionError(f"annotation {APP_PORT_ANNOTATION}: {port} is outside 1-65535")
        return port
    for container in app_containers[:1]:
        for port in container.get("ports") or []:
            if port.get("protocol", "TCP") == "TCP" and isinstance(port.get("containerPort"), int):
                return port["containerPort"]
    return None


def _refuse_proxy_uid(spec: dict, app_containers: list[dict], proxy_uid: int) -> None:
    """An app running as the proxy's uid would bypass capture: its traffic would silently skip the lanes."""
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    for container in app_containers:
        uid = (container.get("securityContext") or {}).get("runAsUser", pod_uid)
        if uid == proxy_uid:
            raise InjectionError(f"container {container.get('name')!r} runs as uid {proxy_uid}, the proxy's: the "
                                 f"capture rules exempt that uid, so its traffic would bypass the sidecar; "
                                 f"run it as another uid")


def _put_named(spec: dict, key: str, item: dict) -> None:
    """Merge item into the list entry with its name, or append it.

    Merging rather than replacing keeps what the API server defaulted in an already injected pod
    (terminationMessagePath, fieldRef apiVersion, probe thresholds...), so re-injecting it patches nothing.
    """
    items = spec.get(key) or []
    for index, existing in enumerate(items):
        if existing.get("name") == item["name"]:
            items[index] = _merged(existing, item)
            break
    else:
        items.append(item)
    spec[key] = items


def _merged(existing: object, wanted: object) -> object:
    """`wanted` laid over `existing`: mappings key by key, lists of equal length item by item."""
    if isinstance(existing, dict) and isinstance(wanted, dict):
        result = dict(existing)
        for key, value in wanted.items():
            result[key] = _merged(existing[key], value) if key in existing else value
        return result
    if isinstance(existing, list) and isinstance(wanted, list) and len(existing) == len(wanted):
        return [_merged(old, new) for old, new in zip(existing, wanted, strict=True)]
    return wanted


def _remove_named(spec: dict, key: str, name: str) -> None:
    if spec.get(key):
        spec[key] = [item for item in spec[key] if item.get("name") != name]
        if not spec[key]:
            del spec[key]


def _ensure_env(container: dict, values: dict[str, str]) -> None:
    """Add variables the container does not set already; the app's own values win."""
    env = container.get("env") or []
    present = {item.get("name") for item in env}
    env.extend({"name": name, "value": value} for name, value in values.items() if name not in present)
    container["env"] = env


# Workloads and manifests -------------------------------------------------------------------------------------


def pod_template(document: dict) -> dict | None:
    """The pod template inside a workload (the Pod itself for a Pod), or None for other kinds."""
    path = POD_TEMPLATE_PATHS.get(document.get("kind", ""))
    if path is None:
        return None
    node = document
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def inject_document(document: dict, settings: SidecarSettings) -> tuple[dict, str | None]:
    """(the document with its pod template injected, or why a workload was left alone (None if it was not))."""
    if document.get("kind") == "List":
        items = []
        for item in document.get("items") or []:
            items.append(inject_document(item, settings)[0])
        return {**document, "items": items}, None
    template = pod_template(document)
    if template is None:
        return document, None  # not a workload: passed through unchanged
    refusal = injection_refusal(template)
    if refusal is not None:
        return document, refusal
    # A template has no name of its own: its pods' workload is the object holding it.
    holder = None if document["kind"] == "Pod" else (document.get("metadata") or {}).get("name")
    injected = inject_pod(template, settings, holder)
    path = POD_TEMPLATE_PATHS[document["kind"]]
    if not path:
        return injected, None
    result = copy.deepcopy(document)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = injected
    return result, None


def inject_manifests(text: str, settings: SidecarSettings) -> Iterator[tuple[dict, str | None]]:
    """Every document of a multi-document YAML stream, injected where it holds a pod template."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise InjectionError(f"not YAML: {exc}") from exc
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document:
            raise InjectionError("every document must be a Kubernetes object with a kind")
        yield inject_document(document, settings)


def dump_manifests(documents: Iterable[dict]) -> str:
    return yaml.safe_dump_all(list(documents), sort_keys=False, default_flow_style=False, explicit_start=False)


# Telemetry: Istio's metrics identity and the scrape annotations ---------------------------------------------

# Istio's scrape annotations, read by annotation-based Prometheus discovery (and Istio's own sample config).
PROMETHEUS_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")
METRICS_PATH = "/stats/prometheus"
APP_METRICS_ANNOTATION = "laneproxy.dev/app-metrics"  # "PORT/PATH": the app's scrape target, merged by the sidecar
VERSION_LABEL = "version"
# Istio's canonical service labels, when the pod has them (empty otherwise: the proxy then uses app and version).
CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CANONICAL_REVISION_LABEL = "service.istio.io/canonical-revision"


def workload_of_pod(pod: dict) -> str | None:
    """The workload a pod belongs to, as Istio names it: a ReplicaSet owner without its hash is the Deployment.

    The webhook sees pods with their owner references; a bare pod is its own workload. A template
    (kube-inject) has neither: its workload is given by inject_document.
    """
    meta = pod.get("metadata") or {}
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller") and owner.get("name"):
            name = owner["name"]
            if owner.get("kind") == "ReplicaSet" and "-" in name:
                return name.rsplit("-", 1)[0]  # <deployment>-<pod-template-hash>
            if owner.get("kind") == "Job" and "-" in name and name.rsplit("-", 1)[1].isdigit():
                return name.rsplit("-", 1)[0]  # <cronjob>-<scheduled time>
            return name
    if meta.get("generateName"):
        return None  # a controller without an owner reference yet: name it by nothing rather than by a hash
    return meta.get("name")


def add_telemetry(sidecar: dict, annotations: dict, settings: SidecarSettings, workload: str | None) -> None:
    """The metrics listener, the workload identity its metrics carry, and Prometheus' scrape annotations.

    Applied to the sidecar container before it is merged into the pod, so re-injecting an injected pod
    (with the API server's defaults filled in) changes nothing. A Kruise canary Deployment cloned from an
    injected template keeps the base's LANEPROXY_WORKLOAD; its pods still differ by their ASM_TRAFFIC_TAG
    label, which the metrics carry as `lane_used`. Scrape annotations the pod already has are the app's
    own: the pod is then scraped on 15020 and the sidecar appends the app's metrics to its own.
    """
    sidecar["env"].extend([
        {"name": "LANEPROXY_METRICS", "value": f"0.0.0.0:{settings.metrics_port}"},
        {"name": "LANEPROXY_VERSION", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{VERSION_LABEL}']"}}},
        {"name": "LANEPROXY_CANONICAL_SERVICE",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{CANONICAL_NAME_LABEL}']"}}},
        {"name": "LANEPROXY_CANONICAL_REVISION",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{CANONICAL_REVISION_LABEL}']"}}},
    ])
    if workload:
        sidecar["env"].append({"name": "LANEPROXY_WORKLOAD", "value": workload})
    sidecar.setdefault("ports", []).append(
        {"name": METRICS_PORT_NAME, "containerPort": settings.metrics_port, "protocol": "TCP"})
    if annotations.get("prometheus.io/scrape") == "false":
        return  # the pod asked not to be scraped
    app_metrics = annotations.get(APP_METRICS_ANNOTATION)
    port = annotations.get("prometheus.io/port")
    if app_metrics is None and port is not None and port != str(settings.metrics_port):
        # The app's own scrape target: merged into the sidecar's answer, as Istio's metrics merging does;
        # recorded in an annotation so that injecting again still knows it.
        if not port.isdigit() or not 0 < int(port) < 65536:
            return  # not a target the sidecar can fetch (a named port?): the app's annotations stay as they are
        app_metrics = annotations[APP_METRICS_ANNOTATION] = f"{port}{annotations.get('prometheus.io/path', '/metrics')}"
    if app_metrics:
        sidecar["env"].append({"name": "LANEPROXY_APP_METRICS", "value": f"http://127.0.0.1:{app_metrics}"})
    annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.metrics_port),
                        "prometheus.io/path": METRICS_PATH})


METRICS_PORT_NAME = "lp-metrics"
