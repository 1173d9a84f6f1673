"""What a user does today, through the installed ``autoglm`` script in real subprocesses.

validate the examples -> render the CRD -> record decisions -> query them -> verify -> tamper -> verify.
The closed loop (`autoglm run`) is not built yet; this covers what is.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

AUTOGLM = str(Path(sys.executable).parent / "autoglm")


def autoglm(*args: str, db: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOGLM_AUDIT_URL": f"sqlite:///{db}"}
    return subprocess.run([AUTOGLM, *args], capture_output=True, text=True, env=env, check=check, timeout=120)


def test_validate_render_record_query_verify_and_catch_tampering(repo_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    examples = sorted(str(p) for p in (repo_root / "examples").glob("*.yaml"))
    assert "is valid" in autoglm("validate", *examples, db=db).stdout

    crd = tmp_path / "crd.yaml"
    autoglm("crds", "-o", str(crd), db=db)
    assert crd.read_text() == (repo_root / "crds" / "autoglm.io_autoglmmodels.yaml").read_text()

    decisions = [
        ("PipelineStarted", "pipeline", "{}"),
        ("GatePassed", "pipeline", '{"qualityLoss": 0.004, "threshold": 0.02}'),
        ("Promoted", "operator", '{"canaryWeight": 100}'),
    ]
    for kind, actor, evidence in decisions:
        autoglm("audit", "append", "--model", "ml/support-glm", "--decision", kind, "--actor", actor,
                "--revision", "r1", "--reason", f"{kind} in the e2e flow", "--evidence", evidence, db=db)  # fmt: skip
    autoglm("audit", "append", "--model", "ml/other", "--decision", "GateFailed", "--actor", "pipeline",
            "--reason", "size reduction 1.4 < 2.0", db=db)  # fmt: skip

    listed = json.loads(autoglm("audit", "query", "--model", "ml/support-glm", "-o", "json", db=db).stdout)
    assert [r["decision"] for r in listed] == ["PipelineStarted", "GatePassed", "Promoted"]
    gates = json.loads(
        autoglm("audit", "query", "--decision", "GatePassed", "--since", "1h", "-o", "json", db=db).stdout
    )
    assert [r["evidence"]["threshold"] for r in gates] == [0.02]

    ok = autoglm("audit", "verify", db=db)
    assert "intact" in ok.stdout

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_records SET reason = 'nothing to see' WHERE seq = 2")
    bad = autoglm("audit", "verify", db=db, check=False)
    assert bad.returncode == 1
    assert "seq 2" in bad.stdout + bad.stderr
