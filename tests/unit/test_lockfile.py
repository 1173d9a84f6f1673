"""requirements.lock: agrees with pyproject.toml, pins what the Makefile installs, is what is installed."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tools import lockfile

REPO = Path(__file__).resolve().parents[2]


def test_the_lock_agrees_with_pyproject() -> None:
    assert lockfile.check() == []


def test_a_dependency_changed_without_make_lock_is_caught(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    text = lockfile.PYPROJECT.read_text()
    pyproject.write_text(text.replace('"transformers>=5.23,<5.25"', '"transformers>=5.23,<5.24"'))
    assert pyproject.read_text() != text
    problems = lockfile.check(pyproject)
    assert any("run `make lock`" in p for p in problems), problems
    assert any("transformers==" in p and "outside" in p for p in problems), problems


def test_a_declared_package_missing_from_the_lock_is_caught(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "".join(
            line + "\n"
            for line in lockfile.LOCK.read_text().splitlines()
            if not line.lower().startswith("optuna==")
        )
    )
    assert lockfile.check(lockfile.PYPROJECT, lock) == [
        "optuna<6,>=5.0 is declared in pyproject.toml but not pinned in requirements.lock"
    ]


def test_torch_is_pinned_by_version_only_at_the_makefile_pin() -> None:
    _, pins = lockfile.read_lock()
    makefile_pin = re.search(r"^TORCH\s*:=\s*torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert makefile_pin is not None
    assert str(pins["torch"]) == makefile_pin.group(1)
    text = lockfile.LOCK.read_text()
    assert "+cpu" not in text
    assert "--hash" not in text
    assert "://" not in text
    assert not any(name.startswith("nvidia-") and name != "nvidia-ml-py" for name in pins)


@pytest.mark.skipif(bool(os.environ.get("AUTOGLM_UNLOCKED")), reason="make test-latest: newest, not locked")
def test_the_installed_environment_is_the_locked_one() -> None:
    _, pins = lockfile.read_lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differing = {
        name: (str(pin), installed.get(name))
        for name, pin in pins.items()
        if name != "setuptools" and installed.get(name, "").split("+")[0] != str(pin)
    }
    assert differing == {}, "installed versions differ from requirements.lock (rerun make venv)"
