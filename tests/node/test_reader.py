"""Reading by sequence, and what the reader and the writer make of damaged segments.

DESIGN.md invariant 3: a torn tail is cut on open and reported, never returned; a
bad CRC in the middle is reported with file, offset and sequence and never returned;
a length that cannot be right ends the file and the rest is reported lost.
"""

from __future__ import annotations

import os
import stat
import struct

import pytest
from walhelpers import (
    file_bytes,
    first_seq_of,
    frames_of,
    payload_for,
    read_all,
    segment_paths,
    write_bytes,
)

from walrep import node
from walrep.node import format as fmt

WAIT_S = 20.0


def _log(wal, count: int, *, max_size: int = 100 * 1024 * 1024, payload=payload_for) -> str:
    """A closed log of count entries (payload(seq) each), one entry per write."""
    w = wal.writer(max_size_bytes=max_size)
    for seq in range(1, count + 1):
        assert w.append_raw(payload(seq), durable=True, timeout=WAIT_S) == seq
    w.close()
    return wal.dir()


def _segment_holding(wal_dir: str, seq: int) -> str:
    return [p for p in segment_paths(wal_dir) if first_seq_of(p) <= seq][-1]


def _frame(path: str, seq: int):
    return frames_of(path)[seq - first_seq_of(path)]


def _patch(path: str, offset: int, new: bytes) -> None:
    data = bytearray(file_bytes(path))
    data[offset : offset + len(new)] = new
    write_bytes(path, bytes(data))


def _flip(path: str, offset: int) -> None:
    data = bytearray(file_bytes(path))
    data[offset] ^= 0x5A
    write_bytes(path, bytes(data))


# --- lookups by sequence --------------------------------------------------------------


def test_from_seq_lookup_across_many_segments(wal):
    wal_dir = _log(wal, 150, max_size=400)
    segments = segment_paths(wal_dir)
    assert len(segments) >= 10
    firsts = [first_seq_of(p) for p in segments]
    reader = node.WALReader(wal_dir)
    probes = {1, 2, 149, 150} | set(firsts) | {f - 1 for f in firsts[1:]} | {f + 1 for f in firsts}
    for lo in sorted(probes):
        for hi in (lo, lo + 1, lo + 17, 150, None):
            got = list(reader.raw_entries(lo, hi))
            top = 150 if hi is None else min(hi, 150)
            assert [s for s, _, _ in got] == list(range(lo, top + 1)), (lo, hi)
            assert all(p == payload_for(s) for s, _, p in got)
    assert list(reader.raw_entries(151)) == []
    assert list(reader.raw_entries(1000, 2000)) == []
    assert reader.problems == []
    assert [e.seq for e in reader.entries(40, 42)] == [40, 41, 42]
    assert reader.bounds() == (1, 150)


def test_from_seq_before_the_first_held_entry_starts_at_the_first(wal):
    wal_dir = _log(wal, 60, max_size=300)
    w = wal.writer(max_size_bytes=300)
    w.purge_before(30)
    w.close()
    first, last = node.WALReader(wal_dir).bounds()
    assert 1 < first <= 30 and last == 60
    got = [s for s, _, _ in node.WALReader(wal_dir).raw_entries(1)]
    assert got == list(range(first, 61))


def test_read_frames_serves_verified_frames_within_one_segment(wal):
    wal_dir = _log(wal, 60, max_size=400)
    reader = node.WALReader(wal_dir)
    for start in (1, 7, 33, 60):
        first, count, data = reader.read_frames(start, 60, max_bytes=1)
        assert (first, count) == (start, 1)  # at least one entry, whatever max_bytes says
        assert data == fmt.encode_entry(
            _frame(_segment_holding(wal_dir, start), start).timestamp_us, payload_for(start)
        )
        first, count, data = reader.read_frames(start, 60, max_bytes=1 << 20)
        segment = _segment_holding(wal_dir, start)
        segment_last = first_seq_of(segment) + len(frames_of(segment)) - 1
        assert count == segment_last - start + 1  # stops at the segment's end
        offset = _frame(segment, start).offset
        assert data == file_bytes(segment)[offset:]
    _first, count, _data = reader.read_frames(10, 11, max_bytes=1 << 20)
    assert count <= 2


