"""The distribution's layout: packages import, ``operator`` is still Python's, one console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["autoglm_api", "autoglm_operator", "autoglm_pipelines", "autoglm_inference", "autoglm_feedback"]
FOLDERS = ["crds", "operator", "pipelines", "inference", "feedback"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_top_level_folders_are_not_packages(repo_root: Path, folder: str) -> None:
    assert not (repo_root / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow imports"


@pytest.mark.parametrize("cwd_on_path", [False, True])
def test_stdlib_operator_is_not_shadowed(repo_root: Path, cwd_on_path: bool) -> None:
    code = "import operator, autoglm_operator; assert operator.itemgetter(1)([0, 7]) == 7; print(operator.__file__)"
    if cwd_on_path:
        code = f"import sys; sys.path.insert(0, {str(repo_root)!r}); " + code
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert "site-packages" not in out.stdout
    assert str(repo_root) not in out.stdout


def test_all_packages_import_and_are_typed() -> None:
    import importlib

    for name in PACKAGES:
        module = importlib.import_module(name)
        assert module.__file__ is not None
        assert (Path(module.__file__).parent / "py.typed").exists(), name


def test_console_script_lists_its_subcommands() -> None:
    exe = shutil.which("autoglm", path=str(Path(sys.executable).parent))
    assert exe, "the autoglm console script is not installed next to this Python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("validate", "crds", "audit"):
        assert f"  {command}" in out, out
