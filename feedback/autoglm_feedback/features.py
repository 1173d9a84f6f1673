"""The Feast feature repository of the feedback loop, and the micro-batch pipeline that feeds it.

Entities: ``model_revision`` (``MODEL@REVISION``) and ``prompt_variant``. Feature views, both fed
through push sources (online and offline at once):

- ``feedback_stats`` (model_revision x prompt_variant): feedback score (mean), feedback volume and
  score sum (the bandit's evidence), requests, error rate, p95 latency, joules per token;
- ``revision_drift`` (model_revision): PSI of prompt length, vocabulary and feedback score of the
  revision's newest requests against its reference window (its first requests once it served
  alone), and the drift
  statistic (their largest). Each revision is its own reference: a revision promoted after
  retraining measures drift from the traffic it was rolled out on.

The store is Feast's local provider by default: SQLite online store, file (parquet) offline store and
a file registry, all under one folder. ``online_store`` chooses a Redis (``redis://HOST:PORT``) or
PostgreSQL (``postgresql://USER:PASS@HOST/DB``) online store instead, as a cluster runs it.

``FeaturePipeline.step`` is one micro-batch: the feedback the feedback store has not pushed yet
(its spool) names the keys to refresh; each key's features are recomputed from the store (all its
feedback, and its requests in the window), pushed, and only then the feedback is marked pushed. A
process killed mid-batch pushes the same values again on its next start: nothing accepted is lost
and nothing is counted twice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlparse

import pandas as pd
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_source import PushMode
from feast.repo_config import RepoConfig
from feast.types import Float64, Int64

from autoglm_core.feedback.records import RequestRecord
from autoglm_core.feedback.store import FeedbackStore, RequestTotals
from autoglm_feedback.drift import Drift, Window, compare

log = logging.getLogger(__name__)

PROJECT: Final = "autoglm"
STATS_VIEW: Final = "feedback_stats"
DRIFT_VIEW: Final = "revision_drift"
STATS_PUSH: Final = "feedback_stats_push"
DRIFT_PUSH: Final = "revision_drift_push"
STATS_FEATURES: Final = (
    "feedback_score", "feedback_count", "feedback_sum", "requests", "error_rate", "latency_p95_s",
    "joules_per_token",
)  # fmt: skip
DRIFT_FEATURES: Final = ("drift_prompt_length", "drift_vocabulary", "drift_score", "drift_statistic")
#: Requests of a revision the latency, error and energy features are computed over (the newest).
WINDOW_REQUESTS: Final = 2000
#: The reference window of drift: a revision's first requests (and the newest window compared with it).
REFERENCE_REQUESTS: Final = 500


def model_revision(model: str, revision: str) -> str:
    return f"{model}@{revision}"


# -- the repository ---------------------------------------------------------------------------------


def definitions(data_dir: Path) -> list[Any]:
    """The entities, sources and feature views (``feast apply`` of ``feedback/feature_repo`` uses these)."""
    revision = Entity(name="model_revision", join_keys=["model_revision"], value_type=ValueType.STRING,
                      description="A model's revision: MODEL@REVISION")  # fmt: skip
    variant = Entity(name="prompt_variant", join_keys=["prompt_variant"], value_type=ValueType.STRING,
                     description="A system-prompt variant (none: the client's own prompt)")  # fmt: skip
    stats_push = PushSource(
        name=STATS_PUSH,
        batch_source=FileSource(
            name="feedback_stats_offline", path=str(data_dir / "feedback_stats.parquet"),
            timestamp_field="event_timestamp",
        ),
    )  # fmt: skip
    drift_push = PushSource(
        name=DRIFT_PUSH,
        batch_source=FileSource(
            name="revision_drift_offline", path=str(data_dir / "revision_drift.parquet"),
            timestamp_field="event_timestamp",
        ),
    )  # fmt: skip
    stats = FeatureView(
        name=STATS_VIEW,
        entities=[revision, variant],
        ttl=timedelta(days=30),
        schema=[
            Field(name="feedback_score", dtype=Float64),
            Field(name="feedback_count", dtype=Int64),
            Field(name="feedback_sum", dtype=Float64),
            Field(name="requests", dtype=Int64),
            Field(name="error_rate", dtype=Float64),
            Field(name="latency_p95_s", dtype=Float64),
            Field(name="joules_per_token", dtype=Float64),
        ],
        source=stats_push,
        online=True,
        description="Feedback and telemetry of each revision and prompt variant",
    )
    drift = FeatureView(
        name=DRIFT_VIEW,
        entities=[revision],
        ttl=timedelta(days=30),
        schema=[Field(name=name, dtype=Float64) for name in DRIFT_FEATURES],
        source=drift_push,
        online=True,
        description="PSI of prompt length, vocabulary and feedback score against the reference window",
    )
    return [revision, variant, stats_push, drift_push, stats, drift]


def repo_config(data_dir: Path, online_store: str = "sqlite") -> RepoConfig:
    """Feast's configuration: the local provider with its registry and files under ``data_dir``;
    ``online_store``: ``sqlite`` (a file there), ``redis://HOST:PORT`` or ``postgresql://...``."""
    online: dict[str, Any]
    if online_store == "sqlite":
        online = {"type": "sqlite", "path": str(data_dir / "online.db")}
    elif online_store.startswith(("redis://", "rediss://")):
        url = urlparse(online_store)
        online = {"type": "redis", "connection_string": f"{url.hostname}:{url.port or 6379}"
                  + (",ssl=true" if url.scheme == "rediss" else "")
                  + (f",password={url.password}" if url.password else "")}  # fmt: skip
    elif online_store.startswith(("postgresql://", "postgres://")):
        url = urlparse(online_store)
        # Feast requires SSL unless told otherwise: the URL's ?sslmode= says, else libpq's default
        sslmode = parse_qs(url.query).get("sslmode", ["prefer"])[0]
        online = {
            "type": "postgres", "host": url.hostname or "localhost", "port": url.port or 5432,
            "database": url.path.lstrip("/"), "user": url.username or "", "password": url.password or "",
            "sslmode": sslmode,
        }  # fmt: skip
    else:
        raise ValueError(
            f"online store {online_store!r}: use sqlite, redis://HOST:PORT or postgresql://USER:PASS@HOST/DB"
        )
    return RepoConfig(
        project=PROJECT,
        registry=str(data_dir / "registry.db"),
        provider="local",
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )


