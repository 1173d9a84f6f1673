"""Energy per request and per token: measured where the machine lets us, modelled where it does not.

Readings, best first: for a model on a GPU, NVML's total-energy counter of that GPU (through
``pynvml``, the ``nvidia-ml-py`` package, when installed); on CPU, RAPL package counters
(``/sys/class/powercap/*/energy_uj``), then a CPU-time model (process CPU seconds x watts per busy
core).
Every reading carries the method that produced it, so dashboards never mix measured and modelled
joules without saying so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Method = Literal["nvml", "rapl", "cpu-time-model"]
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
            if (zone / "name").read_text().strip().startswith("psys"):
                continue  # platform energy (client Intel parts) already includes the package
        except OSError:
            pass
        try:
            int(counter.read_text())
        except (OSError, ValueError):
            continue
        found.append(counter)
    return found


def _nvml_handle(gpu_index: int, gpu_uuid: str | None) -> Any | None:
    """NVML's handle of the GPU when pynvml is installed and the counter reads, else None.

    By ``gpu_uuid`` when given (torch's ``cuda:N`` is NVML's device with the same UUID; NVML's own
    index ignores CUDA_VISIBLE_DEVICES), else by ``gpu_index``.
    """
    try:
        import pynvml  # type: ignore[import-untyped,unused-ignore]

        pynvml.nvmlInit()
        if gpu_uuid:
            uuid = gpu_uuid if gpu_uuid.startswith("GPU-") else f"GPU-{gpu_uuid}"
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # not installed, no driver, or a GPU without the counter
        return None
    return handle


def _nvml_mj(handle: Any) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))  # millijoules since driver load


class EnergyMeter:
    """``with meter.measure() as m: ...`` then ``m.reading``: NVML for ``gpu_index``, else RAPL when
    readable, else the CPU-time model."""

    def __init__(
        self,
        watts_per_core: float | None = None,
        *,
        gpu_index: int | None = None,
        gpu_uuid: str | None = None,
    ) -> None:
        env = os.environ.get(WATTS_PER_CORE_ENV)
        self.watts_per_core = watts_per_core or (float(env) if env else DEFAULT_WATTS_PER_CORE)
        self._nvml = _nvml_handle(gpu_index, gpu_uuid) if gpu_index is not None else None
        self._counters = [] if self._nvml is not None else _rapl_counters()

    @property
    def method(self) -> Method:
        if self._nvml is not None:
            return "nvml"
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
        self._mj = _nvml_mj(self._meter._nvml) if self._meter._nvml is not None else 0
        return self

    def __exit__(self, *_: object) -> None:
        seconds = time.perf_counter() - self._wall
        if self._meter._nvml is not None:
            joules = max(_nvml_mj(self._meter._nvml) - self._mj, 0) / 1e3
        elif self._meter.method == "rapl":
            joules = max(self._meter._rapl_uj() - self._uj, 0) / 1e6  # a wrapped counter reads as 0
        else:
            joules = (time.process_time() - self._cpu) * self._meter.watts_per_core
        self.reading = EnergyReading(joules=joules, seconds=seconds, method=self._meter.method)
