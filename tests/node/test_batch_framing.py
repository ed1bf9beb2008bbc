"""Batch framing in C (node._scan.frame_payloads, used by Writer.append_batch).

It must be invisible: the same bytes, hook entries and exceptions as the pure-Python
loop of node.writer._frame_payloads, which setting ``writer._frame_fast`` to None
selects (as WALREP_PURE_PYTHON=1 does at import). Tests that need the extension skip
when it is not built; the round trip through a real Writer runs either way.
"""

from __future__ import annotations

import array
import os
import random
import subprocess
import sys
import types

import pytest
import walhelpers

from walrep import node
from walrep.node import format as fmt
from walrep.node import writer

try:
    from walrep.node import _scan
except ImportError:
    _scan = None

HAVE_C = _scan is not None and hasattr(_scan, "frame_payloads")
needs_c = pytest.mark.skipif(not HAVE_C, reason="the C extension node._scan is not built")
PURE = os.environ.get("WALREP_PURE_PYTHON", "") not in ("", "0")
TIMESTAMP_US = 1_764_000_000_123_456
MAX = fmt.MAX_PAYLOAD_BYTES


@pytest.fixture(
    params=[pytest.param(True, marks=needs_c, id="c"), pytest.param(False, id="python")]
)
def writer_framing(request, monkeypatch):
    """Writers made in the test frame batches in C, or with the Python loop."""
    monkeypatch.setattr(writer, "_frame_fast", _scan.frame_payloads if request.param else None)


def frame(payloads, *, fast: bool):
    """(data, count, hook entries from sequence 1) of _frame_payloads, at TIMESTAMP_US."""
    saved_fast, saved_time = writer._frame_fast, writer.time
    writer._frame_fast = _scan.frame_payloads if fast else None
    writer.time = types.SimpleNamespace(time_ns=lambda: TIMESTAMP_US * 1000)
    try:
        chunks, count, hook_entries = writer._frame_payloads(payloads)
    finally:
        writer._frame_fast, writer.time = saved_fast, saved_time
    assert len(chunks) == 1
    return chunks[0], count, hook_entries(1)


def reference(payloads) -> bytes:
    """The frames as format.py defines them, independently of either path."""
    return b"".join(fmt.encode_entry(TIMESTAMP_US, bytes(p)) for p in payloads)


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


BATCHES = {
    "empty batch": [],
    "empty payload": [b""],
    "1 B": [b"\x00"],
    "100 B": [_random(100, 1)],
    "around the zlib switch-over": [_random(n, n) for n in (1023, 1024, 1025)],
    "64 KiB": [_random(64 * 1024, 2)],
    "bytearray": [bytearray(_random(100, 3)), bytearray()],
    "memoryview": [memoryview(_random(100, 4)), memoryview(b"")],
    "memoryview slice": [memoryview(_random(300, 5))[17:217]],
    "memoryview of a bytearray": [memoryview(bytearray(_random(50, 6)))],
    "bytes subclass": [type("Sub", (bytes,), {})(b"sub")],
    "mixed": [b"a", bytearray(b"bb"), memoryview(b"ccc"), b"", _random(5000, 7)],
    "tuple batch": (b"x", b"yy"),
    "more than the stack views": [bytes([i]) * i for i in range(40)],
    "many": [_random(random.Random(i).randrange(0, 300), i) for i in range(5000)],
    "over 1 MiB (framed without the GIL)": [_random(1000, 8)] * 1500,
}


@needs_c
@pytest.mark.parametrize("payloads", BATCHES.values(), ids=BATCHES.keys())
def test_c_frames_exactly_like_python(payloads):
    fast, pure = frame(payloads, fast=True), frame(payloads, fast=False)
    assert fast[0] == pure[0] == reference(payloads)
    assert fast[1] == pure[1] == len(payloads)
    assert fast[2] == pure[2]


