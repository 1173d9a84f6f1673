"""The AutoGLM control plane: reconcile core, backends, audit ledger and the ``autoglm`` CLI."""
