"""``autoglm audit``: append, query and verify through click, as a person or a pipeline would."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from autoglm_core.audit import URL_ENV, Ledger
from autoglm_operator.cli.audit import audit_group, parse_time_bound
from autoglm_operator.cli.main import cli


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


def run(db_url: str | None, *args: str) -> Result:
    prefix = ["--db", db_url] if db_url is not None else []
    return CliRunner().invoke(audit_group, [*prefix, *args])


def append(db_url: str, *extra: str, model: str = "default/glm-4", decision: str = "GatePassed") -> Result:
    result = run(
        db_url, "append", "--model", model, "--decision", decision, "--reason", "accuracy ok", *extra
    )
    assert result.exit_code == 0, result.output
    return result


def query_json(db_url: str, *filters: str) -> list[dict[str, object]]:
    result = run(db_url, "query", "-o", "json", *filters)
    assert result.exit_code == 0, result.output
    records: list[dict[str, object]] = json.loads(result.stdout)
    return records


def test_append_then_query_json_round_trip(db_url: str) -> None:
    evidence = {"metrics": {"accuracy": 0.91}, "thresholds": {"accuracy": 0.9}, "queries": ["eval/accuracy"]}
    result = run(
        db_url,
        "append",
        "--model",
        "default/glm-4",
        "--decision",
        "GatePassed",
        "--reason",
        "accuracy 0.91 ≥ 0.90",
        "--evidence",
        json.dumps(evidence),
        "--actor",
        "pipeline",
        "--revision",
        "r3",
    )
    assert result.exit_code == 0, result.output
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    [record] = query_json(db_url)
    assert printed == {"seq": "1", "id": record["id"], "hash": record["hash"]}
    assert record == {
        "id": printed["id"],
        "seq": 1,
        "time": record["time"],
        "namespace": "default",
        "model": "glm-4",
        "revision": "r3",
        "actor": "pipeline",
        "decision": "GatePassed",
        "reason": "accuracy 0.91 ≥ 0.90",
        "evidence": evidence,
        "prev_hash": "0" * 64,
        "hash": printed["hash"],
    }
    with Ledger(db_url) as ledger:
        assert [r.to_json() for r in ledger.query()] == [record]


def test_actor_defaults_to_the_login(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGNAME", "alice")
    append(db_url)
    assert query_json(db_url)[0]["actor"] == "user:alice"


def test_query_filters(db_url: str) -> None:
    append(db_url, "--revision", "r1")
    append(db_url, "--revision", "r2", decision="Promoted")
    append(db_url, model="team-b/glm-4")
    assert [r["seq"] for r in query_json(db_url, "--model", "default/glm-4")] == [1, 2]
    assert [r["seq"] for r in query_json(db_url, "--decision", "Promoted")] == [2]
    assert [r["seq"] for r in query_json(db_url, "--revision", "r1")] == [1]
    assert [r["seq"] for r in query_json(db_url, "--limit", "2")] == [2, 3]
    assert [r["seq"] for r in query_json(db_url, "--since", "1h")] == [1, 2, 3]
    assert query_json(db_url, "--until", "1h") == []
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert query_json(db_url, "--since", tomorrow) == []
    assert [r["seq"] for r in query_json(db_url, "--since", "2000-01-01", "--until", tomorrow)] == [1, 2, 3]


def test_query_yaml_and_table(db_url: str) -> None:
    append(db_url, "--revision", "r1", decision="RolledBack")
    as_yaml = run(db_url, "query", "-o", "yaml")
    assert as_yaml.exit_code == 0
    [record] = yaml.safe_load(as_yaml.stdout)
    assert (record["decision"], record["revision"]) == ("RolledBack", "r1")
    table = run(db_url, "query")
    assert table.exit_code == 0
    assert "RolledBack" in table.stdout
    assert "default/glm-4@r1" in table.stdout
    assert run(db_url, "query", "--decision", "Promoted").stdout == "No audit records match.\n"


def test_verify_intact(db_url: str) -> None:
    append(db_url)
    append(db_url)
    result = run(db_url, "verify")
    assert (result.exit_code, result.stdout) == (0, "audit chain intact: 2 records\n")


def test_verify_names_the_first_bad_record(db_url: str, tmp_path: Path) -> None:
    for _ in range(3):
        append(db_url)
    bad_id = query_json(db_url)[1]["id"]
    with closing(sqlite3.connect(tmp_path / "audit.db")) as conn, conn:
        conn.execute("UPDATE audit_records SET reason = 'edited' WHERE seq = 2")
    result = run(db_url, "verify")
    assert result.exit_code == 1
    assert result.stderr == f"audit chain broken at seq 2 (id {bad_id}): hash mismatch: row altered\n"


def test_database_url_from_the_environment(tmp_path: Path) -> None:
    env_url = f"sqlite:///{tmp_path / 'env.db'}"
    result = CliRunner().invoke(audit_group, ["verify"], env={URL_ENV: env_url})
    assert result.exit_code == 0
    assert (tmp_path / "env.db").is_file()
    flag_url = f"sqlite:///{tmp_path / 'flag.db'}"
    result = CliRunner().invoke(audit_group, ["--db", flag_url, "verify"], env={URL_ENV: env_url})
    assert result.exit_code == 0
    assert (tmp_path / "flag.db").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["append", "--model", "glm-4", "--decision", "GatePassed", "--reason", "r"],
            "is not NAMESPACE/NAME",
        ),
        (
            ["append", "--model", "Default/glm-4", "--decision", "GatePassed", "--reason", "r"],
            "DNS-1123 label",
        ),
        (["append", "--model", "a/b", "--decision", "gate_passed", "--reason", "r"], "CamelCase"),
        (
            ["append", "--model", "a/b", "--decision", "GatePassed", "--reason", " "],
            "reason must not be empty",
        ),
        (
            ["append", "--model", "a/b", "--decision", "GatePassed", "--reason", "r", "--evidence", "{oops"],
            "'--evidence': not valid JSON",
        ),
        (
            ["append", "--model", "a/b", "--decision", "GatePassed", "--reason", "r", "--evidence", "[0.9]"],
            "'--evidence': must be a JSON object",
        ),
        (
            [
                "append",
                "--model",
                "a/b",
                "--decision",
                "GatePassed",
                "--reason",
                "r",
                "--evidence",
                '{"a": NaN}',
            ],
            "evidence.a is nan",
        ),
        (
            ["append", "--model", "a/b", "--decision", "GatePassed", "--reason", "r", "--actor", "bob"],
            "'operator', 'pipeline' or 'user:<name>'",
        ),
        (["query", "--since", "yesterday"], "'yesterday' is neither a duration such as 30s"),
        (["query", "--until", "5x"], "'5x' is neither a duration"),
        (["query", "--since", "99999999999d"], "is longer than 100 years"),
        (["query", "--since", "2025-13-01"], "'2025-13-01' is neither a duration"),
        (["query", "--since", "1h", "--until", "2h"], "is not before --until"),
        (["query", "--limit", "0"], "0 is not in the range x>=1"),
        (["query", "-o", "csv"], "'csv' is not one of 'table', 'json', 'yaml'"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    db_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    result = run(db_url, *args)
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1
    assert message in error_lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "audit.db").exists()  # refused before the database was opened


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+psycopg://audit:secret@127.0.0.1:1/audit", "audit:***@127.0.0.1:1"),
        ("mysql://db/audit", "database 'mysql' is not supported"),
        ("not-a-url", "Could not parse"),
    ],
)
def test_unreachable_database_is_a_usage_error(url: str, message: str) -> None:
    result = run(url, "verify")
    assert result.exit_code == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert "'--db' / AUTOGLM_AUDIT_URL" in error
    assert message in error
    assert "sqlite:///PATH or postgresql+psycopg://" in error
    assert "secret" not in result.output


def test_failed_append_keeps_what_was_stored(db_url: str, tmp_path: Path) -> None:
    append(db_url)
    append(db_url)
    with closing(sqlite3.connect(tmp_path / "audit.db")) as conn, conn:
        conn.execute("DELETE FROM audit_head")
    result = run(db_url, "append", "--model", "a/b", "--decision", "GatePassed", "--reason", "r")
    assert result.exit_code == 1
    assert "audit_head row is missing" in result.stderr
    assert "Traceback" not in result.output
    assert [r["seq"] for r in query_json(db_url)] == [1, 2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T12:00:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T14:00:00+02:00", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ],
)
def test_time_bounds(text: str, expected: timedelta | datetime) -> None:
    assert parse_time_bound(text) == expected


def test_registered_on_the_autoglm_command(db_url: str) -> None:
    result = CliRunner().invoke(cli, ["audit", "--db", db_url, "verify"])
    assert (result.exit_code, result.stdout) == (0, "audit chain intact: 0 records\n")
