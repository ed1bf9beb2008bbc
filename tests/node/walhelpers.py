"""Small helpers shared by the tests in tests/node (real files, no mocks)."""

from __future__ import annotations

import hashlib
import os

import arcw_parser

from walrep import node

HERE = os.path.dirname(os.path.abspath(__file__))
# A copy of the seed system's WAL files and what its reader returned
# (/work/shared/testdata/arc-wal): kept in the repo so the tests need nothing outside it.
ARC_VECTORS_DIR = os.path.join(HERE, "arc-wal")


def payload_for(seq: int, salt: bytes = b"") -> bytes:
    """A payload that can be told apart from every other sequence's, of varying size."""
    digest = hashlib.sha256(salt + seq.to_bytes(8, "big")).digest()
    return b"\x92" + seq.to_bytes(8, "big") + digest * (seq % 5)


def segment_paths(wal_dir: str) -> list[str]:
    """Sequenced segments of a directory, oldest first (by name, which sorts by sequence)."""
    names = sorted(n for n in os.listdir(wal_dir) if n.startswith("arc-") and n.endswith(".wal"))
    return [os.path.join(wal_dir, n) for n in names]


def first_seq_of(path: str) -> int:
    return int(os.path.basename(path)[4:24])


def read_all(wal_dir: str, from_seq: int = 1) -> tuple[list[tuple[int, int, bytes]], list]:
    """Every good entry from from_seq, and every problem the reader reported."""
    problems: list[node.Problem] = []
    reader = node.WALReader(wal_dir, on_problem=problems.append)
    entries = [(seq, ts, bytes(payload)) for seq, ts, payload in reader.raw_entries(from_seq)]
    return entries, problems


def frames_of(path: str) -> list[arcw_parser.Frame]:
    """The frames of an undamaged segment, by the independent parser."""
    return arcw_parser.parse_file(path, strict=True).frames


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
