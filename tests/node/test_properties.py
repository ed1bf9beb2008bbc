"""Property tests: random logs round-trip; random damage never yields wrong bytes.

Damage model. Truncations anywhere, and byte flips in file headers, timestamps,
CRCs and payloads, in the high bytes of length fields (which make a length that
cannot be right) and in their low bytes (a plausible length that moves frame
boundaries: the entry then fails its CRC, and the reader must not return later
entries of that file under shifted sequences).

ARCW v1's CRC covers the payload only, so a flipped timestamp is undetectable:
payloads are compared always, timestamps only where no flip touched them.
"""

from __future__ import annotations

import os
import tempfile

import arcw_parser
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from walhelpers import file_bytes, read_all, segment_paths, write_bytes

from walrep import node

WAIT_S = 20.0
SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

payloads = st.binary(max_size=300)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
records = st.lists(
    st.dictionaries(st.text(max_size=10), scalars, max_size=4), min_size=0, max_size=3
)
database_names = st.text(max_size=30).filter(lambda s: len(s.encode("utf-8", "replace")) <= 255)

operations = st.one_of(
    st.tuples(st.just("raw"), payloads),
    st.tuples(st.just("nowait"), payloads),
    st.tuples(st.just("durable"), payloads),
    st.tuples(st.just("records"), records),
    st.tuples(st.just("meta"), database_names, payloads),
    st.tuples(st.just("batch"), st.lists(payloads, min_size=1, max_size=5)),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("purge_all")),
)


