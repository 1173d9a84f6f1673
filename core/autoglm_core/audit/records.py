"""The audit record, its canonical form and hash, and verification of the hash chain.

Everything here is purely computational: no I/O, no clock reads, no randomness. The caller passes in
the record id and the time, and verification works on rows it is handed. ``ledger.py`` is the only
module that reads or writes the database.

Each record's ``hash`` is the SHA-256 of the canonical JSON of all its other fields, ``prev_hash``
and ``seq`` included, and ``prev_hash`` is the hash of the record before it (``GENESIS_HASH`` for
the first). Changing, deleting or reordering a stored record therefore breaks the chain at that
record. The chain is tamper-evident, not tamper-proof: someone who can write the tables can also
recompute every hash after the one they changed, so keep a copy of the head hash elsewhere when that
matters.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

from autoglm_api.base import DNS_1123_LABEL_PATTERN, DNS_1123_SUBDOMAIN_PATTERN, MAX_LABEL_LENGTH
from autoglm_core.digests import canonical_json

JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"

#: ``prev_hash`` of the first record.
GENESIS_HASH: Final = "0" * 64

# Decision kinds the platform records. Any CamelCase kind is accepted so later components can add theirs.
PIPELINE_STARTED: Final = "PipelineStarted"
GATE_PASSED: Final = "GatePassed"
GATE_FAILED: Final = "GateFailed"
CANARY_ADVANCED: Final = "CanaryAdvanced"
PROMOTED: Final = "Promoted"
ROLLED_BACK: Final = "RolledBack"
PROMPT_POLICY_CHANGED: Final = "PromptPolicyChanged"
RETRAINING_TRIGGERED: Final = "RetrainingTriggered"
MANUAL_OVERRIDE: Final = "ManualOverride"
KNOWN_DECISIONS: Final = (
    PIPELINE_STARTED,
    GATE_PASSED,
    GATE_FAILED,
    CANARY_ADVANCED,
    PROMOTED,
    ROLLED_BACK,
    PROMPT_POLICY_CHANGED,
    RETRAINING_TRIGGERED,
    MANUAL_OVERRIDE,
)

ACTOR_OPERATOR: Final = "operator"
ACTOR_PIPELINE: Final = "pipeline"
USER_ACTOR_PREFIX: Final = "user:"
ACTOR_FORMS: Final = "'operator', 'pipeline' or 'user:<name>'"

DECISION_PATTERN: Final = re.compile(r"^[A-Z][A-Za-z0-9]{1,63}$")
# Kubernetes names: a namespace is a DNS-1123 label, an object name a DNS-1123 subdomain.
NAMESPACE_PATTERN: Final = re.compile(DNS_1123_LABEL_PATTERN)
MODEL_PATTERN: Final = re.compile(DNS_1123_SUBDOMAIN_PATTERN)
_USER_NAME_PATTERN: Final = re.compile(r"^[^\s\x00]{1,253}$")
_HASH_PATTERN: Final = re.compile(r"^[0-9a-f]{64}$")
MAX_REVISION_LENGTH: Final = 255
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 255
MAX_ID_LENGTH: Final = 36


def validate_actor(actor: str) -> str:
    """Return ``actor`` if it is one of the allowed forms; raise ValueError naming them otherwise."""
    if actor in (ACTOR_OPERATOR, ACTOR_PIPELINE):
        return actor
    if actor.startswith(USER_ACTOR_PREFIX) and _USER_NAME_PATTERN.fullmatch(actor[len(USER_ACTOR_PREFIX) :]):
        return _encodable(actor, "actor")
    raise ValueError(
        f"actor {actor!r} is not allowed: use {ACTOR_FORMS}, where <name> is 1-253 characters without spaces"
    )


def validate_decision(decision: str) -> str:
    """Return ``decision`` if it is a CamelCase kind such as ``GatePassed``; raise ValueError otherwise."""
    if DECISION_PATTERN.fullmatch(decision):
        return decision
    raise ValueError(
        f"decision {decision!r} is not a CamelCase kind: use 2-64 letters and digits starting with an "
        f"uppercase letter, e.g. {', '.join(KNOWN_DECISIONS[:3])}"
    )


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is a valid Kubernetes namespace name; raise ValueError otherwise."""
    if len(namespace) <= MAX_LABEL_LENGTH and NAMESPACE_PATTERN.fullmatch(namespace):
        return namespace
    raise ValueError(
        f"namespace {namespace!r} is not a DNS-1123 label: use 1-63 lowercase letters, digits and '-', "
        "starting and ending with a letter or digit"
    )


