"""Where AutoGLM keeps what it can rebuild: converted checkpoints, downloads, compiled kernels.

One place names them, so the CLI, the pipeline steps and the server agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

#: The cache folder of the pipeline and the server: converted GGUF checkpoints and downloads.
CACHE_ENV: Final = "AUTOGLM_CACHE_DIR"
DEFAULT_CACHE_DIR: Final = Path(".cache/autoglm")
#: Compiled CPU kernels; they depend on this machine's compiler and CPU, not on a project.
KERNEL_DIR_ENV: Final = "AUTOGLM_KERNEL_DIR"


def cache_dir(explicit: Path | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """``explicit``, else ``$AUTOGLM_CACHE_DIR``, else ``.cache/autoglm`` (relative to the cwd)."""
    if explicit is not None:
        return explicit
    return Path(environ[CACHE_ENV]) if environ.get(CACHE_ENV) else DEFAULT_CACHE_DIR


def kernel_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``$AUTOGLM_KERNEL_DIR``, else ``$XDG_CACHE_HOME/autoglm/kernels`` (``~/.cache`` by default)."""
    if environ.get(KERNEL_DIR_ENV):
        return Path(environ[KERNEL_DIR_ENV])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autoglm" / "kernels"
