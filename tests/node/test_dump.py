"""`walrep dump`: JSON lines with the documented keys, problems on stderr, exit 0/3/1."""

from __future__ import annotations

import json
import os
import shutil

import msgpack

from walrep import node
from walrep.cluster.cli import main

VECTORS = os.path.join(os.path.dirname(__file__), "arc-wal")


def dump(capsys, *args: str) -> tuple[int, list[dict], str]:
    code = main(["dump", *args, "--json"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def make_log(path) -> str:
    with node.Writer(str(path), max_size_bytes=300) as w:
        w.append([{"host": "a", "value": 1.5}])
        w.append_raw_with_meta("telemetry", msgpack.packb({"m": "cpu", "columns": {"v": [1, 2]}}))
        w.append_raw(b"\x00not msgpack")
        for i in range(20):
            w.append_raw(msgpack.packb([{"i": i}]), durable=True)  # one group each
    return str(path)


def test_json_lines_carry_every_documented_key(tmp_path, capsys):
    code, rows, err = dump(capsys, make_log(tmp_path / "wal"))
    assert code == 0 and err == ""
    assert [r["seq"] for r in rows] == list(range(1, 24))
    first, columnar, raw = rows[:3]
    assert first["kind"] == "records" and first["records"] == [{"host": "a", "value": 1.5}]
    assert first["database"] is None and first["size"] > 0 and first["timestamp_us"] > 0
    assert columnar["kind"] == "columnar" and columnar["database"] == "telemetry"
    assert columnar["measurement"] == "cpu" and columnar["columns"] == {"v": [1, 2]}
    assert raw["kind"] == "raw" and "records" not in raw
    entries = list(node.WALReader(str(tmp_path / "wal")).entries())
    assert [r["crc32"] for r in rows] == [e.crc32 for e in entries]


def test_range_selects_by_sequence_across_segments(tmp_path, capsys):
    wal_dir = make_log(tmp_path / "wal")
    assert len(node.WALReader(wal_dir).segments()) >= 2
    code, rows, _ = dump(capsys, wal_dir, "--from-seq", "10", "--to-seq", "15")
    assert code == 0 and [r["seq"] for r in rows] == [10, 11, 12, 13, 14, 15]


def test_seed_file_without_sequence_and_a_torn_tail_exit_3(tmp_path, capsys):
    code, rows, err = dump(capsys, os.path.join(VECTORS, "vector4.wal"))
    assert code == 3
    assert [r["seq"] for r in rows] == [None, None]  # seed-named: no sequence
    assert "torn-tail" in err and "vector4.wal" in err and "offset 231" in err


def test_corruption_is_named_on_stderr_and_exit_3(tmp_path, capsys):
    wal_dir = make_log(tmp_path / "wal")
    first_segment = node.WALReader(wal_dir).segments()[0].path
    with open(first_segment, "r+b") as f:
        f.seek(7 + 16 + 2)  # inside the first entry's payload
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, rows, err = dump(capsys, wal_dir)
    assert code == 3
    assert 1 not in [r["seq"] for r in rows]
    assert "crc-mismatch" in err and os.path.basename(first_segment) in err
    assert "sequence 1" in err and "offset 7" in err


def test_missing_path_and_bad_usage_exit_1(tmp_path, capsys):
    assert main(["dump", str(tmp_path / "nope")]) == 1
    assert "no such file" in capsys.readouterr().err
    shutil.copy(os.path.join(VECTORS, "vector1.wal"), tmp_path / "v.wal")
    try:
        main(["dump", str(tmp_path / "v.wal"), "--from-seq", "zero"])
    except SystemExit as exc:
        assert exc.code == 1
    else:
        raise AssertionError("bad usage must exit")


def test_progress_goes_to_a_terminal_and_never_into_scripts(tmp_path):
    import pty
    import select
    import subprocess

    from walrep.cluster.procs import walrep_command

    wal_dir = str(tmp_path / "big")
    with node.Writer(wal_dir) as w:
        w.append_batch([b"p" * 20] * 30_000)
    with open(tmp_path / "out.txt", "w") as out:
        quiet = subprocess.run(
            walrep_command("dump", wal_dir), stdout=out, stderr=subprocess.PIPE, timeout=60
        )
    assert quiet.returncode == 0 and quiet.stderr == b""  # stderr not a terminal: silent
    controller, terminal = pty.openpty()
    try:
        with open(tmp_path / "out2.txt", "w") as out:
            shown = subprocess.run(
                walrep_command("dump", wal_dir), stdout=out, stderr=terminal, timeout=60
            )
        assert shown.returncode == 0
        seen = b""
        while select.select([controller], [], [], 0.5)[0]:
            seen += os.read(controller, 4096)
        assert b"dump: " in seen and b"of 30,000" in seen
    finally:
        os.close(controller)
        os.close(terminal)
