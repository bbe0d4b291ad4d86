"""argv and the environment -> settings -> the chosen command (run, controller, validate, crds, mock, demo, inject, webhook,
capture, probe, verdict).

Owns option names, their environment variables and help texts, and that a bad value (on the command
line or in a LANEPROXY_* variable) is a one-line message and exit status 2, never a traceback: every
number and address is converted by an argparse type, and a variable's value goes through the same
type as the flag it stands for. Installs uvloop here, at run time, never at import.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.xds_view import XdsAddressError, parse_source
from laneproxy.settings import (
    Address,
    CircuitBreakerSettings,
    ObservabilitySettings,
    OutlierSettings,
    PodSettings,
    ProxySettings,
    RetrySettings,
    TimeoutSettings,
    WorkloadSettings,
)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LANEPROXY_{name}", default)


class EnvironmentValueError(ValueError):
    """A LANEPROXY_* variable holds a value its option cannot take."""


def _flag(text: str, name: str = "") -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise EnvironmentValueError(f"LANEPROXY_{name}: expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    """A whole number, 0 or more."""
    text = text.strip()
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """A duration in seconds, 0 or more (0 turns a timeout off); nan and inf are not durations."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number, 0 or more), got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (a number, 0 or more), got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds greater than 0, got {text!r}")
    return value


def _percent(text: str) -> float:
    return _percentage(text, float, "a percentage")


def _whole_percent(text: str) -> int:
    """A whole percentage, as Envoy's `max_ejection_percent` (a UInt32) is: 12.5 is refused, not rounded."""
    return int(_percentage(text, int, "a whole percentage"))


def _percentage(text: str, kind: type[int] | type[float], what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} from 0 to 100, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected {what} from 0 to 100, got {text!r}")
    return value


def _address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _optional_address(text: str) -> Address | None:
    return None if text.lower() in ("", "none", "off") else _address(text)


def _checked_env(name: str, default: str | None, check) -> str | None:
    """LANEPROXY_<name>, validated now, whatever the command: a bad value is an error of the whole environment.

    `check` is the option's argparse type, or its list of choices. The text is returned unconverted:
    argparse converts a string default through the option's type itself.
    """
    text = _env(name, default)
    if text is None:
        return None
    if isinstance(check, (list, tuple)):
        if text not in check:
            raise EnvironmentValueError(f"LANEPROXY_{name}: expected one of {', '.join(check)}, got {text!r}")
        return text
    try:
        check(text)
    except argparse.ArgumentTypeError as exc:
        raise EnvironmentValueError(f"LANEPROXY_{name}: {exc}") from None
    return text


def _sidecar_source(text: str) -> str:
    from laneproxy.inject import InjectionError, check_source

    try:
        return check_source(text)
    except InjectionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _source(text: str) -> str:
    if text in ("files", "kubernetes"):
        return text
    try:
        parse_source(text)
    except XdsAddressError as exc:
        raise argparse.ArgumentTypeError(f"expected files, kubernetes or xds://HOST:PORT[,HOST:PORT...]: {exc}") from None
    return text


def _promql_duration(text: str) -> str:
    import re

    if not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", text):
        raise argparse.ArgumentTypeError(f"expected a PromQL duration such as 5m or 90s, got {text!r}")
    return text


def _http_url(text: str) -> str:
    if not text.startswith("http://") or len(text) <= len("http://"):
        raise argparse.ArgumentTypeError(f"expected an http:// URL, got {text!r}")
    return text


def _version_text() -> str:
    from importlib import metadata

    try:
        version = metadata.version("laneproxy")
    except metadata.PackageNotFoundError:
        from laneproxy import __version__ as version
    from laneproxy import BUILD

    return f"laneproxy {version}, {BUILD}"


