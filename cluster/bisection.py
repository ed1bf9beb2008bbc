"""The one divergence bisection: where do two logs first differ, asked as ranges.

`walrep verify` and the reader's anti-entropy (cluster.verify: directories or a
node over the network) and the history checker (cluster.history: directories)
all find the first differing sequence with descend(). It decides which range to
compare next and never reads a log: the caller answers "do the two logs agree
over from..to?" however it can (two digests, a cache, entry by entry), so the
same steps run under trio (verify) and in plain blocking code (the checker).
"""

from __future__ import annotations

from collections.abc import Callable, Generator

# Yields (from_seq, to_seq) to compare, is sent True when the logs agree there,
# returns the first sequence where they differ (None: they agree over it all).
Descent = Generator[tuple[int, int], bool, int | None]


def descend(lo: int, hi: int, *, chunks: int, leaf_entries: int) -> Descent:
    """The first sequence in lo..hi where two logs differ (or one lacks it).

    The whole range is asked first; while it differs, it is cut into ``chunks``
    chunks asked in order, and the search goes on in the first that differs.
    Ranges of at most ``leaf_entries`` are asked entry by entry. The last chunk
    (and the last entry of a leaf) is never asked: the range around it differed
    and everything before it agreed. A log that changed meanwhile is therefore
    not detected here; callers that care ask the sequence found once more
    (verify.search does). With chunks=2 and leaf_entries=1 this is halving.
    """
    if lo > hi:
        return None
    if (yield lo, hi):
        return None
    while hi - lo + 1 > leaf_entries:
        step = -(-(hi - lo + 1) // chunks)
        for start in range(lo, hi + 1, step):
            end = min(hi, start + step - 1)
            if end == hi or not (yield start, end):
                lo, hi = start, end
                break
    for seq in range(lo, hi):
        if not (yield seq, seq):
            return seq
    return hi


def first_difference(
    same: Callable[[int, int], bool], lo: int, hi: int, *, chunks: int, leaf_entries: int
) -> int | None:
    """descend() answered by a blocking ``same(from_seq, to_seq)``."""
    steps = descend(lo, hi, chunks=chunks, leaf_entries=leaf_entries)
    try:
        asked = next(steps)
        while True:
            asked = steps.send(same(*asked))
    except StopIteration as done:
        return done.value