def validate_model(model: str) -> str:
    """Return ``model`` if it is a valid Kubernetes object name; raise ValueError otherwise."""
    if MODEL_PATTERN.fullmatch(model):
        return model
    raise ValueError(
        f"model name {model!r} is not a DNS-1123 subdomain: use 1-253 lowercase letters, digits, '-' and "
        "'.', starting and ending with a letter or digit"
    )


def validate_revision(revision: str | None) -> str | None:
    """Return ``revision`` (None allowed) if it is a non-empty string of at most 255 characters."""
    if revision is None:
        return None
    if not 0 < len(revision) <= MAX_REVISION_LENGTH or "\x00" in revision:
        raise ValueError(
            f"revision must be 1-{MAX_REVISION_LENGTH} characters without NUL, or left out; got {revision[:40]!r}"
        )
    return _encodable(revision, "revision")


def validate_idempotency_key(key: str | None) -> str | None:
    """Return ``key`` (None allowed) if it is 1-255 characters without NUL."""
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or "\x00" in key:
        raise ValueError(
            f"idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} characters without NUL, or left out; "
            f"got {key[:40]!r}"
        )
    return _encodable(key, "idempotency key")


def validate_reason(reason: str) -> str:
    """Return ``reason`` if it has any non-blank text: an audit record must say why."""
    if not reason.strip():
        raise ValueError("reason must not be empty: say why the decision was taken")
    if "\x00" in reason:  # PostgreSQL text cannot hold NUL; refuse it on every backend alike
        raise ValueError("reason must not contain NUL characters")
    return _encodable(reason, "reason")


def normalize_evidence(evidence: object) -> JsonObject:
    """Return ``evidence`` as a plain JSON object, or raise ValueError naming the offending path.

    Tuples become lists and mappings become dicts, so the value hashed now is exactly the value read
    back later. NaN and infinities are refused: they are not JSON, and would not survive a round trip.
    """
    if evidence is None:
        return {}
    if not isinstance(evidence, Mapping):
        raise ValueError(
            f"evidence must be a JSON object (metrics, thresholds, queries), got {type(evidence).__name__}"
        )
    try:
        result = _normalize_json(evidence, "evidence")
    except RecursionError:
        raise ValueError("evidence is nested too deeply to be stored") from None
    assert isinstance(result, dict)
    return result


