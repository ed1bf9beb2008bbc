"""Damage raised as named exceptions: CRCMismatch, TornTail, BadLength, BadHeader.

Each carries the file (None for a run of frames that is not a file), the byte offset
of the damaged entry and its sequence, and says all three in its message. Every log
here is written by node.Writer and then damaged on disk, as a crash or a bad disk
would; the expected places come from the independent parser, not from node.
"""

from __future__ import annotations

import os

import pytest
from walhelpers import file_bytes, first_seq_of, frames_of, payload_for, segment_paths

from walrep import node
from walrep.node import format as fmt
from walrep.node import reader as reader_module
from walrep.node.reader import decode_frames

WAIT_S = 20.0


def _log(wal, count: int, max_size: int = 100 * 1024 * 1024) -> str:
    w = wal.writer(max_size_bytes=max_size)
    for seq in range(1, count + 1):
        assert w.append_raw(payload_for(seq), durable=True, timeout=WAIT_S) == seq
    w.close()
    return wal.dir()


def _segment_holding(wal_dir: str, seq: int) -> str:
    return [p for p in segment_paths(wal_dir) if first_seq_of(p) <= seq][-1]


def _offset_of(path: str, seq: int) -> int:
    return frames_of(path)[seq - first_seq_of(path)].offset


def _patch(path: str, offset: int, new: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new)


def _flip_payload(path: str, seq: int) -> int:
    """Flip the last payload byte of entry seq; return the entry's offset."""
    offset = _offset_of(path, seq)
    length = fmt.ENTRY_HEADER.unpack_from(file_bytes(path), offset)[0]
    last = offset + fmt.ENTRY_HEADER_BYTES + length - 1
    _patch(path, last, bytes([file_bytes(path)[last] ^ 0x5A]))
    return offset


def _names_its_place(exc: fmt.WALDamage, path, offset: int, seq: int) -> None:
    assert (exc.path, exc.offset, exc.seq) == (path, offset, seq)
    assert isinstance(exc, node.WALError)
    text = str(exc)
    assert f"at offset {offset}" in text and f"(sequence {seq})" in text
    assert (path if path is not None else "a run of frames") in text


# --- CRC mismatch -----------------------------------------------------------------------


@pytest.mark.parametrize("scan", ["c", "python"])
def test_a_fetch_over_a_damaged_entry_raises_crc_mismatch(wal, monkeypatch, scan):
    if scan == "python":
        monkeypatch.setattr(reader_module, "_scan_fast", None)
    elif reader_module._scan_fast is None:
        pytest.skip("the C extension is not in use (WALREP_PURE_PYTHON=1)")
    wal_dir = _log(wal, 30, max_size=600)
    path = _segment_holding(wal_dir, 12)
    first = first_seq_of(path)
    assert first < 12 < first_seq_of(_segment_holding(wal_dir, 30))  # a sealed segment
    offset = _flip_payload(path, 12)
    with pytest.raises(node.CRCMismatch) as raised:
        node.WALReader(wal_dir).read_frames(first, 30)
    _names_its_place(raised.value, path, offset, 12)
    assert "CRC mismatch" in str(raised.value)
    # The entries before it are still served; the damaged one never is.
    assert node.WALReader(wal_dir).read_frames(first, 11)[:2] == (first, 12 - first)
    with pytest.raises(node.CRCMismatch):
        node.WALReader(wal_dir).read_frames(12, 12)


def test_a_damaged_newest_segment_refuses_the_writer_with_crc_mismatch(wal):
    wal_dir = _log(wal, 10)
    (path,) = segment_paths(wal_dir)
    offset = _flip_payload(path, 4)
    before = file_bytes(path)
    with pytest.raises(node.CRCMismatch) as raised:
        node.Writer(wal_dir)
    _names_its_place(raised.value, path, offset, 4)
    assert f"truncate it to {offset} bytes" in str(raised.value)
    assert file_bytes(path) == before  # nothing cut: the operator decides
    # Repair as the message says, append, read back.
    os.truncate(path, offset)
    w = wal.writer()
    assert w.append_raw(b"after the cut", durable=True, timeout=WAIT_S) == 4
    w.close()
    entries = list(node.WALReader(wal_dir).raw_entries())
    assert [s for s, _, _ in entries] == [1, 2, 3, 4] and entries[-1][2] == b"after the cut"