def test_read_frames_is_the_same_with_and_without_the_c_scan(wal, monkeypatch):
    # read_frames verifies most of a chunk with node._scan and the rest entry by entry;
    # every cut (sequence range, byte budget, segment end, damage) must come out as the
    # pure-Python loop has it, error text included.
    import random

    from walrep.node import reader as reader_module

    if reader_module._scan_fast is None:
        pytest.skip("node._scan is not built here")
    rng = random.Random(11)
    sizes = [rng.choice((0, 1, 50, 100, 700, 3000)) for _ in range(400)]
    wal_dir = _log(
        wal, 400, max_size=40_000, payload=lambda seq: bytes([seq % 251]) * sizes[seq - 1]
    )
    damaged = _frame(_segment_holding(wal_dir, 321), 321)
    with open(_segment_holding(wal_dir, 321), "r+b") as f:
        f.seek(
            damaged.offset + fmt.ENTRY_HEADER_BYTES + 1 if sizes[320] > 1 else damaged.offset + 12
        )
        f.write(b"\xee")

    def serve(fast, start, stop, budget):
        monkeypatch.setattr(reader_module, "_scan_fast", fast)
        try:
            return node.WALReader(wal_dir).read_frames(start, stop, max_bytes=budget)
        except node.WALError as exc:
            return ("error", str(exc))

    fast = reader_module._scan_fast
    cases = [(1, 400, 1 << 20), (321, 400, 1 << 20), (300, 330, 1 << 20)]
    cases += [
        (start, start + rng.randrange(0, 60), rng.choice((1, 100, 116, 5000, 65536)))
        for start in rng.sample(range(1, 401), 120)
    ]
    errors = 0
    for start, stop, budget in cases:
        stop = min(stop, 400)
        served = serve(fast, start, stop, budget)
        assert served == serve(None, start, stop, budget), (start, stop, budget)
        errors += served[0] == "error"
    assert errors  # the damaged entry was reached, and reported alike


def test_read_frames_refuses_what_is_not_held(wal):
    wal_dir = _log(wal, 30, max_size=300)
    w = wal.writer(max_size_bytes=300)
    w.purge_before(20)
    w.close()
    reader = node.WALReader(wal_dir)
    first, _last = reader.bounds()
    for missing in (1, first - 1, 31, 1000):
        with pytest.raises(node.RangeNotAvailable) as info:
            reader.read_frames(missing, missing + 5)
        assert info.value.sequence == missing
    assert reader.read_frames(first, first)[:2] == (first, 1)


def test_reading_an_empty_or_missing_directory(tmp_path):
    assert list(node.WALReader(str(tmp_path / "nothing")).raw_entries(1)) == []
    assert node.WALReader(str(tmp_path)).bounds() == (None, None)


# --- CRC damage in the middle: reported with its place, never returned -----------------


@pytest.mark.parametrize("where", ["payload", "crc"])
def test_crc_mismatch_mid_segment_is_reported_and_skipped(wal, where):
    wal_dir = _log(wal, 40, max_size=500)
    damaged_seq = 12
    path = _segment_holding(wal_dir, damaged_seq)
    assert path != segment_paths(wal_dir)[-1], "the test wants a sealed segment"
    frame = _frame(path, damaged_seq)
    _flip(path, frame.offset + (16 + 3 if where == "payload" else 13))

    entries, problems = read_all(wal_dir)
    assert [s for s, _, _ in entries] == [s for s in range(1, 41) if s != damaged_seq]
    assert all(p == payload_for(s) for s, _, p in entries)
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.kind, problem.file, problem.offset, problem.sequence) == (
        "crc-mismatch",
        path,
        frame.offset,
        damaged_seq,
    )
    assert str(damaged_seq) in str(problem) and path in str(problem)

    reader = node.WALReader(wal_dir, on_problem=lambda p: None)
    assert [s for s, _, _ in reader.raw_entries(damaged_seq, damaged_seq)] == []
    assert reader.corrupted_entries == 1
    with pytest.raises(node.WALError):  # never served to a replica
        reader.read_frames(damaged_seq - 1, damaged_seq + 1)
    held_before = rf"sequence {damaged_seq} .*holds 1\.\.{damaged_seq - 1}\)"
    with pytest.raises(node.RangeNotAvailable, match=held_before):
        reader.digest(1, 40)
    assert reader.digest(damaged_seq + 1, 40)  # the rest is still whole


