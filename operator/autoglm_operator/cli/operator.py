"""``autoglm operator``: the kopf operator that does in a cluster what ``autoglm run`` does here."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from autoglm_core.audit.ledger import URL_ENV
from autoglm_operator.kube import DEFAULT_ARTIFACT_REPOSITORY, DEFAULT_TARGET_SELECTOR


def _datasets(value: str | None) -> str | None:
    if value is not None and not (value.startswith("pvc://") and len(value) > len("pvc://")):
        raise click.BadParameter(
            f"{value!r}: give pvc://CLAIM/PATH, a PersistentVolumeClaim both the operator and the pipeline mount"
        )
    return value


@click.command("operator", short_help="Run the Kubernetes operator (kopf) for AutoGLMModel resources.")
@click.option("-n", "--namespace", "namespaces", multiple=True, metavar="NAMESPACE",
              help="Watch this namespace (repeatable; a glob like 'team-*' works). Default: -A.")  # fmt: skip
@click.option("-A", "--all-namespaces", "clusterwide", is_flag=True, default=False,
              help="Watch every namespace (the default when no --namespace is given).")  # fmt: skip
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Kubeconfig file; default: the pod's service account, else $KUBECONFIG or ~/.kube/config.")  # fmt: skip
@click.option("--image", default=None,
              help="The AutoGLM image the pipeline's steps run in (default: this release's, autoglm:VERSION).")  # fmt: skip
@click.option("--artifact-repository", default=DEFAULT_ARTIFACT_REPOSITORY, show_default=True,
              help="Argo's default artifact repository as a URI (s3://bucket, gs://bucket, file:///path): an output "
                   "artifact reported only by its key lies under it.")  # fmt: skip
@click.option("--audit-url", default=None,
              help=f"The audit ledger's database URL (PostgreSQL in a cluster); default ${URL_ENV}.")  # fmt: skip
@click.option("--prometheus-url", default=None,
              help="Prometheus HTTP API that scrapes the servers: the canary's figures. Without it a canary holds "
                   "(Inconclusive) and never promotes on its own.")  # fmt: skip
@click.option("--target-selector", default=DEFAULT_TARGET_SELECTOR, show_default=True,
              help="PromQL label matchers that select one target's servers; {model} and {target} are filled in.")  # fmt: skip
@click.option("--feedback-url", envvar="AUTOGLM_FEEDBACK_URL", default=None, show_envvar=True,
              help="The feedback store the servers log to (PostgreSQL in a cluster): runs the prompt policy on its "
                   "features and publishes it in each target's ConfigMap. Default: no feedback loop.")  # fmt: skip
@click.option("--feast-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/var/lib/autoglm/feast"),
              show_default=True, help="The Feast repository's files (registry, offline store).")  # fmt: skip
@click.option("--online-store", envvar="AUTOGLM_FEAST_ONLINE_STORE", default="sqlite", show_default=True,
              show_envvar=True, help="Feast's online store: sqlite (in --feast-dir), redis://HOST:PORT or "
                                     "postgresql://USER:PASS@HOST/DB.")  # fmt: skip
@click.option("--retraining-datasets", default=None, metavar="pvc://CLAIM/PATH", callback=lambda _c, _p, v: _datasets(v),
              help="Where retraining datasets are written (through this pod's mount of the claim at "
                   "$AUTOGLM_PVC_ROOT/CLAIM, default /mnt/pvc) and read by the pipeline's steps, which mount the "
                   "claim read-only. Without it, spec.feedback.retraining triggers nothing.")  # fmt: skip
@click.option("--propose-prompts", is_flag=True, default=False,
              help="OPRO: ask each model's first target (its InferenceService) for new system prompts from past "
                   "(prompt, score) pairs; each joins the bandit as a new arm (status.promptPolicy.proposals, a "
                   "PromptProposed record). Needs --feedback-url.")  # fmt: skip
@click.option("--pipeline-service-account", default="autoglm-pipeline", show_default=True,
              help="The ServiceAccount the pipeline's pods run as in each model's namespace (the chart creates it).")  # fmt: skip
@click.option("--interval", type=click.FloatRange(0.5), default=5.0, show_default=True,
              help="Seconds between reconciles of each model besides those its events trigger.")  # fmt: skip
@click.option("--standalone", is_flag=True, default=False,
              help="No peering: act even if other replicas run (one replica only).")  # fmt: skip
@click.option("--peering", "peering_name", default="autoglm", show_default=True,
              help="The kopf peering object replicas coordinate through (KopfPeering, or ClusterKopfPeering with -A).")  # fmt: skip
@click.option("--priority", type=int, default=None,
              help="This replica's peering priority: the highest acts, the others wait. Default: random per process.")  # fmt: skip
@click.option("--liveness", "liveness_endpoint", default=None, metavar="URL",
              help="Serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz.")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Serve the operator's Prometheus metrics (reconciles, their duration, decisions) on this port; "
                   "0: none.")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="The address the metrics bind to (0.0.0.0 in a pod, for Prometheus to scrape).")  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, default=False, help="Log at DEBUG.")
def operator_command(
    namespaces: tuple[str, ...],
    clusterwide: bool,
    kubeconfig: str | None,
    image: str | None,
    artifact_repository: str,
    audit_url: str | None,
    prometheus_url: str | None,
    target_selector: str,
    feedback_url: str | None,
    feast_dir: Path,
    online_store: str,
    retraining_datasets: str | None,
    propose_prompts: bool,
    pipeline_service_account: str,
    interval: float,
    standalone: bool,
    peering_name: str,
    priority: int | None,
    liveness_endpoint: str | None,
    metrics_port: int,
    metrics_host: str,
    verbose: bool,
) -> None:
    """Reconcile AutoGLMModel resources: submit the pipeline as an Argo Workflow, serve each target
    through a KServe InferenceService, hot-swap and canary revisions through the agents' ConfigMaps,
    judge canaries on Prometheus' figures, and record every decision in the audit ledger and as an
    Event. Runs until interrupted."""
    if namespaces and clusterwide:
        raise click.UsageError("give --namespace or --all-namespaces, not both")
    if propose_prompts and not feedback_url:
        raise click.UsageError(
            "--propose-prompts needs --feedback-url (the ratings the proposals learn from)"
        )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    import kopf

    from autoglm_operator.kube.gateway import Gateway, load_config
    from autoglm_operator.kube.operator import PeeringOptions, build_registry
    from autoglm_operator.kube.reconciler import ClusterOptions, ClusterReconciler
    from autoglm_pipelines.workflow import DEFAULT_IMAGE

    load_config(kubeconfig)
    if metrics_port:
        from autoglm_operator.kube import telemetry

        telemetry.serve(metrics_port, metrics_host)
    options = ClusterOptions(image=image or DEFAULT_IMAGE, artifact_repository=artifact_repository, audit_url=audit_url,
                             prometheus_url=prometheus_url, target_selector=target_selector,
                             feedback_url=feedback_url, feast_dir=feast_dir, online_store=online_store,
                             retraining_datasets=retraining_datasets, propose_prompts=propose_prompts,
                             pipeline_service_account=pipeline_service_account)  # fmt: skip
    reconciler = ClusterReconciler(Gateway(), options)
    peering = PeeringOptions(standalone=standalone, name=peering_name, priority=priority)
    registry = build_registry(
        reconciler, interval=interval, peering=peering, same_login=kubeconfig is not None
    )
    try:
        kopf.run(
            registry=registry, clusterwide=not namespaces, namespaces=namespaces,
            liveness_endpoint=liveness_endpoint,
        )  # fmt: skip
    finally:
        reconciler.close()
