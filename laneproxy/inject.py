"""Sidecar injection: the pod a laneproxy sidecar lives in, computed once for `laneproxy inject` and the webhook.

Owns what injection adds to a pod (the sidecar container with its port, readiness probe on the admin /ready,
resources, security context and the environment naming its namespace, service and lane; the capture init
container, or HTTP_PROXY in the app containers when capture is off; the annotation recording it), the labels
and annotations that steer it, and where the pod template sits in each workload kind.

It also owns the pod's lifecycle around the proxy:
- start: the app never starts before its proxy is ready. Before Kubernetes 1.29 the sidecar is the first
  container with a `postStart` hook that waits for its /ready (the kubelet starts containers in order and
  the next one only after the hook returns: Istio's `holdApplicationUntilProxyStarts`); with
  `native_sidecar` it is an init container with `restartPolicy: Always` and a startup probe (1.29+).
- stop: every app container and the sidecar get a `preStop` hook, an HTTP GET the kubelet sends to the
  sidecar's lifecycle port, that returns once the pod has left the endpoints (as the sidecar's own table
  sees it) plus a margin for every other proxy to see it too, and no request is in flight; the sidecar's
  hook also waits for the app to close its port. So the app is stopped only when no caller can still pick
  this pod, and the sidecar after the app (admin/pod_hooks.py owns the waiting). The preStop wait and the
  sidecar's drain share the pod's `terminationGracePeriodSeconds` (stop_budget), so the kubelet's SIGKILL
  never cuts a drain short.
- Jobs: their pods are injected only when they opt in (label `laneproxy-injection: enabled` on the pod
  itself); the sidecar then exits once the app containers have (it reads its own pod's status).
- credentials: a sidecar on the xDS source (the default: `laneproxy controller` watches the API once and serves
  every sidecar) holds no API token at all: the pod gets `automountServiceAccountToken: false` and its token path
  in the sidecar is an empty directory, so even a token the app asks for (`automountServiceAccountToken: true`,
  which the app keeps) never reaches the proxy. A sidecar on the direct `kubernetes` source (small clusters, local
  runs) and a Job's sidecar (it reads its own pod to exit with the app before Kubernetes 1.29, so it stays on the
  direct source) alone mount a projected token of the pod's service account; the app containers get none.
- capture: every TCP port the app containers declare is captured inbound (the ports a Service can target by
  name, and those it targets by number when declared), or the ports of the `inbound-ports` annotation. `inject_pod` is pure and
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
from laneproxy.core.xds_view import XdsAddressError, parse_source

# Opt-in and opt-out, on a namespace or a pod (like istio-injection): `laneproxy-injection: enabled|disabled`.
INJECTION_LABEL = "laneproxy-injection"
# Set by injection; its value names the laneproxy that injected.
INJECTED_ANNOTATION = "laneproxy.dev/injected"
# Per-pod choices, as annotations on the pod (template).
CAPTURE_ANNOTATION = "laneproxy.dev/capture"  # iptables (default) | http-proxy
APP_PORT_ANNOTATION = "laneproxy.dev/app-port"  # default: the first TCP containerPort of the first app container
# The app ports captured inbound, "8000,9090"; default: every TCP containerPort of the app containers.
INBOUND_PORTS_ANNOTATION = "laneproxy.dev/inbound-ports"
EXCLUDE_OUTBOUND_PORTS_ANNOTATION = "laneproxy.dev/exclude-outbound-ports"  # "5432,6379": non-HTTP traffic
EXCLUDE_OUTBOUND_CIDRS_ANNOTATION = "laneproxy.dev/exclude-outbound-cidrs"

SIDECAR_NAME = "laneproxy"
CAPTURE_INIT_NAME = "laneproxy-capture"
LANE_LABEL = "ASM_TRAFFIC_TAG"  # the pod label that places a pod in a lane (what Kruise Rollout patches)
SERVICE_LABEL = "app"
ADMIN_PORT = 15000
METRICS_PORT = 15020  # Istio's merged-metrics port
# The kubelet's lifecycle hooks and readiness probe reach the sidecar here, on the pod's address and never
# captured (Istio's health port, beside the merged-metrics port). It serves only waits and readiness,
# nothing that changes the proxy, unlike the admin API, which stays on loopback.
LIFECYCLE_PORT = 15021
TOKEN_VOLUME = "laneproxy-api-token"
# An empty directory over the token path in a sidecar that must hold no API credentials (the xDS source).
NO_TOKEN_VOLUME = "laneproxy-no-token"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# Seconds the sidecar waits for its /ready after starting before the kubelet gives up on the pod's start.
START_TIMEOUT_SECONDS = 120
CAPTURE_IPTABLES = "iptables"
CAPTURE_HTTP_PROXY = "http-proxy"
# Where sidecars get lane membership: the controller's xDS service (deploy/base/controller), or the API directly.
XDS_SCHEME = "xds://"
DEFAULT_SOURCE = "xds://laneproxy-controller.laneproxy-system.svc:15010"
DIRECT_SOURCE = "kubernetes"
# What apps reach directly when they use the sidecar as their proxy: loopback, the API server (kubelet expands
# $(KUBERNETES_SERVICE_HOST), a service variable) and the link-local metadata endpoints (cloud instance metadata,
# ECS task metadata): credentials and API calls never pass through the proxy.
NO_PROXY = ("127.0.0.1,localhost,$(KUBERNETES_SERVICE_HOST),kubernetes.default.svc,kubernetes.default.svc.cluster.local,"
            "169.254.169.254,169.254.170.2,metadata.google.internal")

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
    lifecycle_port: int = LIFECYCLE_PORT
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "2"
    memory_limit: str = "1Gi"
    log_level: str = "info"
    # Kubernetes 1.29+: the sidecar as a native sidecar (an init container with restartPolicy: Always).
    native_sidecar: bool = False
    # Seconds every other proxy gets to see that this pod left the endpoints before its app is stopped.
    stop_margin_seconds: float = 2.0
    # The sidecar's minimum drain after SIGTERM (Istio's MINIMUM_DRAIN_DURATION); shortened for a short grace.
    drain_seconds: float = 5.0
    # `xds://HOST:PORT` (the controller; no API credentials in the pod) or `kubernetes` (the sidecar watches the API).
    source: str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        if self.capture not in (CAPTURE_IPTABLES, CAPTURE_HTTP_PROXY):
            raise InjectionError(f"capture must be {CAPTURE_IPTABLES} or {CAPTURE_HTTP_PROXY}, not {self.capture!r}")
        check_source(self.source)


def check_source(source: str) -> str:
    """The sidecar source as given, or an InjectionError saying what is accepted: what the sidecar's --source takes."""
    if source == DIRECT_SOURCE:
        return source
    try:
        parse_source(source)
    except XdsAddressError as exc:
        raise InjectionError(f"sidecar source must be {DIRECT_SOURCE} or {XDS_SCHEME}HOST:PORT[,HOST:PORT...]: "
                             f"{exc}") from None
    return source


