"""Who may use the model repository routes, and which model URIs ``load`` may open.

Inference routes stay open, as KServe's are. The repository routes (``/v2/repository/...``: load,
unload, promote, rollback, index) change what the server serves, so:

- with an admin token configured, every client must send ``Authorization: Bearer TOKEN``
  (compared in constant time);
- without one, they answer only to loopback clients.

``load`` opens only local paths that resolve (symlinks and ``..`` followed) inside a model root,
or the start-up model's own URI; remote URIs (``http(s)://``, ``s3://``, ``gs://``) only when the
server allows them. Every refusal is an :class:`AccessDeniedError` naming why (401 or 403).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from autoglm_core.card import ArtifactError
from autoglm_core.errors import AutoGLMError
from autoglm_core.uris import DEFAULT_PVC_ROOT, PVC_ROOT_ENV, SourceError, resolve
from autoglm_inference.options import ADMIN_TOKEN_ENV

__all__ = ["ADMIN_TOKEN_ENV", "AccessDeniedError", "AdminGuard", "ModelPolicy", "admin_token", "authorize"]
REPOSITORY_PREFIX = "/v2/repository"
REMOTE_SCHEMES = ("http", "https", "s3", "gs")


class AccessDeniedError(AutoGLMError):
    """A refused repository call or model URI: 401 (no usable credentials) or 403 (not allowed)."""

    default_status = 403


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def authorize(
    authorization: str | None,
    client_host: str | None,
    token: str | None,
    *,
    routes: str = "the repository routes",
    configure: str = f"--admin-token-file or {ADMIN_TOKEN_ENV}",
    role: str = "admin",
) -> None:
    """Allow a call to ``routes`` or raise ``AccessDeniedError`` saying why. Pure: no I/O."""
    if token is not None:
        if not authorization:
            raise AccessDeniedError(
                f"{routes} need 'Authorization: Bearer TOKEN' with the server's {role} token", status=401
            )
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AccessDeniedError("the Authorization header must be 'Bearer TOKEN'", status=401)
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AccessDeniedError(f"the bearer token is not the server's {role} token")
        return
    if not is_loopback(client_host):
        raise AccessDeniedError(
            f"{routes} answer only to loopback clients (this one is {client_host}) unless the "
            f"server has a {role} token ({configure})"
        )


def admin_token(
    token_file: Path | None,
    environ: dict[str, str] | None = None,
    *,
    env: str = ADMIN_TOKEN_ENV,
    role: str = "admin",
) -> str | None:
    """A token: the file's content (stripped), else the environment variable ``env``, else None."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"{token_file}: the {role} token file is empty")
        return token
    token = (os.environ if environ is None else environ).get(env, "").strip()
    return token or None


class AdminGuard:
    """ASGI middleware: ``authorize`` every request to the repository routes."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and (
            path == REPOSITORY_PREFIX or path.startswith(REPOSITORY_PREFIX + "/")
        ):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            client = scope.get("client")
            try:
                authorize(headers.get("authorization"), client[0] if client else None, self.token)
            except AccessDeniedError as exc:
                extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                await JSONResponse({"error": str(exc)}, status_code=exc.status, headers=extra)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class ModelPolicy:
    """Which URIs ``load`` may open: local paths inside ``roots``, the ``trusted`` URIs as given
    (the start-up model), and remote URIs only when ``allow_remote``."""

    roots: tuple[Path, ...]
    trusted: frozenset[str] = frozenset()
    allow_remote: bool = False

    @classmethod
    def build(
        cls,
        roots: Iterable[str],
        *,
        cache_dir: Path,
        startup_uri: str | None = None,
        allow_remote: bool = False,
    ) -> ModelPolicy:
        """The policy the server runs with. With no ``roots`` the folder holding the start-up model
        is one; the cache folder (GGUF conversions, downloads) always is."""
        resolved = [_root(r, cache_dir) for r in roots]
        if not resolved and startup_uri is not None:
            start = _local_path(startup_uri, cache_dir)
            if start is not None:
                resolved.append(start.parent)
        resolved.append(cache_dir.resolve())
        trusted = frozenset([startup_uri]) if startup_uri else frozenset()
        return cls(tuple(dict.fromkeys(resolved)), trusted, allow_remote)

    def check(self, uri: str, *, cache_dir: Path) -> None:
        """Allow ``uri`` or raise ``AccessDeniedError`` (403) naming why."""
        if uri in self.trusted:
            return
        scheme = urlparse(uri).scheme if "://" in uri else ""
        if scheme in REMOTE_SCHEMES:
            if not self.allow_remote:
                raise AccessDeniedError(
                    f"{uri}: remote model URIs are not allowed on this server (start it with --allow-remote-models)"
                )
            return
        path = _local_path(uri, cache_dir)
        if path is None:
            raise AccessDeniedError(f"{uri}: unsupported scheme {scheme!r}; use a path, file, pkg, pvc or hf")
        if not any(path.is_relative_to(root) for root in self.roots):
            raise AccessDeniedError(
                f"{uri}: {path} is outside the model roots ({', '.join(map(str, self.roots))}); "
                "start the server with --model-root to allow it"
            )

    def describe(self) -> dict[str, Any]:
        return {"roots": [str(r) for r in self.roots], "allowRemote": self.allow_remote}


def _local_path(uri: str, cache_dir: Path) -> Path | None:
    """The resolved local path ``uri`` names (it may not exist), or None for a remote or unknown scheme."""
    if "://" not in uri:
        return Path(uri).resolve()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.netloc + parsed.path).resolve()
    if parsed.scheme == "pkg":
        package = _package_folder(parsed.netloc, uri, cache_dir)
        path = (package / parsed.path.lstrip("/")).resolve()
        if not path.is_relative_to(package):
            raise AccessDeniedError(f"{uri}: the path leaves package {parsed.netloc!r}")
        return path
    if parsed.scheme == "pvc":
        base = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return (base / parsed.netloc / parsed.path.lstrip("/")).resolve()
    if parsed.scheme == "hf":  # the local Hugging Face cache only; nothing is downloaded
        try:
            return resolve(uri, cache_dir=cache_dir).resolve()
        except SourceError as exc:
            raise ArtifactError(str(exc)) from exc
    return None


def _package_folder(package: str, uri: str, cache_dir: Path) -> Path:
    try:
        return resolve(f"pkg://{package}", cache_dir=cache_dir).resolve()
    except SourceError as exc:
        raise ArtifactError(str(exc)) from exc


def _root(root: str, cache_dir: Path) -> Path:
    """A ``--model-root``: a path, ``file://`` or ``pkg://PACKAGE[/PATH]``."""
    path = _local_path(root, cache_dir)
    if path is None:
        raise ValueError(f"--model-root {root}: use a path, file://, pkg:// or pvc://")
    return path