class _VersionAction(argparse.Action):
    """--version, worked out only when asked: importlib.metadata (with the email and zipfile packages it loads)
    would otherwise cost every process, the sidecar included, about 1 MiB of resident memory."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_text())
        parser.exit()


LOG_LEVELS = ["debug", "info", "warning", "error"]
LOG_FORMATS = ["text", "json"]


def _logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--log-level and --log-format, before or after the command (`laneproxy run --log-level debug`).

    After the command they default to SUPPRESS, so a value given before the command is not overwritten.
    """
    level_default = _checked_env("LOG_LEVEL", "info", LOG_LEVELS) if top else argparse.SUPPRESS
    format_default = _checked_env("LOG_FORMAT", "text", LOG_FORMATS) if top else argparse.SUPPRESS
    parser.add_argument("--log-level", default=level_default, type=str.lower, choices=LOG_LEVELS,
                        help="log threshold (env LANEPROXY_LOG_LEVEL)")
    parser.add_argument("--log-format", default=format_default, type=str.lower, choices=LOG_FORMATS,
                        help="text lines, or one JSON object per line (env LANEPROXY_LOG_FORMAT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laneproxy", description="A swimlane sidecar proxy for full-chain gray release.")
    parser.add_argument("--version", action=_VersionAction)
    _logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser = commands.add_parser

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        sub = add_parser(name, **kwargs)
        _logging_options(sub, top=False)
        return sub

    commands.add_parser = command  # type: ignore[method-assign]

    run = commands.add_parser("run", help="run the proxy (gateway and/or sidecar listeners)")
    _source_options(run, xds=True)
    run.add_argument("--gateway", type=_optional_address, default=_checked_env("GATEWAY", "none", _optional_address),
                     metavar="[HOST:]PORT", help="ingress gateway listener (env LANEPROXY_GATEWAY)")
    run.add_argument("--inbound", type=_optional_address, default=_checked_env("INBOUND", "none", _optional_address),
                     metavar="[HOST:]PORT", help="inbound listener in front of the app (env LANEPROXY_INBOUND)")
    run.add_argument("--app", type=_optional_address, default=_checked_env("APP", "none", _optional_address),
                     metavar="[HOST:]PORT", help="the local app the inbound listener forwards to (env LANEPROXY_APP)")
    run.add_argument("--outbound", type=_optional_address, default=_checked_env("OUTBOUND", "none", _optional_address),
                     metavar="[HOST:]PORT", help="the app's egress listener, usable as HTTP_PROXY (env LANEPROXY_OUTBOUND)")
    run.add_argument("--admin", type=_optional_address, default=_checked_env("ADMIN", "127.0.0.1:15000", _optional_address),
                     metavar="[HOST:]PORT|none", help="admin listener (default 127.0.0.1:15000; env LANEPROXY_ADMIN)")
    run.add_argument("--lane", default=_env("LANE"), help="this sidecar's own lane, used in strict mode (env LANEPROXY_LANE)")
    run.add_argument("--connect-timeout", type=_seconds, default=5.0, help="upstream connect timeout, seconds (Envoy: 5)")
    run.add_argument("--route-timeout", type=_seconds, default=15.0, help="upstream response timeout, seconds; 0 disables")
    run.add_argument("--trace-table-size", type=_positive_int, default=100_000,
                     help="trace-id -> lane entries kept (LRU)")
    run.add_argument("--trace-table-ttl", type=_positive_seconds, default=300.0,
                     help="seconds a trace-id -> lane entry lives")
    run.add_argument("--trace-table-bytes", type=_positive_int, default=_checked_env("TRACE_TABLE_BYTES", str(32 * 1024 * 1024), _positive_int),
                     metavar="BYTES", help="byte budget of the trace-id -> lane table, LRU beyond it (default 32 MiB; "
                                           "env LANEPROXY_TRACE_TABLE_BYTES)")
    run.add_argument("--trust-client-trace-id", action=argparse.BooleanOptionalAction,
                     default=_flag(_env("TRUST_CLIENT_TRACE_ID", "false"), "TRUST_CLIENT_TRACE_ID"),
                     help="gateway: keep the swimlane trace id a client sends instead of giving each request a fresh "
                          "one (off by default; env LANEPROXY_TRUST_CLIENT_TRACE_ID). Anyone who knows a live trace "
                          "id can then move that trace between lanes: turn it on only behind a trusted edge")
    run.add_argument("--workers", type=_positive_int, default=_checked_env("WORKERS", "1", _positive_int), metavar="N",
                     help="N processes sharing the listening ports (SO_REUSEPORT); the admin adds their stats up "
                          "(env LANEPROXY_WORKERS)")
    pod = run.add_argument_group("the pod around an injected sidecar (set by injection from the downward API)")
    pod.add_argument("--app-ports", default=_env("APP_PORTS", ""), metavar="PORT,...",
                     help="every app port captured inbound: a captured connection goes on to the port it was sent "
                          "to, others to --app (env LANEPROXY_APP_PORTS)")
    pod.add_argument("--lifecycle", type=_optional_address, default=_optional_address(_env("LIFECYCLE", "none")),
                     metavar="[HOST:]PORT|none", help="the port the kubelet's preStop hooks ask (GET /wait-for-stop); "
                                                      "env LANEPROXY_LIFECYCLE")
    pod.add_argument("--pod-ip", default=_env("POD_IP"), help="this pod's address (env LANEPROXY_POD_IP)")
    pod.add_argument("--pod-name", default=_env("POD_NAME"), help="this pod's name (env LANEPROXY_POD_NAME)")
    pod.add_argument("--stop-margin", type=_seconds, default=_checked_env("STOP_MARGIN", "2", _seconds),
                     help="seconds a preStop keeps waiting after the pod left the endpoints (env LANEPROXY_STOP_MARGIN)")
    pod.add_argument("--stop-max", type=_seconds, default=_checked_env("STOP_MAX", "20", _seconds),
                     help="the longest a preStop waits, seconds (env LANEPROXY_STOP_MAX)")
    pod.add_argument("--exit-with", default=_env("EXIT_WITH", ""), metavar="CONTAINER,...",
                     help="a Job's sidecar: exit once these containers of the pod have ended (reads the pod "
                          "from the API; env LANEPROXY_EXIT_WITH)")
    run.add_argument("--drain-seconds", type=_seconds, default=_checked_env("DRAIN_SECONDS", "5", _seconds),
                     help="on SIGTERM keep accepting and serving at least this long, answering with Connection: "
                          "close (Istio's MINIMUM_DRAIN_DURATION; env LANEPROXY_DRAIN_SECONDS)")
    run.add_argument("--drain-limit-seconds", type=_seconds, default=_checked_env("DRAIN_LIMIT_SECONDS", "25", _seconds),
                     help="after the minimum, exit once no request is in flight, at the latest this long after "
                          "SIGTERM (env LANEPROXY_DRAIN_LIMIT_SECONDS)")
    limits = run.add_argument_group("limits and timeouts (Envoy's defaults unless noted; 0 turns a timeout off)")
    limits.add_argument("--request-headers-timeout", type=_seconds, default=10.0,
                        help="seconds a client has to send a complete request head (slowloris guard; Envoy: off)")
    limits.add_argument("--stream-idle-timeout", type=_seconds, default=300.0, help="seconds a request may sit idle")
    limits.add_argument("--idle-timeout", type=_seconds, default=3600.0, help="seconds an idle client connection is kept")
    limits.add_argument("--max-request-headers-kb", type=_positive_int, default=60, help="request head size limit (431 beyond)")
    limits.add_argument("--max-request-headers", type=_positive_int, default=100, help="request header count limit (431 beyond)")
    limits.add_argument("--max-response-headers-kb", type=_positive_int, default=80,
                        help="upstream response head size limit (502 UPE beyond)")
    limits.add_argument("--max-response-headers", type=_positive_int, default=100,
                        help="upstream response header count limit (502 UPE beyond)")
    limits.add_argument("--max-pipelined-requests", type=_positive_int, default=16, help="queued pipelined requests per connection")
    limits.add_argument("--per-connection-buffer-limit-bytes", type=_positive_int, default=1 << 20, metavar="BYTES",
                        help="request body bytes buffered per client connection before the proxy stops reading it")
    limits.add_argument("--max-retries", type=_count, default=2,
                        help="retries of any request whose connection failed before anything was sent, and of "
                             "idempotent bodiless requests on reset and 503")
    limits.add_argument("--max-connections", type=_positive_int, default=1024, help="circuit breaker: connections per endpoint")
    limits.add_argument("--max-pending-requests", type=_positive_int, default=1024,
                        help="circuit breaker: requests waiting for a new connection per endpoint")
    limits.add_argument("--max-requests", type=_positive_int, default=1024, help="circuit breaker: requests in flight per cluster")
    limits.add_argument("--outlier-consecutive-5xx", type=_positive_int, default=5, help="5xx in a row that eject an endpoint")
    limits.add_argument("--outlier-ejection-seconds", type=_seconds, default=30.0, help="how long an ejection lasts")
    limits.add_argument("--outlier-max-ejection-percent", type=_whole_percent, default=10,
                        help="share of an endpoint set that may be ejected (at least one endpoint always may)")
    tunnels = run.add_argument_group("tunnels and egress")
    tunnels.add_argument("--outbound-traffic-policy", choices=["ALLOW_ANY", "REGISTRY_ONLY"],
                         default=_checked_env("OUTBOUND_TRAFFIC_POLICY", "ALLOW_ANY", ["ALLOW_ANY", "REGISTRY_ONLY"]),
                         help="hosts outside the mesh from the outbound listener: passed through (ALLOW_ANY), or "
                              "answered 502 (REGISTRY_ONLY, Istio's BlackHoleCluster) (env LANEPROXY_OUTBOUND_TRAFFIC_POLICY)")
    tunnels.add_argument("--upgrade-types", default="websocket", metavar="NAME,NAME",
                         help="Upgrade protocols tunnelled after a 101 (others, such as h2c, are stripped)")
    tunnels.add_argument("--tunnel-idle-timeout", type=_seconds, default=3600.0,
                         help="seconds a tunnel (WebSocket, CONNECT, passed-through TCP) may carry nothing")
    tunnels.add_argument("--protocol-detection-timeout", type=_seconds, default=0.1,
                         help="seconds a captured connection waits for its client's first bytes before it is "
                              "passed through as TCP (server-first protocols)")
    run.add_argument("--access-log", default=_env("ACCESS_LOG"), metavar="stdout|stderr|FILE",
                     help="write an access log line per request (off by default; env LANEPROXY_ACCESS_LOG)")
    run.add_argument("--access-log-format", choices=["text", "json"], default=_checked_env("ACCESS_LOG_FORMAT", "text", ["text", "json"]),
                     help="text: Envoy's default format plus lane asked and lane used; json: one object per line")
    run.add_argument("--tracing", default=_env("TRACING", "none"), metavar="none|console|otlp|file:PATH",
                     help="OpenTelemetry span exporter (default none; env LANEPROXY_TRACING)")
    mesh = run.add_argument_group("metrics for Prometheus and canary analysis")
    mesh.add_argument("--metrics", type=_optional_address, default=_checked_env("METRICS", "none", _optional_address), metavar="[HOST:]PORT|none",
                      help="read-only listener serving /stats/prometheus (and /metrics) for a scraper, apart from the "
                           "admin API; Istio uses 15020 (default none; env LANEPROXY_METRICS)")
    mesh.add_argument("--app-metrics", type=_http_url, default=_checked_env("APP_METRICS", None, _http_url), metavar="URL",
                      help="the app's own Prometheus endpoint (http://127.0.0.1:PORT/PATH), appended to the metrics "
                           "listener's answer; injection sets it from the pod's prometheus.io annotations "
                           "(env LANEPROXY_APP_METRICS)")
    mesh.add_argument("--stats-tags", choices=["envoy", "istio"], default=_checked_env("STATS_TAGS", "envoy", ["envoy", "istio"]),
                      help="Prometheus tag names of Envoy's stats: envoy (envoy_cluster_name, envoy_response_code) "
                           "or istio (cluster_name, response_code) (env LANEPROXY_STATS_TAGS)")
    mesh.add_argument("--istio-metrics", action=argparse.BooleanOptionalAction,
                      default=_flag(_env("ISTIO_METRICS", "true"), "ISTIO_METRICS"),
                      help="record Istio's standard metrics (istio_requests_total, ...) (on by default; "
                           "env LANEPROXY_ISTIO_METRICS)")
    mesh.add_argument("--workload", default=_env("WORKLOAD", "unknown"),
                      help="this pod's workload (its Deployment's name), as the metrics label it (env LANEPROXY_WORKLOAD)")
    mesh.add_argument("--workload-namespace", default=_env("WORKLOAD_NAMESPACE"),
                      help="the workload's namespace (default: --namespace; env LANEPROXY_WORKLOAD_NAMESPACE)")
    mesh.add_argument("--workload-app", default=_env("SERVICE", "unknown"),
                      help="the pod's app label (env LANEPROXY_SERVICE)")
    mesh.add_argument("--workload-version", default=_env("VERSION", "unknown"),
                      help="the pod's version label (env LANEPROXY_VERSION)")
    mesh.add_argument("--canonical-service", default=_env("CANONICAL_SERVICE"),
                      help="Istio's canonical service (default: the app; env LANEPROXY_CANONICAL_SERVICE)")
    mesh.add_argument("--canonical-revision", default=_env("CANONICAL_REVISION"),
                      help="Istio's canonical revision (default: the version, else latest; "
                           "env LANEPROXY_CANONICAL_REVISION)")
    mesh.add_argument("--cluster-id", default=_env("CLUSTER_ID", "Kubernetes"),
                      help="source_cluster/destination_cluster label (Istio's default: Kubernetes)")
    mesh.add_argument("--route-debug-token", default=_env("ROUTE_DEBUG_TOKEN"), metavar="TOKEN",
                      help="opt-in `x-laneproxy-route` trail: the gateway answers with each hop "
                           "(service:lane-asked>lane-used) when a request sends this token in that header; set it on "
                           "the sidecars too so they pass their hops on (off by default; "
                           "env LANEPROXY_ROUTE_DEBUG_TOKEN)")

    controller = commands.add_parser("controller", help="watch the cluster (or files) once and serve every sidecar "
                                                        "its routes over xDS (delta ADS)")
    _source_options(controller)
    controller.add_argument("--xds-port", type=_port, default=_checked_env("XDS_PORT", "15010", _port),
                            help="the xDS (gRPC) port; 0 picks a free one, logged (env LANEPROXY_XDS_PORT)")
    controller.add_argument("--xds-address", default=_env("XDS_ADDRESS", "0.0.0.0"), metavar="HOST",
                            help="the address the xDS port binds (default 0.0.0.0; env LANEPROXY_XDS_ADDRESS)")
    controller.add_argument("--admin", type=_optional_address,
                            default=_checked_env("CONTROLLER_ADMIN", "0.0.0.0:15014", _optional_address),
                            metavar="[HOST:]PORT|none", help="admin listener: /ready, /stats, /stats/prometheus "
                                                             "(default 0.0.0.0:15014; env LANEPROXY_CONTROLLER_ADMIN)")

    validate = commands.add_parser("validate", help="check configuration files and print every problem")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--namespace", default="default")
    validate.add_argument("--lenient", action="store_true", help="unknown fields are warnings, not errors")

    crds = commands.add_parser("crds", help="print the swimlane CustomResourceDefinitions (the schema validate uses)")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR (deploy/crds) instead")

    mock = commands.add_parser("mock", help="run the mock service (the seed's go-http-sample stand-in)")
    mock.add_argument("--listen", type=_address, default=Address("127.0.0.1", 8000), metavar="[HOST:]PORT")
    mock.add_argument("--app", help="service name (env app)")
    mock.add_argument("--version", dest="app_version", help="version reported (env version)")
    mock.add_argument("--upstream-url", help="call this URL and append its body (env upstream_url)")
    mock.add_argument("--trace-header", default="my-request-id", help="the one header forwarded upstream")
    mock.add_argument("--fail-share", type=float, default=None, metavar="SHARE",
                      help="answer 500 to this share of requests, evenly spread (0 to 1; env fail_share)")

    demo = commands.add_parser("demo", help="run the full-chain demo on 127.0.0.1; from a second terminal, "
                                            "release, approve, undo and status drive its release lifecycle")
    demo.add_argument("--gateway-port", type=int, default=8080, help="gateway port (0 picks a free one)")
    demo.add_argument("--state", default=None, metavar="FILE",
                      help="where the running demo writes its control address (default: "
                           "$TMPDIR/laneproxy-demo-<uid>.json)")
    gestures = demo.add_subparsers(dest="gesture", metavar="[release|approve|undo|status]")
    release = gestures.add_parser("release", help="a canary of SERVICE at VERSION joins the canary lane "
                                                  "(as Kruise's canary Deployment)")
    release.add_argument("service")
    release.add_argument("version")
    approve = gestures.add_parser("approve", help="the base lane's SERVICE becomes the canary's version; the canary "
                                                  "goes away (kubectl kruise rollout approve)")
    approve.add_argument("service")
    undo = gestures.add_parser("undo", help="the canary of SERVICE goes away; canary requests use base for that hop "
                                            "(kubectl kruise rollout undo)")
    undo.add_argument("service")
    gestures.add_parser("status", help="each service's versions per lane, as the gateway's /lanes sees them")

    inject = commands.add_parser("inject", help="print Kubernetes manifests with the sidecar added "
                                                "(like istioctl kube-inject)")
    inject.add_argument("-f", "--filename", required=True, metavar="FILE", help="multi-document YAML; - reads stdin")
    _sidecar_options(inject)

    webhook = commands.add_parser("webhook", help="the mutating admission webhook that injects the sidecar (HTTPS)")
    webhook.add_argument("--listen", type=_address, default=_checked_env("WEBHOOK_LISTEN", "127.0.0.1:9443", _address),
                         metavar="[HOST:]PORT", help="HTTPS listener (env LANEPROXY_WEBHOOK_LISTEN)")
    webhook.add_argument("--cert", default=_env("WEBHOOK_CERT"), required=_env("WEBHOOK_CERT") is None,
                         help="serving certificate, PEM; reloaded when it changes (env LANEPROXY_WEBHOOK_CERT)")
    webhook.add_argument("--key", default=_env("WEBHOOK_KEY"), required=_env("WEBHOOK_KEY") is None,
                         help="its private key, PEM (env LANEPROXY_WEBHOOK_KEY)")
    _sidecar_options(webhook)

    capture = commands.add_parser("capture", help="print (and with --apply install) the iptables rules that capture "
                                                  "a pod's traffic for its sidecar: the init container's job")
    capture.add_argument("--apply", action="store_true", help="install them with iptables-restore (needs NET_ADMIN)")
    capture.add_argument("--iptables-restore", default="iptables-restore", metavar="PROGRAM")
    capture.add_argument("--inbound-listener-port", type=int, default=15006)
    capture.add_argument("--outbound-listener-port", type=int, default=15001)
    capture.add_argument("--proxy-uid", type=int, default=1337, help="the proxy's uid (and gid): never captured")
    capture.add_argument("--inbound-ports", default="", metavar="P,P", help="app ports sent to the inbound listener")
    capture.add_argument("--include-outbound-ports", default="", metavar="P,P",
                         help="capture only these (default: all)")
    capture.add_argument("--exclude-outbound-ports", default="", metavar="P,P", help="leave these alone (non-HTTP)")
    capture.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,CIDR", help="leave these alone")
    capture.add_argument("--api-server", default=os.environ.get("KUBERNETES_SERVICE_HOST") or None, metavar="IP",
                         help="the Kubernetes API server, never captured (default: $KUBERNETES_SERVICE_HOST)")
    capture.add_argument("--capture-dns", action="store_true", help="capture TCP port 53 too (default: left alone)")

    verdict = commands.add_parser("verdict", help="ask Prometheus whether a lane is healthy against its baseline: "
                                                  "pass (exit 0), fail (1) or inconclusive (3)")
    verdict.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL (http://host:9090)")
    verdict.add_argument("--group", help="the ASMSwimLaneGroup the lane belongs to (required without --serve)")
    verdict.add_argument("--lane", help="the lane under analysis, the canary (required without --serve)")
    verdict.add_argument("--baseline", help="the lane to compare with (default: the group's fallback target, "
                                            "as laneproxy_lane_info reports it)")
    verdict.add_argument("--namespace", help="only workloads in this namespace (destination_workload_namespace)")
    verdict.add_argument("--window", type=_promql_duration, default="5m",
                         help="PromQL range of the analysis (default 5m)")
    verdict.add_argument("--min-requests", type=_positive_int, default=20,
                         help="fewer requests than this in the window is inconclusive, never a pass (default 20)")
    verdict.add_argument("--min-success-rate", type=_percent, default=99.0,
                         help="lowest acceptable share of non-5xx answers, percent (default 99)")
    verdict.add_argument("--max-success-drop", type=_percent, default=1.0,
                         help="how many points below the baseline's success rate the lane may be (default 1)")
    verdict.add_argument("--max-p99-ms", type=_positive_seconds, default=500.0,
                         help="highest acceptable p99 latency, milliseconds (default 500)")
    verdict.add_argument("--max-fallback-share", type=_percent, default=None,
                         help="highest acceptable share of the lane's hops served by another lane, percent "
                              "(default: reported, not judged)")
    verdict.add_argument("--timeout", type=_positive_seconds, default=10.0, help="seconds per Prometheus query")
    verdict.add_argument("--output", choices=["text", "json"], default="text")
    verdict.add_argument("--serve", type=_address, metavar="[HOST:]PORT",
                         help="answer GET /verdict?group=G&lane=L over HTTP as JSON instead (for an Argo Rollouts "
                              "`web` metric); the other options are the defaults of each request")

    probe = commands.add_parser("probe", help="exit 0 if the URL (an admin /ready) answers 200: a readiness probe")
    probe.add_argument("url", nargs="?", default="http://127.0.0.1:15000/ready")
    probe.add_argument("--timeout", type=float, default=2.0)
    probe.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="keep asking until it answers 200 or SECONDS pass (a postStart hook holding the app's "
                            "start until the proxy is ready)")
    return parser


