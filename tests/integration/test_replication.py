"""Leader and readers as real processes on loopback: the log ends identical everywhere.

Every process is started through cluster.procs (remembered by pid, stopped by pid)
and every wait is a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

from walrep import node
from walrep.cluster.procs import LocalCluster, wait_for, walrep_command

pytestmark = pytest.mark.timeout(240)


def digest_all(proc, head: int) -> str:
    return node.WALReader(proc.wal_dir).digest(1, head)


def assert_identical(cluster: LocalCluster, readers=None) -> int:
    head = cluster.wait_converged(readers, timeout=90)
    leader_digest = digest_all(cluster.leader, head)
    for reader in readers or cluster.reader_nodes:
        assert digest_all(reader, head) == leader_digest, reader.name
    return head


def load(cluster: LocalCluster, count: int, *extra: str) -> subprocess.CompletedProcess:
    result = cluster.load(count, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def wait_started(proc, marker: str) -> None:
    wait_for(lambda: marker in proc.log_text(), 30, f"{proc.name} to log {marker}")


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(str(tmp_path / "cluster"))
    try:
        yield c
    finally:
        c.stop()


def test_100k_entries_reach_both_readers_byte_identical(cluster):
    cluster.start()
    wait_started(cluster.leader, "leader-started")
    load(cluster, 100_000, "--batch", "500")
    head = assert_identical(cluster)
    assert head == 100_000
    # Same sequences and bytes, entry by entry, at a sample of places.
    leader_entries = list(node.WALReader(cluster.leader.wal_dir).raw_entries(99_990))
    for reader in cluster.reader_nodes:
        assert list(node.WALReader(reader.wal_dir).raw_entries(99_990)) == leader_entries


def test_reader_killed_mid_stream_catches_up(cluster):
    cluster.start()
    wait_started(cluster.leader, "leader-started")
    victim = cluster.reader_nodes[1]
    load(cluster, 20_000)
    wait_for(lambda: victim.last_seq() > 0, 30, "the victim to receive entries")
    victim.kill()
    load(cluster, 30_000)
    assert victim.last_seq() < cluster.leader.last_seq()
    victim.start()
    head = assert_identical(cluster)
    assert head == 50_000
    seqs = [seq for seq, _, _ in node.WALReader(victim.wal_dir).raw_entries()]
    assert seqs == list(range(1, head + 1))  # no duplicates, no gaps


def test_reader_started_after_50k_entries(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    late = cluster.make_reader("late-reader")
    try:
        cluster.start()
        wait_started(cluster.leader, "leader-started")
        load(cluster, 50_000)
        late.start()
        load(cluster, 5_000)
        assert_identical(cluster, [*cluster.reader_nodes, late])
        assert late.last_seq() == 55_000
    finally:
        late.stop()
        cluster.stop()


def test_tiny_receive_hwm_forces_drops_yet_ends_identical(tmp_path):
    cluster = LocalCluster(
        str(tmp_path / "c"),
        readers=2,
        leader_extra=["--publish-hwm", "2"],
        reader_extra=["--receive-hwm", "1"],
    )
    try:
        cluster.start()
        wait_started(cluster.leader, "leader-started")
        load(cluster, 20_000, "--ack", "none", "--batch", "50")
        # A reader that keeps up never meets the HWM, so stop one (SIGSTOP, by pid)
        # while more is published than the loopback socket buffers hold: what does
        # not fit is dropped at the tiny HWM, and it must notice and fetch the rest.
        paused = cluster.reader_nodes[0]
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            load(cluster, 150_000, "--ack", "none", "--batch", "50")
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        load(cluster, 20_000, "--ack", "none", "--batch", "50")
        assert assert_identical(cluster) == 190_000
        assert paused.log_text().count(" gap ") > 0, "the tiny HWM was meant to force gaps"
    finally:
        cluster.stop()


@pytest.mark.parametrize("how", ["clean", "sigkill"])
def test_leader_restart_readers_resume(cluster, how):
    cluster.start()
    wait_started(cluster.leader, "leader-started")
    load(cluster, 20_000)
    cluster.wait_converged(timeout=60)
    if how == "clean":
        assert cluster.leader.stop() == 0
    else:
        cluster.leader.kill()
    cluster.leader.start()
    wait_for(lambda: cluster.leader.log_text().count("leader-started") == 2, 30, "leader restart")
    load(cluster, 20_000)
    head = assert_identical(cluster)
    assert head == 40_000  # the sequence continued
    for reader in cluster.reader_nodes:
        seqs = [seq for seq, _, _ in node.WALReader(reader.wal_dir).raw_entries()]
        assert seqs == list(range(1, head + 1))


def test_reader_of_another_log_refuses_and_keeps_its_log(tmp_path):
    first = LocalCluster(str(tmp_path / "a"), readers=1)
    try:
        first.start()
        wait_started(first.leader, "leader-started")
        load(first, 1_000)
        first.wait_converged(timeout=60)
    finally:
        first.stop()
    reader_dir = first.reader_nodes[0].wal_dir
    before = node.WALReader(reader_dir).digest(1, 1_000)
    other = LocalCluster(str(tmp_path / "b"), readers=0)
    try:
        other.start()
        wait_started(other.leader, "leader-started")
        load(other, 10)
        result = subprocess.run(
            walrep_command(
                "reader",
                "--wal-dir",
                reader_dir,
                "--id",
                "reader-1",
                "--leader-publish",
                other.publish,
                "--leader-control",
                other.control,
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        other.stop()
    assert result.returncode == 2
    assert "log-mismatch" in result.stderr
    assert "different histories" in result.stderr
    assert node.WALReader(reader_dir).digest(1, 1_000) == before


def test_append_prints_sequence_and_gives_up_on_unreachable_leader(cluster, tmp_path):
    cluster.start()
    wait_started(cluster.leader, "leader-started")
    out = subprocess.run(
        walrep_command("append", "--ingest", cluster.ingest, '{"m": 1}'),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 1
    dumped = subprocess.run(
        walrep_command("dump", cluster.leader.wal_dir, "--json"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(dumped.stdout.splitlines()[0])["records"] == [{"m": 1}]
    dead = subprocess.run(
        walrep_command("append", "--ingest", "tcp://127.0.0.1:1", "--timeout", "1", '{"m": 1}'),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dead.returncode == 1
    assert "tcp://127.0.0.1:1" in dead.stderr


def test_reader_ahead_of_a_leader_restored_from_backup_refuses(tmp_path):
    """The leader lost entries it had published: the reader names the diverging range."""
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    backup = str(tmp_path / "leader-backup")
    try:
        cluster.start()
        wait_started(cluster.leader, "leader-started")
        load(cluster, 500)
        cluster.wait_converged(timeout=60)
        assert cluster.leader.stop() == 0
        shutil.copytree(cluster.leader.wal_dir, backup)
        cluster.leader.start()
        wait_for(lambda: cluster.leader.log_text().count("leader-started") == 2, 30, "restart")
        load(cluster, 500)
        cluster.wait_converged(timeout=60)
        assert cluster.leader.stop() == 0
        shutil.rmtree(cluster.leader.wal_dir)
        shutil.copytree(backup, cluster.leader.wal_dir)  # the leader goes back in time
        reader = cluster.reader_nodes[0]
        before = node.WALReader(reader.wal_dir).digest(1, 1000)
        cluster.leader.start()
        code = wait_for(lambda: reader.proc.poll(), 30, "the reader to refuse")
    finally:
        cluster.stop()
    assert code == 2
    text = reader.log_text()
    assert "reader-ahead" in text and "501..1000" in text
    assert node.WALReader(reader.wal_dir).digest(1, 1000) == before


def test_garbage_on_every_leader_socket_is_logged_and_survived(cluster):
    import zmq

    cluster.start()
    wait_started(cluster.leader, "leader-started")
    ctx = zmq.Context()
    try:
        for endpoint in (cluster.control, cluster.ingest):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            for junk in (
                b"",
                b"\xc1",
                b"\x93\x09\xa5hello\x80",
                b"\x93\x01\xa4nope\x80",
                b"x" * 1000,
            ):
                sock.send(junk)
            sock.send_multipart([b"two", b"frames"])
            # Each bad message is answered with an error; none crashes the leader.
            assert sock.poll(10_000), f"no answer from {endpoint}"
            sock.close()
    finally:
        ctx.term()
    wait_for(lambda: cluster.leader.log_text().count("bad-message") >= 10, 30, "the rejections")
    text = cluster.leader.log_text()
    assert "protocol version 9 is not supported" in text
    assert "unknown message kind 'nope'" in text
    assert "peer=" in text
    load(cluster, 100)
    assert cluster.leader.running()
    assert assert_identical(cluster) == 100


def test_an_oversized_payload_is_refused_whole_and_takes_no_sequence(tmp_path):
    import zmq

    from walrep.cluster import wire
    from walrep.node import format as fmt

    cluster = LocalCluster(str(tmp_path / "cluster"), readers=0)
    cluster.start()
    ctx = zmq.Context()
    try:
        wait_started(cluster.leader, "leader-started")
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.ingest)
        too_big = fmt.MAX_PAYLOAD_BYTES + 1
        request = wire.Append(7, [b"fits", bytes(too_big), b"fits too"], ack="local")
        sock.send(wire.encode(request))
        assert sock.poll(60_000), "no answer to the oversized append"
        refusal = wire.decode(sock.recv())
        assert refusal == wire.Refused(
            "too-large",
            f"payload of {too_big} bytes exceeds {fmt.MAX_PAYLOAD_BYTES}",
            request_id=7,
        )
        sock.send(wire.encode(wire.Append(8, [b"next"], ack="local")))
        assert sock.poll(30_000), "no answer to the append after it"
        # All or nothing: the refused request's small payloads took no sequence either.
        assert wire.decode(sock.recv()) == wire.Appended(8, 1, 1)
    finally:
        ctx.destroy(linger=0)  # closes the socket too, so a failed assert cannot hang here
        cluster.stop()


@pytest.mark.parametrize(
    ("options", "ack"),
    [(["--writer-thread"], "replicas=2"), (["--sync-mode", "async"], "local")],
    ids=["writer-thread", "async"],
)
def test_writer_thread_modes_replicate_the_same(tmp_path, options, ack):
    """With the WAL's own thread committing (--writer-thread, or the async sync mode),
    a publish task publishes what it commits, where the syncing modes publish from the
    loop that flushed."""
    cluster = LocalCluster(
        str(tmp_path / "c"), readers=2, leader_extra=options, reader_extra=options
    )
    try:
        cluster.start()
        wait_started(cluster.leader, "leader-started")
        load(cluster, 20_000, "--ack", ack, "--batch", "20")
        assert assert_identical(cluster) == 20_000
    finally:
        cluster.stop()
