"""The lock of the whole resolved environment: ``requirements.lock``, written by ``make lock``.

``write`` asks pip's own resolver (``pip install --dry-run --ignore-installed --report``) for every
package, transitive ones included, that ``pyproject.toml`` with the locked extras resolves to, and
writes them pinned with ``==``. It keeps what is locked: the current pins are the resolver's
constraints, so adding a dependency pins only it and what it brings (``make lock``); a resolution
those pins forbid fails and names ``make lock-upgrade``, which resolves everything to today's
releases (``write --upgrade``), to be tested like any other change. The Makefile installs the lock as constraints
(``pip install -c requirements.lock -e '.[EXTRAS]'``), so a clone next week gets exactly these
versions. torch is pinned by version only: which build (CPU, CUDA) is installed stays the choice of
``TORCH_PIP_ARGS``, so its local label (``+cpu``) and the CUDA runtime packages of a CUDA build
(``nvidia-*``, ``triton``) are left out.

The header carries the SHA-256 of the dependency tables of ``pyproject.toml``; ``check`` (run by
``tests/unit/test_lockfile.py``) fails when they changed without ``make lock``, or when a declared
requirement is not satisfied by its pin.

Usage: ``python tools/lockfile.py write TORCH_PIN [--upgrade]`` | ``python tools/lockfile.py check``
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
#: The extras `make demo` and `make test` install; `cloud` (s3fs, gcsfs) is left to the user.
EXTRAS = ("ml", "serve", "kube", "feedback", "dev", "postgres")
#: What a CUDA build of torch brings along; the build is chosen by TORCH_PIP_ARGS, not by the lock.
BUILD_SPECIFIC = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")
DIGEST_LINE = "# pyproject-sha256: "


def declared(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """The requirements of the project and of the locked extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def pyproject_digest(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = EXTRAS) -> str:
    """SHA-256 of what the lock is made from: the dependency tables and the locked extras' names."""
    project = tomllib.loads(pyproject.read_text())["project"]
    basis = {
        "requires-python": project.get("requires-python"),
        "dependencies": project["dependencies"],
        "optional-dependencies": {e: project["optional-dependencies"][e] for e in extras},
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def read_lock(lock: Path = LOCK) -> tuple[str | None, dict[str, Version]]:
    """The recorded pyproject digest and the pins, by canonical name."""
    digest, pins = None, {}
    for raw in lock.read_text().splitlines():
        line = raw.strip()
        if line.startswith(DIGEST_LINE):
            digest = line[len(DIGEST_LINE) :].strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{lock}: {line!r} is not NAME==VERSION")
        pins[canonicalize_name(name)] = Version(version)
    return digest, pins


def check(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> list[str]:
    """What disagrees between ``pyproject.toml`` and the lock; empty when they agree."""
    if not lock.is_file():
        return [f"{lock.name} is missing: run `make lock`"]
    digest, pins = read_lock(lock)
    problems = []
    if digest != pyproject_digest(pyproject):
        problems.append(
            f"the dependencies in {pyproject.name} changed since {lock.name} was written: run `make lock`"
        )
    for requirement in declared(pyproject):
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement} is declared in {pyproject.name} but not pinned in {lock.name}")
        elif not requirement.specifier.contains(pin, prereleases=True):
            problems.append(f"{lock.name} pins {requirement.name}=={pin}, outside {requirement}")
    return problems


def resolve(torch_pin: str, constraints: Path | None = None) -> dict[str, str]:
    """Every package pip resolves for the project with the locked extras, at its version; with
    ``constraints`` (the current lock), the versions it pins are kept."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        "-",
        torch_pin,
        f"{ROOT}[{','.join(EXTRAS)}]",
        *(["-c", str(constraints)] if constraints is not None else []),
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        hint = (
            " (the locked versions forbid it: `make lock-upgrade` resolves everything anew)"
            if constraints
            else ""
        )
        raise SystemExit(f"pip could not resolve the project{hint}:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    project = tomllib.loads(PYPROJECT.read_text())["project"]["name"]
    ours = {canonicalize_name(r.name) for r in declared()}  # nvidia-ml-py is ours, not torch's
    versions = {}
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        if name == canonicalize_name(project) or (BUILD_SPECIFIC.match(name) and name not in ours):
            continue
        versions[name] = Version(item["metadata"]["version"]).public  # 2.13.0+cpu -> 2.13.0
    return versions


def write(torch_pin: str, lock: Path = LOCK, *, upgrade: bool = False) -> None:
    keep = None
    if lock.is_file() and not upgrade:
        _, pins = read_lock(lock)
        keep = lock.with_suffix(".constraints")
        keep.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    try:
        versions = resolve(torch_pin, keep)
    finally:
        if keep is not None:
            keep.unlink(missing_ok=True)
    python = ".".join(map(str, sys.version_info[:2]))
    lines = [
        "# The whole resolved environment of pyproject.toml with the extras "
        f"{', '.join(EXTRAS)}, for Python {python}.",
        "# Written by `make lock` (tools/lockfile.py); installed as constraints by `make venv`. Do not edit.",
        "# torch is pinned by version only: TORCH_PIP_ARGS chooses the build (CPU, CUDA).",
        f"{DIGEST_LINE}{pyproject_digest()}",
        *(f"{name}=={version}" for name, version in sorted(versions.items())),
    ]
    lock.write_text("\n".join(lines) + "\n")
    print(f"{lock.name}: {len(versions)} packages pinned")


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"] and len(argv) in (2, 3) and argv[2:] in ([], ["--upgrade"]):
        write(argv[1], upgrade=argv[2:] == ["--upgrade"])
        return 0
    if argv == ["check"]:
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    print("usage: lockfile.py write TORCH_PIN [--upgrade] | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
