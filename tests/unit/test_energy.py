"""The energy meter: which method it uses, and the joules it reports for each."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest

from autoglm_core import energy
from autoglm_core.energy import EnergyMeter


def fake_pynvml(millijoules: list[int]) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"  # type: ignore[attr-defined]
    module.nvmlDeviceGetTotalEnergyConsumption = lambda handle: millijoules.pop(0)  # type: ignore[attr-defined]
    return module


def test_a_gpu_meter_reads_nvml_millijoules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([1_000, 50_000, 62_500]))
    meter = EnergyMeter(gpu_index=0)
    assert meter.method == "nvml"
    with meter.measure() as m:
        pass
    assert m.reading is not None
    assert m.reading.method == "nvml"
    assert m.reading.joules == pytest.approx(12.5)


def test_without_nvml_a_gpu_meter_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(energy, "_rapl_counters", lambda: [])
    meter = EnergyMeter(gpu_index=0, watts_per_core=20)
    assert meter.method == "cpu-time-model"
    with meter.measure() as m:
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
    assert m.reading is not None
    assert m.reading.method == "cpu-time-model"
    assert m.reading.joules >= 20 * 0.05 * 0.9


def test_rapl_counters_are_read_from_powercap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path
    zones = [
        ("intel-rapl:0", 5_000_000, "package-0"),
        ("intel-rapl:0:0", 1, "core"),
        ("intel-rapl:1", 9, "psys"),
    ]
    for zone, value, name in zones:
        (root / zone).mkdir()
        (root / zone / "energy_uj").write_text(str(value))
        (root / zone / "name").write_text(name + "\n")
    monkeypatch.setattr(energy, "_POWERCAP", root)
    meter = EnergyMeter()
    assert meter.method == "rapl"
    with meter.measure() as m:
        (root / "intel-rapl:0" / "energy_uj").write_text(str(7_000_000))
    assert m.reading is not None
    assert m.reading.joules == pytest.approx(2.0)  # sub-zones and psys (which includes the package) not added


def test_a_gpu_is_found_by_its_uuid_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's cuda:N is NVML's device with the same UUID (NVML's index ignores CUDA_VISIBLE_DEVICES)."""
    module = fake_pynvml([0, 1_000])
    asked: list[str] = []
    module.nvmlDeviceGetHandleByUUID = lambda uuid: asked.append(uuid) or "by-uuid"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", module)
    meter = EnergyMeter(gpu_index=3, gpu_uuid="1f2e")
    assert meter.method == "nvml"
    assert asked == ["GPU-1f2e"]
