"""ARCW v1 encoding and decoding, pinned byte for byte against the seed system.

The hex constants below are frames the seed's writer produced (from the arc-wal test
vectors): if our encoder differs by one byte, the seed cannot read our files.
"""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest

from walrep import node
from walrep.node import format as fmt

# vector2.wal, entry 1: AppendRaw of a columnar payload.
SEED_TS_US = 1795592886095930
SEED_HEADER = bytes.fromhex("00000043000661150c23103a0d213111")
SEED_PAYLOAD = bytes.fromhex(
    "82a7636f6c756d6e7385a4686f737491a161a46e6f746591c0a26f6b91c3a474696d6591d300060a24"
    "182d8240a576616c756591cb4058e00000000000a16da3637075"
)
# vector3.wal, entry 0: AppendRawWithMeta("telemetry", columnar).
SEED_ENVELOPE_TS_US = 1795592886097520
SEED_ENVELOPE_HEADER = bytes.fromhex("00000057000661150c23167092c3b136")
SEED_ENVELOPE_PAYLOAD = bytes.fromhex(
    "01000974656c656d6574727982a7636f6c756d6e7383a4686f737492a161a162a474696d6592d30006"
    "0a24181e4000d300060a24181e4001a576616c756592cb3ff4000000000000cb4004000000000000a1"
    "6da3637075"
)


# --- file header ----------------------------------------------------------------------


def test_file_header_is_the_seeds_seven_bytes():
    assert bytes.fromhex("41524357000101") == fmt.FILE_HEADER
    assert fmt.FILE_HEADER_BYTES == 7
    assert fmt.check_file_header(fmt.FILE_HEADER) is None
    assert fmt.check_file_header(fmt.FILE_HEADER + b"anything after") is None


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "shorter"),
        (b"ARCW\x00", "shorter"),
        (b"ARCX\x00\x01\x01", "magic"),
        (b"ARCW\x00\x02\x01", "version"),
        (b"ARCW\x00\x01\x02", "checksum"),
    ],
)
def test_bad_file_headers_are_described(data, words):
    problem = fmt.check_file_header(data)
    assert problem is not None and words in problem


# --- entries --------------------------------------------------------------------------


def test_entry_encoding_matches_a_seed_frame():
    frame = fmt.encode_entry(SEED_TS_US, SEED_PAYLOAD)
    assert frame == SEED_HEADER + SEED_PAYLOAD
    length, ts, crc = fmt.ENTRY_HEADER.unpack_from(frame)
    assert (length, ts, crc) == (len(SEED_PAYLOAD), SEED_TS_US, zlib.crc32(SEED_PAYLOAD))


def test_entry_header_is_sixteen_big_endian_bytes():
    frame = fmt.encode_entry(0x0102030405060708, b"xyz")
    assert fmt.ENTRY_HEADER_BYTES == 16
    assert frame[:4] == b"\x00\x00\x00\x03"
    assert frame[4:12] == bytes(range(1, 9))
    assert frame[12:16] == struct.pack(">I", zlib.crc32(b"xyz"))
    assert frame[16:] == b"xyz"


def test_empty_payload_entry():
    frame = fmt.encode_entry(5, b"")
    assert frame == struct.pack(">IQI", 0, 5, 0)


def test_payload_too_large_carries_the_size():
    fmt.check_payload_size(fmt.MAX_PAYLOAD_BYTES)  # the limit itself is allowed
    with pytest.raises(node.PayloadTooLarge) as info:
        fmt.check_payload_size(fmt.MAX_PAYLOAD_BYTES + 1)
    assert info.value.size == fmt.MAX_PAYLOAD_BYTES + 1
    assert str(fmt.MAX_PAYLOAD_BYTES + 1) in str(info.value)
    assert isinstance(info.value, node.WALError) and isinstance(info.value, ValueError)
    assert node.MAX_PAYLOAD_BYTES == 100 * 1024 * 1024


# --- envelopes ------------------------------------------------------------------------


def test_envelope_encoding_matches_the_seed():
    inner = SEED_ENVELOPE_PAYLOAD[3 + 9 :]
    assert fmt.encode_envelope("telemetry", inner) == SEED_ENVELOPE_PAYLOAD
    frame = fmt.encode_entry(SEED_ENVELOPE_TS_US, SEED_ENVELOPE_PAYLOAD)
    assert frame[:16] == SEED_ENVELOPE_HEADER  # CRC and length cover the envelope


def test_envelope_round_trip():
    inner = msgpack.packb({"m": "cpu", "columns": {"v": [1]}})
    for name in ["", "db", "ünïcødé-☃", "d" * 255]:
        enveloped = fmt.encode_envelope(name, inner)
        assert enveloped[0] == fmt.ENVELOPE_MARKER
        assert struct.unpack(">H", enveloped[1:3])[0] == len(name.encode())
        assert node.parse_envelope(enveloped) == (name, inner)
        assert node.parse_envelope(enveloped, "default") == (name, inner)


def test_envelope_name_limit_is_in_bytes_not_characters():
    fmt.encode_envelope("é" * 127, b"\x90")  # 254 bytes
    with pytest.raises(node.InvalidDatabaseName):
        fmt.encode_envelope("é" * 128, b"\x90")  # 128 characters, 256 bytes


def test_envelope_refuses_a_name_over_255_bytes():
    assert node.MAX_DATABASE_NAME_BYTES == 255
    with pytest.raises(node.InvalidDatabaseName) as info:
        fmt.encode_envelope("d" * 256, b"\x90")
    assert "256" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", [b"db", None, 7, ["db"]])
def test_envelope_refuses_a_name_that_is_not_str(name):
    with pytest.raises(node.InvalidDatabaseName):
        fmt.encode_envelope(name, b"\x90")


def test_envelope_refuses_a_name_with_lone_surrogates():
    with pytest.raises(node.InvalidDatabaseName):
        fmt.encode_envelope("db\udc80", b"\x90")
    with pytest.raises(node.InvalidDatabaseName):
        fmt.encode_envelope("\ud800", b"\x90")


def test_parse_envelope_leaves_plain_msgpack_alone():
    plain = msgpack.packb([{"a": 1}])
    assert node.parse_envelope(plain) == (None, plain)
    assert node.parse_envelope(plain, "default") == ("default", plain)
    assert node.parse_envelope(b"", "d") == ("d", b"")


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01",  # marker alone
        b"\x01\x00",  # marker and half a length
        b"\x01\x00\x05abc",  # declares 5 name bytes, has 3
        b"\x01\x00\x02\xff\xfe\x90",  # name is not UTF-8
    ],
)
def test_parse_envelope_returns_malformed_envelopes_unchanged(payload):
    # The seed's ParseEnvelope does the same: too short for what it declares -> as is.
    assert node.parse_envelope(payload, "default") == ("default", payload)


def test_parse_envelope_with_an_empty_body():
    assert node.parse_envelope(b"\x01\x00\x02db") == ("db", b"")


# --- payload decoding -----------------------------------------------------------------


def test_decode_records():
    records = [{"measurement": "cpu", "value": 1.5, "time": 1}, {"ok": True, "note": None}]
    decoded = fmt.decode_payload(fmt.encode_records(records))
    assert decoded.kind == "records"
    assert decoded.records == records
    assert decoded.database is None and decoded.columnar is None


def test_decode_empty_records():
    decoded = fmt.decode_payload(fmt.encode_records([]))
    assert decoded.kind == "records" and decoded.records == []


def test_decode_columnar_plain_and_enveloped():
    body = msgpack.packb({"m": "cpu", "columns": {"time": [1, 2], "v": [0.5, None]}})
    plain = fmt.decode_payload(body)
    assert plain.kind == "columnar"
    assert plain.database is None
    assert plain.columnar == node.ColumnarEntry("", "cpu", {"time": [1, 2], "v": [0.5, None]})
    assert plain.columnar.row_count == 2

    wrapped = fmt.decode_payload(fmt.encode_envelope("telemetry", body))
    assert wrapped.kind == "columnar"
    assert wrapped.database == "telemetry"
    assert wrapped.columnar.database == "telemetry"
    assert wrapped.columnar.measurement == "cpu"


