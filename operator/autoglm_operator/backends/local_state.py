"""What an embedded loop keeps in its state directory, read and written here only.

- ``status.json``: the AutoGLMModel status the core last returned (written whole, then renamed in);
- ``loop.json``: which model and manifest the directory belongs to, and while a loop runs its pid
  and each target's server (URL and pid);
- ``loop.lock``: held (``flock``) by the running loop, so two loops never drive one directory and
  ``autoglm rollout`` can tell a running loop from a stopped one;
- ``analysis.json``: the newest canary analysis with its figures;
- ``intents/``: manual intents (promote, abort, retry) waiting for the loop, one JSON file each; the
  loop moves each to ``intents/done/`` once its decision is in the ledger. As annotations on the
  object in a cluster, they are observations, never edits of the manifest.
- ``prometheus-targets.json``: the loop's servers as a Prometheus ``file_sd_configs`` target list
  (empty while none runs), each labelled with its target, for a Prometheus that the canary's
  PromQL source asks;
- ``audit.db``: the audit ledger (unless another URL is given).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, get_args

from autoglm_api.status import AutoGLMModelStatus
from autoglm_operator.plan import Intent, IntentKind

STATUS_FILE = "status.json"
LOOP_FILE = "loop.json"
LOCK_FILE = "loop.lock"
ANALYSIS_FILE = "analysis.json"
TARGETS_FILE = "prometheus-targets.json"
#: The label the scrape targets carry (not ``model``/``revision``/``target``: those are the servers'
#: own metric labels, which a target label of the same name would rename to ``exported_*``).
LOOP_LABEL = "autoglm_loop"
TARGET_LABEL = "autoglm_target"
INTENTS = "intents"
DONE = "done"
SERVERS_KEY = "servers"


class StateError(Exception):
    """A state directory that is not one, or is another model's, or is driven by another loop."""


