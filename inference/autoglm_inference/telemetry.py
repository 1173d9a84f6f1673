"""OpenTelemetry metrics and traces of the model server, exported in Prometheus format on ``/metrics``.

One ``MeterProvider`` per process with a ``PrometheusMetricReader`` on prometheus_client's default
registry, which is the registry KServe's own ``/metrics`` route serves: our instruments appear
beside KServe's. Every instrument carries ``model``, ``revision``, ``prompt_variant`` and
``target`` (the pool: cloud-gpu, edge, local); energy also carries ``method`` (rapl or
cpu-time-model), so measured and modelled joules are never mixed without saying so.

Traces: a span per request; exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the
``opentelemetry-exporter-otlp`` package is installed, otherwise kept in-process only.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

#: Request latency and time to first token: 5 ms to about 2 minutes, three buckets per doubling (each
#: 26% wider than the last). The canary's rank test needs that resolution: with the usual 1-2.5-5
#: decades it caught a 30% slowdown within two intervals in 60% of canaries (bench/canary.py).
LATENCY_BUCKETS = tuple(round(0.005 * 2 ** (i / 3), 6) for i in range(45))
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: Feedback scores are in [0, 1] (a thumb is 0 or 1, a 1-5 rating one of five steps).
SCORE_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)
JOULE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 50, 100, 500)

_lock = threading.Lock()
#: The labels known so far for the request being handled (filled as the request is routed), so an
#: error counted at the end carries the same label set as every other instrument.
_request_labels: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "autoglm_request_labels", default=None
)
UNKNOWN = "-"


def begin_request(target: str) -> dict[str, str]:
    labels = {"model": UNKNOWN, "revision": UNKNOWN, "prompt_variant": UNKNOWN, "target": target}
    _request_labels.set(labels)
    return labels


def request_labels(**known: str) -> None:
    """Record what routing learned about the current request (model, revision, prompt_variant)."""
    labels = _request_labels.get()
    if labels is not None:
        labels.update(known)


_telemetry: Telemetry | None = None


Source = Callable[[], Iterable[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class Labels:
    model: str
    revision: str
    prompt_variant: str
    target: str

    def attrs(self, **extra: str) -> dict[str, str]:
        return {
            "model": self.model,
            "revision": self.revision,
            "prompt_variant": self.prompt_variant,
            "target": self.target,
            **extra,
        }


class Telemetry:
    """The server's instruments; get the process-wide one with ``telemetry()``."""

    def __init__(self) -> None:
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "autoglm-model-server")}
        )
        self.reader = PrometheusMetricReader()
        self.provider = MeterProvider(resource=resource, metric_readers=[self.reader])
        meter = self.provider.get_meter("autoglm_inference")
        self.request_duration = meter.create_histogram(
            "autoglm.request.duration",
            unit="s",
            description="Request latency, arrival to last byte",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.time_to_first_token = meter.create_histogram(
            "autoglm.time_to_first_token",
            unit="s",
            description="Arrival to the first generated token",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.inter_token_latency = meter.create_histogram(
            "autoglm.inter_token_latency",
            unit="s",
            description="Mean time between generated tokens of a request",
            explicit_bucket_boundaries_advisory=TOKEN_LATENCY_BUCKETS,
        )
        self.tokens = meter.create_counter(
            "autoglm.tokens", unit="{token}", description="Prompt (direction=in) and generated (out) tokens"
        )
        self.batch_size = meter.create_histogram(
            "autoglm.batch.size",
            unit="{request}",
            description="Requests decoded together, per decode step",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.prefill_size = meter.create_histogram(
            "autoglm.prefill.size",
            unit="{request}",
            description="Requests prefilled together (a new batch, or requests joining a running one)",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        self.errors = meter.create_counter(
            "autoglm.errors", unit="{request}", description="Requests answered with an error, by HTTP code"
        )
        self.energy = meter.create_counter(
            "autoglm.energy",
            unit="J",
            description="Energy used by generation (method: rapl or cpu-time-model)",
        )
        self.energy_per_request = meter.create_histogram(
            "autoglm.energy.per_request",
            unit="J",
            description="Joules per request",
            explicit_bucket_boundaries_advisory=JOULE_BUCKETS,
        )
        self.energy_per_token = meter.create_histogram(
            "autoglm.energy.per_token",
            unit="J",
            description="Joules per generated token",
            explicit_bucket_boundaries_advisory=JOULE_BUCKETS,
        )
        self.feedback_score = meter.create_histogram(
            "autoglm.feedback.score",
            unit="{score}",
            description="User feedback scores in [0, 1] of the requests each revision and prompt variant answered",
            explicit_bucket_boundaries_advisory=SCORE_BUCKETS,
        )
        self._queue_sources: dict[int, tuple[Labels, Callable[[], int]]] = {}
        meter.create_observable_gauge(
            "autoglm.queue.depth",
            callbacks=[self._observe_queues],
            unit="{request}",
            description="Requests waiting for a batch slot",
        )
        #: Observed each collection from their owners (held weakly): (labels, value) per served revision.
        self._sources: dict[str, dict[int, weakref.WeakMethod[Source]]] = {"traffic": {}, "validated": {}}
        meter.create_observable_gauge(
            "autoglm.revision.traffic",
            callbacks=[lambda _: self._observe("traffic")],
            unit="1",
            description="Each served revision's share of its model's traffic (role: stable or canary)",
        )
        meter.create_observable_gauge(
            "autoglm.revision.validated.energy_per_token",
            callbacks=[lambda _: self._observe("validated")],
            unit="J",
            description="Joules per generated token that validate measured for a served revision (of: candidate, "
            "the revision itself; source, the uncompressed model it was made from; method: how it was measured)",
        )
        self.tracer_provider = TracerProvider(resource=resource)
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning(
                    "OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not installed"
                )
            else:
                self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.tracer_provider.get_tracer("autoglm_inference")

    def watch_queue(self, key: int, labels: Labels, depth: Callable[[], int]) -> None:
        self._queue_sources[key] = (labels, depth)

    def unwatch_queue(self, key: int) -> None:
        self._queue_sources.pop(key, None)

    def watch(self, kind: str, key: int, source: Source) -> None:
        """``source()`` (a bound method, held weakly so the metrics keep nothing alive) gives
        (labels, value) per served revision for the ``kind`` gauge (traffic, validated) at each
        collection."""
        self._sources[kind][key] = weakref.WeakMethod(source)

    def _observe(self, kind: str) -> Iterable[Observation]:
        for key, ref in list(self._sources[kind].items()):
            source = ref()
            if source is None:
                self._sources[kind].pop(key, None)
                continue
            for labels, value in source():
                yield Observation(value, labels)

    def _observe_queues(self, _options: CallbackOptions) -> Iterable[Observation]:
        for labels, depth in list(self._queue_sources.values()):
            yield Observation(depth(), labels.attrs())


def telemetry() -> Telemetry:
    global _telemetry
    with _lock:
        if _telemetry is None:
            _telemetry = Telemetry()
            metrics.set_meter_provider(_telemetry.provider)
            trace.set_tracer_provider(_telemetry.tracer_provider)
        return _telemetry