def open_features(data_dir: Path, online_store: str = "sqlite") -> FeatureStore:
    """The feature store under ``data_dir``, with the definitions applied (idempotent)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare_offline_files(data_dir)
    store = FeatureStore(config=repo_config(data_dir, online_store))
    store.apply(definitions(data_dir))
    return store


def close_features(features: FeatureStore) -> None:
    """Close the online store's connections. Feast opens one (a psycopg connection or pool, a Redis
    client) per store object and has no call that closes it; this reads its provider's private
    fields, checked against Feast 0.67 (``tests/integration/test_feedback_features.py``)."""
    provider = getattr(features, "_provider", None)
    online = getattr(provider, "_online_store", None)
    for name in ("_conn", "_conn_pool", "_client"):
        handle = getattr(online, name, None)
        if handle is not None:
            handle.close()
            setattr(online, name, None)


def prepare_offline_files(data_dir: Path) -> None:
    """The offline store's parquet files, empty with their schema until the first push (Feast's file
    source reads a file's schema when the definitions are applied, and appends pushed rows to it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = {
        "model_revision": pd.Series(dtype="string"),
        "event_timestamp": pd.Series(dtype="datetime64[us, UTC]"),
    }
    stats = {**keys, "prompt_variant": pd.Series(dtype="string"),
             **{n: pd.Series(dtype="int64" if n in ("feedback_count", "requests") else "float64")
                for n in STATS_FEATURES}}  # fmt: skip
    drift = {**keys, **{n: pd.Series(dtype="float64") for n in DRIFT_FEATURES}}
    for name, columns in (("feedback_stats", stats), ("revision_drift", drift)):
        path = data_dir / f"{name}.parquet"
        if not path.exists():
            pd.DataFrame(columns).to_parquet(path, index=False)


