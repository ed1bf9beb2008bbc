"""Making a directory's entries durable: the one fsync of a directory in walrep.

A new, renamed or removed file survives a crash only once its directory is synced
too (creating a segment, an atomic replace of wal.meta, a purge), and a new WAL
directory once its parent is.
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


def ensure_private_dir(path: str) -> None:
    """Create the WAL directory path (0700, parents as needed) unless it exists, and
    sync its parent so it survives a crash."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # makedirs' mode passes through the umask
        sync_dir(os.path.dirname(os.path.abspath(path)))