def _source_options(parser: argparse.ArgumentParser, *, xds: bool = False) -> None:
    """Where the route table comes from: the same options for `run` and `controller` (`run` may follow a
    controller: `xds`)."""
    parser.add_argument("--config", action="append", default=None, metavar="FILE",
                        help="swimlane manifests or endpoints file; repeatable (env LANEPROXY_CONFIG, comma-separated)")
    if xds:
        parser.add_argument("--source", type=_source, default=_checked_env("SOURCE", "files", _source),
                            metavar="{files,kubernetes,xds://HOST:PORT[,HOST:PORT...]}",
                            help="where lane membership comes from: the --config files, the Kubernetes API, or the "
                                 "laneproxy controller over xDS (delta ADS; further addresses are replicas tried in "
                                 "turn; no Kubernetes credentials needed) (env LANEPROXY_SOURCE)")
    else:
        # A sidecar's LANEPROXY_SOURCE=xds://... is not the controller's to follow: it reads files or the API.
        env = _checked_env("SOURCE", "files", _source)
        parser.add_argument("--source", choices=["files", "kubernetes"],
                            default=env if env in ("files", "kubernetes") else "files",
                            help="where lane membership comes from (env LANEPROXY_SOURCE)")
    parser.add_argument("--kubeconfig", default=_env("KUBECONFIG") or os.environ.get("KUBECONFIG"),
                        help="kubeconfig for --source kubernetes; in-cluster credentials when absent")
    parser.add_argument("--namespace", default=_env("NAMESPACE", "default"), help="namespace short host names resolve in")
    parser.add_argument("--lenient", action="store_true", default=_flag(_env("LENIENT", ""), "LENIENT"),
                        help="unknown fields in the configuration are logged warnings instead of a rejected update "
                             "(env LANEPROXY_LENIENT)")
    parser.add_argument("--reload-interval", type=_positive_seconds, default=_checked_env("RELOAD_INTERVAL", "1.0", _positive_seconds),
                        help="seconds between checks of the config files for changes (env LANEPROXY_RELOAD_INTERVAL)")
    parser.add_argument("--watch-read-timeout", type=_positive_seconds,
                     default=_checked_env("WATCH_READ_TIMEOUT", "60", _positive_seconds),
                        help="--source kubernetes: seconds a watch may stay silent before it is opened again, so a "
                             "connection dead without a FIN is noticed (env LANEPROXY_WATCH_READ_TIMEOUT)")
    parser.add_argument("--pods", choices=["full", "metadata"], default=_checked_env("PODS", "full", ["full", "metadata"]),
                        help="--source kubernetes: read whole Pods (full), or only the metadata of the pods labelled "
                             "ASM_TRAFFIC_TAG, with addresses and readiness from EndpointSlices alone (metadata: far "
                             "less memory; needs the EndpointSlice API; the controller's Deployment reads metadata) "
                             "(env LANEPROXY_PODS)")
    parser.add_argument("--table-stale-after", type=_positive_seconds,
                     default=_checked_env("TABLE_STALE_AFTER", "180", _positive_seconds),
                        help="seconds the route table may be behind its source before laneproxy.config.table_stale "
                             "turns 1 (env LANEPROXY_TABLE_STALE_AFTER)")


