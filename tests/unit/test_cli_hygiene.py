"""The command line: --version, logging options after the command, and bad values as a message with exit 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from laneproxy import __version__
from laneproxy.cli import build_parser, main
from laneproxy.observability.logs import JsonLogFormatter


def laneproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("LANEPROXY_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "laneproxy", *args], capture_output=True, text=True, timeout=60,
                          env=environment)


def test_version_prints_the_package_version():
    result = laneproxy("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"laneproxy {__version__}")


@pytest.mark.parametrize("args, env, message", [
    (["run", "--gateway", "0"], {"LANEPROXY_RELOAD_INTERVAL": "abc"}, "LANEPROXY_RELOAD_INTERVAL"),
    (["probe"], {"LANEPROXY_WORKERS": "two"}, "LANEPROXY_WORKERS"),
    (["run", "--gateway", "0", "--trace-table-size", "-3"], {}, "--trace-table-size"),
    (["run", "--gateway", "0", "--connect-timeout", "-1"], {}, "--connect-timeout"),
    (["run", "--gateway", "0", "--route-timeout", "nan"], {}, "--route-timeout"),
    (["run", "--gateway", "0:x"], {}, "--gateway"),
    (["crds"], {"LANEPROXY_SOURCE": "etcd"}, "LANEPROXY_SOURCE"),
    (["crds"], {"LANEPROXY_TRUST_CLIENT_TRACE_ID": "maybe"}, "LANEPROXY_TRUST_CLIENT_TRACE_ID"),
    (["crds"], {"LANEPROXY_METRICS": "everywhere"}, "LANEPROXY_METRICS"),
    (["crds"], {"LANEPROXY_LOG_LEVEL": "loud"}, "LANEPROXY_LOG_LEVEL"),
    (["verdict", "--prometheus", "http://127.0.0.1:1", "--group", "g", "--lane", "l", "--min-success-rate", "101"],
     {}, "--min-success-rate"),
    (["verdict", "--prometheus", "http://127.0.0.1:1", "--group", "g", "--lane", "l", "--window", "5m) or vector(1"],
     {}, "--window"),
    (["verdict", "--prometheus", "http://127.0.0.1:1", "--group", "g"], {}, "--lane"),
    (["controller", "--xds-port", "70000"], {}, "--xds-port"),
    (["crds"], {"LANEPROXY_XDS_PORT": "grpc"}, "LANEPROXY_XDS_PORT"),
    (["run", "--gateway", "0", "--source", "xds://controller"], {}, "--source"),
    (["crds"], {"LANEPROXY_SOURCE": "xds://a:1,b"}, "LANEPROXY_SOURCE"),
])
def test_a_bad_flag_or_environment_value_is_a_message_and_exit_2_never_a_traceback(args, env, message):
    result = laneproxy(*args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after argparse's usage lines, one message naming the culprit
    assert last.startswith("laneproxy") and message in last


def test_an_xds_source_is_taken_from_the_flag_or_the_environment_and_the_controller_ignores_it(monkeypatch):
    source = "xds://laneproxy-controller.laneproxy-system:15010,127.0.0.1:15010"
    assert build_parser().parse_args(["run", "--source", source]).source == source
    monkeypatch.setenv("LANEPROXY_SOURCE", source)
    assert build_parser().parse_args(["run"]).source == source
    assert build_parser().parse_args(["controller"]).source == "files"  # a sidecar's setting, not the controller's


def test_log_level_and_format_are_accepted_after_the_command_and_before_it():
    parser = build_parser()
    after = parser.parse_args(["validate", "x.yaml", "--log-level", "debug", "--log-format", "json"])
    before = parser.parse_args(["--log-level", "error", "validate", "x.yaml"])
    assert (after.log_level, after.log_format) == ("debug", "json")
    assert (before.log_level, before.log_format) == ("error", "text")  # not reset by the command's defaults


def test_json_logs_are_one_object_per_line():
    record = logging.LogRecord("laneproxy", logging.WARNING, __file__, 1, "listener on %s", ("0.0.0.0:8080",), None)
    line = json.loads(JsonLogFormatter().format(record))
    assert line["level"] == "warning" and line["logger"] == "laneproxy" and line["message"] == "listener on 0.0.0.0:8080"
    assert line["time"].endswith("Z")


def test_verdict_against_an_unreachable_prometheus_is_exit_2_with_a_message(capsys):
    code = main(["verdict", "--prometheus", "http://127.0.0.1:9", "--group", "rollout", "--lane", "canary",
                 "--timeout", "2"])
    assert code == 2 and "cannot query Prometheus" in capsys.readouterr().err
