"""``autoglm serve`` as a child process on loopback: the embedded mode's model servers, tests, benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from autoglm_inference.access import ADMIN_TOKEN_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Start ``autoglm serve`` for ``name``/``uri`` on a free loopback port; ``args`` are more serve flags.

    ``admin_token``: the repository routes' bearer token (passed in the environment; without one they
    answer only to loopback, as this client is). ``model_roots``: ``--model-root`` flags.
    """

    def __init__(
        self,
        name: str,
        uri: str,
        *args: str,
        log: Path,
        threads: int = 1,
        admin_token: str | None = None,
        model_roots: Sequence[str | Path] = (),
    ) -> None:
        self.name = name
        self.admin_token = admin_token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable, "-m", "autoglm_inference",
            "--model-name", name, "--model-uri", uri,
            "--host", "127.0.0.1", "--http-port", str(self.port), "--threads", str(threads), *args,
        ]  # fmt: skip
        for root in model_roots:
            command += ["--model-root", str(root)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        env.pop(ADMIN_TOKEN_ENV, None)  # only the token given here, never one inherited by accident
        if admin_token is not None:
            env[ADMIN_TOKEN_ENV] = admin_token
        self._log_file = log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/v2/models/{self.name}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server was not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    @property
    def admin_headers(self) -> dict[str, str]:
        """Headers for the repository routes (the bearer token, when the server has one)."""
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        terminate(self.process)
        self._log_file.close()
        return self.process.returncode


def terminate(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
