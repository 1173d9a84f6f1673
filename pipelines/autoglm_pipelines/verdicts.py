"""The gates' verdict in the audit ledger: recorded exactly once per revision and validate inputs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from autoglm_api.resource import AutoGLMModel
from autoglm_core.audit import ACTOR_PIPELINE, AuditRecord, Ledger
from autoglm_core.audit.ledger import LedgerError, resolve_url, safe_url
from autoglm_core.digests import canonical_digest
from autoglm_core.errors import AutoGLMError
from autoglm_core.variants import variant_named
from autoglm_pipelines.dag import step_name
from autoglm_pipelines.gates import verdict_of
from autoglm_pipelines.results import VALIDATE_REPORT, read_result
from autoglm_pipelines.resume import inputs_digest


class VerdictNotRecordedError(AutoGLMError):
    """The gates' verdict could not be written to the audit ledger: the run fails."""

    default_status = 503


def record_verdict(
    model: AutoGLMModel,
    workdir: Path,
    *,
    decode_tokens: int,
    output: Path | None,
    variant: str = "",
    environ: Mapping[str, str] = os.environ,
) -> AuditRecord | None:
    """Append GatePassed or GateFailed, with the gates and figures as evidence, when validate reported.

    Only a report on this spec's inputs counts (one left by an earlier run is not this run's). The
    record is keyed by the revision and validate's inputs, so a re-run that reuses validate finds the
    verdict already recorded instead of recording it again. None when validate has not reported.
    ``variant``: a target precision's variant (its validate-PRECISION step and its own revision).
    """
    step = step_name("validate", variant)
    done = read_result(workdir / step)
    current = inputs_digest(model, step, workdir, decode_tokens=decode_tokens, output=output)
    if done is None or done.inputs_digest != current:
        return None
    report_file = workdir / step / VALIDATE_REPORT
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        return None  # the pipeline stopped before validate wrote its report: no verdict
    verdict = verdict_of(report)
    namespace, name = model.metadata.namespace or "default", model.metadata.name or ""
    revision = variant_named(model.spec, variant).revision
    key = f"verdict:{revision}:{canonical_digest([namespace, name, revision, current])}"
    url = resolve_url(None, environ)
    try:
        with Ledger(url) as ledger:
            return ledger.append(
                namespace,
                name,
                verdict.decision,
                verdict.reason,
                revision=revision,
                actor=ACTOR_PIPELINE,
                evidence={**verdict.evidence, "report": str(report_file)},
                idempotency_key=key,
            )
    except (LedgerError, ValueError) as exc:
        raise VerdictNotRecordedError(
            f"the gates' verdict was not recorded in the audit ledger ({safe_url(url)}): {exc}; "
            "fix the ledger and run again (finished steps are reused)"
        ) from exc
