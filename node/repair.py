"""Repair on open: what the writer does with a log a crash (or worse) left damaged.

Before a writer appends, it must know where the log really ends and what sequence
comes next. ``open_log`` finds that out from the newest segment and repairs what a
crash explains:

- a torn tail (a partial entry, a zero-filled end, a last entry failing its CRC) is
  cut off; a header a crashed rotation left incomplete is rewritten;
- with mode "cut" (a reader, which can refetch), the whole log is cut back to its
  first damaged entry in any segment, and the segments after it set aside.

Anything else in the newest segment (a CRC mismatch or an impossible length before
its end) makes the next sequence uncertain: it is refused with the damage's
exception, and nothing is changed. Every cut keeps the bytes it removes in
``<segment>.broken`` (a sparse copy: zero runs stay holes) before it truncates and
syncs, so an operator can look at what was lost. This module runs only under the
writer's directory lock.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os

from . import files
from . import format as fmt
from .reader import ScanEnd, Segment, WALReader, list_segments, scan

# Repairs are part of a writer's open, and logged as the writer's.
log = logging.getLogger("walrep.node.writer")

# What opening does with damage: "tail" cuts a torn tail of the newest segment and
# refuses anything else (a leader: its log is the only copy); "cut" cuts the whole log
# back to its first damaged entry (a reader, which refetches).
MODES = ("tail", "cut")
BROKEN_SUFFIX = ".broken"
# Repairs copy cut bytes to a .broken file this many at a time and leave a block of
# zeros as a hole instead of writing it.
SPARSE_BLOCK_BYTES = 1024 * 1024
# How many zeros past a newest segment's last non-zero byte its scan on open reads:
# a crash leaves a few, and a file extended by a gigabyte of them must not cost a
# gigabyte of memory. Below this much, the whole file is read.
ZERO_TAIL_READ_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class LogEnd:
    """Where a log continues: its newest segment (None when there is none), that
    segment's size and entry count, and the next sequence."""

    segment: Segment | None
    size: int
    entries: int
    next_seq: int


def open_log(wal_dir: str, mode: str, repairs: list[fmt.Problem]) -> LogEnd:
    """Repair the log in wal_dir as mode says (see MODES) and return where it ends.

    Each repair made is appended to repairs. Damage no crash explains raises its
    WALDamage (BadHeader, CRCMismatch, BadLength) with nothing changed.
    """
    if mode == "cut":
        _cut_at_first_damage(wal_dir, repairs)
    segments, unsequenced = list_segments(wal_dir)
    for path in unsequenced:
        log.info("not a sequenced segment, left alone by the writer: %s", path)
    if not segments:
        return LogEnd(None, 0, 0, 1)
    newest = segments[-1]
    data, size = _read_newest_segment(newest.path)
    header_problem = fmt.check_file_header(data)
    if header_problem is not None:
        if len(data) < fmt.FILE_HEADER_BYTES and fmt.FILE_HEADER.startswith(data):
            # Created by a rotation that crashed before the header was complete.
            files.overwrite_synced(newest.path, fmt.FILE_HEADER)
            return LogEnd(newest, fmt.FILE_HEADER_BYTES, 0, newest.first_seq)
        detail = f"cannot open the newest segment: {header_problem}"
        raise fmt.Problem("bad-header", newest.path, 0, newest.first_seq, detail).error()
    problems: list[fmt.Problem] = []
    end = _scan_newest_segment(newest, data, size, problems)
    damage = [p for p in problems if p.kind != "torn-tail"]
    if damage:
        # Past a bad CRC or length the entry boundaries are uncertain, so the next
        # sequence is too: refuse rather than risk reusing one.
        first = damage[0]
        advice = (
            f"{first.detail}. The newest segment is damaged, so the next sequence is "
            "uncertain. Entries before that offset are intact (walrep dump shows them). "
            "A reader node can be restarted with --resync; for a leader, keep a copy of "
            f"the file and truncate it to {first.offset} bytes to continue from sequence "
            f"{first.sequence}."
        )
        raise dataclasses.replace(first, detail=advice).error()
    if end.problem is not None:
        _cut_tail(wal_dir, newest.path, end.valid_end, end.problem, repairs)
    return LogEnd(newest, end.valid_end, end.entries, end.next_seq)


def _cut_at_first_damage(wal_dir: str, repairs: list[fmt.Problem]) -> None:
    """Mode "cut": cut the log just before its first damaged entry, in any segment.

    The cut bytes go to ``<segment>.broken`` and every later segment is renamed to
    ``<segment>.broken`` (newest first, so a crash midway leaves a log whose damage
    the next open finds again). Writing continues at the damaged entry's sequence.
    """
    problems: list[fmt.Problem] = []
    for _entry in WALReader(wal_dir, on_problem=problems.append).raw_entries():
        if problems:
            break
    if not problems:
        return
    problem = problems[0]
    segments = list_segments(wal_dir)[0]
    index = next(i for i, s in enumerate(segments) if s.path == problem.file)
    moved = segments[index + 1 :]
    for segment in reversed(moved):
        broken = segment.path + BROKEN_SUFFIX
        if os.path.exists(broken):
            copy_sparse_synced(segment.path, 0, broken)
            os.unlink(segment.path)
        else:
            os.rename(segment.path, broken)
        files.sync_dir(wal_dir)
    keep = problem.offset if problem.kind != "bad-header" else 0
    cut = copy_sparse_synced(problem.file, keep, problem.file + BROKEN_SUFFIX)
    if keep < fmt.FILE_HEADER_BYTES:
        files.overwrite_synced(problem.file, fmt.FILE_HEADER)
    else:
        files.truncate_synced(problem.file, keep)
    files.sync_dir(wal_dir)
    repairs.append(problem)
    log.warning(
        "repair=cut: cut the log before sequence %s: %s; kept the %d cut bytes in "
        "%s.broken and moved %d later segments to .broken files",
        problem.sequence,
        problem,
        cut,
        problem.file,
        len(moved),
    )


