"""What a test of `autoglm run` sets up before it starts a loop."""

from __future__ import annotations

from pathlib import Path

import pytest


def isolated_loop_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A cache of the test's own, and one ledger (``STATE/audit.db``) for the loop and the pipelines
    it starts (their GatePassed records land beside the loop's decisions); returns its URL."""
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tmp_path / "cache"))
    audit = f"sqlite:///{tmp_path / 'state' / 'audit.db'}"
    monkeypatch.setenv("AUTOGLM_AUDIT_URL", audit)
    return audit
