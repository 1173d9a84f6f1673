"""Every object the operator creates for the two examples is committed in ``examples/rendered/`` (as
``make render`` writes it) and valid against its upstream CRD; it is what ``autoglm objects`` previews,
but for the artifact URIs (the run's output artifacts) and the owner references (the model's uid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.support.cluster_render import cluster_objects, render_yaml
from tests.support.crd_schemas import problems
from tests.support.k8s_emulator import kubectl_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def _without_uris(value: Any) -> Any:
    """``value`` with artifact URIs and owner references blanked (what only the cluster knows)."""
    if isinstance(value, dict):
        return {k: ("<uri>" if k in ("uri", "storageUri") else _without_uris(v))
                for k, v in value.items() if k != "ownerReferences"}  # fmt: skip
    if isinstance(value, list):
        return [_without_uris(v) for v in value]
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return _without_uris(yaml.safe_load(value))  # desired.json inside the ConfigMap
        except yaml.YAMLError:
            return value
    return value


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.stem)
def test_the_operators_objects_are_the_committed_ones_and_valid(example: Path) -> None:
    objects = cluster_objects(example)
    rendered = render_yaml(example, objects)
    committed = EXAMPLES / "rendered" / f"{example.stem}.cluster.yaml"
    assert committed.read_text() == rendered, "run `make render`"
    created = list(yaml.safe_load_all(rendered))
    assert {o["kind"] for o in created} == {"WorkflowTemplate", "Workflow", "InferenceService", "ConfigMap"}
    for obj in created:
        if obj["kind"] != "ConfigMap":
            assert problems(obj) == [], obj["metadata"]["name"]
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "AutoGLMModel"
    preview = list(yaml.safe_load_all((EXAMPLES / "rendered" / f"{example.stem}.objects.yaml").read_text()))
    previewed = {(o["kind"], o["metadata"]["name"]): o for o in preview}
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key in previewed, f"autoglm objects does not show {key}"
        assert _without_uris(obj) == _without_uris(previewed[key]), key
