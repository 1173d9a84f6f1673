"""``autoglm audit``: append to, query and verify the audit ledger from a shell.

Every input is checked while the command line is parsed, so bad input exits 2 with a one-line error
before the database is opened; only ``autoglm_core.audit.ledger`` touches the database.
"""

from __future__ import annotations

import getpass
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import click
import yaml
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from autoglm_core.audit.ledger import (
    DEFAULT_URL,
    SUPPORTED_URLS,
    URL_ENV,
    Ledger,
    LedgerError,
    LedgerUnavailableError,
    resolve_url,
)
from autoglm_core.audit.records import (
    ACTOR_FORMS,
    KNOWN_DECISIONS,
    USER_ACTOR_PREFIX,
    AuditRecord,
    format_time,
    normalize_evidence,
    validate_actor,
    validate_decision,
    validate_model,
    validate_namespace,
    validate_reason,
    validate_revision,
)

_URL_KEY: Final = "autoglm.audit.url"
_DURATION: Final = re.compile(r"(?:[0-9]+[smhdw])+")
_DURATION_PART: Final = re.compile(r"([0-9]+)([smhdw])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION_S: Final = 100 * 365 * 86400
_TIME_FORMS: Final = (
    "a duration such as 30s, 5m, 1h, 2d or 1h30m (meaning that long ago), or an ISO-8601 timestamp such "
    "as 2025-01-31T12:00:00Z (UTC when it has no zone)"
)

TimeBound = timedelta | datetime


class ModelRefType(click.ParamType[tuple[str, str]]):
    """``NAMESPACE/NAME`` of an AutoGLMModel, converted to a (namespace, name) pair."""

    name = "NAMESPACE/NAME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        namespace, slash, name = str(value).partition("/")
        if not slash or "/" in name:
            self.fail(f"{value!r} is not NAMESPACE/NAME: write it as e.g. default/glm-4-9b", param, ctx)
        try:
            return validate_namespace(namespace), validate_model(name)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class JsonObjectType(click.ParamType[dict[str, Any]]):
    """A JSON object given as text, e.g. ``{"accuracy": 0.91, "threshold": 0.9}``."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            self.fail(f"not valid JSON ({exc}): pass an object such as '{{\"accuracy\": 0.91}}'", param, ctx)
        if not isinstance(parsed, dict):
            self.fail(
                f"must be a JSON object such as '{{\"accuracy\": 0.91}}', got a JSON {type(parsed).__name__}",
                param,
                ctx,
            )
        try:
            return normalize_evidence(parsed)  # refuses NaN and Infinity, which json.loads lets through
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class TimeBoundType(click.ParamType[TimeBound]):
    """A point in time: a duration meaning "that long ago", or an ISO-8601 timestamp."""

    name = "DURATION|TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> TimeBound:
        if isinstance(value, timedelta | datetime):
            return value
        try:
            return parse_time_bound(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def parse_time_bound(text: str) -> TimeBound:
    """``30s``/``5m``/``1h``/``2d``/``1w`` (combinable, e.g. ``1h30m``) or an ISO-8601 timestamp."""
    if _DURATION.fullmatch(text):
        seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
        if seconds > _MAX_DURATION_S:  # also keeps `now - duration` inside datetime's range
            raise ValueError(f"{text!r} is longer than 100 years: give an ISO-8601 timestamp instead")
        return timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither {_TIME_FORMS}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def resolve_time_bound(bound: TimeBound | None, now: datetime) -> datetime | None:
    """The moment ``bound`` names, durations counted back from ``now``."""
    if isinstance(bound, timedelta):
        return now - bound
    return bound


def _checked(validator: Callable[[str], object]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running one of the record validators, its ValueError as a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            validator(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        return value

    return callback


def default_actor() -> str:
    try:
        actor = USER_ACTOR_PREFIX + getpass.getuser()
        return validate_actor(actor)
    except (KeyError, OSError, ValueError):
        raise click.BadParameter(
            f"cannot tell who is running this command: pass --actor with {ACTOR_FORMS}",
            param_hint="'--actor'",
        ) from None


@contextmanager
def _opened_ledger(ctx: click.Context) -> Iterator[Ledger]:
    url: str = ctx.meta[_URL_KEY]
    try:
        ledger = Ledger(url)
    except LedgerUnavailableError as exc:
        message = str(exc) if SUPPORTED_URLS in str(exc) else f"{exc}; allowed: {SUPPORTED_URLS}"
        raise click.BadParameter(message, param_hint=f"'--db' / {URL_ENV}") from None
    try:
        yield ledger
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        ledger.close()


@click.group("audit", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    default=None,
    help=f"Audit database URL: {SUPPORTED_URLS}. Default: ${URL_ENV}, else {DEFAULT_URL}.",
)
@click.pass_context
def audit_group(ctx: click.Context, db_url: str | None) -> None:
    """The tamper-evident audit ledger: every rollout decision, hash-chained.

    Each record's SHA-256 covers the one before it, so an edited, deleted or reordered record is
    found by `verify`.
    """
    ctx.meta[_URL_KEY] = resolve_url(db_url, os.environ)


@audit_group.command("append")
@click.option(
    "--model", "model_ref", type=ModelRefType(), required=True, help="The model, as NAMESPACE/NAME."
)
@click.option(
    "--decision",
    required=True,
    callback=_checked(validate_decision),
    help=f"A CamelCase kind: {', '.join(KNOWN_DECISIONS)}, or a new one.",
)
@click.option("--reason", required=True, callback=_checked(validate_reason), help="Why, in words.")
@click.option(
    "--evidence", type=JsonObjectType(), default=None, help="A JSON object: metrics, thresholds, queries."
)
@click.option(
    "--actor",
    default=None,
    callback=_checked(validate_actor),
    help=f"Who decided: {ACTOR_FORMS}. Default: user:<your login>.",
)
@click.option("--revision", default=None, callback=_checked(validate_revision), help="The model revision.")
@click.pass_context
def append_command(
    ctx: click.Context,
    model_ref: tuple[str, str],
    decision: str,
    reason: str,
    evidence: dict[str, Any] | None,
    actor: str | None,
    revision: str | None,
) -> None:
    """Append one decision and print its seq, id and hash."""
    namespace, model = model_ref
    actor = actor or default_actor()
    with _opened_ledger(ctx) as ledger:
        try:
            record = ledger.append(
                namespace, model, decision, reason, revision=revision, actor=actor, evidence=evidence
            )
        except ValueError as exc:  # evidence that is JSON yet not storable, e.g. NaN
            raise click.UsageError(str(exc), ctx=ctx) from None
    click.echo(f"seq: {record.seq}\nid: {record.id}\nhash: {record.hash}")


@audit_group.command("query")
@click.option(
    "--model", "model_ref", type=ModelRefType(), default=None, help="Only this model (NAMESPACE/NAME)."
)
@click.option(
    "--decision", default=None, callback=_checked(validate_decision), help="Only this decision kind."
)
@click.option("--revision", default=None, help="Only this model revision.")
@click.option("--since", type=TimeBoundType(), default=None, help=f"Records at or after: {_TIME_FORMS}.")
@click.option(
    "--until", type=TimeBoundType(), default=None, help="Records before this (same forms as --since)."
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the newest N matches.")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.pass_context
def query_command(
    ctx: click.Context,
    model_ref: tuple[str, str] | None,
    decision: str | None,
    revision: str | None,
    since: TimeBound | None,
    until: TimeBound | None,
    limit: int | None,
    output: str,
) -> None:
    """List records matching every filter, oldest first."""
    now = datetime.now(UTC)
    since_at, until_at = resolve_time_bound(since, now), resolve_time_bound(until, now)
    if since_at is not None and until_at is not None and since_at >= until_at:
        raise click.UsageError(
            f"--since ({format_time(since_at)}) is not before --until ({format_time(until_at)}): nothing can match"
        )
    namespace, model = model_ref if model_ref is not None else (None, None)
    with _opened_ledger(ctx) as ledger:
        records = ledger.query(
            namespace=namespace,
            model=model,
            decision=decision,
            revision=revision,
            since=since_at,
            until=until_at,
            limit=limit,
        )
    if output == "json":
        click.echo(json.dumps([r.to_json() for r in records], indent=2, ensure_ascii=False))
    elif output == "yaml":
        click.echo(
            yaml.safe_dump([r.to_json() for r in records], sort_keys=False, allow_unicode=True), nl=False
        )
    else:
        print_records(records)


def print_records(records: list[AuditRecord]) -> None:
    if not records:
        click.echo("No audit records match.")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("time (UTC)", no_wrap=True)  # to the second here; json and yaml keep microseconds
    table.add_column("model@rev", overflow="fold")
    table.add_column("actor", overflow="fold")
    table.add_column("decision", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for r in records:
        model = f"{r.namespace}/{r.model}" + (f"@{r.revision}" if r.revision is not None else "")
        cells = (str(r.seq), r.time.strftime("%Y-%m-%d %H:%M:%S"), model, r.actor, r.decision, r.reason)
        # Text cells: a reason containing [brackets] must not be read as rich markup.
        table.add_row(*(Text(c) for c in cells))
    console = Console()
    if not console.is_terminal:
        # Piped or redirected: no terminal width to fit, so keep rows on one line where possible.
        console = Console(width=200)
    console.print(table)


@audit_group.command("verify")
@click.pass_context
def verify_command(ctx: click.Context) -> None:
    """Check every record's hash and link and the head; exit 1 naming the first bad record."""
    with _opened_ledger(ctx) as ledger:
        result = ledger.verify()
    if not result.ok:
        click.echo(result.describe(), err=True)
        ctx.exit(1)
    click.echo(result.describe())
