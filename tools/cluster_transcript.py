"""Print what a user sees running AutoGLM's operator in a cluster, for the README.

Starts the emulated cluster of the operator's tests (``tests/support/k8s_emulator.py``: kmock's
Kubernetes emulator on loopback) and the real operator, then runs the real ``kubectl`` and
``autoglm audit query`` as a user would, playing only Argo (the Workflow ends with its outputs) and
the agents (their pods report the served revision). Rerun: ``.venv/bin/python tools/cluster_transcript.py``.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore", DeprecationWarning)
logging.basicConfig(level=logging.ERROR)  # kopf's notices (OS signals in a thread) are not the transcript

from tests.support.k8s_emulator import emulated_cluster  # noqa: E402
from tests.support.operator import RunningOperator, settings_for  # noqa: E402
from tests.support.playing import report, succeed  # noqa: E402

EXAMPLE = "examples/cloud-and-edge.yaml"
NS, NAME = "ml", "glm4-chat"


def wait(check, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _elided(text: str) -> str:
    """``kubectl describe`` without the spec and kopf's annotation (the manifest, as applied)."""
    lines, out, skipping = text.splitlines(), [], False
    for line in lines:
        if line.startswith(("Spec:", "Annotations:")):
            out.append(line.split(":")[0] + ":  ...")
            skipping = True
            continue
        if skipping and line[:1] not in (" ", ""):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        with emulated_cluster(home / "cluster") as cluster:

            def shown(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
                done = cluster.kubectl(*args, stdin=stdin)
                print(f"$ kubectl {shlex.join(args)}")
                print(_elided((done.stdout + done.stderr).rstrip()))
                return done

            def get(*args: str) -> dict:  # type: ignore[type-arg]
                done = cluster.kubectl("get", *args, "-o", "json")
                return json.loads(done.stdout) if done.returncode == 0 else {}

            cluster.kubectl(
                "apply", "-f", "-", stdin=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
            )
            audit = settings_for(home)
            with RunningOperator(cluster, audit):
                shown("apply", "-f", EXAMPLE)
                run = wait(lambda: get("workflows", "-n", NS).get("items"), "the Workflow")[0]
                wait(
                    lambda: get("agm", NAME, "-n", NS).get("status", {}).get("phase") == "Compressing",
                    "Compressing",
                )
                shown("get", "agm", "-n", NS)
                shown("get", "workflows", "-n", NS)
                succeed(cluster, run)  # Argo: the pipeline published every target's variant
                wait(
                    lambda: get("agm", NAME, "-n", NS).get("status", {}).get("phase") == "Serving", "Serving"
                )
                for target in ("cloud", "edge"):
                    config = get("configmap", f"{NAME}-{target}-autoglm", "-n", NS)
                    revision = json.loads(config["data"]["desired.json"])["stable"]["revision"]
                    report(cluster, NS, NAME, target, 0, {"stable": revision, "canary": None, "weight": 0})
                wait(
                    lambda: any(c["type"] == "Ready" and c["status"] == "True"
                                for c in get("agm", NAME, "-n", NS).get("status", {}).get("conditions", [])),
                    "Ready",
                )  # fmt: skip
                shown("get", "agm", "-n", NS)
                shown("get", "inferenceservices,configmaps", "-n", NS, "-l", f"autoglm.io/model={NAME}")
                shown("describe", "agm", NAME, "-n", NS)
            command = ["audit", "--db", audit, "query", "--model", f"{NS}/{NAME}"]
            done = subprocess.run(
                [sys.executable, "-m", "autoglm_operator", *command], capture_output=True, text=True
            )
            print(f"$ autoglm audit --db {audit.replace(folder, '/tmp/demo')} query --model {NS}/{NAME}")
            print((done.stdout + done.stderr).rstrip().replace(folder, "/tmp/demo"))


if __name__ == "__main__":
    main()
