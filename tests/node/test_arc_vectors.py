"""Files written by the seed system read and replay exactly as the seed's own reader did.

vectors.json records, for each file, what Arc's Reader and Recovery returned. Go
decodes msgpack numbers into narrow types and its JSON encoder writes an integral
float64 without a decimal point, so every expected value is first turned into the
Python type the *_go_types fields call for, and then compared type and all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from walhelpers import ARC_VECTORS_DIR, file_bytes

from walrep import node

with open(os.path.join(ARC_VECTORS_DIR, "vectors.json")) as _f:
    VECTORS = json.load(_f)["vectors"]

GO_FLOATS = {"float32", "float64"}
GO_INTS = {f"{sign}int{bits}" for sign in ("", "u") for bits in ("", "8", "16", "32", "64")}


def expected_value(value, go_type):
    """The Python value the seed's Go value stands for, with its Python type."""
    if isinstance(go_type, dict):
        assert isinstance(value, dict) and set(value) == set(go_type)
        return {k: expected_value(value[k], go_type[k]) for k in value}
    if isinstance(go_type, list):
        assert isinstance(value, list) and len(value) == len(go_type)
        return [expected_value(v, t) for v, t in zip(value, go_type, strict=True)]
    if go_type in GO_FLOATS:
        return float(value)
    if go_type in GO_INTS:
        assert type(value) is int
        return value
    if go_type == "string":
        assert isinstance(value, str)
        return value
    if go_type == "bool":
        assert isinstance(value, bool)
        return value
    if go_type == "nil":
        assert value is None
        return None
    raise AssertionError(f"go type {go_type!r} not handled by the test")


def assert_same(actual, expected, where="value"):
    """Equal, and of the same Python type all the way down (1 != 1.0 here)."""
    assert type(actual) is type(expected), f"{where}: {actual!r} is not {expected!r}"
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def expected_records(item):
    return [
        expected_value(rec, types)
        for rec, types in zip(item["records"], item["records_go_types"], strict=True)
    ]


def expected_columns(item):
    return expected_value(item["columns"], item["columns_go_types"])


def vector_path(vector) -> str:
    return os.path.join(ARC_VECTORS_DIR, vector["file"])


def complete_frames(vector):
    return [f for f in vector["frames_on_disk"] if f.get("payload_complete")]


def is_torn(vector) -> bool:
    return vector["incomplete_tail_bytes"] > 0


ids = [v["file"] for v in VECTORS]


def test_the_vectors_include_every_kind_of_file():
    kinds = {e["kind"] for v in VECTORS for e in v["arc_reader"]["entries"]}
    assert kinds == {"records", "columnar"}
    assert any(is_torn(v) for v in VECTORS)
    assert any(e.get("database") for v in VECTORS for e in v["arc_reader"]["entries"])


