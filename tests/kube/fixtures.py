"""Pytest fixtures for tests that need a real Kubernetes API server.

Import the fixture into a ``conftest.py`` to make it available::

    from tests.kube.fixtures import kube_apiserver  # noqa: F401

``kube_apiserver`` is session-scoped: one etcd + kube-apiserver pair is
started per test session (building the binary first if this machine has
never built it, see ``build_apiserver.sh``) and stopped at the end.
Tests share the cluster, so they should use their own namespaces / object
names.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kube.apiserver import WATCHER_USER, KubeApiServer, ensure_binary

__all__ = ["kube_apiserver"]


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[KubeApiServer]:
    """A running :class:`KubeApiServer` with users ``admin`` and ``watcher``."""
    binary = ensure_binary()
    with KubeApiServer(binary=binary, users=(WATCHER_USER,)) as server:
        yield server
