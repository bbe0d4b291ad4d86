"""The build of laneproxy's compiled hot path: the same .py sources, compiled with mypyc into C extensions.

pyproject.toml holds everything else about the package; this file only adds the extensions. The modules
compiled are `laneproxy.compilation.COMPILED_MODULES` (the data plane's per-request modules and the core's
decision). The .py sources ship beside the extensions, so a compiled install can still run them
(`LANEPROXY_PURE=1` at run time) and tracebacks point at real lines.

The build never fails for want of a compiler: if mypyc or a C compiler is missing, or the compilation
fails, it warns and the package installs pure, which works the same, only slower. `LANEPROXY_PURE=1`
at build time skips the compilation on purpose. Editable installs (`pip install -e .`) compile in place;
an extension older than its source is ignored at run time (see laneproxy/compilation.py), so an edited
module is never shadowed by a stale build.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """COMPILED_MODULES read from laneproxy/compilation.py without importing the package (its dependencies
    may not be installed yet when the build runs)."""
    tree = ast.parse((HERE / "laneproxy" / "compilation.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMPILED_MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("laneproxy/compilation.py has no COMPILED_MODULES")


def warn(text: str) -> None:
    print(f"laneproxy build: WARNING: {text}; installing the pure-Python build (same behaviour, more CPU per request)",
          file=sys.stderr, flush=True)


def extensions() -> list:
    if os.environ.get("LANEPROXY_PURE", "") not in ("", "0"):
        print("laneproxy build: LANEPROXY_PURE is set: pure-Python build", file=sys.stderr, flush=True)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        warn(f"mypyc is not available ({exc})")
        return []
    paths = [str(Path(*name.split(".")).with_suffix(".py")) for name in compiled_modules()]
    try:
        # One shared library for the group (laneproxy__mypyc), so calls between the modules stay native.
        # The build environment holds only the build requirements: imports of the runtime dependencies
        # (h2, httptools, aiohttp...) are typed Any there, which mypyc compiles as generic Python calls.
        return mypycify(["--ignore-missing-imports", *paths], opt_level="3", debug_level="0", group_name="laneproxy")
    except Exception as exc:  # mypyc reports type errors and its own limits as SystemExit or plain exceptions
        warn(f"mypyc could not compile the hot path ({exc!r})")
        return []
    except SystemExit as exc:
        warn(f"mypyc could not compile the hot path (exit {exc.code})")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure package when the C compiler is missing or fails."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # distutils' CompileError/LinkError/PlatformError, or no compiler found at all
            warn(f"the C extensions could not be built ({exc})")
            self.extensions = []
            return
        self.write_manifest()

    def write_manifest(self) -> None:
        """compiled.json beside the extensions: the digest of each source compiled, so that the package can
        tell at run time whether its extensions still match its sources."""
        import hashlib
        import json

        modules = compiled_modules()
        output = Path(self.get_ext_fullpath(modules[0]))
        package = output.parents[len(modules[0].split(".")) - 2]  # laneproxy/ in the build or (in place) the tree
        digests = {m: hashlib.sha256((HERE / Path(*m.split(".")).with_suffix(".py")).read_bytes()).hexdigest()
                   for m in modules}
        package.mkdir(parents=True, exist_ok=True)
        (package / "compiled.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            # A partial build is worse than none: every compiled module or none (laneproxy/compilation.py
            # also refuses a mixed set at run time).
            for built in self.get_outputs():
                Path(built).unlink(missing_ok=True)
            raise RuntimeError(f"{ext.name}: {exc}") from exc


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
