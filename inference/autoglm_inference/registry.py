"""The served model names of one server process: device, energy meter, engines, prompt variants.

Shared by kserve's model repository (``CausalLMModel.load`` creates a name's service here) and the
repository routes that hot-swap what a name serves.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import torch

from autoglm_core.energy import EnergyMeter
from autoglm_core.feedback.store import FeedbackStore, RequestLog
from autoglm_inference.access import ModelPolicy
from autoglm_inference.artifact import ArtifactError, LoadedArtifact
from autoglm_inference.engine import Engine
from autoglm_inference.faults import Faults
from autoglm_inference.options import ServerOptions
from autoglm_inference.prompts import PromptVariants
from autoglm_inference.revisions import Router, SwapInProgressError, UnknownRevisionError
from autoglm_inference.runtime import Runtime, TorchRuntime
from autoglm_inference.service import LMService
from autoglm_inference.telemetry import Labels, telemetry
from autoglm_modeling.quantization import dequantized_kinds, quantized_kinds, run_activations_in_fp32

log = logging.getLogger(__name__)


def _energy_meter(device: torch.device) -> EnergyMeter:
    """NVML's counter of ``device`` when it is a GPU (found by its UUID), else RAPL or the CPU model."""
    if device.type != "cuda":
        return EnergyMeter()
    index = device.index or 0
    try:
        uuid: str | None = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # an old driver or torch without the property: NVML's index instead
        uuid = None
    return EnergyMeter(gpu_index=index, gpu_uuid=uuid)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use cpu or auto")
    return device


class _EngineObserver:
    """Records each decode step's batch size, on the engine's thread. The attributes are built once (a
    fresh dict per step cost the step loop time), and the steps are recorded in bursts of up to
    ``burst`` (or when a job ends, ``flush``): one record right after a decode, with the interpreter's
    caches cold, cost about 35 us of a 4.5 ms step; a burst's records run warm."""

    burst = 64

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self._attrs = labels.attrs()
        self._steps: list[int] = []

    def on_prefill(self, size: int) -> None:
        telemetry().prefill_size.record(size, self._attrs)

    def on_step(self, rows: int, seconds: float) -> None:
        self._steps.append(rows)
        if len(self._steps) >= self.burst:
            self.flush()

    def flush(self) -> None:
        steps, self._steps = self._steps, []
        record, attrs = telemetry().batch_size.record, self._attrs
        for rows in steps:
            record(rows, attrs)


