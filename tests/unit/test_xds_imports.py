"""grpcio and the xDS messages are loaded only by a proxy that follows a controller (its idle memory matters)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from laneproxy.cli import build_parser
from laneproxy.app import ProxyApp, make_source
from laneproxy.core.store import RouteTableStore
from laneproxy.settings import ProxySettings
args = build_parser().parse_args({argv!r})
make_source(ProxySettings(source=args.source, config_files=("config/swimlanes.yaml",)), RouteTableStore())
print(sorted({{name.split(".")[0] for name in sys.modules if name.split(".")[0] in ("grpc", "envoy", "xds")}}))
"""


def loaded(argv: list[str]) -> str:
    return subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_proxy_on_files_never_imports_grpc_or_the_xds_messages() -> None:
    assert loaded(["run", "--config", "config/swimlanes.yaml"]) == "[]"


def test_a_proxy_on_xds_imports_them_when_its_source_is_made() -> None:
    assert loaded(["run", "--source", "xds://127.0.0.1:15010"]) == "['envoy', 'grpc', 'xds']"
