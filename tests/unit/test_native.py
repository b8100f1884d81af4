"""The compiled request path (gateway.native): used only while it matches its sources, never mixed
with interpreted modules, and GATEWAY_PURE=1 runs everything interpreted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import native

PROBE = (
    "import json, gateway.native as n, gateway.actions.proxy, gateway.pipeline, gateway.outbox\n"
    "print(json.dumps({'state': n.state, 'files': [m.__file__ for m in "
    "(gateway.actions.proxy, gateway.pipeline, gateway.outbox)]}))"
)
built = pytest.mark.skipif(
    not native.MANIFEST.exists(), reason="not compiled here (make native needs gcc and Python's headers)"
)


def _probe(root: Path, **env: str) -> dict[str, object]:
    """Import the package found at `root` in a fresh interpreter: its build state and which files ran."""
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_PURE"}
    environ["PYTHONPATH"] = str(root)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=root, env={**environ, **env}, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _copy(tmp_path: Path) -> Path:
    """The package, build included, in a directory of its own (to change a source safely)."""
    shutil.copytree(native.PACKAGE, tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _interpreted(root: Path, why: str, **env: str) -> None:
    """The package at `root` runs every compiled module from its source, for `why`."""
    seen = _probe(root, **env)
    assert seen["state"] == f"interpreted ({why})"
    assert all(f.endswith(".py") for f in seen["files"])  # type: ignore[attr-defined]


@built
def test_a_build_that_matches_its_sources_is_used() -> None:
    seen = _probe(native.PACKAGE.parent)
    assert seen["state"] == "compiled"
    assert all(not f.endswith(".py") for f in seen["files"])  # type: ignore[attr-defined]


@built
def test_gateway_pure_runs_every_module_from_source() -> None:
    _interpreted(native.PACKAGE.parent, "GATEWAY_PURE is set", GATEWAY_PURE="1")


@built
def test_any_changed_source_sends_every_compiled_module_back_to_source(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert _probe(root)["state"] == "compiled"  # the copy is the same build
    # A module that is not compiled itself: the compiled ones were built against it.
    with (root / "gateway" / "errors.py").open("a") as f:
        f.write("\n# changed\n")
    _interpreted(root, "the sources changed since the build: make native")


@built
def test_a_build_without_its_record_is_not_used(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "gateway" / "_native" / "build.json").unlink()
    _interpreted(root, "no build record: make native")


@built
def test_a_record_that_is_not_one_is_not_used(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "gateway" / "_native" / "build.json").write_text("[]")
    _interpreted(root, "the build is of other modules: make native")


@built
def test_a_partial_build_is_not_used_at_all(tmp_path: Path) -> None:
    # One compiled module missing: none of the others is imported compiled either (they call
    # each other directly, so a mix would run two versions of the code side by side).
    root = _copy(tmp_path)
    next((root / "gateway" / "_native").rglob("resp.*")).unlink()
    _interpreted(root, "not built: make native")


@built
def test_editor_droppings_change_nothing(tmp_path: Path) -> None:
    # An editor's lock file (a dangling symlink named like a source) is not a source.
    root = _copy(tmp_path)
    (root / "gateway" / ".#pipeline.py").symlink_to("user@host.1234")
    assert _probe(root)["state"] == "compiled"


def test_without_a_build_everything_is_interpreted(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    shutil.rmtree(root / "gateway" / "_native", ignore_errors=True)
    _interpreted(root, "not built: make native")


@pytest.mark.skipif(not os.environ.get("GATEWAY_NATIVE_REQUIRED"), reason="only where the build is required (CI)")
def test_the_suite_runs_the_compiled_build() -> None:
    assert native.state == "compiled"


def test_every_compiled_module_has_a_source() -> None:
    for module in native.MODULES:
        assert native._source(module).is_file(), module
