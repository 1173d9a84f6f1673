"""Energy per request and per token: measured where the machine lets us, modelled where it does not.

Readings, best first: RAPL package counters (``/sys/class/powercap/*/energy_uj``), then a CPU-time
model (process CPU seconds x watts per busy core). NVML for GPUs comes with the GPU server path.
Every reading carries the method that produced it, so dashboards never mix measured and modelled
joules without saying so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Method = Literal["rapl", "cpu-time-model"]
WATTS_PER_CORE_ENV = "AUTOGLM_WATTS_PER_CORE"
#: A server core under load draws roughly 5-15 W; 10 W is the default of the CPU-time model.
DEFAULT_WATTS_PER_CORE = 10.0
_POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class EnergyReading:
    joules: float
    seconds: float
    method: Method


def _rapl_counters() -> list[Path]:
    if not _POWERCAP.is_dir():
        return []
    found = []
    for zone in sorted(_POWERCAP.glob("*rapl:[0-9]*")):
        counter = zone / "energy_uj"
        if ":" in zone.name.split("rapl:", 1)[1]:
            continue  # sub-zones (core, uncore, dram) are inside the package counter
        try:
            int(counter.read_text())
        except (OSError, ValueError):
            continue
        found.append(counter)
    return found


class EnergyMeter:
    """``with meter.measure() as m: ...`` then ``m.reading``; RAPL when readable, else the CPU-time model."""

    def __init__(self, watts_per_core: float | None = None) -> None:
        env = os.environ.get(WATTS_PER_CORE_ENV)
        self.watts_per_core = watts_per_core or (float(env) if env else DEFAULT_WATTS_PER_CORE)
        self._counters = _rapl_counters()

    @property
    def method(self) -> Method:
        return "rapl" if self._counters else "cpu-time-model"

    def measure(self) -> _Measurement:
        return _Measurement(self)

    def _rapl_uj(self) -> int:
        return sum(int(c.read_text()) for c in self._counters)


class _Measurement:
    def __init__(self, meter: EnergyMeter) -> None:
        self._meter = meter
        self.reading: EnergyReading | None = None

    def __enter__(self) -> _Measurement:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._uj = self._meter._rapl_uj() if self._meter.method == "rapl" else 0
        return self

    def __exit__(self, *_: object) -> None:
        seconds = time.perf_counter() - self._wall
        if self._meter.method == "rapl":
            joules = max(self._meter._rapl_uj() - self._uj, 0) / 1e6  # a wrapped counter reads as 0
        else:
            joules = (time.process_time() - self._cpu) * self._meter.watts_per_core
        self.reading = EnergyReading(joules=joules, seconds=seconds, method=self._meter.method)
