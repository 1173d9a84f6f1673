"""``autoglm run MANIFEST``: the closed loop on this machine (pipeline, server, canary, ledger)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from autoglm_inference.options import MAX_STREAM_INTERVAL_MS, stream_interval_args
from autoglm_operator.retraining import stage

if TYPE_CHECKING:
    from autoglm_api.resource import AutoGLMModel
    from autoglm_operator.plan import Observed, Plan


def progress_table(
    model: AutoGLMModel, observed: Observed, result: Plan, analysis: dict[str, Any] | None
) -> Table:
    """The live view: phase, revisions, pipeline, canary step and weight, the newest analysis."""
    status = result.status
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    revisions = status.revisions
    table.add_row("model", Text(f"{model.namespaced_name}  phase {status.phase}"))
    source = (
        " (source, the baseline)" if revisions.baseline and revisions.baseline == revisions.stable else ""
    )
    table.add_row("revisions", Text(f"stable {revisions.stable or '-'}{source}  candidate {revisions.candidate or '-'}"
                                    f"  rejected {revisions.rejected or '-'}"))  # fmt: skip
    run = observed.pipeline
    if run is not None and revisions.candidate == run.revision:
        table.add_row(
            "pipeline", Text(f"{run.revision} attempt {run.attempt}: {run.phase} {run.reason}".strip())
        )
    policy = status.prompt_policy
    if policy is not None and policy.shares:
        shares = "  ".join(f"{n} {v:.0%}" for n, v in policy.shares.items())
        table.add_row(
            "prompt policy", Text(f"{policy.algorithm}: {shares}  ({policy.feedback} feedback events)")
        )
    retraining = status.retraining
    where = stage(retraining)
    if retraining is not None and where is not None:
        table.add_row("retraining", Text(f"{where}: {retraining.reason} ({retraining.examples} examples)"))
    canary = status.canary
    if canary.step is not None:
        steps = len(model.spec.rollout.steps)
        table.add_row(
            "canary",
            Text(f"step {canary.step + 1}/{steps} at {canary.weight}%  failed intervals {canary.failures}"),
        )
    if analysis and revisions.candidate == analysis.get("revision"):
        mine, theirs = analysis.get("candidateFigures") or {}, analysis.get("stableFigures") or {}
        table.add_row("analysis", Text(f"{analysis.get('outcome')}: {analysis.get('reason')}"))
        for label, figures in (("candidate", mine), ("stable", theirs)):
            if figures:
                table.add_row(f"  {label}", Text(_figures_line(figures)))
    if status.last_decision is not None:
        d = status.last_decision
        table.add_row("last decision", Text(f"{d.kind}: {d.reason[:160]}"))
    return table


def _figures_line(f: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = f.get(key)
        return "-" if value is None else format(value, fmt)

    rate = f["errors"] / f["requests"] if f.get("requests") else None
    return (f"{f.get('requests', 0)} requests, errors {'-' if rate is None else format(rate, '.1%')}, "
            f"p95 {num('p95LatencyMs', '.0f')} ms, first token p95 {num('p95TimeToFirstTokenMs', '.0f')} ms, "
            f"{num('joulesPerToken', '.3g')} J/token")  # fmt: skip


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL of a Prometheus HTTP API")
    return value


@click.command("run")
@click.argument("manifest", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".autoglm/run"),
              show_default=True, help="Pipelines, each target's server log (server-TARGET.log), the saved status and the audit ledger.")  # fmt: skip
@click.option("--until", type=click.Choice(["serving", "promoted", "policy", "retrained", "forever"]), default="promoted",
              show_default=True,
              help="Stop once something serves, once the manifest's revision is promoted (or rejected), once it is "
                   "promoted and the prompt policy gives one variant 80% of chat traffic, once a retraining revision "
                   "was triggered and promoted or rejected, or never (Ctrl-C stops; edits of the manifest are "
                   "rolled out as they are saved).")  # fmt: skip
@click.option("--traffic", "traffic_rate", type=click.FloatRange(0, 100), default=2.0, show_default=True,
              help="Demo requests per second during a canary, so it has data to judge; 0 when real clients send it.")  # fmt: skip
@click.option("--traffic-clients", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Demo clients sending that traffic side by side (each waits for its answer).")  # fmt: skip
@click.option("--simulate-users", type=click.Choice(["none", "short"]), default="none", show_default=True,
              help="Simulated users at the --traffic rate: chat questions answered with the policy's prompt variant, "
                   "each answer rated on POST /v1/feedback (short: they prefer short answers).")  # fmt: skip
@click.option("--inject-drift", "drift_after", type=click.IntRange(0), default=None, metavar="N",
              help="With --simulate-users: after N questions asked of a promoted revision serving alone, the users "
                   "ask about another topic at greater length (a drift the retraining trigger should see).")  # fmt: skip
@click.option("--drift-window", type=click.IntRange(10, 100_000), default=None, metavar="REQUESTS",
              help="Requests in the drift reference window and in the window compared with it (default 500).")  # fmt: skip
@click.option("--propose-prompts", is_flag=True, default=False,
              help="OPRO: ask the served model for new system prompts once every variant has 20 ratings; each "
                   "joins the bandit as a new arm (status.promptPolicy.proposals, a PromptProposed record).")  # fmt: skip
@click.option("--timeout", "timeout_seconds", type=click.FloatRange(1), default=1800.0, show_default=True,
              help="Give up after this many seconds (not with --until forever).")  # fmt: skip
@click.option("--prometheus-url", metavar="URL", callback=lambda _c, _p, v: _http_url(v),
              help="Judge the canary with PromQL against this Prometheus HTTP API; it must scrape the loop's "
                   "server, listed in STATE_DIR/prometheus-targets.json for a file_sd_configs entry. "
                   "Default: scrape the server's /metrics in process.")  # fmt: skip
@click.option("--decode-tokens", type=click.IntRange(2, 4096), default=32, show_default=True,
              help="New tokens per decode measurement in validate.")  # fmt: skip
@click.option("--stream-interval-ms", type=click.FloatRange(0, MAX_STREAM_INTERVAL_MS), default=0.0, show_default=True,
              help="Each target's server hands streamed tokens over at most this often, several per event "
                   "(autoglm serve --stream-interval-ms; the first token and the end at once). 0: an event per "
                   "token. On a CPU whose every core decodes, each event costs decode time.")  # fmt: skip
def run_command(
    manifest: Path,
    state_dir: Path,
    until: str,
    traffic_rate: float,
    traffic_clients: int,
    simulate_users: str,
    drift_after: int | None,
    drift_window: int | None,
    propose_prompts: bool,
    timeout_seconds: float,
    prometheus_url: str | None,
    decode_tokens: int,
    stream_interval_ms: float,
) -> None:
    """Run MANIFEST's rollout here: build the revision, validate it, serve it, canary it against stable
    and promote or roll back, recording every decision in the audit ledger (STATE_DIR/audit.db).

    Running again resumes from the saved status; editing the manifest rolls out the change.
    `autoglm rollout status|history|promote|abort|retry` works against the same STATE_DIR.
    """
    from autoglm_operator.backends.local_state import StateError
    from autoglm_operator.embedded import EmbeddedLoop, LoopOptions

    console = Console(stderr=True)
    live = Live(Text("starting"), console=console, refresh_per_second=4, transient=False)

    def on_tick(model: AutoGLMModel, observed: Observed, result: Plan) -> None:
        live.update(progress_table(model, observed, result, loop.state.analysis()))

    options = LoopOptions(
        state_dir=state_dir,
        until=until,  # type: ignore[arg-type]
        traffic_rate=traffic_rate,
        traffic_clients=traffic_clients,
        simulated_users=simulate_users,  # type: ignore[arg-type]
        drift_after=drift_after,
        drift_window=drift_window,
        propose_prompts=propose_prompts,
        timeout_seconds=timeout_seconds,
        prometheus_url=prometheus_url,
        pipeline_args=("--decode-tokens", str(decode_tokens)),
        server_args=stream_interval_args(stream_interval_ms),
        log=lambda line: live.console.print(Text(line), soft_wrap=True),
        on_tick=on_tick,
    )
    loop = EmbeddedLoop(manifest, options)
    urls: dict[str, str] = {}
    try:
        with live:
            status = loop.run()
        console.line()
        urls = {target: server.url for target, server in loop.servers.items()}
    except KeyboardInterrupt:
        console.print(f"stopped: the state is kept in {state_dir}; run again to resume")
        raise SystemExit(130) from None
    except (TimeoutError, StateError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        loop.close()
    revisions = status.revisions
    click.echo(f"phase {status.phase}: stable {revisions.stable}, rejected {revisions.rejected}")
    if status.prompt_policy is not None and status.prompt_policy.shares:
        policy = status.prompt_policy
        shares = ", ".join(f"{n} {v:.0%}" for n, v in policy.shares.items())
        click.echo(f"prompt policy ({policy.algorithm}, {policy.feedback} feedback events): {shares}"
                   + (f"; {loop.rated} ratings sent by the simulated users" if loop.rated else ""))  # fmt: skip
    retraining = status.retraining
    if retraining is not None and retraining.triggered_at is not None:
        outcome = (retraining.outcome or "building").lower()
        click.echo(f"retraining ({outcome}): {retraining.reason}; {retraining.examples} examples")
    for target, url in urls.items():
        revision = next((t.revision for t in status.targets if t.name == target), None)
        click.echo(f"{target}: {revision} served at {url} until this command ended "
                   "(autoglm run --until forever keeps it up)")  # fmt: skip
