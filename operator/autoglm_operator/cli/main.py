"""The ``autoglm`` console script: one click group, one module per subcommand group."""

from __future__ import annotations

import click

from autoglm_inference.cli import serve_command
from autoglm_operator.cli.agent import agent_command
from autoglm_operator.cli.audit import audit_group
from autoglm_operator.cli.crds import crds_command
from autoglm_operator.cli.feedback import feedback_group
from autoglm_operator.cli.fleet import fleet_group
from autoglm_operator.cli.objects import objects_command
from autoglm_operator.cli.operator import operator_command
from autoglm_operator.cli.rollout import rollout_group
from autoglm_operator.cli.run import run_command
from autoglm_operator.cli.validate import validate_command
from autoglm_pipelines.cli import pipeline_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autoglm", prog_name="autoglm")
def cli() -> None:
    """AutoGLM: compress, validate, roll out and keep improving GLM-family models.

    Every command works on one machine without a cluster; the operator runs the same code in one.
    """


cli.add_command(validate_command)
cli.add_command(crds_command)
cli.add_command(audit_group)
cli.add_command(pipeline_group)
cli.add_command(serve_command)
cli.add_command(run_command)
cli.add_command(rollout_group)
cli.add_command(objects_command)
cli.add_command(agent_command)
cli.add_command(operator_command)
cli.add_command(feedback_group)
cli.add_command(fleet_group)
