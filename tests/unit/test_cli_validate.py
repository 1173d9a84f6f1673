"""``autoglm validate``: exit codes, one line per problem, every problem reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from autoglm_api.validation import RULES_NOT_CHECKED
from autoglm_operator.cli.main import cli

VALID = (Path(__file__).parents[2] / "examples" / "autoglm-model.yaml").read_text()


def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["validate", *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_examples_are_valid(repo_root: Path) -> None:
    code, out, _ = run(*(str(p) for p in sorted((repo_root / "examples").glob("*.yaml"))))
    assert code == 0, out
    assert "AutoGLMModel ml/support-glm is valid" in out
    assert "AutoGLMModel ml/glm4-chat is valid" in out


def test_every_problem_is_one_line_with_file_and_path(tmp_path: Path) -> None:
    doc = yaml.safe_load(VALID)
    doc["spec"]["rollout"]["steps"] = [{"weight": 10}, {"weight": 5}, {"weight": 100}]
    doc["spec"]["targets"][0]["pool"] = "aws"
    doc["spec"]["compression"]["pruning"]["sparsity"] = 2
    doc["spec"]["unknownField"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, _ = run(str(path))
    assert code == 1
    lines = out.strip().splitlines()
    assert f"{path}: spec.rollout.steps: step weights must be strictly increasing, got [10, 5, 100]" in lines
    assert any(line.startswith(f"{path}: spec.targets[0].pool: must be one of") for line in lines)
    assert any(
        line.startswith(f"{path}: spec.compression.pruning.sparsity: must be less than") for line in lines
    )
    assert any(line.startswith(f"{path}: spec.unknownField: unknown field") for line in lines)
    # pool "aws" is not a supported value: like the API server, the remaining rules are not run, and it says so
    assert f"{path}: {RULES_NOT_CHECKED}" in lines
    assert len(lines) == 5


def test_rules_still_run_beside_bounds_errors_but_not_beside_blocking_errors() -> None:
    doc = yaml.safe_load(VALID)
    doc["spec"]["rollout"]["steps"] = [{"weight": 10}, {"weight": 5}, {"weight": 100}]
    doc["spec"]["rollout"]["analysis"]["maxErrorRate"] = 1.5  # a value error in a sibling object
    code, out, _ = run("-", stdin=yaml.safe_dump(doc))
    assert code == 1
    assert "spec.rollout.steps: step weights must be strictly increasing, got [10, 5, 100]" in out
    assert "spec.rollout.analysis.maxErrorRate: must be less than or equal to 1.0, got 1.5" in out
    doc["spec"]["rollout"]["analysis"]["maxErrorRate"] = "high"  # a type error blocks CEL, as on the server
    code, out, _ = run("-", stdin=yaml.safe_dump(doc))
    assert "strictly increasing" not in out
    assert 'maxErrorRate: must be a number, got string "high"' in out
    assert RULES_NOT_CHECKED in out


def test_bounds_error_and_rule_on_the_same_field_are_both_reported() -> None:
    doc = yaml.safe_load(VALID)
    doc["spec"]["compression"]["pruning"] = {"method": "none", "sparsity": 2}
    code, out, _ = run("-", stdin=yaml.safe_dump(doc))
    assert code == 1
    assert "spec.compression.pruning.sparsity: must be less than or equal to 0.9, got 2" in out
    assert "spec.compression.pruning.sparsity: sparsity must be 0 when method is none, got 2" in out


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("nodeSelector: {2024-01-01: x}", "is valid"),  # a date key is a string key to kubectl
        ("nodeSelector: {a: 2024-01-01}", "is valid"),
        ("nodeSelector: {a: !!binary aGk=}", "is valid"),
        ("resources: {cpu: 0.5}", 'must be an integer or a quantity string such as "500m", got 0.5'),
        ("resources: {cpu: 4}", "is valid"),
    ],
)
def test_yaml_values_are_read_as_kubectl_sends_them(snippet: str, expected: str) -> None:
    text = VALID.replace("      pool: cloud-cpu\n", f"      pool: cloud-cpu\n      {snippet}\n")
    if "resources" in snippet:
        text = text.replace('      resources: {cpu: "2", memory: 4Gi}\n', "")
    code, out, _ = run("-", stdin=text)
    assert expected in out
    assert code == (0 if expected == "is valid" else 1)


def test_yaml_1_2_exponent_floats_are_numbers() -> None:
    text = VALID.replace("maxJoulesPerToken: 2.0", "maxJoulesPerToken: 1e-3").replace(
        "maxP95LatencyMs: 2000", "maxP95LatencyMs: 1.5e3"
    )
    assert "1e-3" in text
    assert "1.5e3" in text
    code, out, _ = run("-o", "json", "-", stdin=text)
    assert code == 0, out
    analysis = json.loads(out)["spec"]["rollout"]["analysis"]
    assert (analysis["maxJoulesPerToken"], analysis["maxP95LatencyMs"]) == (0.001, 1500.0)


def test_generate_name_is_checked_and_shown() -> None:
    ok = VALID.replace("  name: support-glm\n", "  generateName: support-\n")
    code, out, _ = run("-", stdin=ok)
    assert (code, "AutoGLMModel ml/support-* is valid" in out) == (0, True)
    code, out, _ = run("-", stdin=VALID.replace("  name: support-glm\n", "  generateName: Bad_\n"))
    assert code == 1
    assert "metadata: generateName must be at most 35 lowercase letters" in out


def test_several_valid_objects_print_as_a_kubectl_list() -> None:
    code, out, _ = run("-o", "json", "-", stdin=f"{VALID}---\n{VALID}")
    assert code == 0
    listed = json.loads(out)
    assert (listed["kind"], len(listed["items"])) == ("List", 2)


def test_multi_document_stream_from_stdin_numbers_documents() -> None:
    bad = VALID.replace("name: support-glm", "name: Bad_Name")
    namespace = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n"
    code, out, _ = run("-", stdin=f"{namespace}---\n{VALID}---\n{bad}")
    assert code == 1
    assert "<stdin>[1]: skipped: v1/Namespace is not an autoglm.io resource" in out
    assert "<stdin>[2]: AutoGLMModel ml/support-glm is valid" in out
    assert "<stdin>[3]: metadata.name: must be a DNS-1035 label" in out


def test_not_yaml_exits_2_and_other_files_are_still_checked(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    code, out, err = run(str(broken), str(good), str(tmp_path / "missing.yaml"))
    assert code == 2
    assert f"{broken}: not valid YAML" in err
    assert f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory" in err
    assert f"{good}: AutoGLMModel ml/support-glm is valid" in out


def test_duplicate_keys_are_refused_like_kubectl(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(VALID.replace("  namespace: ml\n", "  namespace: ml\n  namespace: prod\n"))
    code, _, err = run(str(path))
    assert code == 2
    assert "found duplicate key 'namespace'" in err


def test_binary_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(str(path))
    assert code == 2
    assert "not UTF-8 text" in err


@pytest.mark.parametrize(
    ("text", "fragment"), [("- a\n- b\n", "must be a YAML mapping"), ("42\n", "got number 42")]
)
def test_non_mapping_documents_are_invalid(text: str, fragment: str) -> None:
    code, out, _ = run("-", stdin=text)
    assert code == 1
    assert fragment in out


def test_empty_stream_is_invalid() -> None:
    code, _, err = run("-", stdin="---\n")
    assert code == 1
    assert "no documents" in err


def test_output_yaml_prints_the_defaulted_object_on_stdout_only() -> None:
    minimal = "apiVersion: autoglm.io/v1alpha1\nkind: AutoGLMModel\nmetadata: {name: m}\nspec:\n"
    minimal += "  source: {uri: 'file:///m'}\n  targets: [{name: local}]\n"
    code, out, err = run("-o", "yaml", "-", stdin=minimal)
    assert code == 0
    obj = yaml.safe_load(out)
    assert obj["spec"]["rollout"]["steps"][0] == {"weight": 10, "pause": "5m"}
    assert obj["spec"]["compression"]["quantization"]["method"] == "int8-weight-only"
    assert "is valid" in err


def test_quiet_prints_nothing_for_valid_input() -> None:
    code, out, _ = run("-q", "-", stdin=VALID)
    assert code == 0
    assert out == ""


def test_no_files_is_a_usage_error() -> None:
    code, _, err = run()
    assert code == 2
    assert "Missing argument" in err


def test_accuracy_metric_is_refused_naming_the_field_and_what_is_allowed(tmp_path: Path) -> None:
    doc = yaml.safe_load(VALID)
    doc["spec"].setdefault("validation", {})["metric"] = "accuracy"
    path = tmp_path / "accuracy.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, _ = run(str(path))
    assert code == 1
    assert (
        "spec.validation.metric: metric accuracy is not built yet: the only supported value is perplexity"
        in out
    )
