"""``python -m autoglm_pipelines STEP --spec MANIFEST --workdir DIR``: one pipeline step, as the local
runner and the WorkflowTemplate's containers start it (``autoglm pipeline STEP`` is the same)."""

from autoglm_pipelines.cli import main

main()
