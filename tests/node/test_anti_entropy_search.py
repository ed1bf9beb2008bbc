"""The reader's anti-entropy search (verify.find_divergence) on real WAL directories.

The leader side is a directory here; what is pinned is how many digests it is
asked for: a few per pass while the logs agree, a bounded descent when they do not.
"""

from __future__ import annotations

import pytest
import trio

from walrep import node
from walrep.cluster.verify import CHUNKS, DirSource, find_divergence
from walrep.node import format as fmt

ENTRIES = 5_000
NEWEST = 100


class CountingDir(DirSource):
    """A directory source that counts the digests it is asked for."""

    def __init__(self, path: str):
        super().__init__(path)
        self.asked = 0

    async def digest(self, from_seq: int, to_seq: int) -> str | None:
        self.asked += 1
        return await super().digest(from_seq, to_seq)


def write_log(path: str, change: dict[int, bytes] | None = None) -> str:
    """ENTRIES entries with fixed timestamps (so two copies are byte-identical)."""
    change = change or {}
    with node.Writer(path, max_size_bytes=64 * 1024) as w:
        for seq in range(1, ENTRIES + 1):
            payload = change.get(seq, b"entry-%06d" % seq)
            w.append_replicated(seq, fmt.encode_entry(1_000_000 + seq, payload))
            if seq % 500 == 0:
                w.wait_durable(seq, timeout=20)  # several segments
    return path


@pytest.fixture(scope="module")
def leader_dir(tmp_path_factory):
    return write_log(str(tmp_path_factory.mktemp("leader") / "wal"))


def search(local: str, leader: str, **options):
    a, b = CountingDir(local), CountingDir(leader)
    found = trio.run(lambda: find_divergence(a, b, 1, ENTRIES, newest_entries=NEWEST, **options))
    return found, b.asked


def test_logs_that_agree_cost_the_leader_one_digest_per_range(leader_dir, tmp_path):
    same = write_log(str(tmp_path / "same"))
    found, asked = search(same, leader_dir)
    assert found.first_difference is None and found.damage == []
    assert asked == 2  # the newest entries, then the rest: no descent
    assert found.checked == ENTRIES
    found, asked = search(same, leader_dir, max_range=1_000)
    assert found.first_difference is None and asked == 1 + 5  # 4,900 in ranges of 1,000


def test_a_divergence_deep_in_the_log_is_found_in_one_pass(leader_dir, tmp_path):
    # Same length, valid CRC: only a comparison with the leader can tell.
    changed = write_log(str(tmp_path / "changed"), {1_234: b"ENTRY-001234"})
    found, asked = search(changed, leader_dir)
    assert found.first_difference == 1_234 and found.damage == []
    levels = 3  # 4,900 entries: chunks of 307, 20, 2
    assert asked <= 2 + CHUNKS * levels + 1  # the two ranges, a descent, one check


def test_the_first_difference_is_reported_even_when_the_newest_entries_differ(leader_dir, tmp_path):
    changed = write_log(str(tmp_path / "changed"), {700: b"x", ENTRIES - 5: b"y"})
    found, _ = search(changed, leader_dir)
    assert found.first_difference == 700
    found, _ = search(changed, leader_dir, whole=False)  # the newest range alone
    assert found.first_difference == ENTRIES - 5


def test_an_entry_this_side_cannot_read_is_damage_not_a_divergence(leader_dir, tmp_path):
    changed = write_log(str(tmp_path / "changed"), {3_000: b"ENTRY-003000"})
    # Flip a payload byte of entry 800 in a sealed segment: its CRC no longer matches.
    segment = [s for s in node.WALReader(changed).segments() if s.first_seq <= 800][-1]
    entry_offset = fmt.FILE_HEADER_BYTES + (800 - segment.first_seq) * (16 + 12)
    with open(segment.path, "r+b") as f:
        f.seek(entry_offset + 16 + 3)
        byte = f.read(1)
        f.seek(entry_offset + 16 + 3)
        f.write(bytes([byte[0] ^ 0x01]))
    found, _ = search(changed, leader_dir)
    assert [(d.side, d.kind, d.sequence) for d in found.damage] == [(changed, "crc-mismatch", 800)]
    assert found.damage[0].file == segment.path and found.damage[0].offset == entry_offset
    assert found.first_difference == 3_000  # and the search went on past the damage