def _sidecar_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--image", default=_env("SIDECAR_IMAGE"),
                         help="the image of the injected containers (default laneproxy:VERSION; "
                              "env LANEPROXY_SIDECAR_IMAGE)")
    command.add_argument("--image-pull-policy", default=_checked_env("SIDECAR_IMAGE_PULL_POLICY", "IfNotPresent", ["Always", "IfNotPresent", "Never"]),
                         choices=["Always", "IfNotPresent", "Never"])
    command.add_argument("--capture", default=_checked_env("SIDECAR_CAPTURE", "iptables", ["iptables", "http-proxy"]), choices=["iptables", "http-proxy"],
                         help="iptables: an init container redirects the pod's traffic; http-proxy: no init container, "
                              "the apps get HTTP_PROXY (env LANEPROXY_SIDECAR_CAPTURE; pods override it with the "
                              "laneproxy.dev/capture annotation)")
    command.add_argument("--sidecar-source", type=_sidecar_source,
                         default=_checked_env("SIDECAR_SOURCE", None, _sidecar_source),
                         metavar="xds://HOST:PORT|kubernetes",
                         help="where injected sidecars get lane membership: the controller's xDS service (default "
                              "xds://laneproxy-controller.laneproxy-system.svc:15010; the pods hold no API token) "
                              "or `kubernetes`, each sidecar watching the API itself (small clusters; needs "
                              "deploy/rbac). A Job's sidecar always uses `kubernetes`: it "
                              "reads its own pod to exit with the app (env LANEPROXY_SIDECAR_SOURCE)")
    command.add_argument("--native-sidecar", action=argparse.BooleanOptionalAction,
                         default=_flag(_env("SIDECAR_NATIVE", "false")),
                         help="Kubernetes 1.29+: inject the sidecar as an init container with restartPolicy: Always "
                              "and a startup probe; off: as the first container with a postStart hook waiting for "
                              "its readiness (env LANEPROXY_SIDECAR_NATIVE)")


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    config = tuple(args.config or [p for p in (_env("CONFIG") or "").split(",") if p])
    return ProxySettings(
        gateway=args.gateway, inbound=args.inbound, app=args.app, outbound=args.outbound, admin=args.admin,
        config_files=config, source=args.source, kubeconfig=args.kubeconfig, namespace=args.namespace,
        own_lane=args.lane, reload_interval=args.reload_interval, lenient=args.lenient,
        watch_read_timeout=args.watch_read_timeout, table_stale_after=args.table_stale_after, pods=args.pods,
        trace_table_capacity=args.trace_table_size, trace_table_ttl=args.trace_table_ttl,
        trace_table_bytes=args.trace_table_bytes, trust_client_trace_id=args.trust_client_trace_id,
        timeouts=TimeoutSettings(connect=args.connect_timeout, route=args.route_timeout,
                                 request_headers=args.request_headers_timeout, stream_idle=args.stream_idle_timeout,
                                 idle=args.idle_timeout),
        circuit_breakers=CircuitBreakerSettings(max_connections=args.max_connections,
                                                max_pending_requests=args.max_pending_requests,
                                                max_requests=args.max_requests),
        retries=RetrySettings(max_retries=args.max_retries),
        outlier=OutlierSettings(consecutive_5xx=args.outlier_consecutive_5xx,
                                ejection_seconds=args.outlier_ejection_seconds,
                                max_ejection_percent=args.outlier_max_ejection_percent),
        max_request_headers_kb=args.max_request_headers_kb, max_request_headers_count=args.max_request_headers,
        max_response_headers_kb=args.max_response_headers_kb, max_response_headers_count=args.max_response_headers,
        max_pipelined_requests=args.max_pipelined_requests,
        per_connection_buffer_limit_bytes=args.per_connection_buffer_limit_bytes,
        drain_seconds=args.drain_seconds, drain_limit_seconds=args.drain_limit_seconds,
        app_ports=_ports(args.app_ports),
        outbound_traffic_policy=args.outbound_traffic_policy, tunnel_idle_timeout=args.tunnel_idle_timeout,
        upgrade_types=tuple(name.strip().lower() for name in args.upgrade_types.split(",") if name.strip()),
        protocol_detection_timeout=args.protocol_detection_timeout,
        pod=PodSettings(lifecycle=args.lifecycle, pod_ip=args.pod_ip or None, pod_name=args.pod_name or None,
                        stop_margin=args.stop_margin, stop_max=args.stop_max,
                        exit_with=tuple(name for name in args.exit_with.split(",") if name)),
        observability=ObservabilitySettings(access_log=args.access_log or None,
                                            access_log_format=args.access_log_format, tracing=args.tracing,
                                            istio_metrics=args.istio_metrics, stats_tags=args.stats_tags,
                                            metrics=args.metrics, app_metrics=args.app_metrics or None,
                                            route_debug_token=args.route_debug_token or None),
        workload=WorkloadSettings(name=args.workload or "unknown",
                                  namespace=args.workload_namespace or args.namespace,
                                  app=args.workload_app or "unknown", version=args.workload_version or "unknown",
                                  canonical_service=args.canonical_service or None,
                                  canonical_revision=args.canonical_revision or None,
                                  cluster=args.cluster_id or "Kubernetes"),
    )


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise SystemExit(f"laneproxy: --app-ports: expected comma-separated port numbers, got {text!r}") from None
    if any(not 0 < port < 65536 for port in ports):
        raise SystemExit(f"laneproxy: --app-ports: a port outside 1-65535 in {text!r}")
    return ports


