"""Self-healing readers: a damaged reader log is cut back to its last good entry and refetched.

The writer option repair="cut" (a reader's) cuts the whole log just before its first
damaged entry, in the newest segment or a sealed one, keeps the cut bytes and every
later segment as .broken files, and continues at the damaged entry's sequence. The
default (a leader's) still refuses mid-file damage in its newest segment: a leader
has no one to refetch from.
"""

from __future__ import annotations

import os
import re

import pytest

from walrep import node
from walrep.cluster.procs import LocalCluster, wait_for
from walrep.node import format as fmt

SEGMENT_BYTES = 4096
PAYLOAD = 100
FRAME = fmt.ENTRY_HEADER_BYTES + PAYLOAD


def payload(seq: int) -> bytes:
    return b"entry-%08d-" % seq + b"p" * (PAYLOAD - 15)


def write_log(wal_dir: str, count: int) -> None:
    """count entries, one group each, so segments rotate every ~35 entries."""
    with node.Writer(wal_dir, max_size_bytes=SEGMENT_BYTES) as w:
        for seq in range(1, count + 1):
            assert w.append_raw(payload(seq), durable=True) == seq


def segments(wal_dir: str) -> list:
    return node.WALReader(wal_dir).segments()


def entry_offset(path: str, index: int) -> int:
    return fmt.FILE_HEADER_BYTES + index * FRAME  # every entry has the same size here


def flip(path: str, at: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << bit)]))


def read_all(wal_dir: str) -> tuple[list, list]:
    problems: list = []
    entries = list(node.WALReader(wal_dir, on_problem=problems.append).raw_entries())
    return entries, problems


def damage(wal_dir: str, where: str, how: str) -> tuple[int, str, int]:
    """Damage entry 5 of the newest or of the second segment; (its seq, file, offset)."""
    segs = segments(wal_dir)
    segment = segs[-1] if where == "newest" else segs[1]
    offset = entry_offset(segment.path, 5)
    if how == "torn":
        os.truncate(segment.path, offset + 30)  # mid-entry
    elif how == "flip":
        flip(segment.path, offset + fmt.ENTRY_HEADER_BYTES + 40)  # a payload byte
    elif how == "flip-length":
        flip(segment.path, offset + 3, bit=1)  # the length's low byte
    elif how == "bad-header":
        flip(segment.path, 1)
        offset = 0
    return segment.first_seq + 5, segment.path, offset


# --- the writer option --------------------------------------------------------------------


@pytest.mark.parametrize(
    "where,how",
    [
        ("newest", "torn"),
        ("newest", "flip"),
        ("newest", "flip-length"),
        ("sealed", "torn"),
        ("sealed", "flip"),
        ("sealed", "flip-length"),
    ],
)
def test_repair_cut_cuts_at_the_first_damaged_entry(tmp_path, where, how):
    wal_dir = str(tmp_path / "wal")
    write_log(wal_dir, 200)
    before = segments(wal_dir)
    seq, path, offset = damage(wal_dir, where, how)
    with open(path, "rb") as f:
        damaged_bytes = f.read()

    w = node.Writer(wal_dir, max_size_bytes=SEGMENT_BYTES, repair="cut")
    try:
        assert w.current_sequence() == seq - 1
        assert [p.sequence for p in w.repairs] == [seq]
        assert w.repairs[0].file == path and w.repairs[0].offset == offset
        # Writing goes on at the damaged entry's sequence, as the leader has it.
        assert w.append_raw(payload(seq), durable=True) == seq
    finally:
        w.close()

    entries, problems = read_all(wal_dir)
    assert problems == []
    assert [e[0] for e in entries] == list(range(1, seq + 1))
    assert all(e[2] == payload(e[0]) for e in entries)
    # The cut bytes are kept beside the segment; later segments are kept whole.
    with open(path + ".broken", "rb") as f:
        assert f.read() == damaged_bytes[offset:]
    later = [s for s in before if s.first_seq > seq]
    for segment in later:
        assert not os.path.exists(segment.path)
        assert os.path.exists(segment.path + ".broken")
    if where == "sealed":
        assert later, "the damage was meant to be in a sealed segment"


def test_repair_cut_rewrites_a_damaged_header_of_a_sealed_segment(tmp_path):
    wal_dir = str(tmp_path / "wal")
    write_log(wal_dir, 120)
    second = segments(wal_dir)[1]
    flip(second.path, 1)
    with node.Writer(wal_dir, repair="cut") as w:
        assert w.current_sequence() == second.first_seq - 1
        assert w.repairs[0].kind == "bad-header"
    entries, problems = read_all(wal_dir)
    assert problems == []
    assert entries[-1][0] == second.first_seq - 1
    with open(second.path, "rb") as f:
        assert f.read() == fmt.FILE_HEADER  # an empty segment, named by the next sequence


