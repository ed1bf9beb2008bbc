"""walrep verify on damaged WAL directories: damage is reported with its place, exit 2.

The directories are built byte by byte (ARCW v1: a 7-byte file header, then
[u32 length][u64 timestamp][u32 CRC-32][payload] per entry), so each test knows
the file, offset and sequence of the damage it planted.
"""

from __future__ import annotations

import json
import os
import struct

from walrep.cluster.cli import main
from walrep.node import format as fmt

EXIT_DIFFER = 1
EXIT_DAMAGE = 2


def payload(seq: int, salt: bytes = b"") -> bytes:
    return b"entry-%d%s" % (seq, salt)


def frame(seq: int, *, body: bytes | None = None, crc: int | None = None) -> bytes:
    data = payload(seq) if body is None else body
    return (
        fmt.ENTRY_HEADER.pack(len(data), 1_000_000 + seq, fmt.crc32(data) if crc is None else crc)
        + data
    )


def make_log(path, segments: dict[int, bytes]) -> str:
    """A WAL directory holding one file per {first sequence: file bytes}."""
    os.makedirs(path, mode=0o700)
    for first_seq, data in segments.items():
        with open(os.path.join(path, fmt.segment_name(first_seq)), "wb") as f:
            f.write(data)
    return str(path)


def clean(first: int, last: int) -> bytes:
    return fmt.FILE_HEADER + b"".join(frame(s) for s in range(first, last + 1))


def offset_of(seq: int, first: int = 1) -> int:
    """Offset of seq's entry in a segment of frame()s starting at first."""
    return fmt.FILE_HEADER_BYTES + sum(len(frame(s)) for s in range(first, seq))


def segment(path: str, first_seq: int) -> str:
    return os.path.join(path, fmt.segment_name(first_seq))


