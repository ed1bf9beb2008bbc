"""The WAL directory's lock: one writer per directory, in this process or any other.

A writer holds an exclusive ``flock`` on ``wal.lock`` in its directory for its whole
life, taken before it repairs or changes anything there; the file says which pid
holds it, so a refused opener can name the holder. The kernel drops the lock when
the holder's file is closed, so a process killed with SIGKILL leaves no stale lock.

Readers never take it: they read files while the writer appends. This module never
deletes the lock file: a second opener that found it gone would lock a new file and
run next to a holder still locked on the old one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from . import format as fmt

LOCK_FILE_NAME = "wal.lock"
# The pid is a few digits; read a little more so a damaged file cannot cost much.
_PID_READ_BYTES = 64


class WALLocked(fmt.WALError):
    """Another writer (in this process or another) holds the WAL directory."""

    def __init__(self, wal_dir: str, pid: int | None):
        if pid is None:
            holder = "another writer (its pid is not recorded yet)"
        elif pid == os.getpid():
            holder = f"another writer in this process (pid {pid})"
        else:
            holder = f"process {pid}"
        super().__init__(
            f"the WAL directory {wal_dir} is locked by {holder}: only one writer may use "
            f"a directory at a time (the lock is {os.path.join(wal_dir, LOCK_FILE_NAME)})"
        )
        self.wal_dir = wal_dir
        self.pid = pid


class DirLock:
    """A held directory lock; release() is idempotent and thread-safe."""

    def __init__(self, wal_dir: str, fd: int):
        self.wal_dir = wal_dir
        self._fd: int | None = fd
        self._guard = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is not None:
            # Closing the only descriptor of this open file releases the flock; the
            # pid stays in the file and is overwritten by the next holder.
            os.close(fd)


def lock_dir(wal_dir: str) -> DirLock:
    """Lock wal_dir (which must exist) for one writer, or raise WALLocked at once."""
    path = os.path.join(wal_dir, LOCK_FILE_NAME)
    # A descriptor of its own: flock belongs to the open file, so a second open in
    # this process conflicts too, and O_CLOEXEC keeps it out of exec'd children.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise WALLocked(wal_dir, _read_pid(fd)) from None
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            # The pid only names the holder in an error; a writer may still open on
            # a full disk (and wait there for room), so the lock holds without it.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
    except BaseException:
        os.close(fd)
        raise
    return DirLock(wal_dir, fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, _PID_READ_BYTES, 0)
    try:
        pid = int(text.strip())
    except ValueError:  # empty: the holder has locked but not written its pid yet
        return None
    return pid if pid > 0 else None
