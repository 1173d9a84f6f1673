"""Identities by content: the SHA-256 of a file, of a folder's files, and of a JSON value.

One canonical JSON serialisation is hashed everywhere (step inputs, revision ids, folder digests,
audit records), so the same value always gets the same digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Final

#: Revision ids are the first hex digits of a SHA-256: 12 digits, as a short git hash is used.
REVISION_LENGTH: Final = 12
_CHUNK: Final = 1 << 20
#: Files being written (renamed into place when complete) are never part of a folder's identity.
PARTIAL_SUFFIX: Final = ".partial"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the bytes of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path, *, exclude: Collection[str] = ()) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path, in sorted order.

    Files named in ``exclude`` (by base name) and partial files (``*.partial``) are left out.
    """
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in exclude and not p.name.endswith(PARTIAL_SUFFIX)
    }


def canonical_json(value: object) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, UTF-8 text kept as is.

    Only JSON values: a Path, a datetime or a NaN raises (TypeError or ValueError) instead of being
    hashed as whatever ``str()`` of it happens to be.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_digest(value: object) -> str:
    """Hex SHA-256 of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def short_id(digest: str) -> str:
    """The revision id of a hex digest: its first ``REVISION_LENGTH`` digits."""
    return digest[:REVISION_LENGTH]
