"""File safety: the steps that make a change to a WAL directory survive a crash.

A file's bytes are durable once it is fsynced; a new, renamed or removed name once its
directory is. Every such step in walrep goes through here (the writer, its repair on
open, wal.meta, the startup probe) so that none forgets the second sync. Also the
small stat helpers for files a purge may remove under a caller's feet.

Nothing here knows the entry format beyond the file header's size, and nothing here
decides what to delete or cut: the writer, repair and purge modules decide.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .format import FILE_HEADER_BYTES

TEMP_SUFFIX = ".tmp"


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


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_atomically(path: str, data: bytes) -> None:
    """Make data the content of path (0600) so that a crash leaves the old content or
    the new, never a mix: write a temp file, fsync it, rename it over path, fsync the
    directory."""
    temp = path + TEMP_SUFFIX
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    sync_dir(os.path.dirname(os.path.abspath(path)))


def truncate_synced(path: str, size: int) -> None:
    """Cut path to size bytes and fsync it (the caller syncs the directory if the
    file is new)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def overwrite_synced(path: str, data: bytes) -> None:
    """Replace path's content with data in place (not atomically: for a file whose old
    content is worthless, such as a header a crash left incomplete) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_synced(directory: str, paths: Iterable[str]) -> int:
    """Remove the files at paths (all in directory) and sync the directory once if any
    went; return how many this call removed (one already gone does not count)."""
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        sync_dir(directory)
    return removed


# --- stat helpers for files that may vanish (a purge, a rotation) ----------------


def size_or_zero(path: str) -> int:
    """The file's size in bytes, or 0 if it is gone."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def mtime_or_inf(path: str) -> float:
    """The file's modification time, or +inf if it is gone: a vanished file counts as
    the newest, so no age limit removes anything on its account."""
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def retained_bytes(paths: Iterable[str]) -> int:
    """Bytes of entries held in these segment files: their sizes less the file headers
    (a file gone counts 0)."""
    return sum(max(0, size_or_zero(path) - FILE_HEADER_BYTES) for path in paths)
