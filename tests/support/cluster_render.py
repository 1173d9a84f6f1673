"""Every object the operator creates for a manifest, as it lies in the (emulated) cluster once the
first run published: the real operator reconciles the manifest applied with ``kubectl``, Argo is
played (the Workflow ends with its outputs), and the objects labelled with the model are read back
with server-set metadata, status and uids taken out. ``make render`` writes them for the examples to
``examples/rendered/*.cluster.yaml``; ``tests/integration/test_operator_render.py`` compares."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from tests.support.k8s_emulator import emulated_cluster
from tests.support.operator import RunningOperator, settings_for
from tests.support.playing import model_of, succeed

#: What the API server sets (or kopf writes): not what the operator creates.
SERVER_SET = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")
RESOURCES = ("workflowtemplates", "workflows", "inferenceservices", "configmaps")


def _cleaned(obj: dict[str, Any]) -> dict[str, Any]:
    obj = {k: v for k, v in obj.items() if k != "status"}
    meta = {k: v for k, v in obj["metadata"].items() if k not in SERVER_SET}
    if meta.get("ownerReferences"):
        meta["ownerReferences"] = [{**o, "uid": "<uid of the AutoGLMModel>"} for o in meta["ownerReferences"]]
    return {**obj, "metadata": meta}


def cluster_objects(manifest: Path, timeout: float = 60) -> list[dict[str, Any]]:
    """The operator's objects for ``manifest``, sorted by kind and name."""
    model = model_of(manifest.read_text())
    namespace, name = model.metadata.namespace or "default", model.metadata.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with tempfile.TemporaryDirectory() as folder, emulated_cluster(Path(folder) / "cluster") as cluster:

            def get(*args: str) -> Any:
                done = cluster.kubectl("get", *args, "-o", "json")
                return json.loads(done.stdout) if done.returncode == 0 else {}

            def wait(check: Any, what: str) -> Any:
                deadline = time.monotonic() + timeout
                while not (value := check()):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{manifest.name}: timed out waiting for {what}")
                    time.sleep(0.2)
                return value

            namespace_doc = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"
            assert cluster.kubectl("apply", "-f", "-", stdin=namespace_doc).returncode == 0
            with RunningOperator(cluster, settings_for(Path(folder))):
                done = cluster.kubectl("apply", "-f", str(manifest))
                assert done.returncode == 0, done.stderr
                run = wait(lambda: get("workflows", "-n", namespace).get("items"), "the Workflow")[0]
                succeed(cluster, run)
                targets = len(model.spec.targets)
                wait(lambda: len(get("configmaps", "-n", namespace, "-l", f"autoglm.io/model={name}").get("items", [])) == targets,
                     "the agents' ConfigMaps")  # fmt: skip
                wait(
                    lambda: get("agm", name, "-n", namespace).get("status", {}).get("phase") == "Serving",
                    "Serving",
                )
                found = []
                for resource in RESOURCES:
                    listed = get(resource, "-n", namespace, "-l", f"autoglm.io/model={name}")
                    found += [_cleaned(item) for item in listed.get("items", [])]
    return sorted(found, key=lambda o: (o["kind"], o["metadata"]["name"]))


def render_yaml(manifest: Path, objects: list[dict[str, Any]] | None = None) -> str:
    """The YAML stream ``make render`` commits (``objects``: as ``cluster_objects`` found them)."""
    header = (
        f"# What `autoglm operator` creates for {manifest.name} once its first run published (Argo played by\n"
        "# tests/support/cluster_render.py); server-set metadata and status left out. Written by `make render`.\n"
    )
    found = cluster_objects(manifest) if objects is None else objects
    return header + yaml.safe_dump_all(found, sort_keys=False, allow_unicode=True)


if __name__ == "__main__":
    import sys

    for path in map(Path, sys.argv[1:]):
        out = path.parent / "rendered" / f"{path.stem}.cluster.yaml"
        out.write_text(render_yaml(path))
        print(f"wrote {out}")
