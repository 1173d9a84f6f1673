"""The canary's interval analysis, driven the same way by the embedded loop and the kopf operator.

Each call of :meth:`CanaryAnalyst.analyse` gives every live target's next verdict, once
``analysis.interval`` has passed since the previous one: all targets judged at the same moment,
each on its own figures since the step began (its :class:`FiguresSource`: a server's ``/metrics``
scraped in process, or PromQL against a Prometheus). A new step, or a change in the servers behind
a target (a restart: new counters; a replica more or less), begins every target's window again, so
all are judged over the same span. Nothing is judged at the call that begins a window. The k-th
time a target's candidate is tested against stable in a window is the k-th look at the same
growing figures: the candidate-vs-stable tests spend their significance over the looks
(``canary.look_alpha``), so a longer step does not make a good candidate likelier to fail. A
judgement that ran no such test (fewer than ``minRequests`` on a side, a source that did not
answer) spends nothing: counting it would leave the tests that follow with less power for no gain
(a twice-as-slow candidate on a loaded machine was once promoted at p=0.0022 after looks that had
too few requests to test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from autoglm_api.status import AutoGLMModelStatus
from autoglm_operator.canary import RELATIVE_METRICS, Figures, judge
from autoglm_operator.metrics import FiguresSource, MetricsUnavailableError
from autoglm_operator.plan import Analysis, duration


@dataclass
class _Window:
    """Where the current canary step's figures come from (a source per target), and since when."""

    key: tuple[str, int] | None = None
    sources: dict[str, FiguresSource] = field(default_factory=dict)
    started: datetime | None = None
    #: Whether the sources' windows were begun (the first read of a step only marks its start).
    begun: bool = False
    #: What served each live target when the windows were begun (its server URL, its pods).
    servers: dict[str, str] = field(default_factory=dict)
    #: When the newest interval was judged: the next one is judged ``analysis.interval`` later.
    judged: datetime | None = None
    #: Per target, how many judgements of this window tested the candidate against stable: the
    #: relative tests' significance shrinks with each.
    looks: dict[str, int] = field(default_factory=dict)


@dataclass
class CanaryAnalyst:
    #: The figures source of a target.
    source_for: Callable[[str], FiguresSource]
    log: Callable[[str], None] = print
    window: _Window = field(default_factory=_Window)

    def analyse(
        self,
        spec_analysis: Any,
        status: AutoGLMModelStatus,
        live: Mapping[str, tuple[str, str | None]],
        servers: Mapping[str, str],
        served_as: Callable[[str], str],
        now: datetime,
    ) -> tuple[dict[str, Analysis], dict[str, dict[str, Any]]]:
        """The verdicts per target and what was measured (for a state file or the status).

        ``live``: per target whose canary is loaded, (candidate, stable); ``servers``: what serves
        each target now (a change begins the window again); ``served_as(target)``: the model name
        the target's metrics carry.
        """
        candidate, step = status.revisions.candidate, status.canary.step
        if candidate is None or step is None or not live:
            return {}, {}
        if self.window.key != (candidate, step):  # a new step (or a restart): judge from here on
            self.window = _Window((candidate, step), started=now)
        current = {t: servers.get(t, "") for t in live}
        if self.window.begun and current != self.window.servers:
            self.log("analysis: the servers changed; the step's figures start again")
            self.window = _Window((candidate, step), started=now)
        window = self.window
        window.servers = current
        for target in live:
            if target not in window.sources:
                window.sources[target] = self.source_for(target)
        last = window.judged or window.started or now
        if (window.begun or window.judged is not None) and now - last < duration(spec_analysis.interval):
            return {}, {}
        got: dict[str, dict[str, Figures | None]] = {}
        if not window.begun:
            try:
                for target in live:
                    window.sources[target].begin(now)
                window.begun, window.started = True, now  # the step's figures start here
                return {}, {}
            except MetricsUnavailableError as exc:
                self.log(f"analysis: {exc}")
        else:
            for target, (mine, theirs) in live.items():
                try:
                    revisions = [r for r in (mine, theirs) if r]
                    got[target] = window.sources[target].read(served_as(target), revisions, now)
                except MetricsUnavailableError as exc:
                    self.log(f"analysis of target {target}: {exc}")
        window.judged = now
        analyses, saved = {}, {}
        for target, (mine, theirs) in live.items():
            figures = got.get(target, {})
            ours, stable = figures.get(mine), figures.get(theirs) if theirs else None
            look = window.looks.get(target, 0) + 1
            result = judge(ours, stable, spec_analysis, weight=status.canary.weight or 0, look=look)
            if any(c.metric in RELATIVE_METRICS for c in result.checks):
                window.looks[target] = look
            source = window.sources[target]
            measured = {
                "target": target, "stable": theirs,
                "since": window.started.isoformat() if window.started else None,
                "source": source.description, "queries": list(getattr(source, "queries", [])),
                "candidateFigures": figures_json(ours), "stableFigures": figures_json(stable),
            }  # fmt: skip
            analyses[target] = Analysis(mine, step, now, result, measured)
            saved[target] = {
                "revision": mine,
                "step": step,
                "at": now.isoformat(),
                **measured,
                **result.to_json(),
            }
        return analyses, saved


def figures_json(f: Figures | None) -> dict[str, float | int | None] | None:
    if f is None:
        return None
    p95 = f.latency.quantile(0.95) if f.latency is not None and f.latency.total else None
    ttft = f.time_to_first_token
    return {
        "requests": f.requests, "errors": f.errors, "p95LatencyMs": p95,
        "p95TimeToFirstTokenMs": ttft.quantile(0.95) if ttft is not None and ttft.total else None,
        "joulesPerToken": f.joules_per_token, "feedbackScore": f.feedback_score,
    }  # fmt: skip
