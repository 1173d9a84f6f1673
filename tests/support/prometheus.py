"""A real Prometheus (Debian's ``prometheus`` package, installed by ``.ci/run``) on loopback, scraping
the targets a ``file_sd_configs`` file lists, every half second."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from autoglm_inference.process import free_port, terminate

SCRAPE_INTERVAL = "500ms"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def scraped(self, timeout: float = 30.0, *, healthy: bool = True) -> None:
        """Wait until every listed target was scraped (``healthy``: and answered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()
            active = r["data"]["activeTargets"]
            if active and all(
                (t["health"] == "up") == healthy and t["lastScrape"][:4] != "0001" for t in active
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus did not scrape its targets in {timeout}s: {r}")

    def stop(self) -> None:
        terminate(self.process)


def binary() -> str:
    """The prometheus binary; skipped without one, but a failure in CI, whose .ci/run installs it."""
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no prometheus binary: .ci/run installs Debian's prometheus package")
        pytest.skip("no prometheus binary (apt-get install prometheus; .ci/run does)")
    return found


@contextmanager
def prometheus(root: Path, targets_file: Path) -> Iterator[Prometheus]:
    """Run Prometheus in ``root`` against the targets in ``targets_file`` (written by the caller)."""
    exe = binary()
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "autoglm",
            "scrape_timeout": "400ms",
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        }],
    }  # fmt: skip
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [exe, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready in 60s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        server.stop()
