"""Fault injection for tests only: make one revision slower, failing or power-hungry, or ``/metrics`` down.

The canary scenarios need a candidate that is measurably worse on live traffic, served by the real
server. ``autoglm serve --test-faults FILE`` reads, per revision::

    {"revisions": {"<revision>": {"latencyFactor": 2.0, "errorRate": 0.1, "joulesFactor": 50}},
     "metricsDown": false}

- ``latencyFactor``: a request to that revision is held until it took this many times as long as its
  generation did (the request latency the metrics and the client see grows by that factor);
- ``errorRate``: this share of its requests is answered 500 before anything runs, spread evenly
  (at 10%: the 5th, 15th, 25th, ... request), so a short test sees its errors early and repeats;
- ``joulesFactor``: the energy charged to its requests is multiplied by this;
- ``metricsDown``: ``GET /metrics`` answers 503 (a metrics source that is down).

The file is re-read when it changes, so a test can turn a fault on mid-run. The option is refused
unless ``AUTOGLM_ENABLE_TEST_FAULTS=1`` is in the environment: no production server can be started
with it by a stray flag.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ENABLE_ENV: Final = "AUTOGLM_ENABLE_TEST_FAULTS"


class FaultsRefusedError(ValueError):
    """``--test-faults`` outside a test, or a faults file that is not what this module reads."""


@dataclass(frozen=True)
class Fault:
    latency_factor: float = 1.0
    error_rate: float = 0.0
    joules_factor: float = 1.0


NONE: Final = Fault()
_KEYS = {"latencyFactor": "latency_factor", "errorRate": "error_rate", "joulesFactor": "joules_factor"}


def _parse(data: Any, path: Path) -> tuple[dict[str, Fault], bool]:
    if not isinstance(data, dict) or not set(data) <= {"revisions", "metricsDown"}:
        raise FaultsRefusedError(f"{path}: expected an object with 'revisions' and 'metricsDown'")
    faults: dict[str, Fault] = {}
    for revision, spec in (data.get("revisions") or {}).items():
        if not isinstance(spec, dict) or not set(spec) <= set(_KEYS):
            raise FaultsRefusedError(f"{path}: revision {revision!r}: allowed keys are {sorted(_KEYS)}")
        if not all(isinstance(v, int | float) for v in spec.values()):
            raise FaultsRefusedError(f"{path}: revision {revision!r}: every value must be a number")
        values = {_KEYS[k]: float(v) for k, v in spec.items()}
        fault = Fault(**values)
        if fault.latency_factor < 1 or not 0 <= fault.error_rate <= 1 or fault.joules_factor < 0:
            raise FaultsRefusedError(
                f"{path}: revision {revision!r}: latencyFactor >= 1, errorRate in [0, 1], joulesFactor >= 0"
            )
        faults[revision] = fault
    return faults, bool(data.get("metricsDown", False))


class Faults:
    """The faults file, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        if os.environ.get(ENABLE_ENV) != "1":
            raise FaultsRefusedError(
                f"--test-faults is for tests only: it is refused unless {ENABLE_ENV}=1 is set"
            )
        self.path = path
        self._lock = threading.Lock()
        self._mtime: tuple[int, int] | None = None
        self._faults: dict[str, Fault] = {}
        self._metrics_down = False
        self._served: dict[str, int] = {}
        self._refresh()

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            mtime: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return
        if mtime is None:
            self._faults, self._metrics_down = {}, False
        else:
            try:
                data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise FaultsRefusedError(f"{self.path}: not JSON: {exc}") from exc
            self._faults, self._metrics_down = _parse(data, self.path)
        self._mtime = mtime

    def of(self, revision: str) -> Fault:
        with self._lock:
            self._refresh()
            return self._faults.get(revision, NONE)

    def fails(self, revision: str) -> bool:
        """Whether this request to ``revision`` is one of the injected errors: request n fails when
        round(n x rate) steps up, so n requests carry round(n x rate) errors."""
        rate = self.of(revision).error_rate
        if rate <= 0:
            return False
        with self._lock:
            n = self._served[revision] = self._served.get(revision, 0) + 1
        return math.floor(n * rate + 0.5) > math.floor((n - 1) * rate + 0.5)

    @property
    def metrics_down(self) -> bool:
        with self._lock:
            self._refresh()
            return self._metrics_down


class MetricsDown:
    """ASGI middleware: ``GET /metrics`` answers 503 while the faults file says the source is down."""

    def __init__(self, app: Any, *, faults: Faults) -> None:
        self.app, self.faults = app, faults

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/metrics" and self.faults.metrics_down:
            body = b'{"error": "metrics down (an injected test fault)"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