def test_replicated_frames_read_from_a_damaged_file_raise_crc_mismatch(wal):
    wal_dir = _log(wal, 6)
    (path,) = segment_paths(wal_dir)
    offset = _flip_payload(path, 5)
    frames = file_bytes(path)[fmt.FILE_HEADER_BYTES :]
    follower = wal.writer(wal.dir("follower"))
    with pytest.raises(node.CRCMismatch) as raised:
        follower.append_replicated(1, frames)
    # A run is no file: the offset is the damaged frame's within the run.
    _names_its_place(raised.value, None, offset - fmt.FILE_HEADER_BYTES, 5)
    assert follower.current_sequence() == 0


# --- torn tail ----------------------------------------------------------------------


@pytest.mark.parametrize("keep", [3, fmt.ENTRY_HEADER_BYTES + 2], ids=["header", "payload"])
def test_frames_of_a_torn_file_raise_torn_tail(wal, keep):
    wal_dir = _log(wal, 5)
    (path,) = segment_paths(wal_dir)
    offset = _offset_of(path, 5)
    os.truncate(path, offset + keep)  # a crash in the middle of writing entry 5
    frames = file_bytes(path)[fmt.FILE_HEADER_BYTES :]
    with pytest.raises(node.TornTail) as raised:
        decode_frames(frames, 1)
    _names_its_place(raised.value, None, offset - fmt.FILE_HEADER_BYTES, 5)
    # The writer, on open, cuts the same tail instead of raising.
    w = wal.writer()
    assert [p.kind for p in w.repairs] == ["torn-tail"] and w.repairs[0].offset == offset
    assert w.append_raw(b"five again", durable=True, timeout=WAIT_S) == 5


# --- impossible length --------------------------------------------------------------


def test_an_impossible_length_in_the_newest_segment_raises_bad_length(wal):
    wal_dir = _log(wal, 8)
    (path,) = segment_paths(wal_dir)
    offset = _offset_of(path, 6)
    _patch(path, offset, (fmt.MAX_PAYLOAD_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(node.BadLength) as raised:
        node.Writer(wal_dir)
    _names_its_place(raised.value, path, offset, 6)
    frames = file_bytes(path)[fmt.FILE_HEADER_BYTES :]
    with pytest.raises(node.BadLength) as raised:
        decode_frames(frames, 1)
    _names_its_place(raised.value, None, offset - fmt.FILE_HEADER_BYTES, 6)


# --- bad header ---------------------------------------------------------------------


def test_a_foreign_header_on_the_newest_segment_raises_bad_header(wal):
    wal_dir = _log(wal, 20, max_size=500)
    newest = segment_paths(wal_dir)[-1]
    _patch(newest, 0, b"NOPE")
    with pytest.raises(node.BadHeader) as raised:
        node.Writer(wal_dir)
    _names_its_place(raised.value, newest, 0, first_seq_of(newest))
    assert "magic" in str(raised.value)
    assert file_bytes(newest)[:4] == b"NOPE"  # left for the operator


# --- the mapping itself -------------------------------------------------------------


def test_each_problem_kind_becomes_its_exception():
    expected = {
        "crc-mismatch": node.CRCMismatch,
        "torn-tail": node.TornTail,
        "bad-length": node.BadLength,
        "bad-header": node.BadHeader,
        "count-mismatch": node.WALDamage,  # reported only, never raised: the base type
    }
    for kind, kind_type in expected.items():
        error = node.Problem(kind, "/d/f.wal", 123, 45, "what is wrong").error()
        assert type(error) is kind_type and error.kind in (kind, "damage")
        assert (error.path, error.offset, error.seq, error.detail) == (
            "/d/f.wal",
            123,
            45,
            "what is wrong",
        )
    unknown = node.Problem("crc-mismatch", "seed.wal", 9, None, "x").error()
    assert unknown.seq is None and "(sequence ?)" in str(unknown)
