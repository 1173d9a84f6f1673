"""requirements.lock: agrees with pyproject.toml, pins what the Makefile installs, is what is installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
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


class _Pip:
    """pip's resolver as ``resolve`` calls it: records the command and its constraints."""

    def __init__(self, returncode: int = 0) -> None:
        self.returncode = returncode
        self.commands: list[list[str]] = []
        self.constraints: str | None = None

    def __call__(self, command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        if "-c" in command:
            self.constraints = Path(command[command.index("-c") + 1]).read_text()
        report = {"install": [{"metadata": {"name": "torch", "version": "2.13.0+cpu"}},
                              {"metadata": {"name": "newpkg", "version": "1.0"}}]}  # fmt: skip
        return subprocess.CompletedProcess(
            command, self.returncode, json.dumps(report), "ResolutionImpossible"
        )


def test_make_lock_keeps_every_locked_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(lockfile.LOCK.read_text())
    pip = _Pip()
    monkeypatch.setattr(lockfile.subprocess, "run", pip)
    lockfile.write("torch==2.13.0", lock)
    _, pins = lockfile.read_lock(lockfile.LOCK)
    assert pip.constraints is not None
    assert pip.constraints.splitlines() == [f"{name}=={version}" for name, version in sorted(pins.items())]
    assert not lock.with_suffix(".constraints").exists()  # removed after the resolve
    assert "newpkg==1.0" in lock.read_text()


def test_make_lock_upgrade_resolves_without_the_locked_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(lockfile.LOCK.read_text())
    pip = _Pip()
    monkeypatch.setattr(lockfile.subprocess, "run", pip)
    lockfile.write("torch==2.13.0", lock, upgrade=True)
    assert pip.constraints is None
    assert "-c" not in pip.commands[0]


def test_a_resolution_the_lock_forbids_names_lock_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(lockfile.LOCK.read_text())
    monkeypatch.setattr(lockfile.subprocess, "run", _Pip(returncode=1))
    with pytest.raises(SystemExit, match="make lock-upgrade"):
        lockfile.write("torch==2.13.0", lock)
    assert lock.read_text() == lockfile.LOCK.read_text()  # nothing written