def test_crc_mismatch_in_the_middle_of_the_newest_segment_is_not_a_torn_tail(wal):
    wal_dir = _log(wal, 10)
    (path,) = segment_paths(wal_dir)
    _flip(path, _frame(path, 4).offset + 20)
    entries, problems = read_all(wal_dir)
    # Without a next segment to confirm the count, entries after a bad CRC could sit
    # at shifted sequences (the length may be damaged too): they are withheld.
    assert [s for s, _, _ in entries] == [1, 2, 3]
    assert [(p.kind, p.sequence) for p in problems] == [("crc-mismatch", 4), ("unplaceable", 4)]


# --- torn tails -------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 8, 16, 17, 30])  # bytes cut from the end
def test_torn_tail_is_reported_not_returned(wal, cut):
    wal_dir = _log(wal, 6)
    (path,) = segment_paths(wal_dir)
    last = _frame(path, 6)
    size = os.path.getsize(path)
    # Cut into entry 6: its payload, or its header.
    cut_at = last.offset + 16 + len(last.payload) - cut
    assert cut_at > last.offset
    os.truncate(path, cut_at)
    entries, problems = read_all(wal_dir)
    assert [s for s, _, _ in entries] == [1, 2, 3, 4, 5]
    assert [(p.kind, p.offset, p.sequence) for p in problems] == [("torn-tail", last.offset, 6)]
    assert problems[0].lost_bytes == cut_at - last.offset
    assert size - cut_at == cut


def test_partial_header_after_the_last_entry_is_a_torn_tail(wal):
    wal_dir = _log(wal, 3)
    (path,) = segment_paths(wal_dir)
    end = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(fmt.encode_entry(1, b"next entry")[:9])
    entries, problems = read_all(wal_dir)
    assert [s for s, _, _ in entries] == [1, 2, 3]
    assert [(p.kind, p.offset, p.sequence) for p in problems] == [("torn-tail", end, 4)]


@pytest.mark.parametrize("zeros", [5, 16, 100, 8192])
def test_zero_filled_tail_is_a_torn_tail(wal, zeros):
    wal_dir = _log(wal, 4)
    (path,) = segment_paths(wal_dir)
    end = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(bytes(zeros))  # what a crash leaves when the size got ahead of the data
    entries, problems = read_all(wal_dir)
    assert [s for s, _, _ in entries] == [1, 2, 3, 4]
    assert [(p.kind, p.offset, p.sequence) for p in problems] == [("torn-tail", end, 5)]
    assert problems[0].lost_bytes == zeros


@pytest.mark.parametrize("kept", [4, 10, 16, 20])  # bytes of the last entry before the zeros
def test_a_torn_entry_followed_by_zeros_is_one_torn_tail(wal, kept):
    wal_dir = _log(wal, 6)
    (path,) = segment_paths(wal_dir)
    last = _frame(path, 6)
    os.truncate(path, last.offset + kept)
    with open(path, "ab") as f:
        f.write(bytes(4096))
    entries, problems = read_all(wal_dir)
    assert [s for s, _, _ in entries] == [1, 2, 3, 4, 5]
    assert [(p.kind, p.offset, p.sequence) for p in problems] == [("torn-tail", last.offset, 6)]


def test_an_incomplete_sealed_segment_is_reported_as_truncated(wal):
    wal_dir = _log(wal, 30, max_size=400)
    path = segment_paths(wal_dir)[0]
    last_seq = first_seq_of(segment_paths(wal_dir)[1]) - 1
    last = _frame(path, last_seq)
    os.truncate(path, last.offset + 20)
    entries, problems = read_all(wal_dir)
    assert [s for s, _, _ in entries] == [s for s in range(1, 31) if s != last_seq]
    assert [(p.kind, p.file, p.offset, p.sequence) for p in problems] == [
        ("truncated", path, last.offset, last_seq)
    ]


