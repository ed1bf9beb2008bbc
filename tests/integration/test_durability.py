"""Ack levels, retention and the edge cases of a real log, with real processes on loopback."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess

import pytest
import trio
import zmq

from walrep import node
from walrep.cluster import wire
from walrep.cluster.admin import status as leader_status
from walrep.cluster.client import AppendUnknown, open_client
from walrep.cluster.loadgen import payload_for
from walrep.cluster.procs import LocalCluster, wait_for, walrep_command

pytestmark = pytest.mark.timeout(300)
SIZE = 100


def wait_started(proc, count: int = 1) -> None:
    wait_for(lambda: proc.log_text().count("leader-started") >= count, 30, f"{proc.name} to start")


def history(path: str) -> list[dict]:
    """The complete lines of a `walrep load --log` history."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def payload_at(wal_dir: str, seq: int) -> bytes | None:
    for s, _ts, payload in node.WALReader(wal_dir).raw_entries(seq, seq):
        return payload if s == seq else None
    return None


def all_payloads(wal_dir: str) -> dict[int, bytes]:
    return {seq: payload for seq, _ts, payload in node.WALReader(wal_dir).raw_entries()}


def status_of(cluster: LocalCluster) -> dict:
    return trio.run(leader_status, cluster.control, 10.0)


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(str(tmp_path / "c"))
    try:
        yield c
    finally:
        c.stop()


# --- what each ack level promises ---------------------------------------------------------


def test_replicas_1_survives_leader_sigkill_at_random_moments(tmp_path):
    """Every entry acknowledged with replicas=1 is on a reader with its bytes, in 10 rounds."""
    rng = random.Random(int(os.environ.get("WALREP_TEST_SEED", "7")))
    cluster = LocalCluster(str(tmp_path / "c"), readers=2)
    acked = 0
    try:
        cluster.start()
        wait_started(cluster.leader)
        for round_number in range(10):
            log = str(tmp_path / f"history-{round_number}.jsonl")
            load = start_load(
                cluster, log, 200_000, "--batch", "50", "--ack", "replicas=1", "--timeout", "2"
            )
            try:
                # A random moment: once a random number of entries were acknowledged.
                target = rng.randint(1, 400) * 50
                wait_for(lambda: _lines(log) >= target, 60, "acknowledgements")  # noqa: B023
                cluster.leader.kill()
            finally:
                # The rest of this run would only time out; its log so far is the history.
                os.kill(load.pid, signal.SIGINT)
                load.wait(timeout=30)
            cluster.leader.start()
            wait_started(cluster.leader, round_number + 2)
            logs = [all_payloads(r.wal_dir) for r in cluster.reader_nodes]
            for record in history(log):
                if record["outcome"] != "ok":
                    continue
                acked += 1
                expected = payload_for(record["id"], SIZE)
                holders = [held for held in logs if held.get(record["seq"]) == expected]
                assert holders, f"round {round_number}: acked {record} is on no reader"
    finally:
        cluster.stop()
    assert acked > 0


