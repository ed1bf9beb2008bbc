"""The purge choice: which segment files a purge may delete. Pure; deletes nothing.

A purge removes whole segments, oldest or chosen by age, and never the active one:
the writer appends there, and on open it finds the next sequence from the newest
segment, so a purge never takes away what that needs. purge_before(seq) deletes
only segments whose every entry is below seq (all of them read, by every reader
retention waits for): a segment is known to end below seq only once the segment
after it starts at or before seq, so the newest segment is never chosen by it.

The writer lists the segments, asks here, and removes what it is told
(node.files.unlink_synced), under its files lock.
"""

from __future__ import annotations

from collections.abc import Callable

from .reader import Segment


def inactive(segments: list[Segment], active: str | None) -> list[Segment]:
    """Every segment but the active one (whose path is active)."""
    return [s for s in segments if s.path != active]


def older_than(
    segments: list[Segment], active: str | None, cutoff: float, mtime: Callable[[str], float]
) -> list[Segment]:
    """Inactive segments modified before cutoff (mtime(path) gives the time)."""
    return [s for s in segments if s.path != active and mtime(s.path) < cutoff]


def before(segments: list[Segment], seq: int, active: str | None) -> list[Segment]:
    """Inactive segments all of whose entries are below seq: those followed by a
    segment that starts at or before seq (segments in order of first sequence)."""
    return [
        s
        for s, following in zip(segments, segments[1:], strict=False)
        if following.first_seq <= seq and s.path != active
    ]
