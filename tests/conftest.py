"""The suite's header names the build of the hot path under test: `make test` runs it on both."""

from __future__ import annotations


def pytest_report_header(config) -> str:
    import laneproxy

    return f"laneproxy build: {laneproxy.BUILD}"