# --- a length that cannot be right -------------------------------------------------------


def test_bad_length_ends_the_file_and_reports_the_rest_lost(wal):
    wal_dir = _log(wal, 30, max_size=500)
    path = segment_paths(wal_dir)[0]
    next_first = first_seq_of(segment_paths(wal_dir)[1])
    bad_seq = 3
    frame = _frame(path, bad_seq)
    _patch(path, frame.offset, struct.pack(">I", fmt.MAX_PAYLOAD_BYTES + 1))
    entries, problems = read_all(wal_dir)
    # Entries before it, and everything in later segments; nothing parsed out of the rest.
    assert [s for s, _, _ in entries] == [1, 2] + list(range(next_first, 31))
    assert all(p == payload_for(s) for s, _, p in entries)
    (problem,) = problems
    assert (problem.kind, problem.file, problem.offset, problem.sequence) == (
        "bad-length",
        path,
        frame.offset,
        bad_seq,
    )
    assert problem.lost_bytes == os.path.getsize(path) - frame.offset


@pytest.mark.parametrize("length", [0xFFFFFFFF, fmt.MAX_PAYLOAD_BYTES + 1])
def test_a_bad_length_in_a_seed_named_file(tmp_path, length):
    import arcw_parser

    data = arcw_parser.FILE_HEADER + arcw_parser.build_frame(1, b"\x90")
    data += struct.pack(">IQI", length, 2, 0) + b"\x90" * 40
    path = tmp_path / "arc-20240101_000000.000000000.wal"
    path.write_bytes(data)
    problems: list = []
    got = list(node.WALReader(str(path), on_problem=problems.append).all_raw_entries())
    assert got == [(None, 1, b"\x90")]
    assert [(p.kind, p.offset, p.sequence) for p in problems] == [("bad-length", 24, None)]


def test_a_bad_file_header_is_reported_and_the_file_skipped(wal):
    wal_dir = _log(wal, 30, max_size=500)
    path = segment_paths(wal_dir)[0]
    _patch(path, 0, b"XRCW")
    entries, problems = read_all(wal_dir)
    next_first = first_seq_of(segment_paths(wal_dir)[1])
    assert [s for s, _, _ in entries] == list(range(next_first, 31))
    assert [(p.kind, p.file, p.offset) for p in problems] == [("bad-header", path, 0)]


# --- the writer repairs a torn tail on open ------------------------------------------------


@pytest.mark.parametrize("kind", ["payload", "header", "crc", "zeros", "payload+zeros"])
def test_writer_cuts_a_torn_tail_keeps_it_and_continues(wal, kind):
    wal_dir = _log(wal, 6)
    (path,) = segment_paths(wal_dir)
    last = _frame(path, 6)
    good_end = last.offset
    if kind == "payload":
        os.truncate(path, last.offset + 16 + 2)
    elif kind == "header":
        os.truncate(path, last.offset + 7)
    elif kind == "crc":  # complete length, wrong bytes: the write never finished
        _flip(path, last.offset + 16)
    elif kind == "payload+zeros":  # half the entry, then a size that got ahead of the data
        os.truncate(path, last.offset + 20)
        with open(path, "ab") as f:
            f.write(bytes(4096))
    else:
        good_end = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(bytes(4096))
    torn = file_bytes(path)[good_end:]
    expected_next = 6 if good_end == last.offset else 7

    w = wal.writer()
    assert len(w.repairs) == 1
    repair = w.repairs[0]
    assert (repair.kind, repair.file, repair.offset, repair.sequence) == (
        "torn-tail",
        path,
        good_end,
        expected_next,
    )
    assert os.path.getsize(path) == good_end
    broken = path + ".broken"
    assert file_bytes(broken) == torn  # what was cut is kept, byte for byte
    assert stat.S_IMODE(os.stat(broken).st_mode) == 0o600
    # The torn entry never became durable, so its number is free; nothing before it is.
    assert w.current_sequence() == expected_next - 1
    assert w.append_raw(b"after repair", durable=True, timeout=WAIT_S) == expected_next
    w.close()
    entries, problems = read_all(wal_dir)
    assert problems == []
    assert [s for s, _, _ in entries] == list(range(1, expected_next + 1))
    assert entries[-1][2] == b"after repair"
    assert all(p == payload_for(s) for s, _, p in entries[:-1])
    # A second open finds nothing to repair.
    assert wal.writer().repairs == []


