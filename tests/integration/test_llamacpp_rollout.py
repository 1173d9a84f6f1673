"""`autoglm run` with llama.cpp: a CPU target's GGUF variant is canaried against the torch-served
source and promoted; the server serves it on llama.cpp and answers what llama.cpp's own ``Llama``
generates from the published file; a torch edit (``engine: torch``) canaried against the llama.cpp
stable is rolled back when it is slower, and the GGUF stable keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from autoglm_api.validation import load_manifest
from autoglm_core.audit import Ledger
from autoglm_core.revision import artifact_revision
from autoglm_core.variants import rollout_revision, target_revisions
from autoglm_operator.embedded import EmbeddedLoop, LoopOptions
from tests.integration.test_embedded_loop import ROLLOUT as FAST_ROLLOUT
from tests.integration.test_embedded_loop import slow_source
from tests.support.llamacpp import needs_llama_cpp
from tests.support.loop import isolated_loop_env
from tests.support.tiny_models import tiny_llama
from tests.unit.test_pipeline_steps import manifest

#: The fast canary, judged on at least 8 requests a side. At 3 a side a candidate three times slower
#: than stable reads p = 0.023 at best (the judge's Mann-Whitney test, complete separation), above
#: the alpha of every look after the first (0.0083, 0.0042, ...): a slower edit was promoted for want
#: of power (once in a full run, on a loaded machine). At 8 a side it reads p = 7e-5.
ROLLOUT = {**FAST_ROLLOUT, "analysis": {**FAST_ROLLOUT["analysis"], "minRequests": 8}}

pytestmark = [pytest.mark.integration, needs_llama_cpp]

PROMPT = "Something is rotten in the state of"


def llama_cpp_greedy(gguf: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from llama-cpp-python's own ``Llama`` class (top-k 1), not our engine."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False, flash_attn=True)
    try:
        out = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


def test_a_cpu_target_rolls_out_on_llama_cpp_and_a_slower_torch_edit_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = isolated_loop_env(tmp_path, monkeypatch)
    source = tiny_llama(tmp_path / "llama", seed=3)
    path = manifest(tmp_path, source, rollout=ROLLOUT)
    _, faults_file = slow_source(tmp_path, monkeypatch, path)
    faults = Path(faults_file)
    options = LoopOptions(
        state_dir=tmp_path / "state", traffic_rate=6, tick_seconds=0.5, timeout_seconds=400, audit_url=audit,
        pipeline_args=("--decode-tokens", "4"), server_args=("--test-faults", str(faults)), log=lambda _l: None,
    )  # fmt: skip
    loop = EmbeddedLoop(path, options)
    try:
        first = loop.run()
        stable = artifact_revision(load_manifest(str(path)).spec)
        assert (first.phase, first.revisions.stable) == ("Serving", stable)
        server = loop.servers["local"]
        (entry,) = httpx.get(f"{server.url}/v2/repository/index", timeout=10).json()
        assert (entry["stable"]["revision"], entry["stable"]["engine"]) == (stable, "llama.cpp")
        published = Path(loop.pipelines.artifact(stable) or "")
        card = json.loads((published / "model-card.json").read_text())
        assert (card["engine"], card["format"]) == ("llama.cpp", "gguf (Q8_0)")

        # what a client gets is what llama.cpp itself generates from the published file
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(published)(PROMPT).input_ids
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        answer = httpx.post(f"{server.url}/openai/v1/completions", json=body, timeout=60).json()
        expected = llama_cpp_greedy(published / "model.gguf", ids, 12)
        tokenizer = AutoTokenizer.from_pretrained(published)
        assert answer["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)

        # an edit to torch: a new revision, canaried against the llama.cpp stable, made slower
        path = manifest(tmp_path, source, rollout=ROLLOUT, targets=[{"name": "local", "engine": "torch"}])
        edited = target_revisions(load_manifest(str(path)).spec)["local"]
        assert edited != stable
        slowed = json.loads(faults.read_text())
        slowed["revisions"][edited] = {"latencyFactor": 3.0}
        faults.write_text(json.dumps(slowed))
        second = loop.run()
        assert second.revisions.stable == stable
        assert second.revisions.rejected == rollout_revision(load_manifest(str(path)).spec)
        assert second.targets[0].revision == stable
        (entry,) = httpx.get(f"{server.url}/v2/repository/index", timeout=10).json()
        assert (entry["stable"]["revision"], entry["stable"]["engine"], entry.get("canary")) == (
            stable, "llama.cpp", None,
        )  # fmt: skip
    finally:
        loop.close()
    with Ledger(audit) as ledger:
        records = list(ledger.query(namespace="ml", model="tiny", limit=100))
    assert records[-1].decision == "RolledBack"
    assert "latencyVsStable" in records[-1].reason
    promoted = next(r for r in records if r.decision == "Promoted")
    assert (promoted.revision, promoted.evidence["against"]) == (stable, "baseline")
