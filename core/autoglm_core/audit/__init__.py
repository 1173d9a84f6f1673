"""The tamper-evident audit ledger: every decision the platform takes, hash-chained in SQL.

``records`` holds the pure record model, hashing and chain verification; ``ledger`` is the only
code that reads or writes the audit tables.
"""

from __future__ import annotations

from autoglm_core.audit.ledger import (
    DEFAULT_URL,
    URL_ENV,
    Ledger,
    LedgerConflictError,
    LedgerCorruptError,
    LedgerError,
    LedgerUnavailableError,
    resolve_url,
)
from autoglm_core.audit.records import (
    ACTOR_OPERATOR,
    ACTOR_PIPELINE,
    CANARY_ADVANCED,
    GATE_FAILED,
    GATE_PASSED,
    GENESIS_HASH,
    KNOWN_DECISIONS,
    MANUAL_OVERRIDE,
    PIPELINE_STARTED,
    PROMOTED,
    PROMPT_POLICY_CHANGED,
    RETRAINING_TRIGGERED,
    ROLLED_BACK,
    AuditRecord,
    ChainHead,
    JsonObject,
    JsonValue,
    VerifyResult,
    compute_hash,
    verify_chain,
)
from autoglm_core.digests import canonical_json

__all__ = [
    "ACTOR_OPERATOR",
    "ACTOR_PIPELINE",
    "CANARY_ADVANCED",
    "DEFAULT_URL",
    "GATE_FAILED",
    "GATE_PASSED",
    "GENESIS_HASH",
    "KNOWN_DECISIONS",
    "MANUAL_OVERRIDE",
    "PIPELINE_STARTED",
    "PROMOTED",
    "PROMPT_POLICY_CHANGED",
    "RETRAINING_TRIGGERED",
    "ROLLED_BACK",
    "URL_ENV",
    "AuditRecord",
    "ChainHead",
    "JsonObject",
    "JsonValue",
    "Ledger",
    "LedgerConflictError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerUnavailableError",
    "VerifyResult",
    "canonical_json",
    "compute_hash",
    "resolve_url",
    "verify_chain",
]