@needs_c
def test_max_size_payloads():
    payloads = [b"\xa5" * MAX, b"tail", bytearray(b"\x5a" * MAX)]
    fast = frame(payloads, fast=True)[0]
    assert fast == frame(payloads, fast=False)[0]
    assert len(fast) == 3 * fmt.ENTRY_HEADER_BYTES + 2 * MAX + 4


@needs_c
def test_extension_in_use():
    assert _scan.MAX_PAYLOAD_BYTES == MAX
    if PURE:
        assert writer._frame_fast is None
    else:
        assert writer._frame_fast is _scan.frame_payloads


def test_pure_python_env_var_forces_the_fallback():
    code = "from node import writer; print(writer._frame_fast is None)"
    for value, pure in (("1", True), ("0", not HAVE_C), ("", not HAVE_C)):
        env = dict(os.environ, WALREP_PURE_PYTHON=value)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == str(pure), value


# --- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("fast", [pytest.param(True, marks=needs_c), False], ids=["c", "python"])
@pytest.mark.parametrize(
    "payloads",
    [
        [bytes(MAX + 1)],
        [b"first", b"second", bytearray(MAX + 1)],
        [memoryview(bytes(MAX + 1)), b"after"],
    ],
    ids=["alone", "last", "first, a memoryview"],
)
def test_oversized_payload_raises_payload_too_large(payloads, fast):
    with pytest.raises(fmt.PayloadTooLarge) as caught:
        frame(payloads, fast=fast)
    assert caught.value.size == MAX + 1


@pytest.mark.parametrize("fast", [pytest.param(True, marks=needs_c), False], ids=["c", "python"])
@pytest.mark.parametrize(
    ("payloads", "error"),
    [
        ([b"ok", "text"], TypeError),
        ([b"ok", 5], TypeError),
        ([None], TypeError),
        ([b"ok", [1, 2]], TypeError),
        (5, TypeError),
        ([memoryview(b"abcd")[::2]], BufferError),  # not contiguous: zlib.crc32 refuses too
    ],
    ids=["str", "int", "None", "list", "not iterable", "strided memoryview"],
)
def test_wrong_types_raise_like_python(payloads, error, fast):
    with pytest.raises(error):
        frame(payloads, fast=fast)


@needs_c
def test_frame_payloads_contract():
    frame_payloads = _scan.frame_payloads
    for ts in (0, 2**64 - 1):
        assert frame_payloads([b"p"], ts, fmt.PayloadTooLarge) == fmt.encode_entry(ts, b"p")
    for ts in (-1, 2**64):
        with pytest.raises(OverflowError):
            frame_payloads([b"p"], ts, fmt.PayloadTooLarge)
    with pytest.raises(TypeError):
        frame_payloads([b"p"], 1.5, fmt.PayloadTooLarge)
    with pytest.raises(TypeError):
        frame_payloads([b"p"], 1)
    with pytest.raises(TypeError, match="payload 1"):
        frame_payloads([b"p", "q"], 1, fmt.PayloadTooLarge)
    # too_large builds the exception; anything else it returns is a TypeError.
    with pytest.raises(TypeError):
        frame_payloads([bytes(MAX + 1)], 1, lambda size: size)
    # A generator is consumed once, like any iterable.
    assert frame_payloads((p for p in [b"a", b"b"]), 1, fmt.PayloadTooLarge) == b"".join(
        fmt.encode_entry(1, p) for p in [b"a", b"b"]
    )


@needs_c
def test_wide_memoryview_is_framed_by_its_bytes():
    # len() of this view counts 3 items, not 12 bytes: the C path frames the bytes.
    view = memoryview(array.array("I", [1, 2, 3]))
    data = _scan.frame_payloads([view, b"next"], TIMESTAMP_US, fmt.PayloadTooLarge)
    assert data == reference([view.tobytes(), b"next"])