def _encodable(text: str, what: str) -> str:
    """``text`` if it encodes as UTF-8, which hashing and every driver need; lone surrogates do not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text ({exc.reason} at position {exc.start})") from None
    return text


def _normalize_json(value: object, path: str) -> JsonValue:
    if isinstance(value, str):
        return _encodable(value, path)
    if value is None or isinstance(value, bool):
        return value
    # numbers.* rather than int/float: metrics often arrive as numpy scalars, which register there.
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{path} is {number}, which JSON cannot represent: use a finite number or null")
        return number
    if isinstance(value, Mapping):
        out: JsonObject = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"{path} has a key {key!r} of type {type(key).__name__}: JSON object keys are strings"
                )
            out[_encodable(key, f"a key in {path}")] = _normalize_json(item, f"{path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_normalize_json(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{path} is a {type(value).__name__}, which is not JSON-serialisable: use an object, array, string, "
        "number, true/false or null"
    )


def format_time(moment: datetime) -> str:
    """UTC ISO-8601 with microseconds and a ``Z``: fixed width, so the text sorts as the time does."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"time {moment.isoformat()} has no timezone: pass an aware datetime, e.g. in UTC")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """The inverse of ``format_time``; raises ValueError for any other text."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or format_time(moment) != text:
        raise ValueError(f"time {text!r} is not in the canonical form YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One decision in the ledger. ``hash`` covers every other field; see ``compute_hash``."""

    id: str
    seq: int
    time: datetime
    namespace: str
    model: str
    revision: str | None
    actor: str
    decision: str
    reason: str
    evidence: JsonObject
    prev_hash: str
    hash: str
    #: Set by a caller that must record a decision once: appending the same key returns this record.
    idempotency_key: str | None = None

    def hashed_fields(self) -> dict[str, object]:
        """The fields the hash covers, in their JSON form (the key only when set: older records hash as before)."""
        key = {} if self.idempotency_key is None else {"idempotency_key": self.idempotency_key}
        return {
            **key,
            "id": self.id,
            "seq": self.seq,
            "time": format_time(self.time),
            "namespace": self.namespace,
            "model": self.model,
            "revision": self.revision,
            "actor": self.actor,
            "decision": self.decision,
            "reason": self.reason,
            "evidence": self.evidence,
            "prev_hash": self.prev_hash,
        }

    def to_json(self) -> dict[str, object]:
        """The record as a JSON object, for output and export."""
        return {**self.hashed_fields(), "hash": self.hash}


def compute_hash(record: AuditRecord) -> str:
    """SHA-256 hex of the canonical JSON of every field except ``hash``."""
    return hashlib.sha256(canonical_json(record.hashed_fields()).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class RecordDraft:
    """A validated decision that has no place in the chain yet: no id, seq, time or hashes."""

    namespace: str
    model: str
    decision: str
    reason: str
    revision: str | None
    actor: str
    evidence: JsonObject
    idempotency_key: str | None = None


def draft_record(
    *,
    namespace: str,
    model: str,
    decision: str,
    reason: str,
    revision: str | None = None,
    actor: str = ACTOR_OPERATOR,
    evidence: object = None,
    idempotency_key: str | None = None,
) -> RecordDraft:
    """Validate a decision's fields; raises ValueError naming the bad field and what is allowed."""
    return RecordDraft(
        namespace=validate_namespace(namespace),
        model=validate_model(model),
        decision=validate_decision(decision),
        reason=validate_reason(reason),
        revision=validate_revision(revision),
        actor=validate_actor(actor),
        evidence=normalize_evidence(evidence),
        idempotency_key=validate_idempotency_key(idempotency_key),
    )


def chain_record(
    draft: RecordDraft, *, record_id: str, seq: int, prev_hash: str, now: datetime
) -> AuditRecord:
    """Place ``draft`` at chain position ``seq`` after ``prev_hash`` and hash it."""
    if not 0 < len(record_id) <= MAX_ID_LENGTH:
        raise ValueError(f"record id must be 1-{MAX_ID_LENGTH} characters, got {record_id!r}")
    if seq < 1:
        raise ValueError(f"seq must be 1 or more, got {seq}")
    if not _HASH_PATTERN.fullmatch(prev_hash):
        raise ValueError(f"prev_hash must be 64 lowercase hex characters, got {prev_hash!r}")
    format_time(now)  # refuses a naive time before anything is hashed
    unhashed = AuditRecord(
        id=record_id,
        seq=seq,
        time=now.astimezone(UTC),
        namespace=draft.namespace,
        model=draft.model,
        revision=draft.revision,
        actor=draft.actor,
        decision=draft.decision,
        reason=draft.reason,
        evidence=draft.evidence,
        prev_hash=prev_hash,
        hash="",
        idempotency_key=draft.idempotency_key,
    )
    return replace(unhashed, hash=compute_hash(unhashed))


def new_record(
    *,
    record_id: str,
    seq: int,
    prev_hash: str,
    now: datetime,
    namespace: str,
    model: str,
    decision: str,
    reason: str,
    revision: str | None = None,
    actor: str = ACTOR_OPERATOR,
    evidence: object = None,
) -> AuditRecord:
    """Validate the fields and build the record at chain position ``seq`` after ``prev_hash``."""
    draft = draft_record(
        namespace=namespace,
        model=model,
        decision=decision,
        reason=reason,
        revision=revision,
        actor=actor,
        evidence=evidence,
    )
    return chain_record(draft, record_id=record_id, seq=seq, prev_hash=prev_hash, now=now)


def record_to_row(record: AuditRecord) -> dict[str, object]:
    """The stored form: time as its canonical text, evidence as canonical JSON text.

    Storing the exact text that was hashed means no driver's datetime or JSON handling can change a
    hashed value between write and read.
    """
    return {
        **record.to_json(),
        "evidence": canonical_json(record.evidence),
        "idempotency_key": record.idempotency_key,
    }


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def record_from_row(row: Mapping[str, Any]) -> AuditRecord:
    """Rebuild a record from its stored form; raises ValueError when a column is unreadable."""
    try:
        evidence = json.loads(row["evidence"], parse_constant=_refuse_constant)
    except (TypeError, ValueError, RecursionError):
        raise ValueError("evidence is not valid JSON text") from None
    if not isinstance(evidence, dict):
        raise ValueError("evidence is not a JSON object")
    try:
        moment = parse_time(row["time"])
    except TypeError:
        raise ValueError("time is not text") from None
    seq = row["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError(f"seq {seq!r} is not an integer")
    return AuditRecord(
        id=row["id"],
        seq=seq,
        time=moment,
        namespace=row["namespace"],
        model=row["model"],
        revision=row["revision"],
        actor=row["actor"],
        decision=row["decision"],
        reason=row["reason"],
        evidence=evidence,
        prev_hash=row["prev_hash"],
        hash=row["hash"],
        idempotency_key=row.get("idempotency_key"),
    )


@dataclass(frozen=True, slots=True)
class ChainHead:
    """What the one-row head table says: the newest record's seq and hash (0 and genesis when empty)."""

    seq: int
    hash: str


EMPTY_HEAD: Final = ChainHead(seq=0, hash=GENESIS_HASH)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of ``verify_chain``: ``ok``, how many records were checked, and the first bad one."""

    ok: bool
    checked: int
    bad_seq: int | None = None
    bad_id: str | None = None
    reason: str | None = None

    def describe(self) -> str:
        """One line for a person: the record count, or which record is bad and why."""
        if self.ok:
            return f"audit chain intact: {self.checked} record{'' if self.checked == 1 else 's'}"
        if self.bad_seq is None:
            return f"audit chain broken: {self.reason}"
        record_id = self.bad_id if self.bad_id is not None else "unknown, the record is missing"
        return f"audit chain broken at seq {self.bad_seq} (id {record_id}): {self.reason}"


def verify_chain(rows: Iterable[Mapping[str, Any]], head: ChainHead | None) -> VerifyResult:
    """Check stored rows, in seq order, against each other and against the head; stop at the first fault.

    For each row, in this order: it must be readable, link to the previous record's hash, follow the
    previous seq by one, and hash to its stored hash. A deleted or reordered record therefore shows
    as a broken link at the record after it, an edited one as a hash mismatch at itself. Last, the
    head must name the newest record, which catches records deleted from (or added to) the end.
    """
    prev_hash, prev_seq, prev_id = GENESIS_HASH, 0, None
    checked = 0
    past_head: tuple[int, str] | None = None
    for row in rows:
        checked += 1
        seq, record_id = row.get("seq"), row.get("id")
        try:
            record = record_from_row(row)
            actual_hash = compute_hash(record)
        except (KeyError, TypeError, ValueError) as exc:
            return _broken(checked, seq, record_id, f"unreadable row ({exc}): row altered")
        if record.prev_hash != prev_hash:
            after = f"seq {prev_seq}" if prev_seq else "the start of the chain"
            return _broken(
                checked,
                seq,
                record_id,
                "prev_hash does not match the previous record's hash: a record was deleted or reordered "
                f"(seq {record.seq} follows {after})",
            )
        if record.seq != prev_seq + 1:
            return _broken(
                checked, seq, record_id, f"seq {record.seq} follows seq {prev_seq}: the record was renumbered"
            )
        if actual_hash != record.hash:
            return _broken(checked, seq, record_id, "hash mismatch: row altered")
        if head is not None and record.seq == head.seq + 1:
            past_head = (record.seq, record.id)
        prev_hash, prev_seq, prev_id = record.hash, record.seq, record.id
    return _check_head(head, checked, prev_seq, prev_hash, prev_id, past_head)


def _check_head(
    head: ChainHead | None,
    checked: int,
    newest_seq: int,
    newest_hash: str,
    newest_id: str | None,
    past_head: tuple[int, str] | None,
) -> VerifyResult:
    if head is None:
        if checked == 0:
            return VerifyResult(ok=True, checked=0)
        return _broken(checked, None, None, "the audit_head row is missing: the head was deleted")
    if head.seq > newest_seq:
        return _broken(
            checked,
            newest_seq + 1,
            None,
            f"head says {head.seq} records but the newest is {newest_seq}: records were deleted from the end",
        )
    if past_head is not None:
        return _broken(
            checked,
            past_head[0],
            past_head[1],
            f"head says {head.seq} records but the newest is {newest_seq}: "
            "records were added without going through the ledger",
        )
    if head.hash != newest_hash:
        return _broken(
            checked,
            newest_seq,
            newest_id,
            "head hash does not match the newest record's hash: the newest record or the head was altered",
        )
    return VerifyResult(ok=True, checked=checked)


def _broken(checked: int, seq: object, record_id: object, reason: str) -> VerifyResult:
    return VerifyResult(
        ok=False,
        checked=checked,
        bad_seq=seq if isinstance(seq, int) else None,
        bad_id=record_id if isinstance(record_id, str) else None,
        reason=reason,
    )
