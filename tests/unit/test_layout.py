"""The distribution's layout: packages import, ``operator`` is still Python's, one console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = [
    "autoglm_api",
    "autoglm_core",
    "autoglm_modeling",
    "autoglm_operator",
    "autoglm_pipelines",
    "autoglm_inference",
    "autoglm_feedback",
]
FOLDERS = ["crds", "core", "modeling", "operator", "pipelines", "inference", "feedback"]


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
    for command in ("validate", "crds", "audit", "pipeline", "serve", "run"):
        assert f"  {command}" in out, out


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("autoglm_core.audit", ("torch", "transformers", "autoglm_modeling")),
        ("autoglm_core.card", ("torch", "transformers")),
        ("autoglm_pipelines.cli", ("torch", "transformers", "hera")),
        ("autoglm_inference.cli", ("torch", "transformers", "kserve")),
        ("autoglm_operator.cli.main", ("torch", "transformers", "kserve", "hera", "optuna")),
    ],
)
def test_light_modules_import_without_the_model_libraries(module: str, forbidden: tuple[str, ...]) -> None:
    """The ledger, the card check and the command line start in well under a second: they import
    no model library (the commands import them when they run)."""
    code = f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.partition('.')[0] in {forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def test_python_m_runs_the_pipeline_and_the_server_alone() -> None:
    """The local runner and the supervisor start ``python -m autoglm_pipelines`` / ``-m autoglm_inference``."""
    for package, expected in (("autoglm_pipelines", "render"), ("autoglm_inference", "--model-uri")):
        out = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout
