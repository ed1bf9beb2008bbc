"""A reader's background comparison with its leader (anti-entropy), with real processes.

A divergence is planted deep in a stopped reader's log: one entry's payload is
replaced by other bytes of the same length with a correct CRC, so nothing but a
comparison with the leader can tell. Restarted, the reader must find it within a
couple of passes, stop streaming and acking, and say so in its status.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess

import pytest

from walrep import node
from walrep.cluster.procs import LocalCluster, free_ports, wait_for, walrep_command
from walrep.node import format as fmt

pytestmark = pytest.mark.timeout(300)

ENTRIES = 300_000
PLANTED = 250_000  # far from both ends: outside the newest window, deep in the log
INTERVAL_S = "2"


def walrep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(walrep_command(*args), capture_output=True, text=True, timeout=timeout)


def reader_row(endpoint: str) -> dict:
    result = walrep("status", "--control", endpoint, "--json", "--timeout", "5")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["nodes"][0]


def plant_divergence(wal_dir: str, seq: int) -> None:
    """Give entry seq other bytes of the same length, with their correct CRC."""
    segment = [s for s in node.WALReader(wal_dir).segments() if s.first_seq <= seq][-1]
    with open(segment.path, "r+b") as f:
        data = f.read()
        pos, current = fmt.FILE_HEADER_BYTES, segment.first_seq
        while current < seq:
            (length,) = struct.unpack_from(">I", data, pos)
            pos += fmt.ENTRY_HEADER_BYTES + length
            current += 1
        length, timestamp, _crc = fmt.ENTRY_HEADER.unpack_from(data, pos)
        start = pos + fmt.ENTRY_HEADER_BYTES
        changed = bytes(b ^ 0x5A for b in data[start : start + length])
        f.seek(pos)
        f.write(fmt.encode_entry(timestamp, changed))
        f.flush()
        os.fsync(f.fileno())


def test_a_divergence_deep_in_the_log_stops_the_reader_within_two_passes(tmp_path):
    (control_port,) = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{control_port}"
    # The default interval (30 s) keeps the check out of the way while loading.
    cluster = LocalCluster(str(tmp_path / "c"), readers=1, reader_extra=["--control", endpoint])
    reader = cluster.reader_nodes[0]
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        loaded = cluster.load(ENTRIES, "--batch", "1000")
        assert loaded.returncode == 0, loaded.stderr
        head = cluster.wait_converged(timeout=120)
        assert head == ENTRIES
        reader.stop()

        plant_divergence(reader.wal_dir, PLANTED)
        ours = list(node.WALReader(reader.wal_dir).raw_entries(PLANTED, PLANTED))
        theirs = list(node.WALReader(cluster.leader.wal_dir).raw_entries(PLANTED, PLANTED))
        assert len(ours) == 1 and ours[0][2] != theirs[0][2]  # readable, and different

        reader.args += ["--anti-entropy-interval-s", INTERVAL_S]
        reader.start()
        row = wait_for(
            lambda: (r := reader_row(endpoint)) and r["state"] == "diverged" and r,
            60,
            "the reader to report itself diverged",
            poll=0.2,
        )
        assert row["diverged_seq"] == PLANTED
        assert "--resync" in row["remedy"]
        assert row["connected"] is False

        lines = [x for x in reader.log_text().splitlines() if "DIVERGENCE" in x]
        assert len(lines) == 1, lines
        assert f"seq={PLANTED} " in lines[0] and f"leader={cluster.control}" in lines[0]
        # Found by the first or second comparison after the restart, not by a walk
        # that needs PLANTED / 10,000 intervals to get there.
        assert int(re.search(r"pass=(\d+)", lines[0]).group(1)) <= 2, lines[0]

        # It stopped streaming: a replicas=1 append cannot be confirmed by it, and
        # what the leader writes meanwhile does not reach its log.
        unconfirmed = walrep(
            "append", "--ingest", cluster.ingest, "--ack", "replicas=1", "--timeout", "2", "{}"
        )
        assert unconfirmed.returncode != 0, unconfirmed.stdout
        assert cluster.load(1_000).returncode == 0
        wait_for(lambda: cluster.leader.last_seq() == ENTRIES + 1_001, 30, "the leader")
        # It still answers status, and still says it diverged.
        later = reader_row(endpoint)
        assert later["state"] == "diverged" and later["diverged_seq"] == PLANTED
        assert later["durable_seq"] == ENTRIES
        assert reader.running() and reader.last_seq() == ENTRIES
    finally:
        cluster.stop()
