"""A full disk: appends wait, nothing acknowledged is lost, and the node resumes by itself.

Root only: the WAL lives on a small tmpfs that the test fills with a file and then frees.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

import pytest

from walrep import node
from walrep.cluster import faults
from walrep.cluster import history as checker
from walrep.cluster.procs import LocalCluster, wait_for, walrep_command

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to mount a small tmpfs as the WAL's file system"
)
# Ever smaller writes, down to 512 bytes: no free space is left for the writer.
FILL_CHUNKS = (1 << 16, 1 << 12, 1 << 9)


@pytest.fixture
def tmpfs(tmp_path):
    """make(name, size): a tmpfs mounted under tmp_path (faults.Tmpfs), unmounted after."""
    mounts: list[faults.Tmpfs] = []

    def make(name: str, size: str) -> faults.Tmpfs:
        fs = faults.Tmpfs(str(tmp_path / name), size)
        try:
            fs.mount()
        except faults.CannotRun as exc:
            pytest.skip(f"cannot mount a tmpfs: {exc}")
        mounts.append(fs)
        return fs

    yield make
    for fs in mounts:
        fs.unmount()


def test_writer_waits_on_a_full_disk_and_resumes_even_across_a_rotation(tmpfs):
    """The group is kept and retried every 0.5 s; a rotation on a full disk is retried too."""
    fs = tmpfs("fs", "1m")
    wal_dir = os.path.join(fs.path, "wal")
    payload = b"x" * 200
    w = node.Writer(wal_dir, max_size_bytes=16 * 1024)
    try:
        seq = 0
        while w.stats().total_rotations == 0 or w.stats().current_file is None:
            seq = w.append_raw(payload, durable=True, timeout=10)
        # Fill the active segment to its limit: the next group must rotate.
        while os.path.getsize(w.current_file()) < w.max_size_bytes:
            seq = w.append_raw(payload, durable=True, timeout=10)
        segments_before = len(w.segments())
        assert fs.fill(FILL_CHUNKS) > 0

        done: dict[str, object] = {}

        def append_durably(name: str, count: int) -> None:
            try:
                last = 0
                for _ in range(count):
                    last = w.append_raw(payload, durable=True, timeout=30)
                done[name] = last
            except Exception as exc:  # reported by the assertions below
                done[name] = exc

        first = threading.Thread(target=append_durably, args=("first", 1))
        first.start()
        wait_for(lambda: w.stats().write_errors >= 2, 10, "the writer to retry a failed write")
        # More appends while the first group waits: queued behind it.
        second = threading.Thread(target=append_durably, args=("second", 50))
        second.start()
        wait_for(lambda: w.current_sequence() >= seq + 2, 10, "appends queued while full")
        assert w.durable_sequence() == seq  # nothing past the full disk is durable
        assert not done
        fs.free()
        first.join(30)
        second.join(30)
        assert done.get("first") == seq + 1, done
        assert isinstance(done.get("second"), int), done
        assert w.durable_sequence() == w.current_sequence() == seq + 51
        assert len(w.segments()) == segments_before + 1  # the rotation happened after all
    finally:
        w.close()
    entries = list(node.WALReader(wal_dir).raw_entries())
    assert [e[0] for e in entries] == list(range(1, seq + 52))
    assert all(e[2] == payload for e in entries)


def test_caller_mode_writer_keeps_its_queue_on_a_full_disk_and_a_later_flush_writes_it(tmpfs):
    """background=False: flush() keeps the group queued with its sequences on ENOSPC."""
    fs = tmpfs("fs", "1m")
    wal_dir = os.path.join(fs.path, "wal")
    payload = b"y" * 200
    w = node.Writer(wal_dir, background=False)
    try:
        seq = w.append_raw(payload, durable=True, timeout=10)
        assert fs.fill(FILL_CHUNKS) > 0
        queued = [w.append_raw_nowait(payload) for _ in range(20)]
        assert w.flush() == seq  # nothing more is durable, and nothing is lost
        assert w.stats().write_errors == 1
        assert w.stats().queued_entries == 20
        small = node.Writer(os.path.join(fs.path, "small"), background=False, buffer_entries=5)
        try:
            for _ in range(5):
                small.append_raw_nowait(payload)
            small.flush()  # the disk is full: the five stay queued
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                small.append_raw(payload, timeout=0.6)  # waits, retrying, then gives up
            assert time.monotonic() - started >= 0.6
        finally:
            with contextlib.suppress(node.WALFailed):
                small.close()  # on a full disk the queued entries cannot be written
        done: dict[str, object] = {}

        def wait_durably() -> None:
            try:
                w.wait_durable(queued[-1], timeout=30)  # retries the flush meanwhile
                done["durable"] = w.durable_sequence()
            except Exception as exc:  # reported by the assertion below
                done["durable"] = exc

        waiter = threading.Thread(target=wait_durably)
        waiter.start()
        wait_for(lambda: w.stats().write_errors >= 2, 10, "the waiting call to retry")
        fs.free()
        waiter.join(30)
        assert done.get("durable") == queued[-1], done
    finally:
        w.close()
    entries = list(node.WALReader(wal_dir).raw_entries())
    assert [e[0] for e in entries] == list(range(1, queued[-1] + 1))


@pytest.mark.timeout(240)
def test_leader_on_a_full_disk_waits_loses_nothing_and_resumes(tmp_path, tmpfs):
    base = str(tmp_path / "c")
    cluster = LocalCluster(base, readers=1, leader_extra=["--max-segment-bytes", "1048576"])
    fs = tmpfs("c/leader", "8m")
    history = str(tmp_path / "history.jsonl")
    load = None
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        load = subprocess.Popen(
            walrep_command(
                "load",
                "--ingest",
                cluster.ingest,
                "--count",
                "40000",
                "--rate",
                "4000",
                "--batch",
                "50",
                "--size",
                "100",
                "--ack",
                "local",
                "--timeout",
                "2",
                "--retries",
                "20",
                "--log",
                history,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: cluster.leader.last_seq() > 4000, 30, "the load to get going")
        fs.fill(FILL_CHUNKS)
        wait_for(
            lambda: "No space left on device" in cluster.leader.log_text(),
            20,
            "the leader to hit the full disk",
        )
        held_at = cluster.leader.last_seq()
        stalled_until = time.monotonic() + 3
        tick = threading.Event()  # never set: a bounded pause between checks
        while time.monotonic() < stalled_until:  # the disk stays full for 3 s
            assert cluster.leader.running(), cluster.leader.log_text()[-3000:]
            assert load.poll() is None
            tick.wait(0.2)
        assert cluster.leader.last_seq() <= held_at + 1  # nothing more reached the disk
        fs.free()
        output, _ = load.communicate(timeout=120)
        assert cluster.leader.running(), cluster.leader.log_text()[-3000:]
        cluster.wait_converged(timeout=60)
        verdict = checker.check(
            [history],
            {"leader": cluster.leader.wal_dir, "reader-1": cluster.reader_nodes[0].wal_dir},
            size=100,
        )
        assert verdict.ok, verdict.table()
        acked = sum(level.acked for level in verdict.levels)
        assert acked == 40_000, output  # every request ended acknowledged, by retrying
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait(timeout=10)
        cluster.stop()