class Registry:
    """The served model names; shared by kserve's repository and our routes."""

    def __init__(self, options: ServerOptions, *, startup_uri: str | None = None) -> None:
        self.options = options
        self.policy = ModelPolicy.build(
            options.model_roots,
            cache_dir=options.cache_dir,
            startup_uri=startup_uri,
            allow_remote=options.allow_remote_models,
        )
        self.device = resolve_device(options.device)
        self.services: dict[str, LMService] = {}
        self.prompts = PromptVariants(options.prompt_variants)
        self.meter = _energy_meter(self.device)
        if self.device.type == "cuda" and self.meter.method != "nvml":
            log.warning(
                "no NVML energy counter for %s (pip install nvidia-ml-py): energy is CPU-time modelled",
                self.device,
            )
        # One decode step at a time on the device: each step's energy reading is then its own.
        self.step_lock = threading.Lock()
        self._busy: dict[str, str] = {}
        telemetry().watch("traffic", id(self), self.traffic)
        telemetry().watch("validated", id(self), self.validated_energy)
        self.faults = Faults(options.test_faults) if options.test_faults else None
        #: The feedback store and the request log feeding it (None without ``feedback_url``).
        self.feedback: FeedbackStore | None = None
        self.request_log: RequestLog | None = None
        if options.feedback_url:
            self.feedback = FeedbackStore(options.feedback_url, max_requests=options.request_log_max)
            self.request_log = RequestLog(self.feedback)
            atexit.register(self.request_log.close)  # what is buffered is written at shutdown

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str, what: str) -> AsyncIterator[None]:
        """One repository operation per model name at a time; a second one gets 409."""
        if name in self._busy:
            raise SwapInProgressError(
                f"{name}: {self._busy[name]} is in progress; retry when it has finished"
            )
        self._busy[name] = what
        try:
            yield
        finally:
            del self._busy[name]

    def make_engine_for(self, name: str) -> Callable[[LoadedArtifact], Engine]:
        def make(loaded: LoadedArtifact) -> Engine:
            runtime = self._runtime(loaded)
            labels = Labels(name, loaded.artifact.revision, "-", self.options.target)
            engine = Engine(
                runtime,
                max_batch_size=self.options.max_batch_size,
                max_batch_delay_ms=self.options.max_batch_delay_ms,
                max_queue=self.options.limits.max_queue,
                continuous=self.options.continuous_batching,
                meter=self.meter,
                observer=_EngineObserver(labels),
                name=f"{name}@{loaded.artifact.revision}",
                step_lock=self.step_lock,
                stream_interval_ms=self.options.stream_interval_ms,
            )
            key = id(engine)
            telemetry().watch_queue(key, labels, lambda: engine.queue_depth)
            engine.on_stop.append(lambda: telemetry().unwatch_queue(key))
            log.info("%s: revision %s runs on %s", name, loaded.artifact.revision, runtime.name)
            return engine

        return make

    def _runtime(self, loaded: LoadedArtifact) -> Runtime:
        if loaded.engine == "llama.cpp":
            from autoglm_inference.llamacpp import LlamaCppRuntime

            limits = self.options.limits
            # Each row may hold the longest request the limits admit, so no admitted request overflows.
            return LlamaCppRuntime(
                loaded.model.path,
                max_rows=self.options.max_batch_size,
                context=limits.max_prompt_tokens + limits.max_new_tokens,
                threads=self.options.threads,
            )
        device = self.device
        if device.type == "cpu" and (swapped := run_activations_in_fp32(loaded.model)):
            log.info(
                "%s: %d modules run with fp32 activations on AutoGLM's CPU kernel (no native half GEMM here)",
                loaded.artifact.uri,
                swapped,
            )
        if device.type != "cpu":
            try:
                loaded.model.to(device)
            except Exception as exc:  # e.g. CPU-only packed int4/int8 weights
                raise ArtifactError(f"{loaded.artifact.uri}: cannot run on {device}: {exc}") from exc
        if slow := dequantized_kinds(quantized_kinds(loaded.model), device):
            log.warning(
                "%s: %s run dequantized on %s (this torch has no kernel for them there): "
                "smaller than bf16 but slower",
                loaded.artifact.uri,
                ", ".join(slow),
                device,
            )
        return TorchRuntime(loaded.model)

    def create(self, name: str, uri: str, sha256: str | None = None) -> LMService:
        router = Router.load_first(
            name, uri, sha256=sha256, make_engine=self.make_engine_for(name), cache_dir=self.options.cache_dir,
            engine=self.options.engine, device=self.device.type,
        )  # fmt: skip
        service = LMService(
            name, router, prompts=self.prompts, limits=self.options.limits, target=self.options.target,
            faults=self.faults, on_request=self.request_log.record if self.request_log else None,
        )  # fmt: skip
        self.services[name] = service
        return service

    def traffic(self) -> Iterator[tuple[dict[str, str], float]]:
        """Each served revision's share of its model's traffic, with its role: what a dashboard needs
        to tell a canary's series from its stable's (requests pinned to a revision aside)."""
        for name, service in list(self.services.items()):
            table = service.router.table
            canary = table.canary_weight / 100 if table.canary is not None else 0.0
            labels = {"model": name, "target": self.options.target}
            yield {**labels, "revision": table.stable.name, "role": "stable"}, 1.0 - canary
            if table.canary is not None:
                yield {**labels, "revision": table.canary.name, "role": "canary"}, canary

    def validated_energy(self) -> Iterator[tuple[dict[str, str], float]]:
        """Joules per token that validate measured for each served revision and for its source
        (the model card's ``validation``), so a dashboard can show what compression saved."""
        for name, service in list(self.services.items()):
            for revision in service.router.revisions():
                validation = (revision.loaded.artifact.card or {}).get("validation") or {}
                for of, figures in (
                    ("candidate", validation.get("candidate")),
                    ("source", validation.get("baseline")),
                ):
                    if isinstance(figures, dict) and isinstance(figures.get("joulesPerToken"), int | float):
                        labels = {"model": name, "revision": revision.name, "target": self.options.target,
                                  "of": of, "method": str(figures.get("energyMethod", "unknown"))}  # fmt: skip
                        yield labels, float(figures["joulesPerToken"])

    def get(self, name: str) -> LMService:
        service = self.services.get(name)
        if service is None:
            raise UnknownRevisionError(f"model {name!r} is not served; served: {sorted(self.services)}")
        return service
