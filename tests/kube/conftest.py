"""Make the Kubernetes fixtures available to the tests in this folder."""

from __future__ import annotations

import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path; a bare `pytest`
# (rootdir-relative "prepend" import mode) does not, so add it for
# `tests.kube.*` imports to work either way.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.kube.fixtures import kube_apiserver  # noqa: E402, F401
