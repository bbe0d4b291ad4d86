"""Which build of the hot path this process runs: the mypyc-compiled extensions or the pure-Python sources.

Owns the list of compiled modules (setup.py reads it), the check made once when the package is imported,
and the switch to the pure sources: `LANEPROXY_PURE=1` in the environment, an install without extensions,
or extensions that do not match their sources (an editable install whose .py was edited after the build,
or a set of extensions missing one module) all run every hot module from its .py. It is all or nothing:
compiled modules reach each other's classes natively, so a mix of compiled and pure modules is refused.

`BUILD` says which build runs and why; `laneproxy --version` and the admin's /server_info print it.

Must never: compile anything, import the modules it lists (it runs before them, from the package's
__init__), or fail the import: whatever goes wrong here means the pure build, with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

# The per-request modules: both codecs' glue, the exchange, the upstream pools, local replies, header
# policy, the listeners' roles, the core's decision with what it calls per request, and the observers every
# finished request goes through (the recorder, the counters, Istio's metrics). Not here: core.errors (its
# class bodies assign several class attributes at once, and it only runs when a request fails).
COMPILED_MODULES = (
    "laneproxy.core.attempts",
    "laneproxy.core.balance",
    "laneproxy.core.decision",
    "laneproxy.core.fallback",
    "laneproxy.core.headers",
    "laneproxy.core.propagation",
    "laneproxy.core.retry",
    "laneproxy.core.routing",
    "laneproxy.dataplane.codec",
    "laneproxy.dataplane.downstream",
    "laneproxy.dataplane.egress",
    "laneproxy.dataplane.exchange",
    "laneproxy.dataplane.header_policy",
    "laneproxy.dataplane.hpack_codec",
    "laneproxy.dataplane.http2",
    "laneproxy.dataplane.http2_fields",
    "laneproxy.dataplane.http2_upstream",
    "laneproxy.dataplane.listener",
    "laneproxy.dataplane.local_reply",
    "laneproxy.dataplane.route_trail",
    "laneproxy.dataplane.sniff",
    "laneproxy.dataplane.tunnel",
    "laneproxy.dataplane.upstream",
    "laneproxy.observability.istio",
    "laneproxy.observability.recorder",
    "laneproxy.observability.stats",
)
PURE_ENV = "LANEPROXY_PURE"
MANIFEST = "compiled.json"  # written by setup.py beside the extensions: module -> sha256 of the source compiled
_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Build:
    compiled: bool
    reason: str  # why this build: shown to people, never parsed

    def __str__(self) -> str:
        return f"{'compiled' if self.compiled else 'pure-Python'} ({self.reason})"


def source_path(module: str) -> Path:
    return _PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")


def extension_path(module: str) -> Path | None:
    source = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(modules: Sequence[str]) -> Build:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return Build(False, f"{PURE_ENV} is set")
    present = [m for m in modules if extension_path(m) is not None]
    if not present:
        return Build(False, "no compiled extensions installed")
    if len(present) != len(modules):
        missing = sorted(set(modules) - set(present))
        return Build(False, f"extensions missing for {', '.join(missing)}: running every hot module from source")
    try:
        manifest = json.loads((_PACKAGE / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return Build(False, f"no readable {MANIFEST} beside the extensions ({exc.__class__.__name__})")
    changed = [m for m in modules if manifest.get(m) != source_digest(source_path(m))]
    if changed:
        return Build(False, f"sources changed since the extensions were built: {', '.join(changed)}; rebuild with "
                            "`pip install -e .`")
    return Build(True, f"mypyc, {len(modules)} modules")


class _PureSources(importlib.abc.MetaPathFinder):
    """Finds the listed modules' .py files ahead of the extensions the path finder would prefer."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        source = source_path(fullname)
        return importlib.util.spec_from_file_location(fullname, source) if source.exists() else None


def choose() -> Build:
    """Called once by the package's __init__, before any listed module is imported."""
    try:
        build = _check(COMPILED_MODULES)
    except OSError as exc:  # an unreadable source or extension: run the sources
        build = Build(False, f"could not check the extensions ({exc})")
    if not build.compiled and build.reason != "no compiled extensions installed":
        if not any(isinstance(finder, _PureSources) for finder in sys.meta_path):
            sys.meta_path.insert(0, _PureSources(COMPILED_MODULES))
    return build


def loaded_compiled(module: ModuleType) -> bool:
    """Whether an imported module is an extension (what really runs, whatever BUILD says)."""
    return str(getattr(module, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