@needs_c
def test_frame_payloads_keeps_no_references():
    payloads = [b"abc" * 10, bytearray(b"xyz"), memoryview(b"mv")]
    before = [sys.getrefcount(p) for p in payloads]
    for _ in range(100):
        _scan.frame_payloads(payloads, 1, fmt.PayloadTooLarge)
    with pytest.raises(fmt.PayloadTooLarge):
        _scan.frame_payloads([*payloads, bytes(MAX + 1)], 1, fmt.PayloadTooLarge)
    with pytest.raises(TypeError):
        _scan.frame_payloads([*payloads, "text"], 1, fmt.PayloadTooLarge)
    assert [sys.getrefcount(p) for p in payloads] == before
    payloads[1].extend(b"!")  # no buffer export left behind: the bytearray can grow


# --- through a real Writer ---------------------------------------------------------


@pytest.mark.usefixtures("writer_framing")
def test_writer_files_read_back(tmp_path):
    wal_dir = str(tmp_path / "wal")
    batches = [
        [walhelpers.payload_for(seq) for seq in range(1, 1001)],
        [b"", bytearray(b"ba"), memoryview(b"mv"), _random(70_000, 9)],
        [_random(100, 10)] * 3000,
    ]
    expected = [bytes(p) for batch in batches for p in batch]
    w = node.Writer(wal_dir, sync_mode="async")
    try:
        ranges = [w.append_batch(batch) for batch in batches]
        w.wait_durable(w.current_sequence(), timeout=20)
    finally:
        w.close()
    assert ranges == [(1, 1000), (1001, 1004), (1005, 4004)]
    entries, problems = walhelpers.read_all(wal_dir)
    assert problems == []
    assert [seq for seq, _ts, _p in entries] == list(range(1, len(expected) + 1))
    assert [p for _seq, _ts, p in entries] == expected
    # One timestamp per batch.
    assert len({ts for _seq, ts, _p in entries[:1000]}) == 1
    # The independent parser agrees.
    paths = walhelpers.segment_paths(wal_dir)
    assert [f.payload for path in paths for f in walhelpers.frames_of(path)] == expected


@pytest.mark.usefixtures("writer_framing")
def test_writer_frames_a_wide_memoryview_by_its_bytes(tmp_path):
    # len() of this view is 3 (items), its payload is 12 bytes: both the batch path
    # and the one-entry path must write 12 as the entry's length.
    view = memoryview(array.array("I", [1, 2, 3]))
    wal_dir = str(tmp_path / "wal")
    w = node.Writer(wal_dir, sync_mode="async")
    try:
        w.append_batch([view, b"next"])
        w.append_raw(view)
        w.wait_durable(w.current_sequence(), timeout=20)
    finally:
        w.close()
    entries, problems = walhelpers.read_all(wal_dir)
    assert problems == []
    assert [p for _seq, _ts, p in entries] == [view.tobytes(), b"next", view.tobytes()]


@pytest.mark.usefixtures("writer_framing")
def test_writer_refused_batch_adds_nothing(tmp_path):
    wal_dir = str(tmp_path / "wal")
    seen: list = []
    w = node.Writer(wal_dir, sync_mode="async")
    w.set_replication_hook(seen.append)
    try:
        assert w.append_batch([b"one"]) == (1, 1)
        with pytest.raises(fmt.PayloadTooLarge):
            w.append_batch([b"two", bytes(MAX + 1)])
        with pytest.raises(TypeError):
            w.append_batch([b"two", "text"])
        assert w.current_sequence() == 1
        assert w.append_batch([b"two", b"three"]) == (2, 3)
        w.wait_durable(3, timeout=20)
    finally:
        w.close()
    entries, problems = walhelpers.read_all(wal_dir)
    assert problems == []
    assert [(seq, p) for seq, _ts, p in entries] == [(1, b"one"), (2, b"two"), (3, b"three")]
    assert [(e.seq, e.payload) for e in seen] == [(1, b"one"), (2, b"two"), (3, b"three")]
