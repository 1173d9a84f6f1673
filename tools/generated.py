"""What the generators in tools/ share: ``write`` writes every generated file, ``check`` exits 1
naming each committed file that differs from what the code generates (or that it no longer
generates, under a folder it owns), so a test fails on drift and names the make target to run."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(
    argv: list[str],
    generated: Callable[[], dict[Path, str]],
    target: str,
    usage: str,
    owned: Path | None = None,
) -> int:
    """``owned``: a folder (and its file pattern) whose every file must be generated, e.g. dashboards/*.json."""
    if argv[1:] == ["write"]:
        for path, text in generated().items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    if argv[1:] == ["check"]:
        files = generated()
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        extra = sorted(set(owned.parent.glob(owned.name)) - set(files)) if owned is not None else []
        for path in [*stale, *extra]:
            print(f"{path.relative_to(ROOT)} is stale: run `make {target}`", file=sys.stderr)
        return 1 if stale or extra else 0
    print(usage, file=sys.stderr)
    return 2