def verify(capsys, *args) -> tuple[int, str, str]:
    code = main(["verify", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def verify_json(capsys, *args) -> tuple[int, dict]:
    code, out, err = verify(capsys, *args, "--json")
    assert out, err
    return code, json.loads(out)


def damage_at(report: dict, side: str, sequence: int) -> dict:
    found = [d for d in report["damage"] if d["side"] == side and d["sequence"] == sequence]
    assert found, report["damage"]
    return found[0]


def test_two_directories_with_bad_headers_are_damaged_not_empty(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: b"XXXX\x00\x01\x01" + clean(1, 8)[7:]})
    b = make_log(tmp_path / "b", {1: b"ARCW\x00\x09\x01" + clean(1, 8)[7:]})
    code, out, _ = verify(capsys, a, b)
    assert code == EXIT_DAMAGE, out
    assert "empty" not in out
    for side in (a, b):
        assert f"bad-header in {segment(side, 1)} at offset 0 (sequence 1)" in out, out
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DAMAGE and report["equal"] is False
    assert damage_at(report, a, 1)["kind"] == "bad-header"
    assert damage_at(report, b, 1)["file"] == segment(b, 1)


def test_a_crc_mismatch_in_the_compared_range_is_damage_with_its_place(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    b_bytes = fmt.FILE_HEADER + b"".join(frame(s, crc=0 if s == 3 else None) for s in range(1, 9))
    b = make_log(tmp_path / "b", {1: b_bytes})
    code, out, _ = verify(capsys, a, b)
    assert code == EXIT_DAMAGE, out
    assert f"crc-mismatch in {segment(b, 1)} at offset {offset_of(3)} (sequence 3)" in out, out
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DAMAGE
    damage = damage_at(report, b, 3)
    assert (damage["kind"], damage["file"], damage["offset"]) == (
        "crc-mismatch",
        segment(b, 1),
        offset_of(3),
    )
    # Apart from the damaged entry the logs agree: that is not a difference.
    assert report["first_difference"] is None
    assert report["holds"] == {a: [1, 8], b: [1, 8]}


def test_a_difference_after_damage_is_still_found(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: clean(1, 40)})
    frames = [
        frame(s, crc=0 if s == 3 else None, body=payload(s, b"!") if s == 30 else None)
        for s in range(1, 41)
    ]
    b = make_log(tmp_path / "b", {1: fmt.FILE_HEADER + b"".join(frames)})
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DAMAGE
    assert damage_at(report, b, 3)["kind"] == "crc-mismatch"
    assert report["first_difference"] == 30


def test_an_impossible_length_ends_the_side_and_is_damage(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    bad = struct.pack(">IQI", 0xFFFF_FFF0, 0, 0)
    b = make_log(tmp_path / "b", {1: clean(1, 5) + bad + b"".join(frame(s) for s in (7, 8))})
    code, out, _ = verify(capsys, a, b)
    assert code == EXIT_DAMAGE, out
    assert f"{b} holds 1..5" in out and f"{a} holds 1..8" in out
    assert f"{b} lacks 6..8" in out and "lacks 1..8" not in out
    assert f"bad-length in {segment(b, 1)} at offset {offset_of(6)} (sequence 6)" in out, out


def test_a_torn_entry_in_a_sealed_segment_is_damage(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    b = make_log(tmp_path / "b", {1: clean(1, 4) + frame(5)[:10], 6: clean(6, 8)})
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DAMAGE
    damage = damage_at(report, b, 5)
    assert (damage["kind"], damage["file"], damage["offset"]) == (
        "truncated",
        segment(b, 1),
        offset_of(5),
    )
    assert report["first_difference"] is None  # 6..8 were still compared, and agree


def test_damage_where_only_one_side_holds_entries_is_reported(tmp_path, capsys):
    a_bytes = fmt.FILE_HEADER + b"".join(frame(s, crc=0 if s == 7 else None) for s in range(1, 9))
    a = make_log(tmp_path / "a", {1: a_bytes})
    b = make_log(tmp_path / "b", {1: clean(1, 5)})
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DAMAGE
    assert damage_at(report, a, 7)["offset"] == offset_of(7)
    assert f"{b} lacks 6..8" in report["missing"]


def test_a_side_holding_less_says_what_it_holds(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    b = make_log(tmp_path / "b", {1: clean(1, 5)})
    code, out, _ = verify(capsys, a, b)
    assert code == EXIT_DIFFER
    assert f"{a} holds 1..8" in out and f"{b} holds 1..5" in out
    assert f"{b} lacks 6..8" in out and "damage" not in out


def test_entries_failing_their_crc_are_not_counted_as_held(tmp_path, capsys):
    # 6 and 7 fail their CRC; 8 does too, at the end of the newest file, which is how
    # a torn write looks: the side holds 1..5, and 6 and 7 are damage.
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    b_bytes = fmt.FILE_HEADER + b"".join(frame(s, crc=0 if s >= 6 else None) for s in range(1, 9))
    b = make_log(tmp_path / "b", {1: b_bytes})
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DAMAGE
    assert report["holds"][b] == [1, 5]
    assert {d["sequence"] for d in report["damage"]} == {6, 7}
    assert f"{b} lacks 6..8" in report["missing"]


def test_a_torn_tail_is_not_damage(tmp_path, capsys):
    # A crash (or a writer caught mid-append) leaves part of the last entry: that is
    # where the log ends, not damage.
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    b = make_log(tmp_path / "b", {1: clean(1, 5) + frame(6)[:20]})
    code, report = verify_json(capsys, a, b)
    assert code == EXIT_DIFFER
    assert report["damage"] == [] and report["holds"][b] == [1, 5]


def test_an_unreadable_segment_is_an_error_not_a_crash(tmp_path, capsys):
    a = make_log(tmp_path / "a", {1: clean(1, 8)})
    b = make_log(tmp_path / "b", {1: clean(1, 5)})
    os.mkdir(segment(b, 6))  # a directory where a segment should be: reading it fails
    code, out, err = verify(capsys, a, b)
    assert code == EXIT_DAMAGE
    assert segment(b, 6) in err and "Traceback" not in err
