from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def load_example(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(doc, dict)
    return copy.deepcopy(doc)


MINIMAL: dict[str, Any] = {
    "apiVersion": "autoglm.io/v1alpha1",
    "kind": "AutoGLMModel",
    "metadata": {"name": "tiny"},
    "spec": {"source": {"uri": "file:///models/tiny"}, "targets": [{"name": "local"}]},
}


@pytest.fixture
def minimal() -> dict[str, Any]:
    return copy.deepcopy(MINIMAL)