def _write(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str))
    partial.replace(path)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class LocalState:
    root: Path

    # -- status and analysis ----------------------------------------------------------------------

    def status(self) -> AutoGLMModelStatus | None:
        data = _read(self.root / STATUS_FILE)
        try:
            return AutoGLMModelStatus.model_validate(data) if data is not None else None
        except ValueError:
            return None

    def save_status(self, status: AutoGLMModelStatus) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.root / STATUS_FILE, status.model_dump(mode="json", by_alias=True, exclude_none=True))

    def analysis(self) -> dict[str, Any] | None:
        data = _read(self.root / ANALYSIS_FILE)
        return data if isinstance(data, dict) else None

    def save_analysis(self, data: dict[str, Any]) -> None:
        _write(self.root / ANALYSIS_FILE, data)

    # -- which model, and the running loop ---------------------------------------------------------

    def loop(self) -> dict[str, Any]:
        data = _read(self.root / LOOP_FILE)
        return data if isinstance(data, dict) else {}

    def claim(self, model: str, manifest: Path) -> IO[str]:
        """Take the directory for a loop driving ``model`` (NAMESPACE/NAME); the returned file holds
        the lock until it is closed (or the process ends)."""
        self.root.mkdir(parents=True, exist_ok=True)
        known = self.loop().get("model")
        if known not in (None, model):
            raise StateError(
                f"{self.root} holds the rollout of {known}, not {model}: use another --state-dir"
            )
        handle = (self.root / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            pid = self.loop().get("pid")
            raise StateError(f"another autoglm run (pid {pid}) is driving {self.root}") from None
        data = {**self.loop(), "model": model, "manifest": str(manifest.resolve()), "pid": os.getpid()}
        _write(self.root / LOOP_FILE, data)

        return handle

    def servers(self) -> dict[str, dict[str, Any]]:
        """The loop's servers by target: ``{"url": ..., "pid": ...}`` each."""
        servers = self.loop().get(SERVERS_KEY)
        return dict(servers) if isinstance(servers, dict) else {}

    def set_server(self, target: str, url: str, pid: int) -> None:
        data = self.loop()
        data[SERVERS_KEY] = {**self.servers(), target: {"url": url, "pid": pid}}
        _write(self.root / LOOP_FILE, data)
        self._write_scrape_targets()

    def clear_server(self, target: str | None = None) -> None:
        """Forget ``target``'s server (every server when None)."""
        servers = {} if target is None else {t: v for t, v in self.servers().items() if t != target}
        if target is None:
            self._forget("serverPid", "url")  # what a loop of the version before wrote
        data = self.loop()
        if SERVERS_KEY in data:
            data[SERVERS_KEY] = servers
            _write(self.root / LOOP_FILE, data)
        if (self.root / TARGETS_FILE).exists() or servers:
            self._write_scrape_targets()

    def _write_scrape_targets(self) -> None:
        model = str(self.loop().get("model", ""))
        listed = [
            {"targets": [str(server["url"]).split("://", 1)[-1].rstrip("/")],
             "labels": {LOOP_LABEL: model, TARGET_LABEL: target}}
            for target, server in sorted(self.servers().items())
        ]  # fmt: skip
        _write(self.root / TARGETS_FILE, listed)

    def _forget(self, *keys: str) -> None:
        data = self.loop()
        if any(k in data for k in keys):
            _write(self.root / LOOP_FILE, {k: v for k, v in data.items() if k not in keys})

    def stale_servers(self) -> list[int]:
        """The pids of servers a killed loop left running (call while holding the lock)."""
        found = []
        listed = list(self.servers().values())
        if isinstance(self.loop().get("serverPid"), int):  # written by a loop of the version before
            listed.append({"pid": self.loop()["serverPid"]})
        for server in listed:
            pid = server.get("pid")
            if not isinstance(pid, int):
                continue
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"autoglm_inference" in command:  # not a reused pid
                found.append(pid)
        return found

    @staticmethod
    def stop_server(pid: int, timeout: float = 30.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                # A child of this process stays a zombie (and answers kill 0) until reaped: reap it.
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    def release(self, handle: IO[str], *, server_kept: bool = False) -> None:
        """Give the directory up; ``server_kept``: the loop's server still runs (its URL stays)."""
        self._forget("pid", *(() if server_kept else (SERVERS_KEY, "serverPid", "url")))
        handle.close()

    def running(self) -> bool:
        """Whether a loop holds the directory now."""
        try:
            handle = (self.root / LOCK_FILE).open("a+")
        except OSError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    # -- manual intents ---------------------------------------------------------------------------

    def submit(self, kind: IntentKind, actor: str, revision: str | None = None) -> Intent:
        if kind not in get_args(IntentKind):
            raise StateError(f"unknown intent {kind!r}; allowed: {', '.join(get_args(IntentKind))}")
        folder = self.root / INTENTS
        folder.mkdir(parents=True, exist_ok=True)
        at = datetime.now(UTC)
        intent = Intent(kind, actor, at, revision)
        name = f"{time.time_ns()}-{kind}.json"
        _write(folder / name, {"kind": kind, "actor": actor, "at": at.isoformat(), "revision": revision})
        return intent

    def pending(self) -> list[tuple[Path, Intent]]:
        """Intents not yet acted on, oldest first; a file that is not an intent is set aside."""
        folder = self.root / INTENTS
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            data = _read(path)
            try:
                if not isinstance(data, dict) or data.get("kind") not in get_args(IntentKind):
                    raise ValueError("not an intent")
                intent = Intent(data["kind"], str(data["actor"]), datetime.fromisoformat(data["at"]),
                                data.get("revision"))  # fmt: skip
            except (KeyError, TypeError, ValueError):
                path.replace(path.with_suffix(".invalid"))
                continue
            out.append((path, intent))
        return out

    def done(self, paths: list[Path], *, ignored: dict[str, str] | None = None) -> None:
        """Move acted-on intents to ``intents/done/``; ``ignored`` (by the intent's time): why one
        changed nothing, kept in its file for ``autoglm rollout`` to show."""
        if not paths:
            return
        folder = self.root / INTENTS / DONE
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            data = _read(path)
            if not isinstance(data, dict):
                continue
            data["ignored"] = (ignored or {}).get(str(data.get("at")))
            _write(folder / path.name, data)
            path.unlink(missing_ok=True)

    def outcome(self, intent: Intent) -> dict[str, Any] | None:
        """The done file of ``intent`` (None while it waits for the loop)."""
        for path in sorted((self.root / INTENTS / DONE).glob(f"*-{intent.kind}.json")):
            data = _read(path)
            if isinstance(data, dict) and data.get("at") == intent.at.isoformat():
                return data
        return None
