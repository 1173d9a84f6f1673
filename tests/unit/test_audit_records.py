"""The pure audit record: validation, canonical JSON, hashing and chain verification without a database."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_core.audit.records import (
    EMPTY_HEAD,
    GATE_PASSED,
    GENESIS_HASH,
    KNOWN_DECISIONS,
    AuditRecord,
    ChainHead,
    canonical_json,
    compute_hash,
    format_time,
    new_record,
    normalize_evidence,
    parse_time,
    record_from_row,
    record_to_row,
    validate_actor,
    validate_decision,
    validate_model,
    validate_namespace,
    verify_chain,
)

T0 = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)


def make_chain(count: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS_HASH
    for i in range(count):
        record = new_record(
            record_id=f"id{i + 1}",
            seq=i + 1,
            prev_hash=prev,
            now=T0 + timedelta(seconds=i),
            namespace="default",
            model="glm-4",
            decision=GATE_PASSED,
            reason=f"gate {i + 1} passed",
            evidence={"metrics": {"accuracy": 0.9 + i / 100}},
        )
        records.append(record)
        prev = record.hash
    return records


def rows_of(records: list[AuditRecord]) -> list[dict[str, object]]:
    return [record_to_row(r) for r in records]


def head_of(records: list[AuditRecord]) -> ChainHead:
    return ChainHead(seq=records[-1].seq, hash=records[-1].hash)


class TestCanonicalJson:
    def test_sorted_keys_no_whitespace_unicode_kept(self) -> None:
        assert (
            canonical_json({"b": 1, "a": ["é", {"d": None, "c": True}]})
            == '{"a":["é",{"c":true,"d":null}],"b":1}'
        )

    def test_nan_is_refused(self) -> None:
        with pytest.raises(ValueError, match="JSON compliant"):
            canonical_json({"x": float("nan")})


class TestHash:
    def test_hash_is_sha256_of_canonical_fields_except_hash(self) -> None:
        record = new_record(
            record_id="abc",
            seq=1,
            prev_hash=GENESIS_HASH,
            now=T0,
            namespace="default",
            model="glm-4",
            decision=GATE_PASSED,
            reason="accuracy 0.91 ≥ 0.90",
            revision="r3",
            actor="pipeline",
            evidence={"thresholds": {"accuracy": 0.9}, "metrics": {"accuracy": 0.91}},
        )
        expected_text = (
            '{"actor":"pipeline","decision":"GatePassed","evidence":{"metrics":{"accuracy":0.91},'
            '"thresholds":{"accuracy":0.9}},"id":"abc","model":"glm-4","namespace":"default",'
            f'"prev_hash":"{GENESIS_HASH}","reason":"accuracy 0.91 ≥ 0.90","revision":"r3","seq":1,'
            '"time":"2025-01-31T12:00:00.123456Z"}'
        )
        assert record.hash == hashlib.sha256(expected_text.encode("utf-8")).hexdigest()
        assert compute_hash(record) == record.hash

    @pytest.mark.parametrize("field", ["seq", "prev_hash", "reason", "evidence", "actor", "time", "revision"])
    def test_every_field_is_covered(self, field: str) -> None:
        record = make_chain(1)[0]
        changed: dict[str, Any] = {
            "seq": 2,
            "prev_hash": "f" * 64,
            "reason": "other",
            "evidence": {"metrics": {"accuracy": 0.5}},
            "actor": "user:mallory",
            "time": T0 + timedelta(microseconds=1),
            "revision": "r9",
        }
        fields = {name: getattr(record, name) for name in AuditRecord.__slots__}
        altered = AuditRecord(**{**fields, field: changed[field]})
        assert compute_hash(altered) != record.hash


class TestValidation:
    @pytest.mark.parametrize(
        "actor", ["operator", "pipeline", "user:alice", "user:system:serviceaccount:ci:bot"]
    )
    def test_allowed_actors(self, actor: str) -> None:
        assert validate_actor(actor) == actor

    @pytest.mark.parametrize(
        "actor", ["", "Operator", "user:", "user:a b", "alice", "pipeline\n", "user:a\x00"]
    )
    def test_other_actors_name_the_allowed_forms(self, actor: str) -> None:
        with pytest.raises(ValueError, match=r"'operator', 'pipeline' or 'user:<name>'"):
            validate_actor(actor)

    @pytest.mark.parametrize("decision", [*KNOWN_DECISIONS, "QuantizationChosen", "Ab"])
    def test_camel_case_decisions(self, decision: str) -> None:
        assert validate_decision(decision) == decision

    @pytest.mark.parametrize(
        "decision", ["gatePassed", "Gate-Passed", "G", "A" * 65, "Gate Passed", "GatePassed\n"]
    )
    def test_other_decisions_are_refused(self, decision: str) -> None:
        with pytest.raises(ValueError, match="CamelCase"):
            validate_decision(decision)

    def test_kubernetes_names(self) -> None:
        assert validate_namespace("team-a") == "team-a"
        assert validate_model("glm-4.9b") == "glm-4.9b"
        with pytest.raises(ValueError, match="DNS-1123 label"):
            validate_namespace("Team_A")
        with pytest.raises(ValueError, match="DNS-1123 subdomain"):
            validate_model("glm/4")

    def test_empty_reason_is_refused(self) -> None:
        with pytest.raises(ValueError, match="reason must not be empty"):
            new_record(
                record_id="x",
                seq=1,
                prev_hash=GENESIS_HASH,
                now=T0,
                namespace="default",
                model="m",
                decision=GATE_PASSED,
                reason="  ",
            )

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"reason": "a\x00b"}, "reason must not contain NUL"),
            ({"revision": "r\x00"}, "without NUL"),
            ({"reason": "bad \udcff bytes"}, "reason is not valid Unicode text"),
        ],
    )
    def test_text_that_cannot_be_stored_is_refused(self, fields: dict[str, str], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            new_record(
                record_id="x",
                seq=1,
                prev_hash=GENESIS_HASH,
                now=T0,
                namespace="default",
                model="m",
                decision=GATE_PASSED,
                **{"reason": "why", **fields},
            )

    def test_naive_time_is_refused(self) -> None:
        with pytest.raises(ValueError, match="no timezone"):
            format_time(datetime(2025, 1, 1))  # naive on purpose


class TestEvidence:
    def test_tuples_and_mappings_become_plain_json(self) -> None:
        assert normalize_evidence({"a": (1, 2), "b": {"c": None}}) == {"a": [1, 2], "b": {"c": None}}
        assert normalize_evidence(None) == {}

    def test_any_real_number_becomes_a_plain_float(self) -> None:
        # numpy scalars register with numbers.Real/Integral the same way Fraction does.
        evidence = normalize_evidence({"ratio": Fraction(1, 4), "ok": True, "n": 3})
        assert evidence == {"ratio": 0.25, "ok": True, "n": 3}
        assert [type(v) for v in evidence.values()] == [float, bool, int]

    @pytest.mark.parametrize(
        ("evidence", "message"),
        [
            ([1, 2], "must be a JSON object"),
            ("text", "must be a JSON object"),
            (
                {"metrics": {"tags": {"a"}}},
                r"evidence\.metrics\.tags is a set, which is not JSON-serialisable",
            ),
            ({"m": [1, float("inf")]}, r"evidence\.m\[1\] is inf, which JSON cannot represent"),
            ({1: "x"}, "JSON object keys are strings"),
            ({"when": datetime(2025, 1, 1, tzinfo=UTC)}, r"evidence\.when is a datetime"),
            ({"exact": Decimal("0.1")}, r"evidence\.exact is a Decimal"),
            ({"text": "broken \udcff"}, r"evidence\.text is not valid Unicode text"),
        ],
    )
    def test_non_json_evidence_names_the_path(self, evidence: object, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            normalize_evidence(evidence)


class TestTime:
    def test_fixed_width_utc_with_microseconds(self) -> None:
        plus_two = timezone(timedelta(hours=2))
        assert format_time(datetime(2025, 1, 31, 14, 0, tzinfo=plus_two)) == "2025-01-31T12:00:00.000000Z"
        assert parse_time("2025-01-31T12:00:00.000000Z") == datetime(2025, 1, 31, 12, tzinfo=UTC)

    @pytest.mark.parametrize("text", ["2025-01-31T12:00:00Z", "2025-01-31 12:00:00.000000", "yesterday"])
    def test_non_canonical_time_is_refused(self, text: str) -> None:
        with pytest.raises(ValueError, match="canonical form"):
            parse_time(text)


# Text the ledger can store: lone surrogates (category Cs) and NUL are refused, and tested above.
storable = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(storable),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(storable, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(database=None, max_examples=60, deadline=None)
@given(
    evidence=st.dictionaries(st.text(storable, max_size=8), json_values, max_size=5),
    reason=st.text(storable, min_size=1).filter(str.strip),
)
def test_stored_form_round_trips_and_keeps_its_hash(evidence: dict[str, Any], reason: str) -> None:
    record = new_record(
        record_id="r1",
        seq=1,
        prev_hash=GENESIS_HASH,
        now=T0,
        namespace="default",
        model="glm-4",
        decision=GATE_PASSED,
        reason=reason,
        evidence=evidence,
    )
    row = json.loads(json.dumps(record_to_row(record)))  # as any driver would hand the text back
    restored = record_from_row(row)
    assert restored == record
    assert compute_hash(restored) == record.hash


class TestVerifyChain:
    def test_intact_chain(self) -> None:
        records = make_chain(5)
        result = verify_chain(rows_of(records), head_of(records))
        assert result.ok
        assert result.checked == 5
        assert result.describe() == "audit chain intact: 5 records"

    def test_empty_chain(self) -> None:
        assert verify_chain([], EMPTY_HEAD).ok
        assert verify_chain([], None).ok

    def test_altered_reason(self) -> None:
        records = make_chain(5)
        rows = rows_of(records)
        rows[2]["reason"] = "nothing to see"
        result = verify_chain(rows, head_of(records))
        assert (result.ok, result.bad_seq, result.bad_id) == (False, 3, "id3")
        assert result.reason == "hash mismatch: row altered"

    def test_deleted_middle_record(self) -> None:
        records = make_chain(5)
        rows = rows_of(records)
        del rows[2]
        result = verify_chain(rows, head_of(records))
        assert (result.bad_seq, result.bad_id) == (4, "id4")
        assert result.reason is not None
        assert result.reason.startswith("prev_hash does not match the previous record's hash")
        assert "(seq 4 follows seq 2)" in result.reason

    def test_deleted_first_record(self) -> None:
        records = make_chain(3)
        result = verify_chain(rows_of(records)[1:], head_of(records))
        assert (result.bad_seq, result.bad_id) == (2, "id2")
        assert result.reason is not None
        assert "follows the start of the chain" in result.reason

    def test_deleted_tail(self) -> None:
        records = make_chain(5)
        result = verify_chain(rows_of(records)[:3], head_of(records))
        assert (result.ok, result.bad_seq, result.bad_id) == (False, 4, None)
        assert result.reason == "head says 5 records but the newest is 3: records were deleted from the end"
        assert "seq 4 (id unknown, the record is missing)" in result.describe()

    def test_records_added_past_the_head(self) -> None:
        records = make_chain(5)
        result = verify_chain(rows_of(records), ChainHead(seq=3, hash=records[2].hash))
        assert (result.bad_seq, result.bad_id) == (4, "id4")
        assert result.reason is not None
        assert "added without going through the ledger" in result.reason

    def test_renumbered_record(self) -> None:
        records = make_chain(3)
        rows = rows_of(records)
        rows[2]["seq"] = 7
        result = verify_chain(rows, head_of(records))
        assert (result.bad_seq, result.reason) == (7, "seq 7 follows seq 2: the record was renumbered")

    def test_missing_head(self) -> None:
        records = make_chain(2)
        result = verify_chain(rows_of(records), None)
        assert not result.ok
        assert result.describe() == "audit chain broken: the audit_head row is missing: the head was deleted"

    def test_head_hash_altered(self) -> None:
        records = make_chain(2)
        result = verify_chain(rows_of(records), ChainHead(seq=2, hash="f" * 64))
        assert (result.bad_seq, result.bad_id) == (2, "id2")

    @pytest.mark.parametrize(
        ("column", "value"),
        [
            ("evidence", "{not json"),
            ("evidence", "[1]"),
            ("evidence", '{"x": NaN}'),
            ("time", "2025"),
            ("seq", "3"),
        ],
    )
    def test_unreadable_row(self, column: str, value: object) -> None:
        records = make_chain(3)
        rows = rows_of(records)
        rows[1][column] = value
        result = verify_chain(rows, head_of(records))
        assert result.bad_id == "id2"
        assert result.reason is not None
        assert result.reason.endswith("row altered")