def _lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def start_load(cluster: LocalCluster, log: str, count: int, *extra: str) -> subprocess.Popen:
    """`walrep load` in the background, writing its history to log (stop it by pid)."""
    return subprocess.Popen(
        walrep_command(
            "load", "--ingest", cluster.ingest, "--count", str(count), "--log", log, *extra
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_local_acks_survive_leader_sigkill(cluster, tmp_path):
    cluster.start()
    wait_started(cluster.leader)
    log = str(tmp_path / "h.jsonl")
    load = start_load(cluster, log, 300_000, "--ack", "local", "--timeout", "2")
    wait_for(lambda: _lines(log) >= 20_000, 60, "acknowledgements")
    cluster.leader.kill()
    os.kill(load.pid, signal.SIGINT)
    load.wait(timeout=30)
    records = [r for r in history(log) if r["outcome"] == "ok"]
    assert records
    for record in records[-2000:] + records[:100]:
        assert payload_at(cluster.leader.wal_dir, record["seq"]) == payload_for(record["id"], SIZE)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_load_interrupted_writes_every_entry_it_sent_to_the_history(cluster, tmp_path, signum):
    """Ctrl-C (or a plain kill) mid-run: requests in flight are logged as unknown, so
    the history accounts for every entry the leader holds and none looks like a stray
    append."""
    cluster.start()
    wait_started(cluster.leader)
    log = str(tmp_path / "h.jsonl")
    load = start_load(
        cluster, log, 2_000_000, "--batch", "10", "--inflight", "64", "--ack", "local"
    )
    try:
        wait_for(lambda: _lines(log) >= 5_000, 60, "acknowledgements")
    finally:
        os.kill(load.pid, signum)
        assert load.wait(timeout=30) == 128 + signum  # 130, 143: as the shell reports it
    assert cluster.leader.stop() == 0  # what it accepted is on disk
    records = history(log)
    logged = {r["id"]: r for r in records}
    assert len(logged) == len(records)  # one line per entry
    assert {r["outcome"] for r in records} <= {"ok", "unknown"}
    held = {int(p[5:17]): seq for seq, p in all_payloads(cluster.leader.wal_dir).items()}
    assert held, "nothing was appended"
    strays = sorted(set(held) - set(logged))
    assert not strays, f"{len(strays)} appended entries have no history line: {strays[:5]}"
    for entry_id, record in logged.items():
        if record["outcome"] == "ok":
            assert held[entry_id] == record["seq"]


def test_load_keeps_its_rate_and_numbers_each_entry_once(cluster, tmp_path):
    """--rate spreads the requests over count/rate seconds (it never runs ahead), and
    every id from 0 to count-1 is sent exactly once, at its own sequence."""
    cluster.start()
    wait_started(cluster.leader)
    log = str(tmp_path / "h.jsonl")
    summary = str(tmp_path / "s.json")
    result = cluster.load(
        3_000, "--rate", "6000", "--batch", "10", "--inflight", "64", "--ack", "local",
        "--log", log, "--summary", summary,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with open(summary) as f:
        totals = json.load(f)
    assert totals["acknowledged"] == 3_000
    assert totals["seconds"] >= 3_000 / 6000 * 0.95  # the last request is due at 0.498 s
    records = history(log)
    assert sorted(r["id"] for r in records) == list(range(3_000))
    held = all_payloads(cluster.leader.wal_dir)
    for record in records:
        assert held[record["seq"]] == payload_for(record["id"], SIZE)


def test_none_acks_are_answered_before_durability_and_kept_by_a_clean_stop(cluster):
    cluster.start()
    wait_started(cluster.leader)
    result = cluster.load(20_000, "--ack", "none")
    assert result.returncode == 0, result.stderr
    assert cluster.leader.stop() == 0  # drains and syncs what it accepted
    assert node.WALReader(cluster.leader.wal_dir).bounds() == (1, 20_000)


def test_replicas_2_with_one_reader_is_unknown_then_a_retry_returns_the_original(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=2)
    second = cluster.reader_nodes[1]
    try:
        cluster.start()
        wait_started(cluster.leader)
        # Both readers known, one of them down: replicas=2 waits for it (with fewer
        # readers known than asked, the leader would refuse it at once instead).
        wait_for(lambda: cluster.leader.log_text().count("reader-hello") >= 2, 30, "two readers")
        second.stop()

        async def scenario():
            async with open_client(cluster.ingest, timeout=2, ack="replicas=2") as client:
                with pytest.raises(AppendUnknown) as info:
                    await client.append_batch([b"only-once"])
                assert "may or may not be committed" in str(info.value)
                second.start()  # now two readers can make it durable
                receipt = await client.retry(info.value, retries=10)
                return receipt.first_seq, receipt.last_seq

        first, last = trio.run(scenario)
    finally:
        cluster.stop()
    assert first == last == 1
    leader_entries = list(node.WALReader(cluster.leader.wal_dir).raw_entries())
    assert [(s, p) for s, _, p in leader_entries] == [(1, b"only-once")]  # not appended twice


def test_a_retry_of_a_durable_request_is_answered_with_its_original_and_no_reader(tmp_path):
    # The retry of a request whose level already holds must be settled by the request
    # itself: with no reader no ack comes, and a heartbeat commits nothing.
    cluster = LocalCluster(str(tmp_path / "c"), readers=0)
    try:
        cluster.leader.start()
        wait_started(cluster.leader)
        request = wire.Append(7, [b"once"], "local", client_id="a-client")
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.ingest)
            answers = []
            for _ in range(2):  # the original, then its retry
                sock.send(wire.encode(request))
                assert sock.poll(10_000), "no answer within 10 s"
                answers.append(wire.decode(sock.recv()))
        duplicates = status_of(cluster)["leader"]["duplicate_requests"]
    finally:
        cluster.stop()
    assert answers == [wire.Appended(7, 1, 1)] * 2
    assert duplicates == 1
    assert [(s, p) for s, _, p in node.WALReader(cluster.leader.wal_dir).raw_entries()] == [
        (1, b"once")
    ]


def test_load_retries_record_attempts_and_never_duplicate(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    try:
        cluster.start()
        wait_started(cluster.leader)
        # The reader known but down (with no reader known, replicas=1 is refused at once).
        wait_for(lambda: "reader-hello" in cluster.leader.log_text(), 30, "the reader")
        cluster.reader_nodes[0].stop()
        log = str(tmp_path / "h.jsonl")
        load = start_load(
            cluster,
            log,
            300,
            "--batch",
            "100",
            "--inflight",
            "1",
            "--ack",
            "replicas=1",
            "--timeout",
            "1",
            "--retries",
            "20",
        )
        # The reader down: the first request goes unknown and is retried; then it starts.
        wait_for(lambda: _retried(cluster), 30, "a retry to reach the leader")
        cluster.reader_nodes[0].start()
        assert load.wait(timeout=120) == 0
    finally:
        cluster.stop()
    records = history(log)
    assert {r["outcome"] for r in records} == {"ok"}
    assert max(r["attempts"] for r in records) > 1
    seqs = [s for s, _, _ in node.WALReader(cluster.leader.wal_dir).raw_entries()]
    assert seqs == list(range(1, 301))  # 300 entries, none appended twice
    assert sorted(r["seq"] for r in records) == seqs


def _retried(cluster) -> bool:
    try:
        return status_of(cluster)["leader"]["duplicate_requests"] > 0
    except Exception:
        return False


# --- back-pressure --------------------------------------------------------------------------


def test_full_queue_makes_clients_wait_or_refuses_nowait_and_counts_it(tmp_path):
    cluster = LocalCluster(
        str(tmp_path / "c"),
        readers=0,
        leader_extra=["--buffer-entries", "1"],
        sync_mode="fsync",
    )
    try:
        cluster.start()
        wait_started(cluster.leader)
        waited = cluster.load(3_000, "--batch", "1", "--inflight", "32", "--ack", "none")
        assert waited.returncode == 0, waited.stderr  # everything accepted: clients waited
        refused = cluster.load(
            3_000, "--batch", "1", "--inflight", "32", "--ack", "none", "--nowait"
        )
        counters = status_of(cluster)["leader"]
    finally:
        cluster.stop()
    assert counters["backpressure_waits"] > 0
    assert counters["busy_refusals"] > 0
    assert refused.returncode == 1 and "not acknowledged" in refused.stderr
    held = node.WALReader(cluster.leader.wal_dir).bounds()[1]
    assert held == 6_000 - counters["busy_refusals"]  # refused ones got no sequence


# --- retention that follows the readers -----------------------------------------------------

SMALL_SEGMENTS = ["--max-segment-bytes", "8192"]


def segment_count(proc) -> int:
    return len(node.WALReader(proc.wal_dir).segments())


def test_segments_are_kept_for_a_stopped_reader_and_purged_once_it_catches_up(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=2, leader_extra=SMALL_SEGMENTS)
    try:
        cluster.start()
        wait_started(cluster.leader)
        assert cluster.load(2_000, "--batch", "20").returncode == 0
        cluster.wait_converged(timeout=60)
        wait_for(lambda: segment_count(cluster.leader) <= 2, 30, "purge of replicated segments")
        down = cluster.reader_nodes[1]
        down.stop()
        # One request in flight: a segment rotates only between commits, and commits
        # that group many requests would make fewer, larger segments than the count
        # below expects (the test failed with 17-20 kept under a loaded machine).
        assert cluster.load(5_000, "--batch", "20", "--inflight", "1").returncode == 0
        # Kept for reader-2 across a leader restart too: positions are persisted.
        assert cluster.leader.stop() == 0
        cluster.leader.start()
        wait_started(cluster.leader, 2)
        kept = segment_count(cluster.leader)
        assert kept > 20
        first, _ = node.WALReader(cluster.leader.wal_dir).bounds()
        assert first <= down.last_seq() + 1
        down.start()
        cluster.wait_converged(timeout=60)
        wait_for(lambda: segment_count(cluster.leader) <= 2, 30, "purge after catch-up")
    finally:
        cluster.stop()


def test_reader_past_the_bound_is_too_old_and_resync_recovers_it(tmp_path):
    cluster = LocalCluster(
        str(tmp_path / "c"),
        readers=2,
        leader_extra=[*SMALL_SEGMENTS, "--max-retained-bytes", "100000"],
    )
    late = cluster.reader_nodes[1]
    try:
        cluster.start()
        wait_started(cluster.leader)
        assert cluster.load(1_000, "--batch", "20").returncode == 0
        cluster.wait_converged(timeout=60)
        late.stop()
        behind = late.last_seq()
        assert cluster.load(10_000, "--batch", "20").returncode == 0
        wait_for(
            lambda: (node.WALReader(cluster.leader.wal_dir).bounds()[0] or 0) > behind + 1,
            30,
            "the bound to purge what reader-2 needs",
        )
        earliest = node.WALReader(cluster.leader.wal_dir).bounds()[0]
        late.start()
        code = wait_for(lambda: late.proc.poll(), 30, "reader-2 to stop")
        assert code == 2
        text = late.log_text()
        assert "too-old" in text and str(behind + 1) in text and "--resync" in text
        assert node.WALReader(late.wal_dir).bounds() == (1, behind)  # left untouched
        resynced = cluster.make_reader("reader-2", "--resync")
        cluster.reader_nodes[1] = resynced
        resynced.start()
        head = cluster.wait_converged(timeout=60)
        first, last = node.WALReader(resynced.wal_dir).bounds()
        assert last == head and first >= earliest

        def digests_of_the_common_range():
            leader_log = node.WALReader(cluster.leader.wal_dir)
            common = max(first, leader_log.bounds()[0])
            try:
                return (
                    node.WALReader(resynced.wal_dir).digest(common, head),
                    leader_log.digest(common, head),
                )
            except node.RangeNotAvailable:
                return None  # the leader's retention purged under this read: read again

        ours, leaders = wait_for(digests_of_the_common_range, 10, "a stable common range")
        assert ours == leaders
    finally:
        cluster.stop()


def test_forget_reader_releases_what_a_dead_reader_pinned(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=2, leader_extra=SMALL_SEGMENTS)
    try:
        cluster.start()
        wait_started(cluster.leader)
        assert cluster.load(1_000, "--batch", "20").returncode == 0
        cluster.wait_converged(timeout=60)
        dead = cluster.reader_nodes[1]
        dead.kill()
        # One request in flight, so that each is its own commit (see above).
        assert cluster.load(5_000, "--batch", "20", "--inflight", "1").returncode == 0
        assert segment_count(cluster.leader) > 20
        result = subprocess.run(
            walrep_command("forget-reader", "reader-2", "--control", cluster.control),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "forgot reader-2" in result.stdout and "reader-1" in result.stdout
        wait_for(lambda: segment_count(cluster.leader) <= 2, 30, "purge after forgetting")
    finally:
        cluster.stop()


# --- log identity ------------------------------------------------------------------------


def test_wiped_leader_gets_a_new_log_id_and_readers_refuse_it(cluster):
    cluster.start()
    wait_started(cluster.leader)
    assert cluster.load(1_000).returncode == 0
    cluster.wait_converged(timeout=60)
    old_id = node.load_meta(cluster.leader.wal_dir)["log_id"]
    assert cluster.leader.stop() == 0
    shutil.rmtree(cluster.leader.wal_dir)
    cluster.leader.start()
    wait_started(cluster.leader, 2)
    assert node.load_meta(cluster.leader.wal_dir)["log_id"] != old_id
    for reader in cluster.reader_nodes:
        assert wait_for(lambda r=reader: r.proc.poll(), 30, f"{reader.name} to refuse") == 2
        assert "log-mismatch" in reader.log_text()
        assert node.WALReader(reader.wal_dir).bounds() == (1, 1_000)
