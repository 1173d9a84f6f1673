"""The kopf operator against the emulated cluster, driven with the real ``kubectl``.

``kubectl apply`` of the cloud-and-edge example → the operator submits a Workflow from the model's
WorkflowTemplate → the test plays Argo (marks it Succeeded with the outputs the template exports) →
an InferenceService and an agents' ConfigMap per target → the test plays the agents (their reports
on the target's pods) → ``kubectl get agm`` and the ledger show the rollout; manual intents as
annotations; a failed gate; ``kubectl delete`` cleans up through the finalizer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_core.variants import rollout_revision, target_revisions, variants
from tests.conftest import EXAMPLES
from tests.support import playing
from tests.support.k8s_emulator import EmulatedCluster, emulated_cluster_with, kubectl_binary, namespace
from tests.support.operator import RunningOperator, settings_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kubectl_binary() is None, reason="kubectl is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

EXAMPLE = EXAMPLES / "cloud-and-edge.yaml"
NS, NAME = "ml", "glm4-chat"
T = TypeVar("T")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    with emulated_cluster_with(tmp_path, namespace(NS)) as running:
        yield running


@pytest.fixture
def operator(cluster: EmulatedCluster, tmp_path: Path) -> Iterator[RunningOperator]:
    with RunningOperator(cluster, settings_for(tmp_path)) as running:
        yield running


def eventually(check: Callable[[], T | None], what: str, timeout: float = 30) -> T:
    """``check()``'s first truthy value; fails naming ``what`` when none comes in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def kubectl_json(cluster: EmulatedCluster, *args: str) -> Any:
    done = cluster.kubectl("get", *args, "-o", "json")
    if done.returncode != 0:
        return None
    return json.loads(done.stdout)


def items(
    cluster: EmulatedCluster, resource: str, selector: str = f"autoglm.io/model={NAME}"
) -> list[dict[str, Any]]:
    found = kubectl_json(cluster, resource, "-n", NS, "-l", selector)
    return list(found["items"]) if found else []


def model_status(cluster: EmulatedCluster) -> dict[str, Any]:
    found = kubectl_json(cluster, "agm", NAME, "-n", NS)
    return (found or {}).get("status") or {}


def apply(cluster: EmulatedCluster, manifest: dict[str, Any] | Path) -> None:
    text = manifest.read_text() if isinstance(manifest, Path) else yaml.safe_dump(manifest)
    done = cluster.kubectl("apply", "-f", "-", stdin=text)
    assert done.returncode == 0, done.stderr


def succeed(cluster: EmulatedCluster, run: dict[str, Any], *, gates: bool = True) -> None:
    playing.succeed(cluster, run, gates=gates)


def report(cluster: EmulatedCluster, target: str, replica: int, served: dict[str, Any]) -> None:
    playing.report(cluster, NS, NAME, target, replica, served)


def follow(cluster: EmulatedCluster) -> None:
    """Play the agents of both targets: each serves what its ConfigMap says."""
    for target in ("cloud", "edge"):
        wanted = desired(cluster, target)
        assert wanted is not None
        candidate = wanted["candidate"] or {}
        served = {"stable": wanted["stable"]["revision"], "canary": candidate.get("revision"),
                  "weight": candidate.get("weight", 0)}  # fmt: skip
        report(cluster, target, 0, served)


def decisions(audit_url: str) -> list[tuple[str, str | None, str]]:
    with Ledger(audit_url) as ledger:
        return [(r.decision, r.revision, r.actor) for r in ledger.query(namespace=NS, model=NAME)]


def desired(cluster: EmulatedCluster, target: str) -> dict[str, Any] | None:
    found = kubectl_json(cluster, "configmap", f"{NAME}-{target}-autoglm", "-n", NS)
    return json.loads(found["data"]["desired.json"]) if found else None


