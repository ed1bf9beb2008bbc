"""The C fast path of node.reader.scan() and decode_frames() (node/_scan.c).

It must be invisible: the same entries, ScanEnd, problems (kind, offset, sequence,
detail) and exceptions as the pure-Python code, on valid logs and on every kind of
damage. The pure path is forced by setting ``reader._scan_fast`` to None, as
WALREP_PURE_PYTHON=1 does at import.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The extension must build wherever the tests run (a compiler and Python's headers
# are part of the test setup): it is imported outright, so a failed build fails here.
from walrep.node import _scan, reader
from walrep.node import format as fmt

FILE = "arc-00000000000000000001.wal"
PURE = os.environ.get("WALREP_PURE_PYTHON", "") not in ("", "0")
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_extension_in_use():
    if PURE:
        assert reader._scan_fast is None
    else:
        assert reader._scan_fast is _scan.scan_entries


def test_pure_python_env_var_forces_the_fallback():
    code = "from node import reader; print(reader._scan_fast is None)"
    for value, pure in (("1", True), ("0", False), ("", False)):
        env = dict(os.environ, WALREP_PURE_PYTHON=value)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == str(pure), value


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100, 1023, 1024, 1025, 5000, 1 << 20])
def test_crc_matches_zlib(size):
    data = os.urandom(size)
    assert _scan.crc32(data) == zlib.crc32(data)
    assert _scan.crc32(memoryview(data)[1:]) == zlib.crc32(data[1:])


_CRC_SWEEP = """
import os, zlib
from walrep.node import _scan
bad = []
for size in [*range(0, 300), 511, 512, 513, 1000, 4095, 4096, 4097, 65536 + 3]:
    for offset in range(17):  # every alignment of a 16-byte load
        data = os.urandom(size + offset)
        if _scan.crc32(memoryview(data)[offset:]) != zlib.crc32(data[offset:]):
            bad.append((size, offset))
# A patterned buffer too: runs of ones and zeros, which random bytes rarely give.
same = b"\\xff" * 200 + b"\\x00" * 200
if _scan.crc32(same) != zlib.crc32(same):
    bad.append(("pattern", 0))
