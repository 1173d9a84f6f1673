"""What the operator reads from the cluster, as the core's terms, and the patches it writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from autoglm_operator.kube.observe import intents, pipeline_run, target_serving
from autoglm_operator.kube.reconciler import merge_diff, overlay_diff
from autoglm_operator.plan import Published, Serving
from tests.support.k8s_emulator import merge_patch

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _workflow(
    phase: str | None, parameters: dict[str, Any] | None = None, artifacts: list[Any] | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase} if phase else {}
    if parameters is not None or artifacts is not None:
        status["outputs"] = {
            "parameters": [{"name": k, "value": json.dumps(v)} for k, v in (parameters or {}).items()],
            "artifacts": artifacts or [],
        }
    return {
        "metadata": {
            "name": "autoglm-m-abc-2",
            "labels": {"autoglm.io/revision": "abc", "autoglm.io/attempt": "2"},
        },
        "status": status,
    }


def _published(step: str, revision: str, **more: Any) -> dict[str, Any]:
    return {"status": "Succeeded", "metrics": {"artifact": f"/autoglm/work/{step}/model", "revision": revision,
                                                "artifactBytes": 123, **more}}  # fmt: skip


def test_a_pending_or_running_workflow_is_a_running_run_of_its_revision_and_attempt() -> None:
    for phase in (None, "Pending", "Running"):
        run = pipeline_run(_workflow(phase), variants=[""], repository="s3://repo")
        assert run is not None
        assert (run.revision, run.phase, run.attempt) == ("abc", "Running", 2)
    assert pipeline_run(None, variants=[""], repository="s3://repo") is None


def test_outputs_give_every_variants_artifact_under_the_repository_or_its_bucket() -> None:
    outputs = {
        "validate-result": {"passed": True},
        "publish-result": _published(
            "publish",
            "abc",
            baseline="/autoglm/work/publish/baseline",
            baselineRevision="src-1",
            baselineBytes=456,
        ),
        "publish-int4-result": _published("publish-int4", "def"),
    }
    artifacts = [
        {"name": "published-model", "s3": {"key": "ml/run/publish"}},
        {"name": "published-model-int4", "s3": {"bucket": "other", "key": "ml/run/publish-int4/"}},
    ]
    run = pipeline_run(
        _workflow("Succeeded", outputs, artifacts), variants=["", "int4"], repository="s3://repo/"
    )
    assert run is not None
    assert (run.phase, run.gates_passed) == ("Succeeded", True)
    assert run.artifact_uri == "s3://repo/ml/run/publish/model"
    assert run.variants == (
        Published("abc", "s3://repo/ml/run/publish/model", 123),
        Published("def", "s3://other/ml/run/publish-int4/model", 123),
    )
    assert run.baseline == Published("src-1", "s3://repo/ml/run/publish/baseline", 456)


def test_a_failed_gate_is_told_apart_from_a_failed_workflow() -> None:
    report = {
        "passed": False,
        "gates": [{"name": "maxQualityLoss", "passed": False}, {"name": "x", "passed": True}],
    }
    run = pipeline_run(
        _workflow("Failed", {"validate-int4-result": report}), variants=["", "int4"], repository="s3://r"
    )
    assert run is not None
    assert (run.phase, run.gates_passed) == ("Succeeded", False)
    assert run.reason == "gate failed (variant int4): maxQualityLoss"
    crashed = _workflow("Error")
    crashed["status"]["message"] = "pod deleted"
    run = pipeline_run(crashed, variants=[""], repository="s3://r")
    assert run is not None
    assert (run.phase, run.reason) == ("Failed", "workflow autoglm-m-abc-2: pod deleted")


def test_a_succeeded_workflow_without_its_outputs_is_a_failure_that_says_which() -> None:
    run = pipeline_run(
        _workflow("Succeeded", {"publish-result": _published("publish", "abc")}),
        variants=[""],
        repository="s3://r",
    )
    assert run is not None
    assert run.phase == "Failed"
    assert "output artifact published-model is missing" in run.reason
    outside = _published("publish", "abc")
    outside["metrics"]["artifact"] = "/elsewhere/model"
    artifacts = [{"name": "published-model", "s3": {"key": "k"}}]
    run = pipeline_run(
        _workflow("Succeeded", {"publish-result": outside}, artifacts), variants=[""], repository="s3://r"
    )
    assert run is not None
    assert run.phase == "Failed"
    assert "publish-result has no published artifact in /autoglm/work/publish" in run.reason


def _pod(served: dict[str, Any] | None, **meta: Any) -> dict[str, Any]:
    annotations = {"autoglm.io/served": json.dumps({"served": served})} if served is not None else {}
    return {"metadata": {"name": "p", "annotations": annotations, **meta}, "status": {"phase": "Running"}}


def test_a_canary_counts_only_when_every_live_replica_reports_it() -> None:
    both = {"stable": "a", "canary": "b", "weight": 10}
    assert target_serving([_pod(both), _pod({**both, "weight": 50})]) == (Serving("a", "b", 10), 2)
    assert target_serving([_pod(both), _pod({"stable": "a", "canary": None, "weight": 0})]) == (
        Serving("a"),
        2,
    )
    assert target_serving([_pod(both), _pod(None)]) == (Serving("a"), 1)  # one has not reported yet
    leaving = _pod({"stable": "a", "canary": None, "weight": 0}, deletionTimestamp="2026-12-02T12:00:00Z")
    assert target_serving([_pod(both), leaving]) == (Serving("a", "b", 10), 1)
    assert target_serving([]) == (Serving(), 0)
    assert target_serving([_pod({"stable": "a"}), _pod({"stable": "b"})]) == (Serving(), 2)


def test_intents_name_who_asked_and_when_from_the_managed_fields() -> None:
    body = {"metadata": {
        "annotations": {"autoglm.io/abort": "Ada Lovelace", "autoglm.io/promote": "true", "other": "x"},
        "managedFields": [{"manager": "kubectl-annotate", "time": "2026-12-02T11:00:00Z",
                           "fieldsV1": {"f:metadata": {"f:annotations": {"f:autoglm.io/abort": {}}}}}],
    }}  # fmt: skip
    found = intents(body, NOW)
    assert [(key, i.kind, i.actor, i.at) for key, i in found] == [
        ("autoglm.io/abort", "abort", "user:Ada-Lovelace", datetime(2026, 12, 2, 11, 0, tzinfo=UTC)),
        ("autoglm.io/promote", "promote", "user:unknown", NOW),
    ]


json_values = st.recursive(
    st.integers() | st.text(max_size=3) | st.booleans(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=3), json_values, max_size=4)


@given(json_objects, json_objects)
def test_merge_diff_is_the_merge_patch_from_old_to_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert merge_patch(old, merge_diff(old, new)) == new


@given(json_objects, json_objects)
def test_overlay_diff_sets_what_new_says_and_keeps_the_rest(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = overlay_diff(old, new)
    patched = merge_patch(old, patch) if patch is not None else old
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            assert all(patched[key].get(k) == v for k, v in value.items() if not isinstance(v, dict))
        else:
            assert patched[key] == value
    assert all(patched.get(k) == v for k, v in old.items() if k not in new)  # nothing of others removed
    assert (patch is None) == (patched == old)