def test_apply_builds_serves_and_delete_cleans_up(
    cluster: EmulatedCluster, operator: RunningOperator, tmp_path: Path
) -> None:
    apply(cluster, EXAMPLE)
    model = load_manifest(str(EXAMPLE))
    revision = rollout_revision(model.spec)
    runs = eventually(lambda: items(cluster, "workflows"), "the pipeline's Workflow")
    assert len(runs) == 1
    run = runs[0]
    assert run["metadata"]["name"] == f"autoglm-{NAME}-{revision}-1"
    assert run["spec"]["workflowTemplateRef"] == {"name": f"autoglm-{NAME}"}
    assert run["metadata"]["ownerReferences"][0]["kind"] == "AutoGLMModel"
    assert kubectl_json(cluster, "workflowtemplate", f"autoglm-{NAME}", "-n", NS) is not None
    status = eventually(
        lambda: model_status(cluster).get("phase") == "Compressing" and model_status(cluster), "Compressing"
    )
    assert status["revisions"]["candidate"] == revision
    assert status["observedGeneration"] == 1

    succeed(cluster, run)
    isvcs = eventually(
        lambda: len(items(cluster, "inferenceservices")) == 2 and items(cluster, "inferenceservices"),
        "two InferenceServices",
    )
    by_target = {i["metadata"]["labels"]["autoglm.io/target"]: i for i in isvcs}
    edge = by_target["edge"]
    assert edge["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert edge["spec"]["predictor"]["model"]["runtime"] == "autoglm-server-edge"
    cloud = by_target["cloud"]["spec"]["predictor"]
    assert cloud["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    revisions = {v.targets[0]: v.revision for v in variants(model.spec)}
    for target in ("cloud", "edge"):
        wanted = desired(cluster, target)
        assert wanted is not None
        assert wanted["stable"]["revision"] in revisions.values()
        assert wanted["stable"]["uri"].startswith("s3://autoglm-artifacts/ml/")
        assert wanted["candidate"] is None
    # Promoted on its offline gates (the run published no baseline); served once agents report it.
    assert eventually(lambda: model_status(cluster).get("phase") == "Serving", "Serving")
    assert model_status(cluster)["revisions"]["stable"] == revision
    for target in ("cloud", "edge"):
        report(
            cluster,
            target,
            0,
            {"stable": desired(cluster, target)["stable"]["revision"], "canary": None, "weight": 0},
        )
    ready = eventually(
        lambda: next(
            (
                c
                for c in model_status(cluster).get("conditions", [])
                if c["type"] == "Ready" and c["status"] == "True"
            ),
            None,
        ),
        "Ready",
    )
    assert ready["reason"] == "Serving"

    table = cluster.kubectl("get", "agm", "-n", NS)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "STABLE", "CANDIDATE"]
    assert row.split()[:3] == [NAME, "Serving", revision]
    kinds = [d[0] for d in decisions(operator.audit_url)]
    assert kinds == ["PipelineStarted", "Promoted"]

    events = kubectl_json(cluster, "events", "-n", NS)
    reasons = [e["reason"] for e in events["items"] if e["involvedObject"]["name"] == NAME]
    assert "PipelineStarted" in reasons
    assert "Promoted" in reasons

    done = cluster.kubectl("delete", "agm", NAME, "-n", NS, "--timeout=30s")
    assert done.returncode == 0, done.stderr
    for resource in ("inferenceservices", "configmaps", "workflows", "workflowtemplates"):
        assert items(cluster, resource) == [], resource
    assert kubectl_json(cluster, "agm", NAME, "-n", NS) is None


def _edited(**compression: Any) -> dict[str, Any]:
    """The example with another compression: a new revision of every target."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["compression"]["quantization"].update(compression)
    return manifest


def _serving(cluster: EmulatedCluster, audit_url: str) -> str:
    """Apply the example, play Argo and the agents until it serves; its revision."""
    apply(cluster, EXAMPLE)
    run = eventually(lambda: items(cluster, "workflows"), "the first Workflow")[0]
    succeed(cluster, run)
    eventually(lambda: model_status(cluster).get("phase") == "Serving", "Serving")
    for target in ("cloud", "edge"):
        stable = eventually(lambda t=target: desired(cluster, t), f"{target}'s ConfigMap")["stable"][
            "revision"
        ]
        report(cluster, target, 0, {"stable": stable, "canary": None, "weight": 0})
    return str(model_status(cluster)["revisions"]["stable"])


def _annotate(cluster: EmulatedCluster, intent: str) -> None:
    done = cluster.kubectl("annotate", "agm", NAME, "-n", NS, intent)
    assert done.returncode == 0, done.stderr


def _in_canary(cluster: EmulatedCluster, manifest: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """Apply ``manifest``, play Argo; the canary starts on each target whose variant changes (the
    int4 edge target's; the bf16 cloud target keeps its revision): (revision, target → its variant)."""
    before = {t: (desired(cluster, t) or {})["stable"]["revision"] for t in ("cloud", "edge")}
    apply(cluster, manifest)
    spec = playing.model_of(manifest).spec
    revision = rollout_revision(spec)
    changing = [t for t, r in target_revisions(spec).items() if r != before[t]]
    assert changing == ["edge"]
    run = eventually(
        lambda: [
            r
            for r in items(cluster, "workflows")
            if r["metadata"]["labels"]["autoglm.io/revision"] == revision
        ],
        "the new revision's Workflow",
    )[0]
    succeed(cluster, run)
    eventually(lambda: model_status(cluster).get("phase") == "RollingOut", "RollingOut")
    wanted = {}
    assert desired(cluster, "cloud")["candidate"] is None
    for target in changing:
        state = eventually(
            lambda t=target: (desired(cluster, t) or {}).get("candidate"), f"{target}'s candidate"
        )
        assert state["weight"] == 10  # the first canary step of the example
        wanted[target] = state["revision"]
    return revision, wanted


def test_intents_promote_and_abort_a_canary_and_a_failed_gate_is_held(
    cluster: EmulatedCluster, operator: RunningOperator
) -> None:
    stable = _serving(cluster, operator.audit_url)
    # A canary; without Prometheus its analysis is Inconclusive and the weight holds until a person decides.
    first, variants_of = _in_canary(cluster, _edited(groupSize=64))
    assert model_status(cluster)["revisions"] == {"stable": stable, "candidate": first}
    for target, revision in variants_of.items():  # every replica loads the candidate
        report(
            cluster,
            target,
            0,
            {"stable": desired(cluster, target)["stable"]["revision"], "canary": revision, "weight": 10},
        )
    _annotate(cluster, "autoglm.io/promote=alice")
    eventually(lambda: model_status(cluster).get("revisions", {}).get("stable") == first, "the promotion")
    for target, revision in variants_of.items():
        assert desired(cluster, target)["stable"]["revision"] == revision
        assert desired(cluster, target)["candidate"] is None
    annotations = kubectl_json(cluster, "agm", NAME, "-n", NS)["metadata"].get("annotations", {})
    assert "autoglm.io/promote" not in annotations  # handled, then removed
    records = decisions(operator.audit_url)
    assert ("ManualOverride", first, "user:alice") in records
    assert ("Promoted", first, "user:alice") in records
    follow(cluster)  # the agents promote where it is warm

    second, _ = _in_canary(cluster, _edited(groupSize=32))
    _annotate(cluster, "autoglm.io/abort=bob")
    eventually(lambda: model_status(cluster).get("revisions", {}).get("rejected") == second, "the rollback")
    status = model_status(cluster)
    assert status["revisions"]["stable"] == first
    assert status["phase"] == "Serving"
    for target in ("cloud", "edge"):
        assert desired(cluster, target)["candidate"] is None
    assert ("RolledBack", second, "user:bob") in decisions(operator.audit_url)

    # A failed gate: the revision is rejected, stable keeps serving, the condition says why.
    third = _edited(groupSize=256)
    apply(cluster, third)
    revision = rollout_revision(playing.model_of(third).spec)
    run = eventually(
        lambda: [
            r
            for r in items(cluster, "workflows")
            if r["metadata"]["labels"]["autoglm.io/revision"] == revision
        ],
        "the third Workflow",
    )[0]
    succeed(cluster, run, gates=False)
    eventually(
        lambda: model_status(cluster).get("revisions", {}).get("rejected") == revision, "the rejection"
    )
    validated = next(c for c in model_status(cluster)["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "GatesFailed")
    assert model_status(cluster)["revisions"]["stable"] == first
    table = cluster.kubectl("describe", "agm", NAME, "-n", NS)
    assert table.returncode == 0, table.stderr
    assert "RolledBack" in table.stdout
    assert "Validated" in table.stdout


def test_a_restarted_operator_submits_nothing_twice_and_records_nothing_twice(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    audit = settings_for(tmp_path)
    with RunningOperator(cluster, audit):
        apply(cluster, EXAMPLE)
        run = eventually(lambda: items(cluster, "workflows"), "the Workflow")[0]
        eventually(lambda: model_status(cluster).get("phase") == "Compressing", "Compressing")
    with RunningOperator(cluster, audit):  # resumes: the same run, no second Workflow
        time.sleep(2)
        assert [r["metadata"]["name"] for r in items(cluster, "workflows")] == [run["metadata"]["name"]]
        succeed(cluster, run)
        eventually(lambda: model_status(cluster).get("phase") == "Serving", "Serving")
    with RunningOperator(cluster, audit):
        time.sleep(2)
    assert [d[0] for d in decisions(audit)] == ["PipelineStarted", "Promoted"]
    assert len(items(cluster, "workflows")) == 1
    assert len(items(cluster, "inferenceservices")) == 2


def test_two_replicas_only_the_higher_priority_acts(cluster: EmulatedCluster, tmp_path: Path) -> None:
    from autoglm_operator.kube.operator import PeeringOptions

    apply(
        cluster, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "autoglm"}}
    )
    audit = settings_for(tmp_path)
    low = RunningOperator(cluster, audit, peering=PeeringOptions(priority=10))
    high = RunningOperator(cluster, audit, peering=PeeringOptions(priority=20))
    with low, high:
        # kopf's peering is announced, not locked: the lower replica pauses once it sees the higher
        # one (before that, the reconcile's idempotence is what keeps two acting replicas harmless).
        eventually(
            lambda: (
                len(
                    (kubectl_json(cluster, "clusterkopfpeerings.kopf.dev", "autoglm") or {}).get("status")
                    or {}
                )
                == 2
            ),
            "both replicas in the peering object",
        )
        time.sleep(1)  # the lower one reads it and pauses
        apply(cluster, EXAMPLE)
        run = eventually(lambda: items(cluster, "workflows"), "the Workflow")[0]
        succeed(cluster, run)
        eventually(lambda: model_status(cluster).get("phase") == "Serving", "Serving")
        time.sleep(2)
        peering = kubectl_json(cluster, "clusterkopfpeerings.kopf.dev", "autoglm")
        priorities = sorted(p["priority"] for p in peering["status"].values())
        assert priorities == [10, 20]  # both replicas announce themselves; the lower one waits
    writes = {c for c in low.gateway.calls if c[0] in ("create", "patch", "delete")}
    assert writes == set(), f"the paused replica wrote: {writes}"
    assert any(c[0] == "create" for c in high.gateway.calls)
    assert [d[0] for d in decisions(audit)] == ["PipelineStarted", "Promoted"]


def test_an_operator_restarted_mid_canary_resumes_the_same_step(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    audit = settings_for(tmp_path)
    with RunningOperator(cluster, audit) as running:
        _serving(cluster, running.audit_url)
        revision, variants_of = _in_canary(cluster, _edited(groupSize=64))
        before = model_status(cluster)
    assert before["canary"]["step"] == 0
    with RunningOperator(cluster, audit):
        time.sleep(2)  # resumed: every model reconciled again, several times
        after = model_status(cluster)
        assert after["canary"] == before["canary"]  # the same step, since the same moment
        assert after["revisions"] == before["revisions"]
        for target, variant in variants_of.items():
            assert desired(cluster, target)["candidate"]["revision"] == variant
        _annotate(cluster, "autoglm.io/promote=carol")
        eventually(
            lambda: model_status(cluster).get("revisions", {}).get("stable") == revision, "the promotion"
        )
    kinds = [d[0] for d in decisions(audit)]
    assert kinds == [
        "PipelineStarted",
        "Promoted",
        "PipelineStarted",
        "CanaryStarted",
        "ManualOverride",
        "Promoted",
    ]
    assert len(items(cluster, "workflows")) == 2


def test_a_first_rollout_serves_the_source_then_canaries_against_it(
    cluster: EmulatedCluster, operator: RunningOperator
) -> None:
    """The run published the uncompressed source too: it serves first on every target (the canary's
    baseline), the candidate is canaried against it once every replica serves it, and an abort leaves
    the source serving."""
    apply(cluster, EXAMPLE)
    run = eventually(lambda: items(cluster, "workflows"), "the Workflow")[0]
    assert run["metadata"]["annotations"]["autoglm.io/baseline"] == "true"
    playing.succeed(cluster, run, baseline=True)
    source = eventually(lambda: model_status(cluster).get("revisions", {}).get("baseline"), "the baseline")
    for target in ("cloud", "edge"):
        wanted = eventually(lambda t=target: desired(cluster, t), f"{target}'s ConfigMap")
        assert wanted["stable"]["revision"] == source
        assert wanted["stable"]["uri"].endswith("/baseline")  # beside the first variant the run published
        assert wanted["candidate"] is None  # nothing canaried before the source is served
    for target in ("cloud", "edge"):
        report(cluster, target, 0, {"stable": source, "canary": None, "weight": 0})
    candidates = {
        t: eventually(lambda t=t: (desired(cluster, t) or {}).get("candidate"), f"{t}'s candidate")[
            "revision"
        ]
        for t in ("cloud", "edge")
    }
    assert set(candidates.values()) == set(target_revisions(load_manifest(str(EXAMPLE)).spec).values())
    status = model_status(cluster)
    assert (status["phase"], status["revisions"]["stable"], status["canary"]["weight"]) == (
        "RollingOut",
        source,
        10,
    )
    _annotate(cluster, "autoglm.io/abort=dave")
    eventually(lambda: model_status(cluster).get("revisions", {}).get("rejected"), "the rollback")
    assert all(desired(cluster, t)["candidate"] is None for t in ("cloud", "edge"))
    kinds = [d[0] for d in decisions(operator.audit_url)]
    assert kinds == ["PipelineStarted", "BaselineServed", "CanaryStarted", "ManualOverride", "RolledBack"]
    rolled_back = next(
        e for e in kubectl_json(cluster, "events", "-n", NS)["items"] if e["reason"] == "RolledBack"
    )
    assert "the uncompressed source" in rolled_back["message"]
    assert rolled_back["type"] == "Warning"


def test_the_prompt_policy_goes_to_every_targets_configmap_the_status_and_the_ledger(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    """With a feedback store, the operator runs the prompt policy on its Feast features and publishes
    it in each target's ConfigMap (``prompt-variants.yaml``, which the servers read), the status and
    the ledger. The document is read back with the server's own parser."""
    from autoglm_core.feedback.records import RequestRecord, parse_feedback
    from autoglm_core.feedback.store import FeedbackStore
    from autoglm_inference.prompts import Variants

    feedback_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    options = {"feedback_url": feedback_url, "feast_dir": tmp_path / "feast"}
    with RunningOperator(cluster, settings_for(tmp_path), options=options) as running:
        stable = _serving(cluster, running.audit_url)

        def shares(target: str) -> dict[str, float]:
            found = kubectl_json(cluster, "configmap", f"{NAME}-{target}-autoglm", "-n", NS)
            return Variants.parse(yaml.safe_load(found["data"]["prompt-variants.yaml"]), target).weights

        assert shares("cloud") == shares("edge") == {"concise": 0.5, "detailed": 0.5}
        # The servers' users: concise answers rated well, detailed ones poorly.
        store = FeedbackStore(feedback_url)
        now = time.time()
        store.add_requests([
            RequestRecord(f"q{i}", now + i * 1e-3, NAME, stable, ("concise", "detailed")[i % 2], "cloud", 0.3, 10, 12,
                          0.5, "cpu-time-model", "ok")
            for i in range(80)
        ])  # fmt: skip
        store.accept(parse_feedback({"feedback": [
            {"request_id": f"q{i}", "score": "up" if i % 2 == 0 else "down"} for i in range(80)
        ]}))  # fmt: skip
        moved = eventually(
            lambda: shares("cloud")["concise"] > 0.5 and shares("edge"), "the policy in the ConfigMaps"
        )
        assert moved["concise"] == pytest.approx(0.75)  # one step of at most 25% of traffic
        policy = model_status(cluster)["promptPolicy"]
        assert policy["revision"] == stable
        assert policy["shares"] == {"concise": 0.75, "detailed": 0.25}
        assert policy["feedback"] == 80
        changed = [d for d in decisions(running.audit_url) if d[0] == "PromptPolicyChanged"]
        assert changed[0][1] == stable
        assert desired(cluster, "cloud")["stable"]["revision"]  # the agents' document is untouched


def test_a_low_feedback_score_triggers_a_retraining_workflow_that_fine_tunes_on_a_mounted_dataset(
    cluster: EmulatedCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's ``feedback.retraining`` (score below 0.5 over 200 events): the operator exports
    the rated requests to the PVC it was given, records ``RetrainingTriggered``, and submits the
    retraining revision's Workflow: the manifest it runs fine-tunes on that file (by its SHA-256),
    and every step mounts the claim where ``pvc://`` resolves. The user's spec is not written."""
    from autoglm_core.feedback.records import RequestRecord, parse_feedback
    from autoglm_core.feedback.store import FeedbackStore

    monkeypatch.setenv("AUTOGLM_PVC_ROOT", str(tmp_path / "pvc"))
    feedback_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    options = {"feedback_url": feedback_url, "feast_dir": tmp_path / "feast",
               "retraining_datasets": "pvc://feedback-data/retraining"}  # fmt: skip
    with RunningOperator(cluster, settings_for(tmp_path), options=options) as running:
        stable = _serving(cluster, running.audit_url)
        generation = kubectl_json(cluster, "agm", NAME, "-n", NS)["metadata"]["generation"]
        store = FeedbackStore(feedback_url)
        now = time.time()
        chat = json.dumps([{"role": "user", "content": "What is Hamlet about?"}])
        store.add_requests([
            RequestRecord(f"q{i}", now + i * 1e-3, NAME, stable, "concise", "cloud", 0.3, 10, 12, 0.5,
                          "cpu-time-model", "ok", prompt=chat, output=f"Revenge ({i}).")
            for i in range(220)
        ])  # fmt: skip
        store.accept(parse_feedback({"feedback": [
            {"request_id": f"q{i}", "score": "up" if i % 3 == 0 else "down"} for i in range(220)
        ]}))  # fmt: skip
        retraining = eventually(
            lambda: (model_status(cluster).get("retraining") or {}).get("candidate"), "a retraining candidate"
        )
        dataset = retraining["dataset"]
        assert dataset.startswith("pvc://feedback-data/retraining/retrain-")
        written = tmp_path / "pvc" / dataset.removeprefix("pvc://")
        assert hashlib.sha256(written.read_bytes()).hexdigest() == retraining["sha256"]
        examples = [json.loads(line) for line in written.read_text().splitlines()]
        assert len(examples) == 74  # the thumbs-up answers; the thumbs-down ones are left out
        assert all(e["messages"][-1]["content"].startswith("Revenge") for e in examples)

        def retraining_run() -> dict[str, Any] | None:
            runs = [
                r
                for r in items(cluster, "workflows")
                if r["metadata"]["labels"]["autoglm.io/revision"] != stable
            ]
            return runs[0] if runs else None

        run = eventually(retraining_run, "the retraining revision's Workflow")
        revision = run["metadata"]["labels"]["autoglm.io/revision"]
        params = {p["name"]: p["value"] for p in run["spec"]["arguments"]["parameters"]}
        spec = yaml.safe_load(params["manifest"])["spec"]
        assert spec["training"]["dataset"] == dataset
        assert spec["training"]["sha256"] == retraining["sha256"]
        # judged on the held-out feedback against what the first target serves
        assert spec["training"]["against"] == desired(cluster, "cloud")["stable"]["uri"]
        assert revision == rollout_revision(playing.model_of(yaml.safe_load(params["manifest"])).spec)
        (template,) = items(cluster, "workflowtemplates")
        steps = {t["name"]: t for t in template["spec"]["templates"] if "container" in t}
        assert "finetune" in steps  # the template follows the revision it runs
        for step in steps.values():
            assert {
                "name": "pvc-feedback-data",
                "mountPath": "/mnt/pvc/feedback-data",
                "readOnly": True,
            } in step["container"]["volumeMounts"]
        triggered = [d for d in decisions(running.audit_url) if d[0] == "RetrainingTriggered"]
        assert triggered == [("RetrainingTriggered", stable, "operator")]
        # the spec a GitOps tool syncs is untouched
        current = kubectl_json(cluster, "agm", NAME, "-n", NS)
        assert "training" not in current["spec"]
        assert current["metadata"]["generation"] == generation


def test_with_propose_prompts_the_served_model_proposes_a_prompt_that_joins_the_arms(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    """``autoglm operator --propose-prompts``: once every arm has its ratings, the operator asks the
    first target's InferenceService, at the address KServe reports (here a real ``autoglm serve``
    on a tiny GLM, serving under the InferenceService's name), for a better system prompt; the
    answer joins the bandit as a new arm in the status, the targets' ConfigMaps (read back with the
    server's own parser) and the ledger (``PromptProposed`` with the meta-prompt it was asked)."""
    from autoglm_core.feedback.records import RequestRecord, parse_feedback
    from autoglm_core.feedback.store import FeedbackStore
    from autoglm_inference.process import ServerProcess
    from autoglm_inference.prompts import Variants
    from tests.support.tiny_models import tiny_glm, with_model_card

    feedback_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    options = {"feedback_url": feedback_url, "feast_dir": tmp_path / "feast", "propose_prompts": True}
    served_as = f"{NAME}-cloud"  # the InferenceService's name: the runtime's --model-name={{.Name}}
    artifact = tiny_glm(tmp_path / "tiny", init_std=0.3, seed=3)
    with_model_card(artifact, "rev-a")
    server = ServerProcess(served_as, str(artifact), log=tmp_path / "server.log").wait_ready()
    try:
        with RunningOperator(cluster, settings_for(tmp_path), options=options) as running:
            stable = _serving(cluster, running.audit_url)
            patched = cluster.kubectl(
                "patch", "inferenceservice", served_as, "-n", NS, "--type", "merge",
                "-p", json.dumps({"status": {"address": {"url": server.url}}}),
            )  # fmt: skip
            assert patched.returncode == 0, patched.stderr
            store = FeedbackStore(feedback_url)
            now = time.time()
            store.add_requests([
                RequestRecord(f"q{i}", now + i * 1e-3, NAME, stable, ("concise", "detailed")[i % 2], "cloud", 0.3,
                              10, 12, 0.5, "cpu-time-model", "ok")
                for i in range(60)
            ])  # fmt: skip
            store.accept(parse_feedback({"feedback": [
                {"request_id": f"q{i}", "score": "up" if i % 2 == 0 else "down"} for i in range(60)
            ]}))  # fmt: skip
            proposals = eventually(
                lambda: (model_status(cluster).get("promptPolicy") or {}).get("proposals"),
                "a proposal in the status",
                timeout=90,
            )
            assert len(proposals) == 1
            proposal = proposals[0]
            assert proposal["name"].startswith("opro-")

            def published(target: str) -> dict[str, str] | None:
                found = kubectl_json(cluster, "configmap", f"{NAME}-{target}-autoglm", "-n", NS)
                texts = Variants.parse(yaml.safe_load(found["data"]["prompt-variants.yaml"]), target).texts
                return texts if proposal["name"] in texts else None

            for target in ("cloud", "edge"):
                assert (
                    eventually(lambda t=target: published(t), f"the proposal in {target}'s ConfigMap")[
                        proposal["name"]
                    ]
                    == proposal["system"]
                )
            with Ledger(running.audit_url) as ledger:
                (record,) = [
                    r for r in ledger.query(namespace=NS, model=NAME) if r.decision == "PromptProposed"
                ]
            assert record.revision == stable
            assert record.evidence["text"] == proposal["system"]
            assert (
                "Prompt: Answer in one short sentence.\nRating: 1.00 (30 ratings)"
                in record.evidence["metaPrompt"]
            )
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        asked = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("autoglm_request_duration_seconds_count") and served_as in line
        ]
        assert sum(asked) >= 1, "the served model was not asked"
    finally:
        server.stop()
