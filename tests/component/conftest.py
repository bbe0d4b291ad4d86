"""Shared fixtures of the component tier: real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib

import pytest

from laneproxy.demo import DemoCluster


@pytest.fixture(scope="module")
def demo_cluster():
    """The demo's full chain: a gateway and five app+sidecar pairs, as `laneproxy demo` starts them."""
    with DemoCluster(log_level="warning") as cluster:
        yield cluster


@contextlib.contextmanager
def started_demo(**options):
    """A started DemoCluster, tried twice: the ports it picks are free when picked, but on a shared machine
    another process's outgoing connection can take one before the demo binds it (the process then exits 2)."""
    for attempt in range(2):
        cluster = DemoCluster(**options)
        try:
            cluster.start()
        except RuntimeError:
            if attempt:
                raise
            continue
        try:
            yield cluster
        finally:
            cluster.stop()
        return
