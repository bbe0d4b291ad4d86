"""laneproxy.compilation: the process says which build of the hot path it runs, and that is the build it runs.

The compiled build and the pure one are the same sources; these tests check the switch between them: what
`BUILD` says against the modules really imported, `LANEPROXY_PURE=1`, and the two ways an install's
extensions can stop matching its sources (an edited source, a missing extension), each of which must run
the whole hot path from source rather than a mix or a stale build. The last test builds the extensions
with no working C compiler: the build warns and leaves a pure package, it does not fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import laneproxy
from laneproxy.compilation import COMPILED_MODULES, MANIFEST, extension_path

_REPO = Path(__file__).resolve().parents[2]
_PROBE = """
import importlib, json, laneproxy
from laneproxy.compilation import COMPILED_MODULES, loaded_compiled
loaded = {m: loaded_compiled(importlib.import_module(m)) for m in COMPILED_MODULES}
print(json.dumps({"compiled": laneproxy.BUILD.compiled, "reason": laneproxy.BUILD.reason, "loaded": loaded}))
"""
_HAS_EXTENSIONS = all(extension_path(m) is not None for m in COMPILED_MODULES)
needs_extensions = pytest.mark.skipif(not _HAS_EXTENSIONS, reason="this install has no compiled extensions")


def probe(env: dict[str, str], cwd: Path | None = None) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("LANEPROXY_PURE", "PYTHONPATH")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                            env=environment, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_build_named_is_the_build_every_hot_module_is_loaded_from():
    seen = probe({})
    assert set(seen["loaded"].values()) == {seen["compiled"]}, seen
    assert seen["compiled"] == _HAS_EXTENSIONS


def test_laneproxy_pure_runs_every_hot_module_from_its_source():
    seen = probe({"LANEPROXY_PURE": "1"})
    assert seen["compiled"] is False and "LANEPROXY_PURE" in seen["reason"]
    assert not any(seen["loaded"].values()), seen


def copy_of_install(tmp_path: Path) -> Path:
    """The package as installed here (sources, extensions, manifest and mypyc's shared library), elsewhere."""
    root = tmp_path / "site"
    shutil.copytree(Path(laneproxy.__file__).parent, root / "laneproxy", ignore=shutil.ignore_patterns("__pycache__"))
    for shared in Path(laneproxy.__file__).parent.parent.glob("laneproxy__mypyc*"):
        shutil.copy(shared, root)
    return root


@needs_extensions
def test_a_source_edited_after_the_build_runs_the_whole_hot_path_from_source(tmp_path):
    root = copy_of_install(tmp_path)
    edited = root / "laneproxy" / "dataplane" / "exchange.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    seen = probe({"PYTHONPATH": str(root)}, cwd=tmp_path)
    assert seen["compiled"] is False and "laneproxy.dataplane.exchange" in seen["reason"], seen
    assert not any(seen["loaded"].values()), seen  # not only the edited module: no mix of the two builds


@needs_extensions
def test_a_missing_extension_runs_the_whole_hot_path_from_source(tmp_path):
    root = copy_of_install(tmp_path)
    for built in (root / "laneproxy" / "core").glob("decision.*.so"):
        built.unlink()
    seen = probe({"PYTHONPATH": str(root)}, cwd=tmp_path)
    assert seen["compiled"] is False and "laneproxy.core.decision" in seen["reason"], seen
    assert not any(seen["loaded"].values()), seen


@needs_extensions
def test_the_unmodified_copy_runs_compiled_so_the_two_tests_above_see_the_edit_not_the_copy(tmp_path):
    root = copy_of_install(tmp_path)
    manifest = json.loads((root / "laneproxy" / MANIFEST).read_text())
    assert sorted(manifest) == sorted(COMPILED_MODULES)
    seen = probe({"PYTHONPATH": str(root)}, cwd=tmp_path)
    assert seen["compiled"] is True and all(seen["loaded"].values()), seen


def test_a_build_without_a_working_c_compiler_warns_and_leaves_the_pure_package(tmp_path):
    pytest.importorskip("mypyc")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(_REPO / name, source)
    shutil.copytree(_REPO / "laneproxy", source / "laneproxy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", MANIFEST))
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    env.pop("LANEPROXY_PURE", None)
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=source, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installing the pure-Python build" in result.stderr
    assert not list(source.rglob("*.so"))
    seen = probe({"PYTHONPATH": str(source)}, cwd=source)
    assert (seen["compiled"], seen["reason"]) == (False, "no compiled extensions installed")
    assert not any(seen["loaded"].values())