def test_writer_repairs_a_segment_whose_header_a_crash_interrupted(wal):
    wal_dir = _log(wal, 8, max_size=200)
    newest = segment_paths(wal_dir)[-1]
    newest_first = first_seq_of(newest)
    os.truncate(newest, 3)  # the rotation crashed after writing "ARC"
    w = wal.writer(max_size_bytes=200)
    assert w.current_sequence() == newest_first - 1
    assert w.append_raw(b"next", durable=True, timeout=WAIT_S) == newest_first
    w.close()
    assert file_bytes(newest)[:7] == fmt.FILE_HEADER
    entries, problems = read_all(wal_dir)
    assert problems == [] and [s for s, _, _ in entries] == list(range(1, newest_first + 1))


def test_writer_refuses_a_newest_segment_with_a_foreign_header(wal):
    wal_dir = _log(wal, 3)
    (path,) = segment_paths(wal_dir)
    _patch(path, 0, b"NOPE")
    with pytest.raises(node.WALError):
        wal.writer()
    assert file_bytes(path)[:4] == b"NOPE"  # left for the operator, not rewritten


# --- damage to a length field that still looks plausible ------------------------
#
# ARCW v1 frames carry no sequence number and the CRC covers only the payload, so a
# length field damaged into another plausible value moves the frame boundaries. With
# 48-byte payloads (64-byte frames) one flipped bit (48 -> 112) makes entry k swallow
# entry k+1: entry k fails its CRC (reported), and every later entry of that file is
# would then be read one sequence too low. The reader withholds entries after a bad
# CRC unless the next segment's name confirms the count, and the writer refuses to
# open such a newest segment rather than guess its next sequence.


def _fixed_size_log(wal, damage: str = "shift") -> tuple[str, str]:
    wal_dir = _log(wal, 10, payload=lambda s: bytes([s]) * 48)
    (path,) = segment_paths(wal_dir)
    frame = _frame(path, 4)
    length = 48 ^ 64 if damage == "shift" else fmt.MAX_PAYLOAD_BYTES + 1  # 48 -> 112: one bit
    _patch(path, frame.offset, struct.pack(">I", length))
    return wal_dir, path


def test_a_shifted_frame_is_never_returned_under_another_sequence(wal):
    wal_dir, _path = _fixed_size_log(wal)
    entries, problems = read_all(wal_dir)
    assert problems, "the damage must be reported"
    for seq, _ts, payload in entries:
        assert payload == bytes([seq]) * 48, f"sequence {seq} returned another entry's bytes"


@pytest.mark.parametrize("damage", ["shift", "bad-length"])
def test_writer_never_reuses_a_sequence_after_length_damage(wal, damage):
    wal_dir, _path = _fixed_size_log(wal, damage)
    try:
        w = wal.writer()
    except node.WALError:
        return  # refusing to open a damaged newest segment is also acceptable
    assert w.current_sequence() >= 10


def test_read_frames_when_retention_purges_its_segment_meanwhile(wal):
    """A fetch being served while retention deletes its segment: RangeNotAvailable, no crash."""
    w = wal.writer(max_size_bytes=200)
    for i in range(1, 41):
        w.append_raw(b"entry-%d" % i, durable=True)
    reader = node.WALReader(w.wal_dir)
    first, count, _ = reader.read_frames(1, 40, max_bytes=16)
    assert first == 1 and count >= 1
    w.purge_before(30)  # what retention does once every reader holds 1..29
    with pytest.raises(node.RangeNotAvailable):
        reader.read_frames(first + count, 40, max_bytes=16)
    earliest = node.WALReader(w.wal_dir).bounds()[0]
    assert reader.read_frames(earliest, 40)[0] == earliest  # later ranges still served
