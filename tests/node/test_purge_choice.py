"""node.purge: which segments a purge may delete, checked against a real log's entries.

purge_before(seq) may delete a segment only when every entry in it is below seq
(all read by whoever retention waits for), and never the active segment; the
choice is the largest such set, so retention frees what it may.
"""

from __future__ import annotations

from walhelpers import payload_for

from walrep import node
from walrep.node import purge
from walrep.node.reader import WALReader

WAIT_S = 20.0


def _entries_by_segment(wal_dir: str) -> dict[str, list[int]]:
    reader = WALReader(wal_dir)
    return {
        s.path: [seq for seq, _, _ in WALReader(s.path).raw_entries()] for s in reader.segments()
    }


def test_purge_before_chooses_exactly_the_segments_wholly_below_seq(wal):
    w = wal.writer(max_size_bytes=300)
    for seq in range(1, 41):
        assert w.append_raw(payload_for(seq), durable=True, timeout=WAIT_S) == seq
    w.close()
    held = _entries_by_segment(wal.dir())
    segments = node.WALReader(wal.dir()).segments()
    assert len(segments) > 5
    newest = segments[-1].path
    for seq in range(0, 43):
        for active in (None, newest, segments[2].path):
            chosen = {s.path for s in purge.before(segments, seq, active)}
            for segment in segments:
                wholly_below = all(e < seq for e in held[segment.path])
                may = wholly_below and segment.path not in (active, newest)
                assert (segment.path in chosen) == may, (seq, active, segment.path)


def test_the_other_choices_spare_the_active_segment(wal):
    w = wal.writer(max_size_bytes=300)
    for seq in range(1, 21):
        w.append_raw(payload_for(seq), durable=True, timeout=WAIT_S)
    segments = w.segments()
    active = w.current_file()
    assert [s.path for s in purge.inactive(segments, active)] == [
        s.path for s in segments if s.path != active
    ]
    ages = {s.path: i for i, s in enumerate(segments)}
    older = purge.older_than(segments, active, 3, ages.__getitem__)
    assert [s.path for s in older] == [s.path for s in segments[:3]]
    assert purge.older_than(segments, active, float("inf"), ages.__getitem__) == [
        s for s in segments if s.path != active
    ]
