"""Making a directory's entries durable: the one fsync of a directory in walrep.

A new, renamed or removed file survives a crash only once its directory is synced
too (creating a segment, an atomic replace of wal.meta, a purge).
"""

from __future__ import annotations

import os


def sync_dir(path: str) -> None:
    """fsync the directory at path, so the names in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