def _safe_db(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@settings(max_examples=300, **SETTINGS)
@given(
    ops=st.lists(operations, min_size=1, max_size=25),
    max_size=st.integers(min_value=8, max_value=1500),
    sync_mode=st.sampled_from(["async", "fdatasync"]),
)
def test_random_operations_round_trip(tmp_path, ops, max_size, sync_mode):
    with tempfile.TemporaryDirectory(dir=tmp_path) as wal_dir:
        expected: dict[int, bytes] = {}  # what the log must hold: seq -> payload
        last = 0  # last sequence ever assigned: never reused
        enveloped: dict[int, tuple[str, bytes]] = {}

        def open_writer():
            return node.Writer(wal_dir, sync_mode=sync_mode, max_size_bytes=max_size)

        w = open_writer()
        try:
            for op in ops:
                kind = op[0]
                if kind == "reopen":
                    w.close(WAIT_S)
                    w = open_writer()
                    assert w.current_sequence() == last
                    continue
                if kind == "purge_all":
                    w.wait_committed(last, WAIT_S)
                    w.purge_all()
                    expected.clear()
                    continue
                if kind == "batch":
                    first, end = w.append_batch(op[1])
                    assert (first, end) == (last + 1, last + len(op[1]))
                    for i, payload in enumerate(op[1]):
                        expected[first + i] = payload
                    last = end
                    continue
                if kind == "raw":
                    seq, payload = w.append_raw(op[1]), op[1]
                elif kind == "nowait":
                    seq, payload = w.append_raw_nowait(op[1]), op[1]
                elif kind == "durable":
                    seq, payload = w.append_raw(op[1], durable=True, timeout=WAIT_S), op[1]
                    assert w.durable_sequence() >= seq
                elif kind == "records":
                    seq = w.append(op[1])
                    payload = msgpack.packb(op[1], use_bin_type=True)
                else:
                    _, name, body = op
                    seq = w.append_raw_with_meta(name, body)
                    payload = arcw_parser.build_envelope(name, body)
                    enveloped[seq] = (name, body)
                assert seq == last + 1
                expected[seq] = payload
                last = seq
        finally:
            w.close(WAIT_S)

        entries, problems = read_all(wal_dir)
        assert problems == []
        assert {s: p for s, _, p in entries} == expected
        assert [s for s, _, _ in entries] == sorted(expected)
        # The same files, read by the independent parser.
        parsed = [
            f.payload
            for path in segment_paths(wal_dir)
            for f in arcw_parser.parse_file(path, strict=True).frames
        ]
        assert parsed == [expected[s] for s in sorted(expected)]
        for seq, (name, body) in enveloped.items():
            if seq in expected:
                assert node.parse_envelope(expected[seq]) == (name, body)
        w = open_writer()
        try:
            assert w.current_sequence() == last
        finally:
            w.close(WAIT_S)


# --- damage ------------------------------------------------------------------------------

FIXED_SIZES = [0, 1, 48, 112, 240]

damages = st.lists(
    st.tuples(
        st.sampled_from(["flip", "flip", "flip-length-high", "flip-length-low", "truncate"]),
        st.integers(min_value=0, max_value=10**6),  # which segment (modulo)
        st.integers(min_value=0, max_value=10**6),  # where in it (modulo)
        st.integers(min_value=1, max_value=255),  # xor mask
    ),
    min_size=1,
    max_size=4,
)


@st.composite
def logs(draw):
    count = draw(st.integers(min_value=1, max_value=30))
    if draw(st.booleans()):
        size = draw(st.sampled_from(FIXED_SIZES))
        items = [draw(st.binary(min_size=size, max_size=size)) for _ in range(count)]
    else:
        items = draw(st.lists(st.binary(max_size=200), min_size=count, max_size=count))
    return items


@settings(max_examples=600, **SETTINGS)
@given(
    items=logs(),
    max_size=st.integers(min_value=8, max_value=2000),
    damage=damages,
)
def test_damage_never_returns_other_bytes_at_a_sequence(tmp_path, items, max_size, damage):
    with tempfile.TemporaryDirectory(dir=tmp_path) as wal_dir:
        w = node.Writer(wal_dir, sync_mode="async", max_size_bytes=max_size)
        try:
            for payload in items:
                w.append_raw(payload)
        finally:
            w.close(WAIT_S)
        pristine, problems = read_all(wal_dir)
        assert problems == [] and [p for _, _, p in pristine] == items
        written = {s: (ts, p) for s, ts, p in pristine}

        segments = segment_paths(wal_dir)
        layout = {path: arcw_parser.parse_file(path).frames for path in segments}
        touched_ts: set[int] = set()  # sequences whose timestamp bytes were flipped
        touched_files: set[str] = set()
        truncations: list[tuple[str, int]] = []
        first_seqs = {path: int(os.path.basename(path)[4:24]) for path in segments}

        for kind, which, where, mask in damage:
            path = segments[which % len(segments)]
            data = bytearray(file_bytes(path))
            frames = layout[path]
            if kind == "truncate":
                truncations.append((path, where % len(data)))
                continue
            if kind in ("flip-length-high", "flip-length-low"):
                if not frames:
                    continue
                frame = frames[where % len(frames)]
                # High bytes: +16 MiB or +64 KiB, past the end of any file this test
                # writes. Low bytes: another length that may well fit.
                low = 2 if kind == "flip-length-low" else 0
                offset = frame.offset + low + (where // len(frames)) % 2
            else:
                length_fields = {f.offset + i for f in frames for i in range(4)}
                allowed = [i for i in range(len(data)) if i not in length_fields]
                offset = allowed[where % len(allowed)]
                for i, f in enumerate(frames):
                    if f.offset + 4 <= offset < f.offset + 12:
                        touched_ts.add(first_seqs[path] + i)
            data[offset] ^= mask
            write_bytes(path, bytes(data))
            touched_files.add(path)
        for path, cut in truncations:
            os.truncate(path, min(cut, os.path.getsize(path)))
            touched_files.add(path)

        entries, problems = read_all(wal_dir)
        for seq, ts, payload in entries:
            assert seq in written, f"sequence {seq} was never written"
            assert payload == written[seq][1], f"sequence {seq} returned other bytes"
            if seq not in touched_ts:
                assert ts == written[seq][0]
        returned = {s for s, _, _ in entries}
        assert len(returned) == len(entries), "a sequence was returned twice"
        # Nothing is lost silently, and undamaged segments read whole. (A cut at an entry
        # boundary, or a newest segment cut inside its header, looks like a shorter log.)
        boundaries = {
            path: {7}
            | {f.offset for f in frames}
            | {f.offset + 16 + len(f.payload) for f in frames}
            for path, frames in layout.items()
        }
        silent_ok = any(
            cut in boundaries[path] or (cut < 7 and path == segments[-1])
            for path, cut in truncations
        )
        if len(entries) < len(written) and not silent_ok:
            assert problems
        for path in segments:
            if path not in touched_files:
                first = first_seqs[path]
                for i in range(len(layout[path])):
                    assert first + i in returned