def _cut_tail(
    wal_dir: str, path: str, valid_end: int, problem: fmt.Problem, repairs: list[fmt.Problem]
) -> None:
    broken = path + BROKEN_SUFFIX
    cut = copy_sparse_synced(path, valid_end, broken)
    files.truncate_synced(path, valid_end)
    files.sync_dir(wal_dir)
    repairs.append(problem)
    log.warning("cut a torn tail: %s; kept the %d cut bytes in %s", problem, cut, broken)


# --- reading the newest segment without its zero tail -----------------------------


def _read_newest_segment(path: str) -> tuple[bytes, int]:
    """The newest segment's bytes for the scan on open, and the file's size.

    A crash can leave a file longer than what was written to it, ending in zeros,
    and so can a tool: however many there are, the scan needs the bytes up to the
    last non-zero one and a few of the zeros after it (_scan_newest_segment adds
    more if an entry reaches further). So a gigabyte of zeros is neither read into
    memory nor, where it is a hole, read at all.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        limit = min(size, _data_end(fd, size) + ZERO_TAIL_READ_BYTES)
        parts = []
        pos = 0
        while pos < limit and (part := os.pread(fd, limit - pos, pos)):
            parts.append(part)
            pos += len(part)
    finally:
        os.close(fd)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return data, (size if pos == limit else pos)  # short of limit: the file shrank


def _scan_newest_segment(
    segment: Segment, data: bytes, size: int, problems: list[fmt.Problem]
) -> ScanEnd:
    """scan() of the newest segment as if data held all of its size bytes.

    Past the bytes _read_newest_segment read, the file holds only zeros: when the
    scan stops where it needs more of them (an entry whose payload ends in zeros,
    or the header after it), they are added here, not read.
    """
    while True:
        problems.clear()
        end = scan(
            data,
            segment.path,
            segment.first_seq,
            is_tail=True,
            on_problem=problems.append,
            file_size=size,
        )
        if len(data) >= size:
            return end
        need = _bytes_to_judge(data, end.valid_end)
        if need <= len(data):
            return end
        data += bytes(min(size, need + ZERO_TAIL_READ_BYTES) - len(data))


def _bytes_to_judge(data: bytes, pos: int) -> int:
    """How much of the file the scan needs to judge the entry at pos: its header and,
    if the length there is possible, its payload (0 if no more would change that)."""
    for status, _at, end, _timestamp, _payload in fmt.walk_frames(data, pos):
        if status == fmt.PARTIAL_HEADER:
            break
        return 0 if status == fmt.BAD_LENGTH else end  # a bad length however much follows
    return pos + fmt.ENTRY_HEADER_BYTES


# --- sparse copies for .broken files -------------------------------------------------


def _data_regions(fd: int, start: int, stop: int) -> list[tuple[int, int]]:
    """The parts of [start, stop) of a file that are not holes, in order (all of it
    where the file system cannot tell)."""
    seek_data = getattr(os, "SEEK_DATA", None)  # Linux, and not every other system
    if seek_data is None:
        return [(start, stop)] if start < stop else []
    regions: list[tuple[int, int]] = []
    pos = start
    while pos < stop:
        try:
            begin = os.lseek(fd, pos, seek_data)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # a hole from pos to the end of the file
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(start, stop)]
            raise
        if begin >= stop:
            break
        end = min(os.lseek(fd, begin, os.SEEK_HOLE), stop)
        regions.append((begin, end))
        pos = end
    return regions


def _data_end(fd: int, size: int) -> int:
    """The offset just past the file's last non-zero byte (0 if it is all zeros)."""
    for begin, end in reversed(_data_regions(fd, 0, size)):
        while end > begin:
            start = max(begin, end - SPARSE_BLOCK_BYTES)
            kept = os.pread(fd, end - start, start).rstrip(b"\0")
            if kept:
                return start + len(kept)
            end = start
    return 0


def copy_sparse_synced(src: str, start: int, dst: str) -> int:
    """Append src's bytes from start on to dst (created 0600), fsync dst, return how many.

    The copy has the same length and content, but zeros are not written: holes in
    src and blocks of zeros stay holes in dst, and the rest goes a block at a time,
    so a tail of a gigabyte of zeros costs neither a gigabyte of disk nor of memory.
    """
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        count = max(0, os.fstat(src_fd).st_size - start)
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            at = os.fstat(dst_fd).st_size - start  # after what earlier repairs kept there
            for begin, end in _data_regions(src_fd, start, start + count):
                for offset in range(begin, end, SPARSE_BLOCK_BYTES):
                    block = os.pread(src_fd, min(SPARSE_BLOCK_BYTES, end - offset), offset)
                    if block.count(0) != len(block):
                        _pwrite_all(dst_fd, block, at + offset)
            os.ftruncate(dst_fd, at + start + count)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    os.chmod(dst, 0o600)
    return count


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