def _raise_open_file_limit() -> None:
    """A proxy holds two sockets per request in flight: take the hard limit, as Envoy's docs advise."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(args: argparse.Namespace) -> int:
    import uvloop

    _raise_open_file_limit()

    if args.workers > 1:
        from laneproxy.workers import supervise

        return supervise(settings_from_args(args), args.workers, args.log_level, args.log_format)

    from laneproxy.app import StartupError, serve

    try:
        uvloop.run(serve(settings_from_args(args)))
    except StartupError as exc:
        print(f"laneproxy: {exc}", file=sys.stderr)
        return 2
    return 0


def _controller(args: argparse.Namespace) -> int:
    import uvloop

    try:
        from laneproxy.xds.controller import ControllerSettings, serve_controller
    except ImportError as exc:
        print(f"laneproxy controller needs: pip install 'laneproxy[xds]' ({exc})", file=sys.stderr)
        return 2
    from laneproxy.app import StartupError

    config = tuple(args.config or [p for p in (_env("CONFIG") or "").split(",") if p])
    source = ProxySettings(config_files=config, source=args.source, kubeconfig=args.kubeconfig,
                           namespace=args.namespace, reload_interval=args.reload_interval, lenient=args.lenient,
                           watch_read_timeout=args.watch_read_timeout, table_stale_after=args.table_stale_after,
                           pods=args.pods)
    settings = ControllerSettings(source=source, xds=Address(args.xds_address, args.xds_port), admin=args.admin)
    _raise_open_file_limit()
    try:
        uvloop.run(serve_controller(settings))
    except StartupError as exc:
        print(f"laneproxy controller: {exc}", file=sys.stderr)
        return 2
    return 0


def _validate(args: argparse.Namespace) -> int:
    from laneproxy.control.files import load_files

    try:
        built = load_files(args.files, namespace=args.namespace, lenient=args.lenient)
    except ConfigInvalidError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    for warning in built.warnings:
        print(f"{warning} (ignored: --lenient)")
    for notice in built.notices:
        print(notice)
    table = built.table
    lanes = sum(len(group.lanes) for group in table.groups.values())
    warned = f" with {len(built.warnings)} warning(s)" if built.warnings else ""
    print(f"ok{warned}: {len(table.groups)} group(s), {lanes} lane(s), {len(table.services)} service(s), "
          f"version {table.version}")
    return 0


def _crds(args: argparse.Namespace) -> int:
    from pathlib import Path

    from laneproxy.core.schema import crd_files

    files = crd_files()
    if args.write is None:
        sys.stdout.write("---\n".join(files.values()))
        return 0
    for name, text in files.items():
        path = Path(args.write) / name
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


def _mock(args: argparse.Namespace) -> int:
    import uvloop

    _raise_open_file_limit()

    from laneproxy.mock import MockSettings, serve_mock

    try:
        settings = MockSettings.from_environment(
            app=args.app, version=args.app_version, upstream_url=args.upstream_url, host=args.listen.host,
            port=args.listen.port, trace_header=args.trace_header, fail_share=args.fail_share)
    except ValueError as exc:
        print(f"laneproxy mock: {exc}", file=sys.stderr)
        return 2
    uvloop.run(serve_mock(settings))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from laneproxy.demo import run_demo
    from laneproxy.rollout import ControlClientError, control_request, default_state_file, status_text

    state = Path(args.state) if args.state else default_state_file()
    if args.gesture is None:
        return run_demo(args.gateway_port, state)
    try:
        if args.gesture == "status":
            print(status_text(control_request(state, "GET", "/status")))
            return 0
        query = {"service": args.service}
        if args.gesture == "release":
            query["version"] = args.version
        print(control_request(state, "POST", f"/{args.gesture}", **query)["message"])
    except ControlClientError as exc:
        print(f"laneproxy demo {args.gesture}: {exc}", file=sys.stderr)
        return 1
    return 0


def _sidecar_settings(args: argparse.Namespace):
    from laneproxy.inject import DEFAULT_SOURCE, SidecarSettings, default_image

    return SidecarSettings(image=args.image or default_image(), image_pull_policy=args.image_pull_policy,
                           capture=args.capture, log_level=args.log_level, native_sidecar=args.native_sidecar,
                           source=args.sidecar_source or DEFAULT_SOURCE)


def _inject(args: argparse.Namespace) -> int:
    from laneproxy.inject import InjectionError, dump_manifests, inject_manifests

    try:
        text = sys.stdin.read() if args.filename == "-" else open(args.filename, encoding="utf-8").read()
        documents = []
        for document, refusal in inject_manifests(text, _sidecar_settings(args)):
            if refusal is not None:
                name = (document.get("metadata") or {}).get("name", "?")
                print(f"laneproxy inject: {document.get('kind')} {name} left as it is: {refusal}", file=sys.stderr)
            documents.append(document)
    except (OSError, InjectionError) as exc:
        print(f"laneproxy inject: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(dump_manifests(documents))
    return 0


def _webhook(args: argparse.Namespace) -> int:
    import uvloop

    from laneproxy.webhook import CertificateError, WebhookSettings, serve_webhook

    settings = WebhookSettings(cert_file=args.cert, key_file=args.key, host=args.listen.host, port=args.listen.port,
                               sidecar=_sidecar_settings(args))
    try:
        uvloop.run(serve_webhook(settings))
    except (CertificateError, OSError) as exc:
        print(f"laneproxy webhook: {exc}", file=sys.stderr)
        return 2
    return 0


def _capture(args: argparse.Namespace) -> int:
    from laneproxy.capture import CaptureError, CaptureSettings, apply_rules, nat_rules, parse_cidrs, parse_ports

    try:
        rules = nat_rules(CaptureSettings(
            inbound_listener_port=args.inbound_listener_port, outbound_listener_port=args.outbound_listener_port,
            proxy_uid=args.proxy_uid, proxy_gid=args.proxy_uid, inbound_ports=parse_ports(args.inbound_ports),
            include_outbound_ports=parse_ports(args.include_outbound_ports),
            exclude_outbound_ports=parse_ports(args.exclude_outbound_ports),
            exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs), api_server=args.api_server,
            capture_dns=args.capture_dns))
        sys.stdout.write(rules)
        if args.apply:
            apply_rules(rules, args.iptables_restore)
            print("# installed", file=sys.stderr)
    except CaptureError as exc:
        print(f"laneproxy capture: {exc}", file=sys.stderr)
        return 1
    return 0


def _probe(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    import time

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through HTTP_PROXY
    deadline = time.monotonic() + args.wait
    while True:
        try:
            with opener.open(args.url, timeout=args.timeout) as response:
                if response.status == 200:
                    return 0
                problem = f"answered {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(exc)
        if time.monotonic() >= deadline:
            print(f"laneproxy probe: {args.url}: {problem}", file=sys.stderr)
            return 1
        time.sleep(0.2)


def _verdict(args: argparse.Namespace) -> int:
    from laneproxy.verdict import PrometheusQueryError, Thresholds, VerdictRequest, decide, render_text

    if args.serve is None and not (args.group and args.lane):
        print("laneproxy verdict: --group and --lane are required (or --serve)", file=sys.stderr)
        return 2
    request = VerdictRequest(prometheus=args.prometheus, group=args.group or "", lane=args.lane or "",
                             baseline=args.baseline, namespace=args.namespace, window=args.window,
                             timeout=args.timeout)
    thresholds = Thresholds(min_requests=args.min_requests, min_success_rate=args.min_success_rate,
                            max_success_drop=args.max_success_drop, max_p99_ms=args.max_p99_ms,
                            max_fallback_share=args.max_fallback_share)
    if args.serve is not None:
        import uvloop

        from laneproxy.standalone import serve_until_signalled
        from laneproxy.verdict import build_verdict_app

        uvloop.run(serve_until_signalled(build_verdict_app(request, thresholds), args.serve.host, args.serve.port))
        return 0
    try:
        verdict = decide(request, thresholds)
    except PrometheusQueryError as exc:
        print(f"laneproxy verdict: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        import json

        print(json.dumps(verdict.as_dict(), indent=1))
    else:
        print(render_text(verdict))
    return verdict.exit_code


def _configure_logging(level: str, log_format: str) -> None:
    if log_format == "json":
        from laneproxy.observability.logs import json_handler

        logging.basicConfig(level=level.upper(), handlers=[json_handler()])
    else:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except EnvironmentValueError as exc:
        print(f"laneproxy: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)  # a bad value exits 2 with argparse's one-line message
    _configure_logging(args.log_level, args.log_format)
    handler = {"run": _run, "controller": _controller, "validate": _validate, "crds": _crds, "mock": _mock, "demo": _demo, "inject": _inject,
               "webhook": _webhook, "capture": _capture, "probe": _probe, "verdict": _verdict}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
