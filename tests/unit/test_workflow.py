"""The pipeline's Argo WorkflowTemplate: committed renders, DAG, retries, deadlines, labels, Argo validity, CLI."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hera.workflows import WorkflowTemplate
from hera.workflows.models import WorkflowTemplate as ArgoWorkflowTemplate

from autoglm_api.resource import AutoGLMModel
from autoglm_api.spec import AutoGLMModelSpec
from autoglm_api.validation import validate_document, validate_text
from autoglm_operator.cli.main import cli
from autoglm_pipelines import workflow
from autoglm_pipelines.dag import Step, pipeline_steps
from autoglm_pipelines.workflow import (
    DEFAULT_IMAGE,
    PUBLISHED_ARTIFACT,
    SPEC_PATH,
    WORKDIR,
    artifact_revision,
    build_workflow_template,
    go_duration,
    pipeline_manifest,
    render_yaml,
)
from tests.conftest import EXAMPLES

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
RENDERED = EXAMPLES / "rendered"


def _rendered_path(example: Path) -> Path:
    return RENDERED / f"{example.stem}.workflowtemplate.yaml"


def _model(doc: dict[str, Any]) -> AutoGLMModel:
    result = validate_document(doc)
    assert result.model is not None, result.problems
    return result.model


def _example(example: Path) -> AutoGLMModel:
    (result,) = validate_text(example.read_text())
    assert result.model is not None, result.problems
    return result.model


def _render(model: AutoGLMModel, **kwargs: Any) -> dict[str, Any]:
    doc = yaml.safe_load(render_yaml(model, **kwargs))
    assert isinstance(doc, dict)
    return doc


def _templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in doc["spec"]["templates"]}


def _tasks(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dag = _templates(doc)[doc["spec"]["entrypoint"]]["dag"]
    return {t["name"]: t for t in dag["tasks"]}


def _seconds(go: str) -> int:
    total, number = 0, ""
    for char in go:
        if char.isdigit():
            number += char
        else:
            total += int(number) * {"h": 3600, "m": 60, "s": 1}[char]
            number = ""
    return total


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_committed_render_matches_the_builder(example: Path) -> None:
    committed = _rendered_path(example)
    assert committed.exists(), f"{committed} is missing: run `make render`"
    assert committed.read_text() == render_yaml(_example(example)), f"{committed} is stale: run `make render`"


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_render_is_a_valid_argo_object_that_round_trips_through_heras_models(example: Path) -> None:
    text = render_yaml(_example(example))
    doc = yaml.safe_load(text)
    parsed = ArgoWorkflowTemplate.model_validate(doc)
    # Hera's models ignore fields they do not know: equality proves nothing was dropped or renamed.
    assert parsed.model_dump(mode="json", by_alias=True, exclude_none=True) == doc
    assert parsed.api_version == "argoproj.io/v1alpha1"
    assert parsed.kind == "WorkflowTemplate"
    reread = WorkflowTemplate.from_yaml(text)
    assert isinstance(reread, WorkflowTemplate)
    assert reread.to_yaml() == text


def test_the_round_trip_check_catches_a_field_argo_does_not_know(minimal: dict[str, Any]) -> None:
    doc = _render(_model(minimal))
    doc["spec"]["templates"][1]["container"]["retries"] = 3  # not an Argo/Kubernetes field
    parsed = ArgoWorkflowTemplate.model_validate(doc)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_none=True) != doc


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_dag_edges_and_artifacts_follow_the_step_list(example: Path) -> None:
    model = _example(example)
    doc = _render(model)
    steps = pipeline_steps(model.spec)
    tasks, templates = _tasks(doc), _templates(doc)
    assert list(tasks) == [s.name for s in steps]
    for step in steps:
        task = tasks[step.name]
        assert task["template"] == step.name
        assert (task["depends"].split(" && ") if "depends" in task else []) == list(step.depends)
        passed = (task.get("arguments") or {}).get("artifacts", [])
        assert passed == [
            {"name": dep, "from": f"{{{{tasks.{dep}.outputs.artifacts.{dep}}}}}"} for dep in step.depends
        ]
        template = templates[step.name]
        inputs = template["inputs"]["artifacts"]
        assert inputs[0] == {
            "name": "spec",
            "path": SPEC_PATH,
            "raw": {"data": "{{workflow.parameters.manifest}}"},
        }
        assert inputs[1:] == [{"name": dep, "path": f"{WORKDIR}/{dep}"} for dep in step.depends]
        (output,) = template["outputs"]["artifacts"]
        assert (output["name"], output["path"]) == (step.name, f"{WORKDIR}/{step.name}")
        variant = ["--variant", step.variant] if step.variant else []
        assert template["container"]["command"] == [
            "autoglm",
            "pipeline",
            step.function,
            *variant,
            "--spec",
            SPEC_PATH,
            "--workdir",
            WORKDIR,
        ]
        assert template["container"]["image"] == DEFAULT_IMAGE
        assert {"name": "work", "mountPath": WORKDIR} in template["container"]["volumeMounts"]
    assert set(templates) == {doc["spec"]["entrypoint"], *tasks}


def test_each_target_precision_is_a_variant_built_after_the_shared_steps() -> None:
    """cloud-and-edge: bf16 for the cloud GPUs (torch), the spec's own (searched int4, engine auto)
    for the edge, one DAG."""
    model = _example(EXAMPLES / "cloud-and-edge.yaml")
    tasks, templates = _tasks(_render(model)), _templates(_render(model))
    assert list(tasks) == [
        "fetch", "calibrate", "search",
        "compress-bf16", "validate-bf16", "publish-bf16",  # the cloud target's precision, first target first
        "compress", "validate", "publish",  # the spec's own variant, searched, for the edge
    ]  # fmt: skip
    assert tasks["compress-bf16"]["depends"] == "fetch && calibrate"  # a fixed precision: no search
    assert tasks["compress"]["depends"] == "fetch && calibrate && search"
    assert tasks["publish-bf16"]["depends"] == "fetch && calibrate && compress-bf16 && validate-bf16"
    assert templates["compress-bf16"]["container"]["command"][2:5] == [
        "compress",
        "--variant",
        "bf16",
    ]
    (output,) = templates["publish-bf16"]["outputs"]["artifacts"]
    assert output["globalName"] == "published-model-bf16"


def test_publish_output_is_the_workflows_published_model(minimal: dict[str, Any]) -> None:
    templates = _templates(_render(_model(minimal)))
    (output,) = templates["publish"]["outputs"]["artifacts"]
    assert output["globalName"] == PUBLISHED_ARTIFACT
    others = [t for name, t in templates.items() if name != "publish" and "outputs" in t]
    assert all("globalName" not in a for t in others for a in t["outputs"]["artifacts"])


def test_search_task_only_when_search_is_enabled(minimal: dict[str, Any]) -> None:
    without = _tasks(_render(_model(minimal)))
    assert "search" not in without
    # calibrate runs on the source model, before anything is compressed
    assert without["calibrate"]["depends"] == "fetch"
    assert without["compress"]["depends"] == "fetch && calibrate"
    assert without["validate"]["depends"] == "fetch && compress"
    minimal["spec"]["compression"] = {"search": {"enabled": True}}
    with_search = _tasks(_render(_model(minimal)))
    assert with_search["search"]["depends"] == "fetch && calibrate"
    assert with_search["compress"]["depends"] == "fetch && calibrate && search"


def test_retries_backoff_deadlines_and_resources_per_step() -> None:
    model = _example(EXAMPLES / "cloud-and-edge.yaml")
    doc = _render(model)
    templates = _templates(doc)
    budgets = 0
    for step in pipeline_steps(model.spec):
        template = templates[step.name]
        assert template["activeDeadlineSeconds"] == step.timeout_seconds
        requests = template["container"]["resources"]["requests"]
        assert requests["cpu"] == step.cpu
        assert requests["memory"] == step.memory
        assert "nvidia.com/gpu" not in requests  # no step of this pipeline asks for a GPU
        if step.retries == 0:
            assert "retryStrategy" not in template
            budgets += step.timeout_seconds
            continue
        strategy = template["retryStrategy"]
        assert strategy["limit"] == step.retries
        # infrastructure errors and a step's transient exit (75) are retried; a verdict (exit 1) is not
        assert strategy["retryPolicy"] == "Always"
        assert strategy["expression"] == 'lastRetry.status == "Error" || lastRetry.exitCode == "75"'
        backoff = strategy["backoff"]
        assert (backoff["duration"], backoff["factor"]) == ("10s", 2)
        # maxDuration counts from the first attempt's start: it must leave every attempt its full deadline
        waits = sum(10 * 2**i for i in range(step.retries))
        budget = _seconds(backoff["maxDuration"])
        assert budget == (step.retries + 1) * step.timeout_seconds + waits
        budgets += budget
    assert doc["spec"]["activeDeadlineSeconds"] == budgets


def test_gpu_steps_request_nvidia_gpus(monkeypatch: pytest.MonkeyPatch, minimal: dict[str, Any]) -> None:
    def with_gpu_compress(spec: AutoGLMModelSpec) -> tuple[Step, ...]:
        return tuple(
            dataclasses.replace(s, gpu=1) if s.name == "compress" else s for s in pipeline_steps(spec)
        )

    monkeypatch.setattr(workflow, "pipeline_steps", with_gpu_compress)
    resources = _templates(_render(_model(minimal)))["compress"]["container"]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_labels_link_template_workflows_and_pods_to_model_and_revision(example: Path) -> None:
    model = _example(example)
    doc = _render(model)
    expected = {
        "app.kubernetes.io/managed-by": "autoglm",
        "autoglm.io/model": model.metadata.name,
        "autoglm.io/revision": artifact_revision(model.spec),
    }
    assert doc["metadata"]["name"] == f"autoglm-{model.metadata.name}"
    assert doc["metadata"]["namespace"] == model.metadata.namespace
    assert doc["metadata"]["labels"] == expected
    assert doc["spec"]["workflowMetadata"]["labels"] == expected
    assert doc["spec"]["podMetadata"]["labels"] == expected
    for name, template in _templates(doc).items():
        if "container" in template:
            assert template["metadata"]["labels"] == {"autoglm.io/step": name}


def test_explicit_image_and_revision(minimal: dict[str, Any]) -> None:
    doc = _render(_model(minimal), image="registry.local/autoglm:dev", revision="abc123")
    assert doc["metadata"]["labels"]["autoglm.io/revision"] == "abc123"
    images = {t["container"]["image"] for t in doc["spec"]["templates"] if "container" in t}
    assert images == {"registry.local/autoglm:dev"}


def test_manifest_parameter_is_the_model_without_server_fields(minimal: dict[str, Any]) -> None:
    model = _model(minimal)
    doc = _render(model)
    (parameter,) = doc["spec"]["arguments"]["parameters"]
    assert parameter["name"] == "manifest"
    manifest = yaml.safe_load(parameter["value"])
    assert manifest == pipeline_manifest(model)
    assert manifest["spec"] == model.to_json()["spec"]
    assert _model(manifest).to_json()["spec"] == model.to_json()["spec"]

    live = copy.deepcopy(minimal)
    live["metadata"].update(uid="0b6c", resourceVersion="42", generation=3, labels={"team": "ml"})
    live["status"] = {"phase": "Compressing"}
    assert render_yaml(_model(live)) == render_yaml(model)


def test_artifact_revision_is_content_addressed(minimal: dict[str, Any]) -> None:
    base = artifact_revision(_model(minimal).spec)
    assert len(base) == 12
    assert int(base, 16) >= 0

    explicit_defaults = copy.deepcopy(minimal)
    explicit_defaults["spec"]["compression"] = {"quantization": {"method": "int8-weight-only"}}
    assert artifact_revision(_model(explicit_defaults).spec) == base

    serving_only = copy.deepcopy(minimal)
    serving_only["spec"]["targets"] = [{"name": "other", "replicas": {"min": 1, "max": 3}}]
    serving_only["spec"]["rollout"] = {"strategy": "immediate", "steps": []}
    assert artifact_revision(_model(serving_only).spec) == base

    for part, value in [
        ("source", {"uri": "file:///models/other"}),
        ("compression", {"quantization": {"method": "int4-weight-only"}}),
        ("calibration", {"samples": 7}),
        ("validation", {"maxTokens": 100}),
    ]:
        changed = copy.deepcopy(minimal)
        changed["spec"][part] = value
        assert artifact_revision(_model(changed).spec) != base, part


def test_a_model_named_only_by_generate_name_is_refused(minimal: dict[str, Any]) -> None:
    minimal["metadata"] = {"generateName": "tiny-"}
    with pytest.raises(ValueError, match=r"metadata\.name is required"):
        build_workflow_template(_model(minimal))


def test_go_duration() -> None:
    assert [go_duration(s) for s in (0, 10, 600, 3600, 10830, 7261)] == [
        "0s",
        "10s",
        "10m",
        "1h",
        "3h30s",
        "2h1m1s",
    ]


# --- the CLI ---------------------------------------------------------------------------------------


def _cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["pipeline", "render", *args], input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.name)
def test_cli_prints_the_builders_yaml(example: Path) -> None:
    code, out, err = _cli(str(example))
    assert (code, err) == (0, "")
    assert out == render_yaml(_example(example))


def test_cli_reads_stdin_takes_an_image_and_writes_a_file(tmp_path: Path) -> None:
    text = (EXAMPLES / "autoglm-model.yaml").read_text()
    code, out, _ = _cli("-", "--image", "registry.local/autoglm:dev", stdin=text)
    assert code == 0
    assert out == render_yaml(_example(EXAMPLES / "autoglm-model.yaml"), image="registry.local/autoglm:dev")
    target = tmp_path / "out" / "wt.yaml"
    code, out, err = _cli(str(EXAMPLES / "autoglm-model.yaml"), "-o", str(target))
    assert (code, out, err) == (0, "", f"wrote {target}\n")
    assert target.read_text() == render_yaml(_example(EXAMPLES / "autoglm-model.yaml"))


def test_cli_invalid_manifest_is_one_line_and_exit_2(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "autoglm-model.yaml").read_text())
    doc["spec"]["compression"]["quantization"]["method"] = "int3"
    doc["spec"]["rollout"]["steps"] = [{"weight": 50}, {"weight": 10}, {"weight": 100}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = _cli(str(path))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"Error: {path}: invalid AutoGLMModel: ")
    assert "spec.compression.quantization.method: must be one of" in err
    assert "spec.rollout.steps: step weights must be strictly increasing" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read"),
        ("a: [unclosed\n", "not valid YAML"),
        ("", "expected one AutoGLMModel document, found 0"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "found 0"),
        (b"\xff\xfe", "not UTF-8"),
    ],
    ids=["missing", "not-yaml", "empty", "other-kind", "binary"],
)
def test_cli_unusable_manifest_is_one_line_and_exit_2(
    tmp_path: Path, content: str | bytes | None, fragment: str
) -> None:
    path = tmp_path / "manifest.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, out, err = _cli(str(path))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1, err
    assert fragment in err


def test_cli_two_models_in_one_file_are_refused(tmp_path: Path) -> None:
    text = (EXAMPLES / "autoglm-model.yaml").read_text()
    path = tmp_path / "two.yaml"
    path.write_text(text + "---\n" + (EXAMPLES / "cloud-and-edge.yaml").read_text())
    code, _, err = _cli(str(path))
    assert code == 2
    assert "expected one AutoGLMModel document, found 2" in err


def test_a_fine_tune_runs_after_fetch_and_its_pvc_dataset_is_mounted_where_it_resolves(
    minimal: dict[str, Any],
) -> None:
    from tests.support.crd_schemas import problems

    minimal["spec"]["training"] = {
        "dataset": "pvc://feedback-data/retraining/retrain-0123.jsonl",
        "sha256": "a" * 64,
    }
    minimal["spec"]["validation"] = {"dataset": "pvc://corpora/hamlet.txt"}
    doc = _render(_model(minimal))
    assert problems(doc) == []  # the upstream Argo WorkflowTemplate schema
    tasks = _tasks(doc)
    assert tasks["finetune"]["depends"] == "fetch"
    # everything after it reads the fine-tuned model
    assert tasks["calibrate"]["depends"] == "fetch && finetune"
    assert tasks["compress"]["depends"] == "fetch && calibrate && finetune"
    assert tasks["validate"]["depends"] == "fetch && compress && finetune"
    for name, template in _templates(doc).items():
        if "container" not in template:
            continue
        mounts = {m["name"]: m for m in template["container"]["volumeMounts"]}
        assert mounts["pvc-feedback-data"] == {
            "name": "pvc-feedback-data", "mountPath": "/mnt/pvc/feedback-data", "readOnly": True,
        }, name  # fmt: skip
        assert mounts["pvc-corpora"]["mountPath"] == "/mnt/pvc/corpora"
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in doc["spec"]["templates"][1]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"pvc-corpora": {"claimName": "corpora", "readOnly": True},
                      "pvc-feedback-data": {"claimName": "feedback-data", "readOnly": True}}  # fmt: skip
    # a spec without pvc:// URIs mounts nothing more than its work folder and its scratch /tmp
    minimal["spec"].pop("training")
    minimal["spec"].pop("validation")
    plain = _render(_model(minimal))
    assert all(
        [m["name"] for m in t["container"]["volumeMounts"]] == ["work", "tmp"]
        for t in _templates(plain).values() if "container" in t
    )  # fmt: skip