def test_decode_enveloped_records_keep_their_database():
    decoded = fmt.decode_payload(fmt.encode_envelope("db", fmt.encode_records([{"a": 1}])))
    assert decoded.kind == "records"
    assert decoded.database == "db"
    assert decoded.records == [{"a": 1}]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never valid msgpack
        b"not msgpack at all \xff\xff",
        msgpack.packb({"a": 1}),  # a map that is not columnar
        msgpack.packb({"m": 3, "columns": {}}),  # measurement not a string
        msgpack.packb({"m": "cpu", "columns": {"v": 1}}),  # a column that is not a list
        msgpack.packb({"m": "cpu", "columns": [1]}),  # columns not a map
        msgpack.packb([{"a": 1}, 2]),  # an array that is not all maps
        msgpack.packb(42),
        msgpack.packb([{"a": 1}]) + b"trailing",  # extra data after the value
    ],
)
def test_decode_anything_else_is_raw(payload):
    decoded = fmt.decode_payload(payload)
    assert decoded.kind == "raw"
    assert decoded.records is None and decoded.columnar is None


def test_encode_records_refuses_non_records():
    with pytest.raises(TypeError):
        fmt.encode_records({"a": 1})
    with pytest.raises(TypeError):
        fmt.encode_records([{"a": 1}, "b"])


def test_encode_records_is_a_msgpack_array_of_maps():
    payload = fmt.encode_records([{"a": 1}])
    assert payload[0] == 0x91  # fixarray of 1: never the envelope marker
    assert msgpack.unpackb(payload) == [{"a": 1}]


# --- segment names --------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 2, 9, 10, 12345, 10**19, 2**64 - 1])
def test_segment_name_round_trip(seq):
    name = node.segment_name(seq)
    assert name.startswith("arc-") and name.endswith(".wal")
    assert len(name) == len("arc-") + 20 + len(".wal")
    assert fmt.parse_segment_name(name) == seq
    assert fmt.is_wal_file_name(name)


def test_segment_names_sort_like_their_sequences():
    seqs = [1, 2, 10, 99, 100, 1001, 10**12, 2**63]
    names = [node.segment_name(s) for s in reversed(seqs)]
    assert [fmt.parse_segment_name(n) for n in sorted(names)] == seqs


def test_segment_name_refuses_sequences_below_one():
    for bad in (0, -1):
        with pytest.raises(ValueError):
            node.segment_name(bad)


@pytest.mark.parametrize(
    "name",
    [
        "arc-20261125_074806.093906951.wal",  # the seed's time-based name
        "arc-00000000000000000000.wal",  # sequence 0 does not exist
        "arc-0000000000000000001.wal",  # 19 digits
        "arc-000000000000000000001.wal",  # 21 digits
        "arc-00000000000000000001.wal.broken",
        "arc-00000000000000000001.wal.tmp",
        "arc-00000000000000000001.WAL",
        "ARC-00000000000000000001.wal",
        "x-arc-00000000000000000001.wal",
        "arc-0000000000000000000a.wal",
        "arc-+0000000000000000001.wal",
        "arc-00000000000000000001.wal.recovered",
        "wal.meta",
        "vector1.wal",
        "",
    ],
)
def test_parse_segment_name_rejects_seed_and_foreign_names(name):
    assert fmt.parse_segment_name(name) is None


def test_parse_segment_name_rejects_non_ascii_digits_and_a_trailing_newline():
    # A regex \d takes Arabic-Indic digits and $ matches before a final newline:
    # either would make a stray file pass for segment 1.
    assert fmt.parse_segment_name("arc-" + "\u0660" * 19 + "\u0661" + ".wal") is None
    assert fmt.parse_segment_name(node.segment_name(1) + "\n") is None


def test_which_files_count_as_wal_files():
    assert fmt.is_wal_file_name("arc-20261125_074806.093906951.wal")  # seed files replay
    assert not fmt.is_wal_file_name(".arc-00000000000000000001.wal")  # hidden/temp
    assert not fmt.is_wal_file_name("arc-00000000000000000001.wal.broken")
    assert not fmt.is_wal_file_name("wal.meta")


# --- problems and zero detection ------------------------------------------------------


def test_problem_names_its_place():
    problem = node.Problem("crc-mismatch", "/d/f.wal", 123, 45, "stored CRC differs")
    text = str(problem)
    for part in ("crc-mismatch", "/d/f.wal", "123", "45", "stored CRC differs"):
        assert part in text
    assert "sequence ?" in str(node.Problem("torn-tail", "f", 7, None, "cut"))


