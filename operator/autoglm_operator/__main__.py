"""``python -m autoglm_operator``: the ``autoglm`` CLI (used by the local pipeline runner)."""

from autoglm_operator.cli.main import cli

cli(prog_name="autoglm")
