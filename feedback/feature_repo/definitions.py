"""The feature repository's objects, for the feast CLI: the same definitions AutoGLM applies in code
(``autoglm_feedback.features.definitions``), with the offline files under ``data/``."""

from pathlib import Path

from autoglm_feedback.features import definitions, prepare_offline_files

DATA = Path(__file__).resolve().parent / "data"
prepare_offline_files(DATA)
model_revision, prompt_variant, feedback_stats_push, revision_drift_push, feedback_stats, revision_drift = (
    definitions(DATA)
)
