"""The committed CRD is what the models generate, and it is a CRD Kubernetes accepts and explains."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from autoglm_api.crd import CRD_FILENAME, render_crd, render_crd_yaml

COMMITTED = [Path("crds") / CRD_FILENAME, Path("charts/autoglm-crds/files") / CRD_FILENAME]


@pytest.mark.parametrize("relative", COMMITTED, ids=str)
def test_committed_crd_matches_the_models(repo_root: Path, relative: Path) -> None:
    committed = (repo_root / relative).read_text()
    assert committed == render_crd_yaml(), f"{relative} is stale: run `make crds`"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string), no $ref, no nullable unions, no additionalProperties: false."""
    for path, node in _nodes(_schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert "$ref" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path


def test_every_property_is_described_for_kubectl_explain() -> None:
    for path, node in _nodes(_schema()["properties"]["spec"], "spec"):
        if not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"
    for path, node in _nodes(_schema()["properties"]["status"], "status"):
        if not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


def test_lists_and_rule_strings_are_bounded_for_cel_cost_estimation() -> None:
    for path, node in _nodes(_schema()):
        if node.get("type") == "array":
            assert "maxItems" in node, (
                f"{path} needs maxItems, or the API server's CEL cost estimate rejects the CRD"
            )


def test_rules_compile_and_are_where_the_issue_wants_them() -> None:
    rules: dict[str, list[dict[str, str]]] = {}
    for path, node in _nodes(_schema()):
        for rule in node.get("x-kubernetes-validations") or []:
            celpy.Environment().compile(rule["rule"])
            if "messageExpression" in rule:
                celpy.Environment().compile(rule["messageExpression"])
            assert rule["message"]
            rules.setdefault(path, []).append(rule)
    expected = {
        ".spec": "target names must be unique",
        ".spec.rollout": "strictly increasing",
        ".spec.compression.quantization": "groupSize is only allowed",
        ".spec.targets[]": "cloud-gpu targets must request",
        ".spec.targets[].replicas": "replicas.min must be less",
        ".spec.compression.pruning": "sparsity must be 0 when method is none",
        ".spec.compression.distillation.temperature": "start >= end > 0",
        ".spec.feedback.promptOptimization": "at least 2 variants",
    }
    for path, fragment in expected.items():
        assert any(fragment in r["message"] for r in rules.get(path, [])), (path, rules.get(path))
    messages = " ".join(r["message"] for r in rules[".spec.rollout"])
    assert "last step must have weight 100" in messages
    assert "immediate takes no steps" in messages


def test_enums_bounds_patterns_and_defaults_are_carried() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    quant = spec["compression"]["properties"]["quantization"]["properties"]
    assert "smoothquant-w8a8" in quant["method"]["enum"]
    assert quant["method"]["default"] == "int8-weight-only"
    step = spec["rollout"]["properties"]["steps"]["items"]["properties"]
    assert (step["weight"]["minimum"], step["weight"]["maximum"]) == (1, 100)
    assert "pattern" in step["pause"]
    rate = spec["rollout"]["properties"]["analysis"]["properties"]["maxErrorRate"]
    assert (rate["minimum"], rate["maximum"]) == (0.0, 1.0)
    loss = spec["compression"]["properties"]["search"]["properties"]["tolerableLoss"]
    assert loss["minimum"] == 0.0
    assert loss["exclusiveMinimum"] is True
    assert spec["rollout"]["default"]["steps"][-1] == {"weight": 100}


def test_crd_metadata_names_columns_and_status_subresource() -> None:
    crd = render_crd()
    assert crd["metadata"]["name"] == "autoglmmodels.autoglm.io"
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["agm"]
    assert names["categories"] == ["autoglm"]
    assert names["plural"] == "autoglmmodels"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stable",
        "Candidate",
        "Canary",
        "Age",
    ]


def test_rendered_yaml_parses_back_to_the_same_object() -> None:
    assert yaml.safe_load(render_crd_yaml()) == render_crd()
