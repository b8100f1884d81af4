"""The request path's modules compiled with mypyc, and the guard that keeps a stale build out.

`python -m gateway.compile` (what `make native` runs) compiles the modules in `MODULES` with
mypyc into extension modules next to their sources. Python imports an extension module in
preference to the `.py` beside it, so a build that no longer matches its sources would run old
code: the build records a digest of every source file of the package (`_native.json`), and
`guard()`, called when the package is imported, sends every compiled module back to its source
unless the digest still matches. A change to any file of the package makes the whole package
run interpreted until the next build; never a mix, since the compiled modules call each other
directly, past the import system. `GATEWAY_PURE=1` runs interpreted whatever is built.

Interpreted and compiled, the code is the same: mypyc compiles the annotated Python as it is,
checking the annotations at run time. Nothing depends on which one runs, only the cost.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
MANIFEST = PACKAGE / "_native.json"
#: The compiled modules: the own front end, the request path, the proxy and its upstream side,
#: the RESP codec and connection, the multiplexer, and the own-codec backends. (Not `pool.py`:
#: mypyc compiles no async generator, and it has one, `Pool.connection`.)
MODULES = (
    "gateway.outbox",
    "gateway.pipeline",
    "gateway.stepper",
    "gateway.histogram",
    "gateway.resp",
    "gateway.connection",
    "gateway.multiplexer",
    "gateway.backends.raw",
    "gateway.backends.multiplexed",
    "gateway.backends.batched",
    "gateway.upstream.connection",
    "gateway.upstream.server",
    "gateway.actions.proxy",
    "gateway.http.httptools_impl",
    "gateway.http.httptools_proxy",
)
#: The shared library mypyc builds for them (a package module, so any install path finds it).
GROUP = "gateway._native"

#: "compiled", or "interpreted (why)": set by guard().
state = "interpreted (not checked)"


def _source(module: str) -> Path:
    return PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")


def digest() -> str:
    """One digest over every source file of the package, with the interpreter's ABI tag."""
    h = hashlib.sha256(sys.implementation.cache_tag.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _built() -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return all(any(_source(m).with_suffix(s).exists() for s in suffixes) for m in MODULES)


def _why_not() -> str | None:
    """Why the build cannot be used (None: it can)."""
    if os.environ.get("GATEWAY_PURE", "") not in ("", "0"):
        return "GATEWAY_PURE is set"
    if not _built():
        return "not built: make native"
    try:
        recorded = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return "no build record: make native"
    if recorded.get("digest") != digest():
        return "the sources changed since the build: make native"
    return None


class _Interpreted:
    """A meta path finder that loads the compiled modules from their sources instead."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(name, _source(name))


def guard() -> None:
    """Use the build if it matches the sources, else import every compiled module from source."""
    global state
    if any(isinstance(f, _Interpreted) for f in sys.meta_path):
        return
    why = _why_not()
    if why is None:
        state = "compiled"
        return
    state = f"interpreted ({why})"
    if _built():
        sys.meta_path.insert(0, _Interpreted())


def build() -> int:
    """Compile MODULES in place and record the digest; 1 (and a message) if it cannot."""
    try:
        from mypyc.build import mypycify
        from setuptools import Distribution  # type: ignore[import-untyped]
    except ImportError as exc:
        print(f"gateway.native: cannot build ({exc}); the gateway runs interpreted", file=sys.stderr)
        return 1
    clean()
    root = PACKAGE.parent
    cwd = os.getcwd()
    os.chdir(root)  # mypyc names modules by their paths from here
    try:
        paths = [str(_source(m).relative_to(root)) for m in MODULES]
        extensions = mypycify(paths, opt_level="3", group_name=GROUP, target_dir="build/native")
        dist = Distribution({"name": "gateway-native", "ext_modules": extensions})
        dist.script_args = ["build_ext", "--inplace", "--build-temp", "build/native/temp", "--quiet"]
        dist.parse_command_line()
        dist.run_commands()
    except (Exception, SystemExit) as exc:  # setuptools reports a compiler failure as SystemExit
        print(f"gateway.native: build failed ({exc}); the gateway runs interpreted", file=sys.stderr)
        clean()
        return 1
    finally:
        os.chdir(cwd)
    MANIFEST.write_text(json.dumps({"digest": digest(), "modules": list(MODULES)}, indent=1) + "\n")
    print(f"gateway.native: compiled {len(MODULES)} modules", file=sys.stderr)
    return 0


def clean() -> None:
    """Remove the build: every module runs interpreted."""
    MANIFEST.unlink(missing_ok=True)
    for path in PACKAGE.rglob("*"):
        if path.suffix in (".so", ".pyd") and path.is_file():
            path.unlink()


def main(argv: Sequence[str]) -> int:
    if list(argv) in ([], ["build"]):
        return build()
    if list(argv) == ["clean"]:
        clean()
        return 0
    if list(argv) == ["state"]:
        guard()
        print(state)
        return 0
    print("usage: python -m gateway.compile [build|clean|state]", file=sys.stderr)
    return 2