@pytest.mark.parametrize("vector", VECTORS, ids=ids)
def test_vector_file_is_the_one_described(vector):
    data = file_bytes(vector_path(vector))
    assert len(data) == vector["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == vector["sha256"]
    assert data[:7].hex() == vector["file_header_hex"]


@pytest.mark.parametrize("vector", VECTORS, ids=ids)
def test_reader_returns_what_arcs_reader_returned(vector):
    arc = vector["arc_reader"]
    problems: list[node.Problem] = []
    reader = node.WALReader(vector_path(vector), on_problem=problems.append)
    entries = list(reader.all_entries())

    assert len(entries) == arc["entry_count"] == len(arc["entries"])
    for entry, want in zip(entries, arc["entries"], strict=True):
        where = f"{vector['file']} entry {want['index']}"
        assert entry.seq is None, where  # a seed-named file carries no sequence
        assert entry.timestamp_us == want["timestamp_us"], where
        assert entry.kind == want["kind"], where
        if want["kind"] == "records":
            assert entry.columnar is None
            assert_same(entry.records, expected_records(want), where)
        else:
            assert entry.records is None
            assert entry.columnar.measurement == want["measurement"], where
            assert_same(entry.columnar.columns, expected_columns(want), where)
            assert entry.columnar.database == want["database"], where
            # The seed says "" for no envelope; we say None and keep "" for columnar.
            assert entry.database == (want["database"] or None), where

    # The bytes we return are the bytes on disk, not a re-encoding.
    frames = complete_frames(vector)
    assert [e.payload.hex() for e in entries] == [f["payload_hex"] for f in frames]
    assert [e.timestamp_us for e in entries] == [f["timestamp_us"] for f in frames]
    assert [e.crc32 for e in entries] == [f["crc32_stored"] for f in frames]
    if "replication_hook_payloads_hex" in vector:
        assert [e.payload.hex() for e in entries] == vector["replication_hook_payloads_hex"]

    # Metrics: entries and corrupted count like the seed's; the seed's TotalBytes
    # counts whole frames, ours counts payload bytes.
    assert reader.total_entries == arc["reader_total_entries"]
    assert reader.corrupted_entries == arc["corrupted_entries"]
    assert reader.total_bytes + 16 * reader.total_entries == arc["reader_total_bytes"]

    assert reader.problems == problems
    if is_torn(vector):
        torn_frame = next(f for f in vector["frames_on_disk"] if not f["payload_complete"])
        assert len(problems) == 1
        (problem,) = problems
        assert problem.kind == "torn-tail"
        assert problem.file == vector_path(vector)
        assert problem.offset == torn_frame["offset"]
        assert problem.sequence is None
        assert problem.lost_bytes == vector["incomplete_tail_bytes"]
    else:
        assert problems == []


def _replay(directory: str, options: node.RecoveryOptions):
    rows: list = []
    columnar: list = []
    options.columnar_callback = lambda db, m, cols: columnar.append((db, m, cols))
    stats = node.Recovery(directory).recover(rows.append, options)
    return rows, columnar, stats


def _copy_vector(vector, directory) -> str:
    os.makedirs(directory)
    name = vector.get("original_arc_file_name") or vector["file"]
    path = os.path.join(directory, name)
    shutil.copyfile(vector_path(vector), path)
    return path


@pytest.mark.parametrize("vector", VECTORS, ids=ids)
def test_recovery_replays_what_arcs_recovery_replayed(vector, tmp_path):
    arc = vector["arc_recovery"]
    directory = str(tmp_path / "wal")
    path = _copy_vector(vector, directory)

    rows, columnar, stats = _replay(directory, node.RecoveryOptions())

    assert len(rows) == len(arc["row_callback_calls"])
    for got, want in zip(rows, arc["row_callback_calls"], strict=True):
        assert_same(got, expected_records(want), vector["file"])
    assert len(columnar) == len(arc["columnar_callback_calls"])
    for (db, measurement, columns), want in zip(
        columnar, arc["columnar_callback_calls"], strict=True
    ):
        assert db == want["database"]
        assert measurement == want["measurement"]
        assert_same(columns, expected_columns(want), vector["file"])

    want_stats = arc["stats"]
    assert stats.recovered_entries == want_stats["RecoveredEntries"]
    assert stats.recovered_batches == want_stats["RecoveredBatches"]
    assert stats.corrupted_entries == want_stats["CorruptedEntries"]
    assert stats.recovered_files == want_stats["RecoveredFiles"]
    assert stats.skipped_files == want_stats["SkippedFiles"]
    assert [p.kind for p in stats.problems] == (["torn-tail"] if is_torn(vector) else [])

    # Unlike the seed, recovery keeps the file unless asked: readers catch up from it.
    assert os.path.exists(path)
    assert file_bytes(path) == file_bytes(vector_path(vector))


@pytest.mark.parametrize("vector", VECTORS, ids=ids)
def test_recovery_deletes_replayed_files_only_when_asked(vector, tmp_path):
    directory = str(tmp_path / "wal")
    path = _copy_vector(vector, directory)
    rows, columnar, stats = _replay(directory, node.RecoveryOptions(delete_replayed=True))
    assert stats.recovered_files == 1
    assert len(rows) + len(columnar) == len(vector["arc_recovery"]["row_callback_calls"]) + len(
        vector["arc_recovery"]["columnar_callback_calls"]
    )
    assert os.path.exists(path) is not vector["arc_recovery"]["file_deleted_by_recovery"]


def test_recovery_batch_size_splits_records(tmp_path):
    vector = next(v for v in VECTORS if v["file"] == "vector1.wal")
    directory = str(tmp_path / "wal")
    _copy_vector(vector, directory)
    rows, _columnar, stats = _replay(directory, node.RecoveryOptions(batch_size=1))
    everything = [
        r for call in vector["arc_recovery"]["row_callback_calls"] for r in call["records"]
    ]
    assert [len(call) for call in rows] == [1] * len(everything)
    assert stats.recovered_batches == len(everything)
    assert stats.recovered_entries == len(everything)


def test_recovery_skips_the_active_file_and_young_files(tmp_path):
    directory = str(tmp_path / "wal")
    os.makedirs(directory)
    paths = []
    for vector in VECTORS[:3]:
        path = os.path.join(directory, vector["original_arc_file_name"])
        shutil.copyfile(vector_path(vector), path)
        paths.append(path)
    _rows, _col, stats = _replay(directory, node.RecoveryOptions(skip_active_file=paths[0]))
    assert (stats.recovered_files, stats.skipped_files) == (2, 1)
    # Files just copied are younger than a minute: all skipped.
    _rows, _col, stats = _replay(directory, node.RecoveryOptions(min_file_age_s=60))
    assert (stats.recovered_files, stats.skipped_files) == (0, 3)
    old = os.stat(paths[1]).st_mtime - 3600
    os.utime(paths[1], (old, old))
    _rows, _col, stats = _replay(directory, node.RecoveryOptions(min_file_age_s=60))
    assert (stats.recovered_files, stats.skipped_files) == (1, 2)


def test_seed_named_files_are_read_but_never_served_by_sequence(tmp_path, wal):
    directory = wal.dir()
    os.makedirs(directory)
    for vector in VECTORS[:3]:
        shutil.copyfile(
            vector_path(vector), os.path.join(directory, vector["original_arc_file_name"])
        )
    reader = node.WALReader(directory)
    # Seed names sort by time, which is the order they were written in.
    timestamps = [e.timestamp_us for e in reader.all_entries()]
    assert len(timestamps) == 9 and timestamps == sorted(timestamps)
    assert list(reader.raw_entries(1)) == []
    assert reader.bounds() == (None, None)
    with pytest.raises(node.RangeNotAvailable):
        reader.read_frames(1, 10)

    # A writer in the same directory leaves them alone and starts its own log at 1.
    writer = wal.writer(directory)
    assert writer.append_raw(b"\x90", durable=True, timeout=20) == 1
    writer.close()
    assert [s for s, _, _ in node.WALReader(directory).raw_entries(1)] == [1]
    assert len(list(node.WALReader(directory).all_entries())) == 10
    active, legacy = node.Recovery(directory).list_wal_files()
    assert len(active) == 4 and legacy == []


def test_cleanup_old_wals_removes_only_old_legacy_files(tmp_path):
    directory = tmp_path / "wal"
    directory.mkdir()
    old = directory / "arc-20240101_000000.000000000.wal.recovered"
    young = directory / "arc-20240102_000000.000000000.wal.recovered"
    keep = directory / "arc-20240103_000000.000000000.wal"
    for path in (old, young, keep):
        path.write_bytes(b"ARCW\x00\x01\x01" + b"x" * 10)
    os.utime(old, (0, 0))
    recovery = node.Recovery(str(directory))
    active, legacy = recovery.list_wal_files()
    assert active == [str(keep)]
    assert legacy == [str(old), str(young)]
    assert recovery.cleanup_old_wals(3600) == (1, 17)
    assert sorted(p.name for p in directory.iterdir()) == [young.name, keep.name]
