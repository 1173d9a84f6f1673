from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


def pytest_configure(config: pytest.Config) -> None:
    # Tests write nothing into the repository: Hypothesis keeps its example database and caches in
    # ./.hypothesis unless told otherwise.
    from hypothesis import configuration

    config.stash[_HYPOTHESIS_HOME] = home = Path(tempfile.mkdtemp(prefix="autoglm-hypothesis-"))
    configuration.set_hypothesis_home_dir(home)


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_HYPOTHESIS_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


_HYPOTHESIS_HOME = pytest.StashKey[Path]()


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
