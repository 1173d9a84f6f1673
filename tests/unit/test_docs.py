"""The documentation site: its reference pages are what the code generates (the CRD, the
dashboards), and MkDocs builds it strictly (a broken link, a missing snippet of the README, a page
left out of the navigation: each a warning, each a failure)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

docs_reference = pytest.importorskip("tools.docs_reference")

REPO = Path(__file__).resolve().parents[2]


def test_the_reference_pages_are_what_the_code_generates() -> None:
    assert docs_reference.main(["docs_reference.py", "check"]) == 0, "run `make docs`"


def test_every_field_of_the_crd_is_in_the_reference() -> None:
    page = (REPO / "docs" / "reference" / "autoglmmodel.md").read_text()
    for path in ("spec.source.uri", "spec.targets[].pool", "spec.rollout.analysis", "spec.feedback.retraining",
                 "spec.feedback.retraining.fineTune", "status.revisions.stable"):  # fmt: skip
        assert f"| `{path}`" in page or f"| `{path}." in page, path


def test_every_readme_snippet_the_docs_include_is_marked() -> None:
    readme = (REPO / "README.md").read_text()
    included = set()
    for page in (REPO / "docs").rglob("*.md"):
        included |= set(re.findall(r'--8<-- "README\.md:(\w+)"', page.read_text()))
    assert included
    for name in included:
        assert readme.count(f"[start:{name}]") == 1, name
        assert readme.count(f"[end:{name}]") == 1, name


def test_mkdocs_builds_the_site_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the dev extra)")
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO, capture_output=True,
        text=True, check=False, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    operator = (tmp_path / "site" / "operator" / "index.html").read_text()
    assert "--8&lt;--" not in operator  # the README's section was included, not its marker
    assert "kopf" in operator
