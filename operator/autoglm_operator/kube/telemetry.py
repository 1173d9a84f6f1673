"""The operator's own Prometheus metrics (``autoglm operator --metrics-port``), which the chart's
ServiceMonitor scrapes: how often it reconciles, how long a reconcile takes, how many fail, and the
decisions it records, by kind (the ledger holds each one; this is their rate).

``prometheus_client``'s default registry and its HTTP server: kopf has no metrics of its own.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter(
    "autoglm_operator_reconciles_total",
    "Reconciles of an AutoGLMModel, by outcome (ok, error, skipped: gone, being deleted or invalid).",
    ["outcome"],
)
RECONCILE_SECONDS = Histogram(
    "autoglm_operator_reconcile_duration_seconds",
    "Time one reconcile of one AutoGLMModel took, API calls included.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DECISIONS = Counter(
    "autoglm_operator_decisions_total",
    "Decisions this replica recorded in the audit ledger, by kind (RolloutStarted, Promoted, RolledBack, ...); "
    "one replayed after a restart counts again here, while the ledger keeps it once.",
    ["decision"],
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """``/metrics`` on ``host:port`` in a daemon thread (loopback unless told otherwise)."""
    start_http_server(port, addr=host)
