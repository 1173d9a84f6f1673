"""Resolve the URIs of ``spec.source`` and the datasets to local paths.

``file://`` and ``pvc://`` (a mounted volume) are paths; ``pkg://PACKAGE/PATH`` is a file shipped
inside an installed Python package (found without importing it); ``hf://ORG/NAME`` comes from the
local Hugging Face cache only (nothing is downloaded from the hub at run time); ``s3://`` and
``gs://`` go through fsspec when the ``cloud`` extra is installed; ``http(s)://`` is downloaded.
Remote files are cached under the cache folder, keyed by URI, and checked against ``sha256``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from autoglm_core.digests import sha256_file

PVC_ROOT_ENV = "AUTOGLM_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"  # where KServe's storage initializer mounts pvc:// URIs
_CHUNK = 1 << 20


class SourceError(Exception):
    """A URI that cannot be resolved, with what is wrong and what would work."""


class TransientSourceError(SourceError):
    """A remote source that failed in a way a retry may fix (a refused connection, a timeout)."""


def resolve(uri: str, *, cache_dir: Path, sha256: str | None = None, revision: str | None = None) -> Path:
    """The local path of ``uri`` (a file or a folder); raises SourceError naming the problem."""
    parsed = urlparse(uri)
    scheme, rest = parsed.scheme, (parsed.netloc + parsed.path)
    if scheme in ("file", "pvc"):
        path = local_path(uri)
    elif scheme == "pkg":
        path = _package_file(parsed.netloc, parsed.path.lstrip("/"), uri)
    elif scheme == "hf":
        path = _hf_cached(rest.strip("/"), revision, uri)
    elif scheme in ("s3", "gs"):
        path = _fsspec_copy(uri, cache_dir)
    elif scheme in ("http", "https"):
        path = _download(uri, cache_dir)
    else:
        raise SourceError(
            f"{uri}: unsupported scheme {scheme!r}; use file, pkg, pvc, hf, s3, gs, http or https"
        )
    if not path.exists():
        raise SourceError(f"{uri}: {path} does not exist")
    if sha256 is not None:
        if not path.is_file():
            raise SourceError(f"{uri}: sha256 given but {path} is a folder; name a file")
        actual = sha256_file(path)
        if actual != sha256:
            raise SourceError(f"{uri}: sha256 mismatch: expected {sha256}, got {actual}")
    return path


def local_path(uri: str) -> Path:
    """Where a ``file://`` or ``pvc://CLAIM/PATH`` URI is on this machine (it need not exist yet:
    what is written there is read back at the same URI); SourceError for any other scheme."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.netloc + parsed.path)  # file:///abs/path, or file://relative/path
    if parsed.scheme == "pvc":
        return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / parsed.netloc / parsed.path.lstrip("/")
    raise SourceError(f"{uri}: not a local path; use file:// or pvc://CLAIM/PATH")


def _package_file(package: str, relative: str, uri: str) -> Path:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"{uri}: cannot look up package {package!r}: {exc}") from exc
    if spec is None:
        raise SourceError(
            f"{uri}: Python package {package!r} is not installed (pip install it, with --no-deps)"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    if not roots:
        raise SourceError(f"{uri}: {package!r} is not a package with files")
    return Path(roots[0]) / relative


def _hf_cached(repo_id: str, revision: str | None, uri: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise SourceError(f"{uri}: hf:// needs huggingface_hub (the 'ml' extra)") from exc
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise SourceError(
            f"{uri}: not in the local Hugging Face cache; AutoGLM does not download from the hub at run time: "
            "put the model in the cache (huggingface-cli download) or use file:// or pvc://"
        ) from exc


def _cache_path(uri: str, cache_dir: Path) -> Path:
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_dir / "sources" / key / (Path(urlparse(uri).path).name or "download")


def _fsspec_copy(uri: str, cache_dir: Path) -> Path:
    target = _cache_path(uri, cache_dir)
    if target.exists():
        return target
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with the ml extra
        raise SourceError(f"{uri}: s3:// and gs:// need fsspec: pip install 'autoglm[cloud]'") from exc
    try:
        fs, path = fsspec.core.url_to_fs(uri)  # type: ignore[no-untyped-call]
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        fs.get(path, str(partial), recursive=fs.isdir(path))
        partial.rename(target)
    except ImportError as exc:
        raise SourceError(f"{uri}: {exc}; install the 'cloud' extra: pip install 'autoglm[cloud]'") from exc
    except OSError as exc:
        raise TransientSourceError(f"{uri}: cannot copy: {exc}") from exc
    return target


def _download(uri: str, cache_dir: Path) -> Path:
    target = _cache_path(uri, cache_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(uri, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise TransientSourceError(f"{uri}: download failed: {exc}") from exc
    partial.rename(target)
    return target
