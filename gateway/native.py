"""The request path's modules compiled with mypyc, and the guard that keeps a stale build out.

`python -m gateway.compile` (what `make native` runs) compiles the modules in `MODULES` with
mypyc into extension modules kept apart from the sources, in `gateway/_native/` (never beside a
`.py`, where Python would prefer them to it, and where a checkout of an older commit would still
find them). The build records a digest of every source file of the package
(`_native/build.json`).
`guard()`, called when the package is imported, lets the compiled modules be imported (a meta
path finder that maps each name of `MODULES` to its extension file) only if the build is whole
and the digest still matches; otherwise nothing compiled is imported at all. So a change to any
file of the package makes the whole package run interpreted until the next build; never a mix,
since the compiled modules call each other directly, past the import system. `GATEWAY_PURE=1`
runs interpreted whatever is built.

Interpreted and compiled, the code is the same: mypyc compiles the annotated Python as it is,
checking the annotations at run time. Nothing depends on which one runs, only the cost.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = Path(__file__).resolve().parent
#: Where the build puts the extension modules (gateway/_native/gateway/...), and its record.
BUILD = PACKAGE / "_native"
MANIFEST = BUILD / "build.json"
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
#: The shared library mypyc builds for them, which each module's own extension loads.
GROUP = "gateway._native__mypyc"

#: "compiled", or "interpreted (why)": set by guard().
state = "interpreted (not checked)"


def _source(module: str) -> Path:
    return PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")


def _extension(module: str) -> Path | None:
    """The built extension file of `module` (in BUILD), None if there is none."""
    stem = BUILD.joinpath(*module.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = stem.with_name(stem.name + suffix)
        if path.is_file():
            return path
    return None


def digest() -> str:
    """One digest over every source file of the package (editor droppings such as `.#x.py` and
    what is not a regular file left out), with the interpreter's ABI tag."""
    h = hashlib.sha256(sys.implementation.cache_tag.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == BUILD.name or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        h.update(str(rel).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _why_not() -> str | None:
    """Why the build cannot be used (None: it can)."""
    if os.environ.get("GATEWAY_PURE", "") not in ("", "0"):
        return "GATEWAY_PURE is set"
    if any(_extension(m) is None for m in (*MODULES, GROUP)):
        return "not built: make native"
    try:
        recorded = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return "no build record: make native"
    if not isinstance(recorded, dict) or recorded.get("modules") != list(MODULES):
        return "the build is of other modules: make native"
    try:
        current = digest()
    except OSError:
        return "the sources could not be read"
    if recorded.get("digest") != current:
        return "the sources changed since the build: make native"
    return None


class _Compiled:
    """A meta path finder that imports each compiled module from its extension file."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != GROUP and name not in MODULES:
            return None
        location = _extension(name)
        return None if location is None else importlib.util.spec_from_file_location(name, location)


def guard() -> None:
    """Import the compiled modules if the build is whole and matches the sources; else none."""
    global state
    if any(isinstance(f, _Compiled) for f in sys.meta_path):
        return
    why = _why_not()
    if why is not None:
        state = f"interpreted ({why})"
        return
    state = "compiled"
    sys.meta_path.insert(0, _Compiled())


def build() -> int:
    """Compile MODULES into BUILD and record the digest; 1 (and a message) if it cannot."""
    try:
        from mypyc.build import mypycify
        from setuptools import Distribution  # type: ignore[import-untyped]
    except ImportError as exc:
        print(f"gateway.native: cannot build ({exc}); the gateway runs interpreted", file=sys.stderr)
        return 1
    clean()
    root = PACKAGE.parent
    before = digest()
    cwd = os.getcwd()
    os.chdir(root)  # mypyc names modules by their paths from here
    try:
        paths = [str(_source(m).relative_to(root)) for m in MODULES]
        extensions = mypycify(paths, opt_level="3", group_name=GROUP.removesuffix("__mypyc"), target_dir="build/native")
        dist = Distribution({"name": "gateway-native", "ext_modules": extensions})
        dist.script_args = ["build_ext", "--build-lib", str(BUILD), "--build-temp", "build/native/temp", "--quiet"]
        dist.parse_command_line()
        dist.run_commands()
    except (Exception, SystemExit) as exc:  # setuptools reports a compiler failure as SystemExit
        print(f"gateway.native: build failed ({exc}); the gateway runs interpreted", file=sys.stderr)
        clean()
        return 1
    finally:
        os.chdir(cwd)
    if digest() != before:
        # A source changed while it was compiled: the build may be of either version.
        print("gateway.native: a source changed during the build; not used (make native again)", file=sys.stderr)
        return 1
    MANIFEST.write_text(json.dumps({"digest": before, "modules": list(MODULES)}, indent=1) + "\n")
    print(f"gateway.native: compiled {len(MODULES)} modules", file=sys.stderr)
    return 0


def clean() -> None:
    """Remove the build: every module runs interpreted. (Extension files beside the sources, which
    no build of this version makes, would be imported before them: they go too.)"""
    shutil.rmtree(BUILD, ignore_errors=True)
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