# Kubernetes' default terminationGracePeriodSeconds, and what is kept back from it for the kubelet's SIGKILL.
DEFAULT_GRACE_SECONDS = 30
KILL_MARGIN_SECONDS = 1


@dataclass(frozen=True, slots=True)
class StopBudget:
    """How the pod's grace period is shared: the preStop wait, then the sidecar's drain, within the grace."""

    stop_max: int  # the longest a preStop waits (LANEPROXY_STOP_MAX)
    drain_seconds: int  # the minimum drain after SIGTERM (LANEPROXY_DRAIN_SECONDS)
    drain_limit: int  # the latest exit after SIGTERM (LANEPROXY_DRAIN_LIMIT_SECONDS)


def stop_budget(grace: object, drain_seconds: float = 5.0) -> StopBudget:
    """Derived from the pod's terminationGracePeriodSeconds, as Istio derives terminationDrainDuration from it.

    The kubelet counts the preStop hook inside the grace period and sends SIGKILL at its end, and the
    sidecar's preStop ends at most `stop_max` after deletion, its drain at most `drain_limit` after that:
    so stop_max + drain_limit stays a second under the grace. A third of it (at least the minimum drain)
    goes to the drain, the rest to the preStop wait: 20 s and 9 s of the default 30 s. A grace shorter
    than the minimum drain shortens the drain and leaves the preStop nothing. A missing or malformed
    grace is Kubernetes' default.
    """
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        grace = DEFAULT_GRACE_SECONDS
    total = max(0, int(grace) - KILL_MARGIN_SECONDS)
    minimum = max(0, int(drain_seconds))
    drain_limit = min(total, max(minimum, total // 3))
    return StopBudget(stop_max=total - drain_limit, drain_seconds=min(minimum, drain_limit), drain_limit=drain_limit)


def is_job_pod(pod: dict) -> bool:
    """A pod a Job runs (owned by one, or carrying the Job controller's labels): it must finish, not serve."""
    meta = pod.get("metadata") or {}
    if any(ref.get("kind") == "Job" for ref in meta.get("ownerReferences") or [] if isinstance(ref, dict)):
        return True
    labels = meta.get("labels") or {}
    return "job-name" in labels or "batch.kubernetes.io/job-name" in labels


def injection_refusal(pod: dict, *, job: bool = False) -> str | None:
    """Why a pod (or pod template) must not get a sidecar, or None when it may. `job`: it is a Job's pod."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(INJECTION_LABEL) == "disabled":
        return f"label {INJECTION_LABEL}: disabled"
    if (pod.get("spec") or {}).get("hostNetwork"):
        return "hostNetwork pod: capture would rewrite the node's own traffic"
    if (job or is_job_pod(pod)) and labels.get(INJECTION_LABEL) != "enabled":
        return f"a Job's pod: injected only when the pod itself has the label {INJECTION_LABEL}: enabled"
    return None


def inject_pod(pod: dict, settings: SidecarSettings, workload: str | None = None, *, job: bool = False) -> dict:
    """The pod (or pod template: metadata and spec) with the sidecar; the input is not modified.

    `workload` names the object holding a template (its pods' workload); a pod's comes from its owner.

    Containers and init containers laneproxy owns are found by name and updated in place, so injecting
    again with the same settings changes nothing and injecting with new settings updates them. `job`: the
    pod belongs to a Job (found from the pod itself when not said), so the sidecar exits with the app.
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
    if not app_containers:
        raise InjectionError("a pod needs an app container besides the sidecar")
    capture = annotations.get(CAPTURE_ANNOTATION, settings.capture)
    if capture not in (CAPTURE_IPTABLES, CAPTURE_HTTP_PROXY):
        raise InjectionError(f"annotation {CAPTURE_ANNOTATION}: expected {CAPTURE_IPTABLES} or {CAPTURE_HTTP_PROXY}, "
                             f"got {capture!r}")
    app_port = _app_port(app_containers, annotations)
    inbound_ports = _inbound_ports(app_containers, annotations, app_port, settings)
    if app_port is None and inbound_ports:
        app_port = inbound_ports[0]  # a port declared by a later container: the inbound listener needs one
    if capture == CAPTURE_IPTABLES:
        _refuse_proxy_uid(spec, app_containers, settings.proxy_uid)
    job = job or is_job_pod(injected)
    # A Job's sidecar reads its own pod to exit with the app (control/own_pod.py): it needs the API, so it keeps
    # the direct source and its token; every other sidecar uses the source the injector is set to.
    source = DIRECT_SOURCE if job else settings.source

    sidecar = sidecar_container(settings, app_port, inbound_ports, source=source,
                                exit_with=[c.get("name", "") for c in app_containers] if job else None,
                                budget=stop_budget(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS),
                                                   settings.drain_seconds))
    add_telemetry(sidecar, annotations, settings, workload or workload_of_pod(pod))
    if source == DIRECT_SOURCE:
        _remove_volume(spec, NO_TOKEN_VOLUME)
        token_mount = _token_for_sidecar_only(spec, app_containers)
    else:
        _remove_volume(spec, TOKEN_VOLUME)
        token_mount = _no_token_for_sidecar(spec, app_containers)
    if token_mount is not None:
        sidecar["volumeMounts"] = [token_mount]
    if settings.native_sidecar:
        _remove_named(spec, "containers", SIDECAR_NAME)
    else:
        _remove_named(spec, "initContainers", SIDECAR_NAME)
    if capture == CAPTURE_IPTABLES:
        _put_named(spec, "initContainers", capture_init_container(settings, inbound_ports, annotations))
    else:
        _remove_named(spec, "initContainers", CAPTURE_INIT_NAME)
        proxy_url = f"http://127.0.0.1:{settings.outbound_port}"
        for container in spec["containers"]:
            if container.get("name") != SIDECAR_NAME:
                _ensure_env(container, {"HTTP_PROXY": proxy_url, "http_proxy": proxy_url,
                                        "HTTPS_PROXY": proxy_url, "https_proxy": proxy_url,  # CONNECT tunnels
                                        "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY})
    if settings.native_sidecar:
        # Init containers start in order: right after the capture rules, before the app's own init containers
        # (which then already have a proxy), with a startup probe that holds the rest until the proxy is ready.
        del sidecar["lifecycle"]["postStart"]
        sidecar["restartPolicy"] = "Always"
        sidecar["startupProbe"] = {
            "exec": {"command": ["laneproxy", "probe", f"http://127.0.0.1:{settings.admin_port}/ready"]},
            "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": START_TIMEOUT_SECONDS,
        }
        _put_named_after(spec, "initContainers", sidecar, CAPTURE_INIT_NAME)
    else:
        # First among the containers: the kubelet starts them in order and runs each one's postStart hook to
        # its end before starting the next, so the app starts only once the proxy answers /ready.
        _put_named_first(spec, "containers", sidecar)
    if app_port is not None and not job:
        for container in spec["containers"]:
            if container.get("name") != SIDECAR_NAME:
                _add_pre_stop(container, settings, wait_for_app=False)
    annotations[INJECTED_ANNOTATION] = settings.image
    meta["annotations"] = annotations
    return injected


def _pre_stop_hook(settings: SidecarSettings, *, wait_for_app: bool) -> dict:
    path = "/wait-for-stop?app=1" if wait_for_app else "/wait-for-stop"
    return {"httpGet": {"path": path, "port": settings.lifecycle_port, "scheme": "HTTP"}}


def _add_pre_stop(container: dict, settings: SidecarSettings, *, wait_for_app: bool) -> None:
    """The app's preStop hook, unless it has its own (then the app decides when it is safe to stop)."""
    lifecycle = container.get("lifecycle") or {}
    current = lifecycle.get("preStop")
    wanted = _pre_stop_hook(settings, wait_for_app=wait_for_app)
    if current is None or (current.get("httpGet") or {}).get("port") == settings.lifecycle_port:
        lifecycle["preStop"] = _merged(current, wanted) if current else wanted
        container["lifecycle"] = lifecycle


def sidecar_container(settings: SidecarSettings, app_port: int | None, inbound_ports: tuple[int, ...] = (),
                      exit_with: list[str] | None = None, budget: StopBudget | None = None,
                      source: str | None = None) -> dict:
    budget = budget or stop_budget(DEFAULT_GRACE_SECONDS, settings.drain_seconds)
    env = [
        {"name": "LANEPROXY_SOURCE", "value": source or settings.source},
        {"name": "LANEPROXY_OUTBOUND", "value": f"127.0.0.1:{settings.outbound_port}"},
        {"name": "LANEPROXY_ADMIN", "value": f"127.0.0.1:{settings.admin_port}"},
        {"name": "LANEPROXY_LIFECYCLE", "value": f"0.0.0.0:{settings.lifecycle_port}"},
        {"name": "LANEPROXY_LOG_LEVEL", "value": settings.log_level},
        # Short host names (`mockb`) resolve in the pod's own namespace.
        {"name": "LANEPROXY_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # The pod's lane: its ASM_TRAFFIC_TAG label (empty when it has none), used in strict mode.
        {"name": "LANEPROXY_LANE", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LANE_LABEL}']"}}},
        # The service this sidecar fronts, by the seed's convention (the `app` label); informational.
        {"name": "LANEPROXY_SERVICE", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{SERVICE_LABEL}']"}}},
        # The pod's own address and name: the preStop wait looks for the address among the endpoints, and a
        # Job's sidecar reads its own pod to see the app containers end.
        {"name": "LANEPROXY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "LANEPROXY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "LANEPROXY_STOP_MARGIN", "value": f"{settings.stop_margin_seconds:g}"},
        # Within the pod's terminationGracePeriodSeconds (stop_budget): the kubelet kills at its end.
        {"name": "LANEPROXY_STOP_MAX", "value": str(budget.stop_max)},
        {"name": "LANEPROXY_DRAIN_SECONDS", "value": str(budget.drain_seconds)},
        {"name": "LANEPROXY_DRAIN_LIMIT_SECONDS", "value": str(budget.drain_limit)},
    ]
    ports = []
    if app_port is not None:
        # 0.0.0.0: captured connections arrive on the pod's address (REDIRECT in PREROUTING keeps it).
        env[1:1] = [{"name": "LANEPROXY_INBOUND", "value": f"0.0.0.0:{settings.inbound_port}"},
                    {"name": "LANEPROXY_APP", "value": f"127.0.0.1:{app_port}"}]
        if len(inbound_ports) > 1:
            # A captured connection goes on to the app port it was sent to (SO_ORIGINAL_DST), one of these.
            env.insert(3, {"name": "LANEPROXY_APP_PORTS", "value": ",".join(map(str, inbound_ports))})
        ports.append({"name": "lp-inbound", "containerPort": settings.inbound_port, "protocol": "TCP"})
    if exit_with:
        env.append({"name": "LANEPROXY_EXIT_WITH", "value": ",".join(exit_with)})
    container = {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["run"],
        "env": env,
        "ports": ports,
        # On the lifecycle port (the admin API stays on loopback: it can drain and stop the proxy): ready once
        # the proxy has its table and the app accepts connections, so the pod is Ready only when it can answer.
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": settings.lifecycle_port, "scheme": "HTTP"},
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "lifecycle": {
            # Holds the next container's start until the proxy is ready (a failed hook restarts the sidecar).
            "postStart": {"exec": {"command": ["laneproxy", "probe", "--wait", str(START_TIMEOUT_SECONDS),
                                               f"http://127.0.0.1:{settings.admin_port}/ready"]}},
            "preStop": _pre_stop_hook(settings, wait_for_app=app_port is not None),
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
    if exit_with:
        # A Job's sidecar has no stop to wait for: it exits itself once the app containers have ended.
        del container["lifecycle"]["preStop"]
    if not ports:
        del container["ports"]
    return container


def capture_init_container(settings: SidecarSettings, inbound_ports: tuple[int, ...], annotations: dict) -> dict:
    try:
        exclude_ports = parse_ports(annotations.get(EXCLUDE_OUTBOUND_PORTS_ANNOTATION))
        exclude_cidrs = parse_cidrs(annotations.get(EXCLUDE_OUTBOUND_CIDRS_ANNOTATION))
    except CaptureError as exc:
        raise InjectionError(f"annotation: {exc}") from exc
    args = ["capture", "--apply",
            "--inbound-listener-port", str(settings.inbound_port),
            "--outbound-listener-port", str(settings.outbound_port),
            "--proxy-uid", str(settings.proxy_uid)]
    if inbound_ports:
        args += ["--inbound-ports", ",".join(map(str, inbound_ports))]
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


def _inbound_ports(app_containers: list[dict], annotations: dict, app_port: int | None,
                   settings: SidecarSettings) -> tuple[int, ...]:
    """The app ports captured inbound: the annotation's, or every TCP port the app containers declare.

    A Service targets a named port only through a declaration, and a numbered one usually; a port a Service
    targets without any declaration needs the annotation (the webhook cannot see Services).
    """
    value = annotations.get(INBOUND_PORTS_ANNOTATION)
    if value is not None:
        try:
            ports = parse_ports(value)
        except CaptureError as exc:
            raise InjectionError(f"annotation {INBOUND_PORTS_ANNOTATION}: {exc}") from exc
    else:
        ports = tuple(port["containerPort"] for container in app_containers for port in container.get("ports") or []
                      if port.get("protocol", "TCP") == "TCP" and isinstance(port.get("containerPort"), int))
        if app_port is not None:
            ports = (app_port, *ports)
    own = {settings.inbound_port, settings.outbound_port, settings.admin_port, settings.lifecycle_port,
           settings.metrics_port}
    for port in ports:
        if not 0 < port < 65536:
            raise InjectionError(f"annotation {INBOUND_PORTS_ANNOTATION}: {port} is outside 1-65535")
        if port in own:
            raise InjectionError(f"app port {port} is one of the sidecar's own ports {sorted(own)}")
    return tuple(dict.fromkeys(ports))


def _token_for_sidecar_only(spec: dict, app_containers: list[dict]) -> dict | None:
    """The sidecar's mount of an API token, after taking the automatic one away from the app containers.

    Returns None when the pod asks for the token itself (`automountServiceAccountToken: true`): the admission
    plugin mounts it into every container then, the sidecar included. Otherwise the pod gets no automatic
    token, and the mounts the ServiceAccount admission plugin already added (the webhook sees the pod after it)
    are removed from the app containers with their volume; the sidecar mounts a projected token instead.
    """
    if spec.get("automountServiceAccountToken") is True:
        return None
    spec["automountServiceAccountToken"] = False
    # What the ServiceAccount admission plugin would set: a projected token must name its account.
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    _remove_automatic_tokens(spec, app_containers)
    volumes = spec.get("volumes") or []
    token_volume = {"name": TOKEN_VOLUME, "projected": {"defaultMode": 0o444, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                       "fieldPath": "metadata.namespace"}}]}},
    ]}}
    for index, volume in enumerate(volumes):
        if volume.get("name") == TOKEN_VOLUME:
            volumes[index] = _merged(volume, token_volume)
            break
    else:
        volumes.append(token_volume)
    spec["volumes"] = volumes
    return {"name": TOKEN_VOLUME, "mountPath": TOKEN_PATH, "readOnly": True}


def _no_token_for_sidecar(spec: dict, app_containers: list[dict]) -> dict:
    """The sidecar's mount of an empty directory over the token path: it holds no API credentials whatever the pod.

    The app containers lose the automatic token unless the pod asks for it (`automountServiceAccountToken: true`:
    the app keeps it). Either way the sidecar's token path is an empty, read-only directory, so a token the
    ServiceAccount admission plugin would add when it runs again after the webhook (reinvocation) never lands there.
    """
    if spec.get("automountServiceAccountToken") is not True:
        spec["automountServiceAccountToken"] = False
        _remove_automatic_tokens(spec, app_containers)
    volumes = spec.get("volumes") or []
    if not any(volume.get("name") == NO_TOKEN_VOLUME for volume in volumes):
        volumes.append({"name": NO_TOKEN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Ki"}})
    spec["volumes"] = volumes
    return {"name": NO_TOKEN_VOLUME, "mountPath": TOKEN_PATH, "readOnly": True}


def _remove_automatic_tokens(spec: dict, app_containers: list[dict]) -> None:
    """Take the token mounts the ServiceAccount admission plugin added away from the app containers, and their
    volumes when nothing else mounts them (the webhook sees the pod after that plugin)."""
    removed: set[str] = set()
    for container in [*app_containers, *(spec.get("initContainers") or [])]:
        if container.get("name") in (SIDECAR_NAME, CAPTURE_INIT_NAME):
            continue
        mounts = container.get("volumeMounts") or []
        kept = [m for m in mounts if not (m.get("mountPath") == TOKEN_PATH and _automatic_token(spec, m.get("name")))]
        removed.update(m.get("name") for m in mounts if m not in kept)
        if len(kept) != len(mounts):
            if kept:
                container["volumeMounts"] = kept
            else:
                del container["volumeMounts"]
    still_used = {m.get("name") for c in [*spec.get("containers", []), *spec.get("initContainers", [])]
                  if c.get("name") != SIDECAR_NAME for m in c.get("volumeMounts") or []}
    if removed - still_used:
        spec["volumes"] = [v for v in spec.get("volumes") or [] if v.get("name") not in removed - still_used]


def _remove_volume(spec: dict, name: str) -> None:
    """A volume laneproxy added for another source (injecting again with new settings changes the shape)."""
    if spec.get("volumes"):
        spec["volumes"] = [volume for volume in spec["volumes"] if volume.get("name") != name]
        if not spec["volumes"]:
            del spec["volumes"]


def _automatic_token(spec: dict, volume_name: str | None) -> bool:
    """Whether a volume is the token the ServiceAccount admission plugin mounts (a secret `<account>-token-*`
    before 1.21, a projected `kube-api-access-*` after)."""
    for volume in spec.get("volumes") or []:
        if volume.get("name") != volume_name:
            continue
        if str(volume_name).startswith("kube-api-access-") and "projected" in volume:
            return True
        secret = (volume.get("secret") or {}).get("secretName", "")
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        return secret.startswith(f"{account}-token-")
    return False


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


def _put_named_first(spec: dict, key: str, item: dict) -> None:
    """Merge item into its entry and move that entry to the front of the list."""
    _put_named(spec, key, item)
    items = spec[key]
    index = next(i for i, existing in enumerate(items) if existing.get("name") == item["name"])
    items.insert(0, items.pop(index))


def _put_named_after(spec: dict, key: str, item: dict, after: str) -> None:
    """Merge item into its entry and place it right after the entry named `after` (first when there is none)."""
    _put_named(spec, key, item)
    items = spec[key]
    mine = items.pop(next(i for i, existing in enumerate(items) if existing.get("name") == item["name"]))
    position = next((i + 1 for i, existing in enumerate(items) if existing.get("name") == after), 0)
    items.insert(position, mine)


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
    job = document["kind"] in ("Job", "CronJob")
    refusal = injection_refusal(template, job=job)
    if refusal is not None:
        return document, refusal
    # A template has no name of its own: its pods' workload is the object holding it.
    holder = None if document["kind"] == "Pod" else (document.get("metadata") or {}).get("name")
    injected = inject_pod(template, settings, holder, job=job)
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