def test_repair_cut_of_a_truncated_sealed_segment_at_an_entry_boundary(tmp_path):
    """No torn entry at all: only the count against the next segment's name shows it."""
    wal_dir = str(tmp_path / "wal")
    write_log(wal_dir, 120)
    second = segments(wal_dir)[1]
    os.truncate(second.path, entry_offset(second.path, 7))
    with node.Writer(wal_dir, repair="cut") as w:
        assert w.current_sequence() == second.first_seq + 6
        assert w.repairs[0].kind == "count-mismatch"
    assert read_all(wal_dir)[1] == []


def test_a_clean_log_is_left_alone(tmp_path):
    wal_dir = str(tmp_path / "wal")
    write_log(wal_dir, 100)
    names = sorted(os.listdir(wal_dir))
    with node.Writer(wal_dir, repair="cut") as w:
        assert w.current_sequence() == 100
        assert w.repairs == []
    assert sorted(os.listdir(wal_dir)) == names


def test_the_default_still_refuses_mid_file_damage_in_the_newest_segment(tmp_path):
    """A leader's writer: the next sequence would be uncertain, and nobody can refetch."""
    wal_dir = str(tmp_path / "wal")
    write_log(wal_dir, 100)
    damage(wal_dir, "newest", "flip")
    names = sorted(os.listdir(wal_dir))
    with pytest.raises(node.WALError, match="damaged"):
        node.Writer(wal_dir)
    assert sorted(os.listdir(wal_dir)) == names  # nothing touched


def test_unknown_repair_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="repair"):
        node.Writer(str(tmp_path / "wal"), repair="everything")


# --- real processes: the reader heals and refetches; the leader refuses -------------------


def _started(proc, marker: str, count: int = 1) -> None:
    wait_for(lambda: proc.log_text().count(marker) >= count, 30, f"{proc.name} {marker}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "where,how", [("newest", "torn"), ("newest", "flip"), ("sealed", "torn"), ("sealed", "flip")]
)
def test_reader_heals_its_damaged_log_and_refetches(tmp_path, where, how):
    # The leader keeps one big segment (so it purges nothing); the reader rotates often.
    cluster = LocalCluster(
        str(tmp_path / "c"), readers=1, reader_extra=["--max-segment-bytes", "65536"]
    )
    reader = cluster.reader_nodes[0]
    try:
        cluster.start()
        _started(cluster.leader, "leader-started")
        result = cluster.load(20_000, "--size", "100", "--ack", "replicas=1")
        assert result.returncode == 0, result.stderr
        head = cluster.wait_converged(timeout=60)
        reader.kill()
        reader_segments = segments(reader.wal_dir)
        assert len(reader_segments) > 3
        segment = reader_segments[-1] if where == "newest" else reader_segments[1]
        offset = fmt.FILE_HEADER_BYTES + 40 * FRAME  # the 41st entry (size 100 each)
        seq = segment.first_seq + 40
        if how == "torn":
            os.truncate(segment.path, offset + 50)
        else:
            flip(segment.path, offset + fmt.ENTRY_HEADER_BYTES + 7)

        reader.start()
        _started(reader, "reader-started", 2)
        assert cluster.wait_converged(timeout=60) == head
        text = reader.log_text()
        healed = [line for line in text.splitlines() if "self-healed" in line]
        assert len(healed) == 1, text
        assert f"file={segment.path}" in healed[0]
        assert f"offset={offset}" in healed[0]
        assert f"sequence={seq}" in healed[0]
        assert re.search(rf"refetch_from={seq}\b", healed[0])
        # The healed log is the leader's, byte for byte, and holds no damage.
        leader_log = node.WALReader(cluster.leader.wal_dir)
        assert node.WALReader(reader.wal_dir).digest(1, head) == leader_log.digest(1, head)
        assert read_all(reader.wal_dir)[1] == []
        assert os.path.exists(segment.path + ".broken")
    finally:
        cluster.stop()


@pytest.mark.timeout(120)
def test_leader_with_mid_file_damage_refuses_to_start(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=0)
    try:
        cluster.start()
        _started(cluster.leader, "leader-started")
        assert cluster.load(2_000, "--size", "100").returncode == 0
        assert cluster.leader.stop() == 0
        newest = segments(cluster.leader.wal_dir)[-1]
        flip(newest.path, fmt.FILE_HEADER_BYTES + 100 * FRAME + fmt.ENTRY_HEADER_BYTES + 1)
        with open(newest.path, "rb") as f:
            before = f.read()
        cluster.leader.start()
        code = cluster.leader.proc.wait(timeout=30)
        assert code != 0
        assert "damaged" in cluster.leader.log_text()
        with open(newest.path, "rb") as f:
            assert f.read() == before  # the leader's log is left as it was
    finally:
        cluster.stop()
