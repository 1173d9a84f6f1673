"""A real `autoglm serve` with the test-only fault injection, and a canary loaded into it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from autoglm_inference.faults import ENABLE_ENV
from autoglm_inference.process import ServerProcess


def faulty_server(root: Path, name: str, stable: Path, faults: Path) -> ServerProcess:
    """Serve ``stable`` as ``name`` with ``--test-faults faults`` (artifacts under ``root``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENABLE_ENV, "1")
        return ServerProcess(
            name, str(stable), "--test-faults", str(faults), log=root / "server.log", model_roots=[root],
        ).wait_ready()  # fmt: skip


def load_canary(server: ServerProcess, name: str, folder: Path, weight: int) -> None:
    """Load ``folder`` beside stable as the canary, at ``weight`` percent, through the repository API."""
    load = httpx.post(
        f"{server.url}/v2/repository/models/{name}/load",
        json={"parameters": {"uri": str(folder), "canaryWeight": weight}},
        timeout=120,
    )
    assert load.status_code == 200, load.text
