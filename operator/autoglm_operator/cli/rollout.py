"""``autoglm rollout status|history|promote|abort|retry MODEL``: steer an embedded loop by hand.

They work against a running or a stopped ``autoglm run`` (its ``--state-dir``). promote, abort and
retry are manual intents: written to the state directory as observations (never as edits of the
manifest, which stays the source of truth), acted on by the loop's next tick, recorded in the audit
ledger with who asked. A running loop acts within a tick and the command prints the ledger record;
a stopped one acts when it runs again, and the command says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from autoglm_core.audit import Ledger
from autoglm_core.audit.records import USER_ACTOR_PREFIX, validate_actor
from autoglm_operator.backends.local_state import LocalState, StateError
from autoglm_operator.cli.audit import default_actor, print_records
from autoglm_operator.retraining import stage

_STATE = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".autoglm/run"),
    show_default=True, help="The state directory of the autoglm run to steer.",
)  # fmt: skip
_MODEL = click.argument("model", metavar="MODEL")


def _state(state_dir: Path, model: str) -> tuple[LocalState, str]:
    """The state directory, checked to hold MODEL's rollout (NAMESPACE/NAME, or NAME alone)."""
    state = LocalState(state_dir)
    known = state.loop().get("model")
    if not known:
        raise click.UsageError(
            f"{state_dir} holds no rollout: start one with autoglm run MANIFEST --state-dir {state_dir}"
        )
    if model not in (known, known.split("/", 1)[1]):
        raise click.UsageError(f"{state_dir} holds the rollout of {known}, not {model}")
    return state, str(known)


def _ledger(state_dir: Path, db: str | None) -> Ledger:
    return Ledger(db or f"sqlite:///{state_dir / 'audit.db'}")


@click.group("rollout", context_settings={"help_option_names": ["-h", "--help"]})
def rollout_group() -> None:
    """Where a rollout stands, what it decided, and promote, abort or retry by hand."""


@rollout_group.command("status")
@_MODEL
@_STATE
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def status_command(model: str, state_dir: Path, output: str) -> None:
    """Phase, revisions, canary step and weight, the newest analysis, and whether the loop runs."""
    state, name = _state(state_dir, model)
    status = state.status()
    loop = state.loop()
    running = state.running()
    data: dict[str, Any] = {
        "model": name,
        "manifest": loop.get("manifest"),
        "loop": f"running (pid {loop.get('pid')})" if running else "stopped",
        "servers": {t: v.get("url") for t, v in state.servers().items()} if running else {},
        "status": status.model_dump(mode="json", by_alias=True, exclude_none=True) if status else None,
        "analysis": state.analysis(),
    }
    if output == "json":
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(
        f"model: {name}  ({data['manifest']})\nloop: {data['loop']}"
        + "".join(f"\n  {target} at {url}" for target, url in data["servers"].items())
    )
    if status is None:
        click.echo("status: none saved yet")
        return
    r = status.revisions
    click.echo(
        f"phase: {status.phase}\nstable: {r.stable or '-'}"
        + (
            " (the uncompressed source, the first canary's baseline)"
            if r.baseline and r.baseline == r.stable
            else ""
        )
        + f"\ncandidate: {r.candidate or '-'}\nrejected: {r.rejected or '-'}"
    )
    if len(status.targets) > 1 or any(t.candidate for t in status.targets):
        for t in status.targets:
            click.echo(
                f"target {t.name}: {t.revision or '-'}"
                + (f", candidate {t.candidate}" if t.candidate else "")
            )
    if status.canary.step is not None:
        click.echo(
            f"canary: step {status.canary.step + 1} at {status.canary.weight}%, failed intervals {status.canary.failures}"
        )
    retraining = status.retraining
    where = stage(retraining)
    if retraining is not None and where is not None:
        fine_tune = retraining.candidate or retraining.stable
        click.echo(
            f"retraining ({where}, triggered {retraining.triggered_at:%Y-%m-%d %H:%M:%S}): {retraining.reason}; "
            f"{retraining.examples} examples" + (f" in {fine_tune.dataset}" if fine_tune is not None else "")
        )
    analysis = data["analysis"]
    if analysis and analysis.get("revision") == r.candidate:
        click.echo(f"analysis ({analysis.get('at')}): {analysis.get('outcome')}: {analysis.get('reason')}")
    if status.last_decision is not None:
        d = status.last_decision
        click.echo(f"last decision: {d.kind} ({d.audit_id}): {d.reason}")


@rollout_group.command("history")
@_MODEL
@_STATE
@click.option("--db", default=None, help="The audit ledger's URL (default: STATE_DIR/audit.db).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def history_command(model: str, state_dir: Path, db: str | None, limit: int) -> None:
    """The rollout's decisions as the audit ledger holds them, oldest first."""
    _, name = _state(state_dir, model)
    namespace, short = name.split("/", 1)
    with _ledger(state_dir, db) as ledger:
        print_records(ledger.query(namespace=namespace, model=short, limit=limit))


def _intent_command(kind: str, help_text: str) -> click.Command:
    @click.command(kind, help=help_text)
    @_MODEL
    @_STATE
    @click.option(
        "--revision", default=None, help="Only if this is the revision concerned (default: the current one)."
    )
    @click.option("--actor", default=None, help="Who asks (user:NAME; default: the user running this).")
    @click.option("--wait", type=click.FloatRange(0), default=60.0, show_default=True,
                  help="Seconds to wait for a running loop to act on it.")  # fmt: skip
    @click.option("--db", default=None, help="The audit ledger's URL (default: STATE_DIR/audit.db).")
    def command(
        model: str, state_dir: Path, revision: str | None, actor: str | None, wait: float, db: str | None
    ) -> None:
        state, name = _state(state_dir, model)
        try:
            who = validate_actor(actor) if actor else default_actor()
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--actor'") from None
        if not who.startswith(USER_ACTOR_PREFIX):
            raise click.BadParameter("a manual intent comes from a person: user:NAME", param_hint="'--actor'")
        try:
            intent = state.submit(kind, who, revision)  # type: ignore[arg-type]
        except StateError as exc:
            raise click.ClickException(str(exc)) from exc
        if not state.running():
            click.echo(f"{kind} for {name} queued: the loop is stopped and acts on it when it runs again "
                       f"(autoglm run MANIFEST --state-dir {state_dir})")  # fmt: skip
            return
        deadline = time.monotonic() + wait
        while (outcome := state.outcome(intent)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if outcome is None:
            click.echo(f"{kind} for {name} queued; the loop has not acted on it after {wait:.0f}s")
            return
        if outcome.get("ignored"):
            raise click.ClickException(f"{kind} changed nothing: {outcome['ignored']}")
        namespace, short = name.split("/", 1)
        with _ledger(state_dir, db) as ledger:
            records = [r for r in ledger.query(namespace=namespace, model=short, since=intent.at)
                       if r.actor == who]  # fmt: skip
        print_records(records)

    return command


rollout_group.add_command(_intent_command(
    "promote", "Promote the candidate now (it must have passed its pipeline and gates), skipping the rest of the canary."))  # fmt: skip
rollout_group.add_command(_intent_command(
    "abort", "Roll the candidate back now and hold it: not tried again until the manifest changes or a retry."))  # fmt: skip
rollout_group.add_command(_intent_command(
    "retry", "Build and roll out again the revision that failed or was rolled back (the manifest's revision)."))  # fmt: skip
