"""The API models: defaults, round trips, CEL rules and condition setters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from autoglm_api import AutoGLMModel
from autoglm_api.cel import CelRule
from autoglm_api.conditions import READY, set_condition
from autoglm_api.crd import openapi_schema
from autoglm_api.spec import AutoGLMModelSpec
from autoglm_api.structural import apply_defaults, check_rules
from autoglm_api.validation import prune_nulls, validate_document
from tests.conftest import load_example


def test_minimal_manifest_is_valid_and_fully_defaulted(minimal: dict[str, Any]) -> None:
    result = validate_document(minimal)
    assert result.valid, result.problems
    assert result.model is not None
    spec = result.model.spec
    assert spec.compression.quantization.method == "int8-weight-only"
    assert spec.targets[0].pool == "cloud-cpu"
    assert [s.weight for s in spec.rollout.steps] == [10, 50, 100]
    assert spec.rollout.strategy == "canary"
    assert spec.feedback.prompt_optimization.enabled is False


@pytest.mark.parametrize("name", ["autoglm-model.yaml", "cloud-and-edge.yaml"])
def test_examples_are_valid(name: str) -> None:
    result = validate_document(load_example(name))
    assert result.valid, result.problems


@pytest.mark.parametrize("name", ["autoglm-model.yaml", "cloud-and-edge.yaml", None])
def test_crd_structural_defaulting_equals_model_defaults(name: str | None, minimal: dict[str, Any]) -> None:
    """The API server, defaulting from the CRD, stores exactly what the models produce."""
    raw = load_example(name) if name else minimal
    raw["spec"] = prune_nulls(raw["spec"])
    model = AutoGLMModel.model_validate(raw)
    schema = openapi_schema()["properties"]["spec"]
    assert apply_defaults(raw["spec"], schema) == model.to_json()["spec"]
    assert check_rules(apply_defaults(raw, openapi_schema()), openapi_schema()) == []


def test_canary_without_steps_takes_the_default_progression(minimal: dict[str, Any]) -> None:
    minimal["spec"]["rollout"] = {"analysis": {"interval": "30s"}}
    result = validate_document(minimal)
    assert result.valid, result.problems
    assert result.model is not None
    assert [s.weight for s in result.model.spec.rollout.effective_steps] == [10, 50, 100]
    minimal["spec"]["rollout"] = {"strategy": "immediate"}
    model = validate_document(minimal).model
    assert model is not None
    assert model.spec.rollout.effective_steps == []


def test_cel_string_of_a_double_prints_like_cel_go() -> None:
    rule = CelRule(rule="false", message="m", message_expression="string(self.a) + ' ' + string(self.b)")
    assert rule.check({"a": 2.0, "b": 0.25}) == "2 0.25"


def test_round_trip_is_stable() -> None:
    model = AutoGLMModel.model_validate(prune_nulls(load_example("cloud-and-edge.yaml")))
    again = AutoGLMModel.model_validate(model.to_json())
    assert again == model


def test_snake_case_names_are_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AutoGLMModelSpec.model_validate(
            {"source": {"uri": "file:///m"}, "targets": [{"name": "a"}], "roll_out": {}}
        )


def test_rules_also_hold_when_models_are_built_in_python() -> None:
    with pytest.raises(ValidationError, match="target names must be unique"):
        AutoGLMModelSpec.model_validate(
            {"source": {"uri": "file:///m"}, "targets": [{"name": "a"}, {"name": "a"}]}
        )


def test_integer_yaml_value_for_a_number_field_is_a_number_for_cel(minimal: dict[str, Any]) -> None:
    minimal["spec"]["compression"] = {"pruning": {"method": "structured-l1", "sparsity": 0}}
    problems = validate_document(minimal).problems
    assert [p.path for p in problems] == ["spec.compression.pruning.sparsity"]


def test_null_fields_are_pruned_like_the_api_server(minimal: dict[str, Any]) -> None:
    minimal["spec"]["compression"] = {"quantization": {"method": "int8-weight-only", "groupSize": None}}
    minimal["spec"]["source"]["revision"] = None
    assert validate_document(minimal).valid


def test_cel_rule_evaluation_error_fails_the_rule_with_its_message() -> None:
    rule = CelRule(rule="self.missing > 1", message="needs missing > 1")
    message = rule.check({"present": 1})
    assert message is not None
    assert message.startswith("needs missing > 1")


def test_message_expression_falls_back_to_message_when_not_a_string() -> None:
    rule = CelRule(rule="false", message="static", message_expression="1 + 1")
    assert rule.check({}) == "static"


def test_set_condition_moves_transition_time_only_on_status_change() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    conditions, changed = set_condition([], READY, "False", "PipelineRunning", "compressing", now=t0)
    assert changed
    assert conditions[0].last_transition_time == t0
    same, changed = set_condition(
        conditions, READY, "False", "PipelineRunning", "compressing", now=t0 + timedelta(1)
    )
    assert not changed
    assert same == conditions
    reworded, changed = set_condition(
        conditions, READY, "False", "PipelineRunning", "calibrating", now=t0 + timedelta(1)
    )
    assert changed
    assert reworded[0].last_transition_time == t0
    flipped, changed = set_condition(reworded, READY, "True", "Promoted", "serving", now=t0 + timedelta(2))
    assert changed
    assert flipped[0].last_transition_time == t0 + timedelta(2)
    assert conditions[0].message == "compressing"  # the input list was not modified


def test_status_is_ignored_by_validate_but_typed_in_the_model(minimal: dict[str, Any]) -> None:
    minimal["status"] = {"phase": "NotAPhase"}
    assert validate_document(minimal).valid  # the API server drops status on create
    with pytest.raises(ValidationError, match="phase"):
        AutoGLMModel.model_validate(minimal)


@pytest.mark.parametrize("quantity", ["4Gi", "16Gi", "500m", "4", "1.5Gi", "2G", "100Mi", "3k", "1Ei"])
def test_a_quantity_means_what_kubernetes_reads_it_as(quantity: str) -> None:
    from autoglm_api.base import quantity_value

    utils = pytest.importorskip("kubernetes.utils")  # the oracle: the Kubernetes client's parser
    assert quantity_value(quantity) == utils.parse_quantity(quantity)


def test_a_malformed_quantity_is_refused_by_name() -> None:
    from autoglm_api.base import quantity_value

    with pytest.raises(ValueError, match="'4 Gi' is not a Kubernetes quantity such as 500m, 4, 16Gi"):
        quantity_value("4 Gi")
