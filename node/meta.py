"""The node's metadata file: what must survive restarts besides the entries.

``wal.meta`` is JSON, replaced atomically (temp file, fsync, rename, fsync of the
directory) so a crash leaves either the old or the new version, never a mix.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from .files import replace_atomically
from .format import WALError

META_FILE_NAME = "wal.meta"


class MetaError(WALError):
    pass


def new_log_id() -> str:
    """A random 128-bit log id, as 32 hex digits."""
    return secrets.token_hex(16)


def meta_path(wal_dir: str) -> str:
    return os.path.join(wal_dir, META_FILE_NAME)


def load_meta(wal_dir: str) -> dict[str, Any]:
    """The metadata, or {} if the node has none yet."""
    path = meta_path(wal_dir)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise MetaError(
            f"{path} is not valid JSON ({exc}); restore it or remove the node"
        ) from None
    if not isinstance(value, dict):
        raise MetaError(f"{path} must hold a JSON object")
    return value


def save_meta(wal_dir: str, meta: dict[str, Any]) -> None:
    replace_atomically(meta_path(wal_dir), json.dumps(meta, sort_keys=True).encode() + b"\n")


def update_meta(wal_dir: str, **changes: Any) -> dict[str, Any]:
    meta = load_meta(wal_dir)
    meta.update(changes)
    save_meta(wal_dir, meta)
    return meta
