"""The bare-path latency baseline (scripts/bench_pipeline.py) does the work it stands for.

`make bench` puts walrep's commit latency next to this baseline's, so a baseline
that acknowledged before writing, synced nothing or skipped the readers would make
walrep look slow for nothing. Driven here by the real `walrep load`.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from bench_pipeline import Pipeline

from walrep import node
from walrep.cluster.loadgen import payload_for
from walrep.cluster.procs import walrep_command

pytestmark = pytest.mark.timeout(120)


def load(pipeline: Pipeline, tmp_path, count: int, ack: str) -> tuple[dict, list[dict]]:
    summary, log = tmp_path / f"{ack}.json", tmp_path / f"{ack}.jsonl"
    command = walrep_command(
        "load", "--ingest", pipeline.ingest, "--count", str(count), "--batch", "10",
        "--ack", ack, "--summary", str(summary), "--log", str(log), "--timeout", "10",
    )  # fmt: skip
    subprocess.run(command, check=True, timeout=60, stdout=subprocess.DEVNULL)
    with open(log) as f:
        return json.loads(summary.read_text()), [json.loads(line) for line in f]


@pytest.mark.parametrize("ack", ["local", "replicas=1", "replicas=2"])
def test_every_acknowledged_entry_is_in_the_leaders_and_readers_wal(tmp_path, ack):
    pipeline = Pipeline(str(tmp_path / "pipe"), readers=2)
    try:
        summary, history = load(pipeline, tmp_path, 500, ack)
        assert summary["acknowledged"] == 500
        assert sorted(line["seq"] for line in history) == list(range(1, 501))
        assert {line["outcome"] for line in history} == {"ok"}
        expected = {line["seq"]: payload_for(line["id"], 100) for line in history}
        held = {
            name: {seq: payload for seq, _ts, payload in node.WALReader(wal_dir).raw_entries()}
            for name in ("leader", "reader-1", "reader-2")
            for wal_dir in [os.path.join(pipeline.base, name)]
        }
        assert held["leader"] == expected
        readers = [held["reader-1"], held["reader-2"]]
        # Whatever a reader holds is the leader's entry at that sequence, and as many
        # readers as the ack level names held the last one when it was acknowledged.
        for entries in readers:
            assert all(expected.get(seq) == payload for seq, payload in entries.items())
        complete = sum(entries == expected for entries in readers)
        assert complete >= {"local": 0, "replicas=1": 1, "replicas=2": 2}[ack]
    finally:
        pipeline.stop()
    assert all(not process.running() for process in pipeline.nodes())