print(_scan.CRC_IMPLEMENTATION)
print(bad)
"""


@pytest.mark.parametrize("no_clmul", ["", "1"])
def test_crc_matches_zlib_at_every_length_and_alignment_on_both_paths(no_clmul):
    env = dict(os.environ, WALREP_NO_CLMUL=no_clmul)
    done = subprocess.run(
        [sys.executable, "-c", _CRC_SWEEP], env=env, capture_output=True, text=True, check=True
    )
    implementation, bad = done.stdout.splitlines()
    assert bad == "[]"
    if no_clmul:
        assert "pclmulqdq" not in implementation
    elif "pclmulqdq" not in implementation:
        pytest.skip(f"this CPU has no PCLMULQDQ (the CRC is {implementation!r})")


# --- the C function's own contract ----------------------------------------------------


def _log(*frames: bytes) -> bytes:
    return fmt.FILE_HEADER + b"".join(frames)


def test_scan_entries_statuses():
    good = fmt.encode_entry(5, b"abc")
    base = fmt.FILE_HEADER_BYTES
    cases = [
        (_log(good, good), None, (base + 2 * len(good), 3, 2, _scan.STATUS_END)),
        (_log(good, good), 1, (base + len(good), 2, 1, _scan.STATUS_STOP_SEQ)),
        (_log(good, good[:10]), None, (base + len(good), 2, 1, _scan.STATUS_PARTIAL_HEADER)),
        (_log(good, good[:-1]), None, (base + len(good), 2, 1, _scan.STATUS_PAST_END)),
        (
            _log(good, struct.pack(">IQI", fmt.MAX_PAYLOAD_BYTES + 1, 5, 0)),
            None,
            (base + len(good), 2, 1, _scan.STATUS_BAD_LENGTH),
        ),
        (_log(good, bytes(16)), None, (base + len(good), 2, 1, _scan.STATUS_ZERO_HEADER)),
        (
            _log(good, good[:-1] + b"x"),
            None,
            (base + len(good), 2, 1, _scan.STATUS_CRC_MISMATCH),
        ),
    ]
    for data, stop, expected in cases:
        out: list = []
        assert _scan.scan_entries(data, base, 1, 0, stop, out) == expected
        assert out == [(seq, 5, b"abc") for seq in range(1, expected[2] + 1)]


def test_scan_entries_sequence_limits():
    good = fmt.encode_entry(5, b"abc")
    data = _log(good, good)
    base = fmt.FILE_HEADER_BYTES
    out: list = []
    # The last sequence that fits is left to Python, and so is anything beyond.
    assert _scan.scan_entries(data, base, I64_MAX - 1, 0, None, out) == (
        base + len(good),
        I64_MAX,
        1,
        _scan.STATUS_SEQ_LIMIT,
    )
    assert _scan.scan_entries(data, base, 2**64, 0, None, out) == (
        base,
        2**64,
        0,
        _scan.STATUS_SEQ_LIMIT,
    )
    assert out == [(I64_MAX - 1, 5, b"abc")]
    # Without a sequence: None in, None out.
    out = []
    assert _scan.scan_entries(data, base, None, 0, None, out)[1:] == (None, 2, _scan.STATUS_END)
    assert out == [(None, 5, b"abc")] * 2


def test_scan_entries_rejects_wrong_types():
    with pytest.raises(TypeError):
        _scan.scan_entries(bytearray(_log()), 7, 1, 0, None, [])
    with pytest.raises(TypeError):
        _scan.scan_entries(_log(), 7, 1, 0, None, ())
    with pytest.raises(TypeError):
        _scan.scan_entries(_log(), 7, "1", 0, None, [])


def test_scan_uses_the_extension_for_the_bulk():
    calls = []

    def counting(*args):
        result = _scan.scan_entries(*args)
        calls.append(result)
        return result

    frames = [fmt.encode_entry(i, b"x" * (i % 50)) for i in range(1, 1001)]
    frames[500] = frames[500][:-1] + b"\xff"  # a CRC mismatch in the middle
    data = _log(*frames)
    saved = reader._scan_fast
    reader._scan_fast = counting
    try:
        out: list = []
        problems: list = []
        end = reader.scan(data, FILE, 1, out=out, on_problem=problems.append)
    finally:
        reader._scan_fast = saved
    assert [p.kind for p in problems] == ["crc-mismatch"]
    assert end == reader.ScanEnd(len(data), 1001, 1000, None)
    assert len(out) == 999
    # One call up to the bad entry, Python judges it, one call for the rest.
    assert [c[2:] for c in calls] == [(500, _scan.STATUS_CRC_MISMATCH), (499, _scan.STATUS_END)]


# --- equivalence with the pure-Python code --------------------------------------------

payloads = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=1000, max_size=1100),  # around the zlib switch-over
    st.just(b""),
)
timestamps = st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.just(1_700_000_000_000_000))
frames_st = st.lists(st.tuples(timestamps, payloads), max_size=12).map(
    lambda entries: b"".join(fmt.encode_entry(ts, p) for ts, p in entries)
)


@st.composite
def damage(draw, data: bytes, floor: int) -> bytes:
    """Zero to three of: truncation, byte flips, zero fills, stray bytes, wild lengths."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "zero", "zero-tail", "append", "length"]))
        n = len(buf)
        if op == "truncate" and n > floor:
            del buf[draw(st.integers(floor, n - 1)) :]
        elif op == "flip" and n > floor:
            i = draw(st.integers(floor, n - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "zero" and n > floor:
            a = draw(st.integers(floor, n - 1))
            b = draw(st.integers(a, min(n, a + 40)))
            buf[a:b] = bytes(b - a)
        elif op == "zero-tail":
            buf += bytes(draw(st.integers(1, 40)))
        elif op == "append":
            buf += draw(st.binary(min_size=1, max_size=30))
        elif op == "length" and n >= floor + 4:
            i = draw(st.integers(floor, n - 4))
            value = draw(
                st.one_of(
                    st.integers(0, 2**32 - 1),
                    st.integers(fmt.MAX_PAYLOAD_BYTES - 2, fmt.MAX_PAYLOAD_BYTES + 2),
                    st.integers(0, 64),
                )
            )
            buf[i : i + 4] = struct.pack(">I", value)
    return bytes(buf)


sequences = st.one_of(
    st.integers(0, 50),
    st.integers(I64_MAX - 15, I64_MAX + 3),
    st.integers(I64_MIN - 3, I64_MIN + 3),
    st.integers(-(2**70), 2**70),
)


@st.composite
def scan_cases(draw):
    data = fmt.FILE_HEADER + draw(frames_st)
    data = draw(damage(data, fmt.FILE_HEADER_BYTES))
    first_seq = draw(st.one_of(st.none(), sequences))
    near = first_seq if first_seq is not None else 0

    def around():
        return st.one_of(
            st.none(),
            st.integers(near - 3, near + 15),
            st.just(0),
            st.integers(-(2**70), 2**70),
        )

    kwargs = {
        "start_seq": draw(around()),
        "stop_seq": draw(around()),
        "is_tail": draw(st.booleans()),
    }
    return data, first_seq, kwargs, draw(st.booleans()), draw(st.booleans())


def _scan_with(fast, data, first_seq, kwargs, want_out, want_problems):
    saved = reader._scan_fast
    reader._scan_fast = fast
    try:
        out = [] if want_out else None
        problems: list[fmt.Problem] = []
        end = reader.scan(
            data,
            FILE,
            first_seq,
            out=out,
            on_problem=problems.append if want_problems else None,
            **kwargs,
        )
    finally:
        reader._scan_fast = saved
    types = None if out is None else [tuple(type(x) for x in e) for e in out]
    return end, out, types, problems


@SETTINGS
@given(scan_cases())
def test_scan_same_with_and_without_extension(case):
    data, first_seq, kwargs, want_out, want_problems = case
    pure = _scan_with(None, data, first_seq, kwargs, want_out, want_problems)
    fast = _scan_with(_scan.scan_entries, data, first_seq, kwargs, want_out, want_problems)
    assert fast == pure


@SETTINGS
@given(scan_cases())
def test_scan_of_other_buffers_falls_back(case):
    """bytearray and memoryview data (and list subclasses for out) use the pure path."""
    data, first_seq, kwargs, _want_out, want_problems = case
    expected = _scan_with(None, data, first_seq, kwargs, True, want_problems)
    for wrapped in (bytearray(data), memoryview(data)):
        got = _scan_with(_scan.scan_entries, wrapped, first_seq, kwargs, True, want_problems)
        assert got[0] == expected[0]
        assert got[3] == expected[3]
        assert [(s, t, bytes(p)) for s, t, p in got[1]] == expected[1]


def test_scan_out_list_subclass_falls_back():
    class Recording(list):
        def append(self, item):
            super().append(("seen", *item))

    data = _log(fmt.encode_entry(1, b"a"), fmt.encode_entry(2, b"b"))
    out = Recording()
    reader.scan(data, FILE, 1, out=out)
    assert out == [("seen", 1, 1, b"a"), ("seen", 2, 2, b"b")]


def test_scan_of_int_subclasses_falls_back():
    data = _log(fmt.encode_entry(1, b"a"), fmt.encode_entry(2, b"b"))
    for first, start, stop in ((True, None, None), (1, True, None), (1, None, True)):
        kwargs = {"start_seq": start, "stop_seq": stop}
        fast = _scan_with(_scan.scan_entries, data, first, kwargs, True, True)
        assert fast == _scan_with(None, data, first, kwargs, True, True)
    assert _decode_with(_scan.scan_entries, data[7:], True) == _decode_with(None, data[7:], True)
    assert _decode_with(_scan.scan_entries, data[7:], None) == _decode_with(None, data[7:], None)


def test_scan_bytes_from_the_reader_are_equal(tmp_path):
    """End to end through WALReader on a damaged segment: same entries and problems."""
    frames = [fmt.encode_entry(i, os.urandom(i % 300)) for i in range(1, 2001)]
    frames[700] = frames[700][:20] + bytes(len(frames[700]) - 20)
    data = _log(*frames) + frames[0][:9]
    (tmp_path / FILE).write_bytes(data)

    def read(fast):
        saved = reader._scan_fast
        reader._scan_fast = fast
        try:
            r = reader.WALReader(str(tmp_path), on_problem=lambda p: None)
            return list(r.raw_entries()), r.problems, r.total_entries, r.total_bytes
        finally:
            reader._scan_fast = saved

    assert read(_scan.scan_entries) == read(None)


def test_scan_same_at_the_64_bit_limits():
    frames = [fmt.encode_entry(i, bytes([i]) * i) for i in range(1, 6)]
    frames[2] = frames[2][:-1] + b"?"
    data = _log(*frames)
    firsts = [I64_MIN - 1, I64_MIN, I64_MIN + 1, -1, 0, 1, I64_MAX - 3, I64_MAX, I64_MAX + 1]
    for first in [None, *firsts]:
        base = 0 if first is None else first
        bounds = [None, 0, I64_MIN, I64_MAX, -(2**70), 2**70]
        bounds += [base + d for d in (-1, 0, 1, 2, 3)]
        for start in bounds:
            for stop in bounds:
                kwargs = {"start_seq": start, "stop_seq": stop}
                assert _scan_with(_scan.scan_entries, data, first, kwargs, True, True) == (
                    _scan_with(None, data, first, kwargs, True, True)
                ), (first, start, stop)


def _decode_with(fast, data, first_seq, walk=reader.decode_frames):
    """walk(data, first_seq) with the extension (fast) or without (None): its result or
    the error it raised, so that the two paths can be compared."""
    saved = reader._scan_fast
    reader._scan_fast = fast
    try:
        return "ok", walk(data, first_seq)
    except Exception as e:  # WALError for damage; whatever misuse raises, the same
        return type(e), str(e)
    finally:
        reader._scan_fast = saved


@SETTINGS
@given(frames_st.flatmap(lambda frames: damage(frames, 0)), sequences)
def test_decode_frames_same_with_and_without_extension(data, first_seq):
    assert _decode_with(_scan.scan_entries, data, first_seq) == _decode_with(None, data, first_seq)


# -- the walks by length: frames_offset() and split_frames() -------------------------


def _walk_with(fast: bool, call):
    saved = fmt._frames_offset_fast, fmt._split_points_fast
    if not fast:
        fmt._frames_offset_fast = fmt._split_points_fast = None
    try:
        return "ok", call()
    except Exception as e:  # WALError / ValueError for a short run: the same on both paths
        return type(e), str(e)
    finally:
        fmt._frames_offset_fast, fmt._split_points_fast = saved


def test_walks_use_the_extension():
    if PURE:
        assert fmt._frames_offset_fast is None and fmt._split_points_fast is None
    else:
        assert fmt._frames_offset_fast is _scan.frames_offset
        assert fmt._split_points_fast is _scan.split_points


def test_split_frames_cuts_where_a_piece_reaches_max_bytes():
    run = b"".join(fmt.encode_entry(7, bytes([i]) * 100) for i in range(10))  # 116 B each
    for fast in (True, False):
        status, pieces = _walk_with(fast, lambda: fmt.split_frames(run, 41, 300))
        assert status == "ok"
        # 116, 232, 348 >= 300: three entries per piece, then the last one alone.
        assert [(seq, count, len(frames)) for seq, count, frames in pieces] == [
            (41, 3, 348),
            (44, 3, 348),
            (47, 3, 348),
            (50, 1, 116),
        ]
        assert b"".join(frames for _, _, frames in pieces) == run
        assert _walk_with(fast, lambda: fmt.split_frames(b"", 1, 300)) == ("ok", [])
        assert _walk_with(fast, lambda: fmt.frames_offset(run, 4)) == ("ok", 4 * 116)
        assert _walk_with(fast, lambda: fmt.frames_offset(run, 10)) == ("ok", len(run))
    short = _walk_with(True, lambda: fmt.frames_offset(run, 11))
    assert short == (fmt.WALError, "run of frames ends before frame 11")
    cut = _walk_with(True, lambda: fmt.split_frames(run[:-1], 1, 300))
    assert cut == (ValueError, "run of frames ends inside entry 9 (at byte 1044 of 1159)")


@SETTINGS
@given(
    frames_st.flatmap(lambda frames: damage(frames, 0)),
    st.integers(-2, 14),
    st.integers(1, 2000),
)
def test_walks_same_with_and_without_extension(data, skip, max_bytes):
    for call in (
        lambda: fmt.frames_offset(data, skip),
        lambda: fmt.frames_offset(memoryview(data), skip),
        lambda: fmt.split_frames(data, 5, max_bytes),
    ):
        assert _walk_with(True, call) == _walk_with(False, call)


def _count_with(fast, data, first_seq):
    return _decode_with(fast, data, first_seq, walk=reader.count_frames)


@SETTINGS
@given(frames_st.flatmap(lambda frames: damage(frames, 0)), sequences)
def test_count_frames_checks_as_decode_frames_does(data, first_seq):
    # A reader's append counts and checks the frames without building entries: the
    # same errors as decode_frames, on both paths, and its length when the run is good.
    decoded = _decode_with(_scan.scan_entries, data, first_seq)
    expected = ("ok", len(decoded[1])) if decoded[0] == "ok" else decoded
    assert _count_with(_scan.scan_entries, data, first_seq) == expected
    assert _count_with(None, data, first_seq) == expected