# -- what is computed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """One (model, revision, prompt variant)'s features."""

    model: str
    revision: str
    prompt_variant: str
    feedback_count: int
    feedback_sum: float
    requests: int
    error_rate: float | None
    latency_p95_s: float | None
    joules_per_token: float | None

    @property
    def feedback_score(self) -> float | None:
        return self.feedback_sum / self.feedback_count if self.feedback_count else None

    def row(self, at: datetime) -> dict[str, Any]:
        return {
            "model_revision": model_revision(self.model, self.revision), "prompt_variant": self.prompt_variant,
            "event_timestamp": at, "feedback_score": _nan(self.feedback_score),
            "feedback_count": self.feedback_count, "feedback_sum": self.feedback_sum, "requests": self.requests,
            "error_rate": _nan(self.error_rate), "latency_p95_s": _nan(self.latency_p95_s),
            "joules_per_token": _nan(self.joules_per_token),
        }  # fmt: skip


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def stats_of(
    model: str,
    revision: str,
    variant: str,
    feedback: tuple[int, float],
    totals: RequestTotals | None,
    latencies: Sequence[float],
) -> Stats:
    """The features of one key from its feedback totals, request totals and newest latencies (pure)."""
    count, score_sum = feedback
    ordered = sorted(latencies)
    requests = totals.requests if totals else 0
    return Stats(
        model=model, revision=revision, prompt_variant=variant, feedback_count=count,
        feedback_sum=round(score_sum, 9), requests=requests,
        error_rate=(totals.errors / requests) if totals and requests else None,
        latency_p95_s=ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] if ordered else None,
        joules_per_token=(totals.joules / totals.completion_tokens) if totals and totals.completion_tokens else None,
    )  # fmt: skip


def window_of(requests: Sequence[RequestRecord], scores: Sequence[float]) -> Window:
    return Window.of((r.prompt_tokens for r in requests), (_user_text(r.prompt) for r in requests), scores)


def _user_text(prompt: str) -> str:
    """The words a user typed: a chat's user messages, or the plain prompt."""
    if prompt.startswith("["):
        try:
            messages = json.loads(prompt)
            return " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
        except (ValueError, AttributeError):
            pass
    return prompt


# -- the pipeline -----------------------------------------------------------------------------------