@pytest.mark.parametrize("size", [0, 1, 16, 4095, 4096, 10000])
def test_is_all_zero(size):
    data = b"head" + bytes(size)
    assert fmt.is_all_zero(data, 4)
    if size:
        damaged = bytearray(data)
        damaged[-1] = 1
        assert not fmt.is_all_zero(bytes(damaged), 4)


# --- walking frames ---------------------------------------------------------------------


def _walk(data, **options):
    return [(status, pos, end) for status, pos, end, _ts, _p in fmt.walk_frames(data, **options)]


def test_walk_frames_steps_by_length_and_checks_from_verify_from():
    one, two, three = (fmt.encode_entry(7, bytes([i]) * (10 * i)) for i in (1, 2, 3))
    run = one + two + three
    ends = [len(one), len(one + two), len(run)]
    starts = [0, *ends[:-1]]
    assert _walk(run) == [(fmt.FRAME, a, b) for a, b in zip(starts, ends, strict=True)]
    assert [s for s, _, _ in _walk(run, verify_from=1)] == [fmt.FRAME, fmt.GOOD, fmt.GOOD]
    frames = list(fmt.walk_frames(run, verify_from=0))
    assert [(ts, payload) for _, _, _, ts, payload in frames] == [
        (7, b"\x01" * 10),
        (7, b"\x02" * 20),
        (7, b"\x03" * 30),
    ]
    damaged = one + two[:-1] + b"?" + three
    assert [s for s, _, _ in _walk(damaged, verify_from=0)] == [
        fmt.GOOD,
        fmt.CRC_MISMATCH,  # a whole frame: the walk goes on after it
        fmt.GOOD,
    ]
    # From an offset, at most limit frames, and none that starts at or past until.
    assert _walk(run, pos=ends[0]) == _walk(run)[1:]
    assert _walk(run, limit=2) == _walk(run)[:2]
    assert _walk(run, limit=0) == []
    assert _walk(run, until=ends[0] + 1) == _walk(run)[:2]
    assert _walk(run, until=ends[0]) == _walk(run)[:1]


def test_walk_frames_ends_with_the_frame_it_cannot_step_over():
    good = fmt.encode_entry(1, b"abc")
    n = len(good)
    assert _walk(good + good[:10]) == [(fmt.FRAME, 0, n), (fmt.PARTIAL_HEADER, n, None)]
    assert _walk(good + good[:-1]) == [(fmt.FRAME, 0, n), (fmt.PAST_END, n, 2 * n)]
    huge = struct.pack(">IQI", fmt.MAX_PAYLOAD_BYTES + 1, 1, 0)
    end = n + 16 + fmt.MAX_PAYLOAD_BYTES + 1
    assert _walk(good + huge + good) == [(fmt.FRAME, 0, n), (fmt.BAD_LENGTH, n, end)]
    # A walk by length alone steps over any length that fits, as its C twins do.
    assert _walk(good + huge, max_length=fmt.ANY_LENGTH)[-1] == (fmt.PAST_END, n, end)
    assert _walk(b"") == []


@pytest.mark.parametrize(
    "status, words",
    [
        (fmt.PARTIAL_HEADER, "partial entry header"),
        (fmt.PAST_END, "entry of 3 bytes, only 2 present"),
        (fmt.CRC_MISMATCH, "stored CRC"),
    ],
)
def test_frame_problems_of_a_run_name_kind_offset_and_sequence(status, words):
    good = fmt.encode_entry(1, b"abc")
    bad = {
        fmt.PARTIAL_HEADER: good[:9],
        fmt.PAST_END: good[:-1],
        fmt.CRC_MISMATCH: good[:-1] + b"?",
    }[status]
    data = good + bad
    [*_, (found, pos, end, _ts, _p)] = fmt.walk_frames(data, verify_from=0)
    assert found == status
    problem = fmt.frame_problem(status, data, pos, end, file=None, seq=42, offset=100)
    assert (problem.file, problem.offset, problem.sequence) == (None, 100 + len(good), 42)
    assert words in problem.detail
    kind = "crc-mismatch" if status == fmt.CRC_MISMATCH else "torn-tail"
    assert problem.kind == kind and type(problem.error()).kind == kind
