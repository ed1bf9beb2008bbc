"""node.files: the crash-safe file steps (directory fsync, atomic replace, truncate and
fsync, delete and fsync) on real files with the real fsync.

Which file or directory each fsync reached is recorded by wrapping os.fsync (the
real call still runs) and naming its descriptor through /proc/self/fd.
"""

from __future__ import annotations

import os
import stat

import pytest

from walrep.node import files
from walrep.node import format as fmt

needs_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc"
)


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """Paths fsynced during the test, in order (the fsync itself is the real one)."""
    seen: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return seen


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@needs_proc
def test_replace_atomically_writes_syncs_renames_then_syncs_the_directory(tmp_path, synced):
    target = tmp_path / "wal.meta"
    files.replace_atomically(str(target), b"first\n")
    assert target.read_bytes() == b"first\n" and _mode(target) == 0o600
    assert synced == [str(tmp_path / "wal.meta.tmp"), str(tmp_path)]
    synced.clear()
    files.replace_atomically(str(target), b"second, longer\n")
    assert target.read_bytes() == b"second, longer\n"
    assert sorted(os.listdir(tmp_path)) == ["wal.meta"]  # no temp file left behind
    assert synced[-1] == str(tmp_path)  # the rename is made durable last


def test_replace_atomically_leaves_the_old_content_when_it_fails(tmp_path):
    target = tmp_path / "wal.meta"
    files.replace_atomically(str(target), b"old\n")
    os.mkdir(tmp_path / "wal.meta.tmp")  # the temp file cannot be created
    with pytest.raises(IsADirectoryError):
        files.replace_atomically(str(target), b"new\n")
    assert target.read_bytes() == b"old\n"


@needs_proc
def test_truncate_synced_cuts_and_syncs_the_file(tmp_path, synced):
    path = tmp_path / "arc-00000000000000000001.wal"
    path.write_bytes(fmt.FILE_HEADER + b"entry bytes and a torn tail")
    files.truncate_synced(str(path), fmt.FILE_HEADER_BYTES + 11)
    assert path.read_bytes() == fmt.FILE_HEADER + b"entry bytes"
    assert synced == [str(path)]


@needs_proc
def test_overwrite_synced_replaces_the_content_in_place(tmp_path, synced):
    path = tmp_path / "arc-00000000000000000001.wal"
    path.write_bytes(b"ARC")  # a header a crashed rotation left incomplete
    inode = os.stat(path).st_ino
    files.overwrite_synced(str(path), fmt.FILE_HEADER)
    assert path.read_bytes() == fmt.FILE_HEADER and os.stat(path).st_ino == inode
    assert synced == [str(path)]


@needs_proc
def test_sync_dir_syncs_the_directory_itself(tmp_path, synced):
    files.sync_dir(str(tmp_path))
    assert synced == [str(tmp_path)]
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        files.sync_dir(str(tmp_path / "plain"))


@needs_proc
def test_ensure_private_dir_creates_0700_whatever_the_umask_and_syncs_the_parent(tmp_path, synced):
    path = tmp_path / "a" / "wal"
    old_umask = os.umask(0o022)
    try:
        files.ensure_private_dir(str(path))
    finally:
        os.umask(old_umask)
    assert path.is_dir() and _mode(path) == 0o700
    assert synced == [str(tmp_path / "a")]
    synced.clear()
    os.chmod(path, 0o750)
    files.ensure_private_dir(str(path))  # there already: left as it is
    assert _mode(path) == 0o750 and synced == []


@needs_proc
def test_unlink_synced_counts_what_it_removed_and_syncs_once(tmp_path, synced):
    names = [f"arc-{n:020d}.wal" for n in (1, 5, 9)]
    for name in names:
        (tmp_path / name).write_bytes(fmt.FILE_HEADER)
    doomed = [str(tmp_path / n) for n in names[:2]] + [str(tmp_path / "gone.wal")]
    assert files.unlink_synced(str(tmp_path), doomed) == 2
    assert os.listdir(tmp_path) == [names[2]]
    assert synced == [str(tmp_path)]
    synced.clear()
    assert files.unlink_synced(str(tmp_path), [str(tmp_path / "gone.wal")]) == 0
    assert synced == []  # nothing removed, nothing to make durable


def test_stat_helpers_treat_a_vanished_file_as_empty_and_newest(tmp_path):
    path = tmp_path / "arc-00000000000000000001.wal"
    path.write_bytes(fmt.FILE_HEADER + b"x" * 93)
    other = tmp_path / "arc-00000000000000000002.wal"
    other.write_bytes(fmt.FILE_HEADER)
    assert files.size_or_zero(str(path)) == fmt.FILE_HEADER_BYTES + 93
    assert files.mtime_or_inf(str(path)) == os.stat(path).st_mtime
    gone = str(tmp_path / "gone.wal")
    assert files.size_or_zero(gone) == 0
    assert files.mtime_or_inf(gone) == float("inf")
    assert files.retained_bytes([str(path), str(other), gone]) == 93
