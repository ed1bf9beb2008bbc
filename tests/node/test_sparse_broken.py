"""A newest segment that ends in a gigabyte of zeros opens cheaply and keeps its cut sparse.

A crash (or a tool) can leave the newest segment far longer than what was written
to it. Opening cuts that tail off and keeps it in ``<segment>.broken``, byte for
byte; these tests check that a gigabyte of zeros costs neither a gigabyte of disk
in the .broken file nor a gigabyte of memory, and that everything before it is kept.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from walhelpers import file_bytes, payload_for, read_all, segment_paths

from walrep import node
from walrep.node import format as fmt

WAIT_S = 20.0
MIB = 1024 * 1024
GIB = 1024 * MIB
# What a .broken file of a gigabyte of zeros may hold on disk: a block or so of the
# bytes before the zeros, and file system overhead.
SPARSE_LIMIT_BYTES = 16 * MIB


def _log_of(wal_dir: str, count: int, **options) -> tuple[str, int]:
    """A closed log of count entries; (newest segment, its size)."""
    w = node.Writer(wal_dir, **options)
    for seq in range(1, count + 1):
        w.append_raw(payload_for(seq), durable=True, timeout=WAIT_S)
    w.close()
    path = segment_paths(wal_dir)[-1]
    return path, os.path.getsize(path)


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _append_bytes(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_a_gigabyte_hole_after_the_last_entry_is_cut_into_a_sparse_broken_file(wal):
    path, size = _log_of(wal.dir(), 5)
    os.truncate(path, size + GIB)  # a sparse all-zero tail

    w = wal.writer()
    assert w.current_sequence() == 5
    broken = path + ".broken"
    assert os.path.getsize(broken) == GIB
    assert _allocated(broken) < SPARSE_LIMIT_BYTES
    assert stat.S_IMODE(os.stat(broken).st_mode) == 0o600
    [problem] = w.repairs
    assert (problem.kind, problem.offset, problem.sequence) == ("torn-tail", size, 6)
    assert problem.lost_bytes == GIB
    assert f"the last {GIB} bytes" in problem.detail
    assert os.path.getsize(path) == size

    assert w.append_raw(payload_for(6), durable=True, timeout=WAIT_S) == 6
    w.close()
    entries, problems = read_all(wal.dir())
    assert problems == []
    assert [(s, p) for s, _, p in entries] == [(s, payload_for(s)) for s in range(1, 7)]


# Opens the Writer on argv[1] and reports its peak memory before and after, in KiB.
MEASURE = """
import json, resource, sys
from walrep import node
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w = node.Writer(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w.close()
print(json.dumps({"before_kib": before, "after_kib": after, "seq": w.current_sequence()}))
"""


@pytest.mark.parametrize(
    ("how", "zeros"),
    [("hole", GIB), ("written", 48 * MIB)],
)
def test_opening_reads_no_zero_tail_into_memory(wal, how, zeros):
    path, size = _log_of(wal.dir(), 5)
    if how == "hole":
        os.truncate(path, size + zeros)
    else:  # zeros really on disk, as a file system that allocated them leaves them
        with open(path, "ab") as f:
            for _ in range(zeros // MIB):
                f.write(bytes(MIB))
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, wal.dir()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    assert measured["seq"] == 5
    grew = (measured["after_kib"] - measured["before_kib"]) * 1024
    assert grew < 16 * MIB, f"opening grew the peak RSS by {grew // MIB} MiB"
    assert os.path.getsize(path + ".broken") == zeros
    assert _allocated(path + ".broken") < SPARSE_LIMIT_BYTES


def test_a_tail_of_bytes_holes_and_zeros_is_kept_byte_for_byte(wal):
    path, size = _log_of(wal.dir(), 3)
    # A torn entry: its header promises 8 MiB, and what follows is a mix of bytes,
    # a hole and written zeros, as a crash in the middle of a big write leaves it.
    payload_start = b"\x07" * 100
    _append_bytes(path, fmt.ENTRY_HEADER.pack(8 * MIB, 12345, 0xDEADBEEF) + payload_start)
    os.truncate(path, os.path.getsize(path) + 2 * MIB + 512)  # a hole
    _append_bytes(path, b"\x01\x02\x03" * 333 + bytes(3 * MIB // 2) + b"tail\xff" + bytes(10))
    tail = file_bytes(path)[size:]

    w = wal.writer()
    assert w.current_sequence() == 3
    broken = path + ".broken"
    assert file_bytes(broken) == tail
    assert _allocated(broken) <= len(tail) - MIB  # a MiB of the zeros at least is a hole
    assert file_bytes(path)[size:] == b""
    assert w.append_raw(payload_for(4), durable=True, timeout=WAIT_S) == 4
    w.close()

    # A second cut is appended after the first, byte for byte as well.
    size = os.path.getsize(path)
    second = fmt.ENTRY_HEADER.pack(64, 1, 2) + b"\x09" + bytes(20) + b"\x09"  # 22 of 64
    _append_bytes(path, second)
    w = wal.writer()
    assert w.current_sequence() == 4
    assert file_bytes(broken) == tail + second
    w.close()
    assert [s for s, _, _ in read_all(wal.dir())[0]] == [1, 2, 3, 4]


def test_an_entry_whose_payload_ends_in_zeros_survives_a_gigabyte_of_zeros_after_it(wal):
    """The scan reads past the last non-zero byte as far as the last entry reaches."""
    w = wal.writer()
    w.append_raw(payload_for(1), durable=True, timeout=WAIT_S)
    zero_ended = b"z" + bytes(3 * MIB)  # longer than what the open reads past a non-zero
    w.append_raw(zero_ended, durable=True, timeout=WAIT_S)
    w.close()
    path = segment_paths(wal.dir())[-1]
    size = os.path.getsize(path)
    os.truncate(path, size + GIB)

    w = wal.writer()
    assert w.current_sequence() == 2
    [problem] = w.repairs
    assert (problem.offset, problem.lost_bytes) == (size, GIB)
    assert os.path.getsize(path) == size
    assert os.path.getsize(path + ".broken") == GIB
    w.close()
    assert [p for _, _, p in read_all(wal.dir())[0]] == [payload_for(1), zero_ended]


def test_a_last_entry_failing_its_crc_before_a_gigabyte_hole_is_a_torn_tail(wal):
    path, size = _log_of(wal.dir(), 2)
    _append_bytes(path, fmt.ENTRY_HEADER.pack(4, 1, 0) + b"abcd")  # wrong CRC
    os.truncate(path, size + 20 + GIB)

    w = wal.writer()
    assert w.current_sequence() == 2
    [problem] = w.repairs
    assert (problem.kind, problem.offset, problem.lost_bytes) == ("torn-tail", size, 20 + GIB)
    assert os.path.getsize(path + ".broken") == 20 + GIB


def test_an_impossible_length_before_a_gigabyte_hole_names_every_lost_byte(wal):
    path, size = _log_of(wal.dir(), 2)
    _append_bytes(path, fmt.ENTRY_HEADER.pack(fmt.MAX_PAYLOAD_BYTES + 1, 1, 0) + b"abcd")
    os.truncate(path, size + 20 + GIB)
    with pytest.raises(node.WALError) as refused:
        node.Writer(wal.dir())
    assert f"the remaining {20 + GIB} bytes of the file are lost" in str(refused.value)
    assert f"truncate it to {size} bytes" in str(refused.value)
    assert not os.path.exists(path + ".broken")


def test_repair_cut_keeps_a_zero_tail_sparse_too(wal):
    path, size = _log_of(wal.dir(), 4, repair="cut")
    os.truncate(path, size + 256 * MIB)
    w = wal.writer(repair="cut")
    assert w.current_sequence() == 4
    assert os.path.getsize(path + ".broken") == 256 * MIB
    assert _allocated(path + ".broken") < SPARSE_LIMIT_BYTES
    assert os.path.getsize(path) == size