@dataclass
class FeaturePipeline:
    """Feedback store -> Feast, one micro-batch per ``step``."""

    store: FeedbackStore
    features: FeatureStore
    data_dir: Path
    batch: int = 1000
    window_requests: int = WINDOW_REQUESTS
    reference_requests: int = REFERENCE_REQUESTS
    pushed_rows: int = 0
    _references: dict[str, Window] = field(default_factory=dict)

    def step(self, *, models: Sequence[str] = ()) -> int:
        """Push the features of every key with unpushed feedback (and of ``models``' keys with
        requests in the window); mark that feedback pushed. Returns the feedback events consumed."""
        spool = self.store.unpushed(self.batch)
        wanted = {f.model for f in spool} | set(models)
        if not wanted:
            return 0
        at = datetime.now(UTC)
        stats_rows, drift_rows = [], []
        for model in sorted(wanted):
            stats, drift = self.compute(model)
            stats_rows += [s.row(at) for s in stats]
            drift_rows += [
                {"model_revision": model_revision(model, revision), "event_timestamp": at,
                 **{f"drift_{k}": _nan(v) for k, v in (("prompt_length", d.prompt_length),
                    ("vocabulary", d.vocabulary), ("score", d.score))}, "drift_statistic": d.statistic}
                for revision, d in drift.items()
            ]  # fmt: skip
        if stats_rows:
            self.features.push(STATS_PUSH, pd.DataFrame(stats_rows), to=PushMode.ONLINE_AND_OFFLINE)
        if drift_rows:
            self.features.push(DRIFT_PUSH, pd.DataFrame(drift_rows), to=PushMode.ONLINE_AND_OFFLINE)
        self.store.mark_pushed([f.id for f in spool])  # after the push: a crash before this replays it
        self.pushed_rows += len(stats_rows) + len(drift_rows)
        return len(spool)

    def run_until_empty(self, *, models: Sequence[str] = ()) -> int:
        """Steps until the spool is empty (a start replays what a killed process left)."""
        total = self.step(models=models)
        while (n := self.step()) > 0:
            total += n
        return total

    def compute(self, model: str) -> tuple[list[Stats], dict[str, Drift]]:
        """Every (revision, variant) of ``model``'s features, and each revision's drift: aggregates
        asked of the store (SQL), so a step costs the same however much the store holds."""
        feedback = self.store.feedback_totals(model)
        totals = self.store.request_totals(model)
        keys = sorted(set(feedback) | set(totals))
        stats = [
            stats_of(model, rev, var, feedback.get((rev, var), (0, 0.0)), totals.get((rev, var)),
                     self.store.latencies(model, rev, var, limit=self.window_requests))
            for rev, var in keys
        ]  # fmt: skip
        drift: dict[str, Drift] = {}
        for revision in sorted({rev for rev, _ in keys}):
            reference = self.reference(model, revision)
            if reference is None:
                continue
            recent = self.store.recent_requests(model, revision, limit=self.reference_requests)
            scores = self.store.scores_of([r.request_id for r in recent])
            drift[revision] = compare(reference, window_of(recent, scores))
        return stats, drift

    def reference(self, model: str, revision: str) -> Window | None:
        """``revision``'s reference window: its first ``reference_requests`` requests once it served
        alone (after its canary: a canary's split, and demo traffic, are not the traffic it serves),
        with their feedback; kept in ``DATA_DIR/reference-MODEL@REVISION.json`` once that many were seen."""
        key = model_revision(model, revision)
        if key in self._references:
            return self._references[key]
        path = self.data_dir / f"reference-{key}.json"
        if path.exists():
            window = Window.from_json(json.loads(path.read_text()))
        else:
            first = self.store.first_requests_alone(model, revision, limit=self.reference_requests)
            if len(first) < self.reference_requests:
                return None
            window = window_of(first, self.store.scores_of([r.request_id for r in first]))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(window.to_json()))
            tmp.replace(path)
        self._references[key] = window
        return window


# -- reading them back ------------------------------------------------------------------------------


def online_stats(
    features: FeatureStore, keys: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The online features of each (model, revision, variant) key, with its revision's drift."""
    if not keys:
        return {}
    rows = [{"model_revision": model_revision(m, r), "prompt_variant": v} for m, r, v in keys]
    refs = [f"{STATS_VIEW}:{name}" for name in STATS_FEATURES] + [
        f"{DRIFT_VIEW}:{name}" for name in DRIFT_FEATURES
    ]
    table = features.get_online_features(features=refs, entity_rows=rows).to_dict()
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for i, key in enumerate(keys):
        values = {name: table[name][i] for name in (*STATS_FEATURES, *DRIFT_FEATURES)}
        out[key] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}
    return out


def evidence(
    stats: dict[tuple[str, str, str], dict[str, Any]], revision: str
) -> dict[str, tuple[float, float]]:
    """The bandit's evidence for ``revision``: ``{variant: (feedback count, score sum)}``."""
    return {
        variant: (float(v.get("feedback_count") or 0), float(v.get("feedback_sum") or 0.0))
        for (_m, rev, variant), v in stats.items()
        if rev == revision
    }
