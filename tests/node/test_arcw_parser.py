"""Our files, read by a parser that shares no code with node/ (so the seed can read them)."""

from __future__ import annotations

import json
import os

import arcw_parser
import msgpack
import pytest
from walhelpers import ARC_VECTORS_DIR, file_bytes, first_seq_of, payload_for, segment_paths

from walrep import node
from walrep.node import format as fmt


def _write_every_kind(writer: node.Writer) -> None:
    """One of each append call, several times over, so the log spans segments."""
    columnar = msgpack.packb({"m": "cpu", "columns": {"time": [1, 2], "value": [0.5, 1.5]}})
    for round_ in range(6):
        writer.append([{"measurement": "cpu", "value": round_ + 0.5, "time": round_}])
        writer.append_nowait([{"measurement": "mem", "used": round_}])
        writer.append_raw(columnar)
        writer.append_raw_nowait(payload_for(round_))
        writer.append_raw_with_meta("telemetry", columnar)
        writer.append_raw_with_meta_nowait("d" * 200, columnar)
        writer.append_raw(b"", durable=True, timeout=20)  # an empty payload is an entry too
        writer.append_batch([payload_for(100 + round_ * 3 + i) for i in range(3)])
        writer.append_batch_nowait([b"\x90", b"\x91\x01"])


def test_independent_parser_reads_what_our_writer_wrote(wal):
    seen: list[node.ReplicationEntry] = []
    writer = wal.writer(max_size_bytes=600)
    writer.set_replication_hook(seen.append)
    _write_every_kind(writer)
    writer.close()

    segments = segment_paths(wal.dir())
    assert len(segments) >= 4, "the test wants several rotations"
    frames = []
    expected_first = 1
    for path in segments:
        assert file_bytes(path)[:7] == arcw_parser.FILE_HEADER
        parsed = arcw_parser.parse_file(path, strict=True)
        assert first_seq_of(path) == expected_first  # named by its first entry
        expected_first += len(parsed.frames)
        frames.extend(parsed.frames)

    assert [s.seq for s in seen] == list(range(1, len(seen) + 1))
    assert [(f.timestamp_us, f.payload) for f in frames] == [
        (s.timestamp_us, s.payload) for s in seen
    ]

    # Decoded independently too: envelopes and msgpack, as the seed would.
    databases = [arcw_parser.split_envelope(f.payload)[0] for f in frames]
    assert databases.count("telemetry") == 6 and databases.count("d" * 200) == 6
    first = msgpack.unpackb(frames[0].payload)
    assert first == [{"measurement": "cpu", "value": 0.5, "time": 0}]


def test_independent_parser_reads_replicated_and_restarted_logs(wal):
    leader = wal.writer(wal.dir("leader"), max_size_bytes=300)
    runs: list[node.CommittedRun] = []
    leader.set_commit_hook(runs.append)
    for i in range(1, 31):
        leader.append_raw(payload_for(i))
    leader.close()
    follower = wal.writer(wal.dir("follower"), max_size_bytes=300)
    for run in runs:
        follower.append_replicated(run.first_seq, run.data)
    follower.close()
    # Reopened: the writer continues in its newest segment, still parseable.
    follower = wal.writer(wal.dir("follower"), max_size_bytes=300)
    follower.append_raw(payload_for(31), durable=True, timeout=20)
    follower.close()

    payloads = [
        f.payload
        for path in segment_paths(wal.dir("follower"))
        for f in arcw_parser.parse_file(path).frames
    ]
    assert payloads == [payload_for(i) for i in range(1, 32)]


def test_our_reader_reads_a_file_built_by_the_independent_encoder(tmp_path):
    # The other direction: a file the seed could have written, built without node/.
    body = msgpack.packb([{"measurement": "cpu", "value": 1.0}])
    payloads = [body, arcw_parser.build_envelope("db", body), b""]
    data = arcw_parser.FILE_HEADER + b"".join(
        arcw_parser.build_frame(1_700_000_000_000_000 + i, p) for i, p in enumerate(payloads)
    )
    path = tmp_path / node.segment_name(5)
    path.write_bytes(data)
    entries = list(node.WALReader(str(tmp_path)).raw_entries(1))
    assert entries == [(5 + i, 1_700_000_000_000_000 + i, p) for i, p in enumerate(payloads)]
    assert [fmt.encode_entry(ts, p) for _s, ts, p in entries] == [
        arcw_parser.build_frame(ts, p) for _s, ts, p in entries
    ]


with open(os.path.join(ARC_VECTORS_DIR, "vectors.json")) as _f:
    VECTORS = json.load(_f)["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["file"] for v in VECTORS])
def test_independent_parser_reads_the_seed_vectors(vector):
    path = os.path.join(ARC_VECTORS_DIR, vector["file"])
    torn = vector["incomplete_tail_bytes"] > 0
    if torn:
        with pytest.raises(arcw_parser.ARCWError):
            arcw_parser.parse_file(path, strict=True)
    parsed = arcw_parser.parse_file(path, strict=not torn)
    complete = [f for f in vector["frames_on_disk"] if f["payload_complete"]]
    assert [(f.offset, f.timestamp_us, f.payload.hex()) for f in parsed.frames] == [
        (f["offset"], f["timestamp_us"], f["payload_hex"]) for f in complete
    ]
    assert parsed.tail_bytes == vector["incomplete_tail_bytes"]
    for frame, want in zip(parsed.frames, complete, strict=True):
        assert (
            arcw_parser.build_frame(frame.timestamp_us, frame.payload)[:16].hex()
            == (want["header_hex"])
        )
