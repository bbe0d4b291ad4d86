"""Shared fixtures of the component tier: real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import pytest

from laneproxy.demo import DemoCluster


@pytest.fixture(scope="module")
def demo_cluster():
    """The demo's full chain: a gateway and five app+sidecar pairs, as `laneproxy demo` starts them."""
    with DemoCluster(log_level="warning") as cluster:
        yield cluster
