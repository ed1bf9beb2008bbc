"""Attacks and accidents against a running leader: forged acks, squatters, huge frames,
bad ack levels, and thousands of requests in flight. Real processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import msgpack
import pytest
import zmq
from test_security import client_keys, keys, secure_cluster  # noqa: F401 (keys: a fixture)

from walrep.cluster import wire
from walrep.cluster.procs import LocalCluster, free_ports, wait_for, walrep_command
from walrep.cluster.security import client_options, load_public, load_secret

pytestmark = pytest.mark.timeout(300)

FORGED_ACK = [1, "ack", {"reader_id": "reader-1", "applied_seq": 10**12, "durable_seq": 10**12}]


def walrep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(walrep_command(*args), capture_output=True, text=True, timeout=timeout)


def leader_status(cluster, *key_args: str) -> dict:
    result = walrep("status", "--control", cluster.control, "--json", *key_args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def reader_row(status: dict, reader_id: str) -> dict:
    return next(n for n in status["nodes"] if n["id"] == reader_id)


def wait_registered(cluster, count: int) -> None:
    wait_for(
        lambda: cluster.leader.log_text().count("reader-hello") >= count,
        60,
        f"{count} readers to hand-shake",
    )


def wait_leader(cluster) -> None:
    wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")


def start_and_wait(cluster) -> None:
    """Start every node; wait until each reader hand-shook (with none, the leader runs)."""
    cluster.start()
    if cluster.reader_nodes:
        wait_registered(cluster, len(cluster.reader_nodes))
    else:
        wait_leader(cluster)


def dealer(ctx: zmq.Context, endpoint: str, **options) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(getattr(zmq, option), value)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, timeout_s: float) -> wire.Message:
    assert sock.poll(int(timeout_s * 1000)), f"no answer within {timeout_s} s"
    return wire.decode(sock.recv())


def append(cluster, ack: str, *extra: str) -> subprocess.CompletedProcess:
    return walrep(
        "append", "--ingest", cluster.ingest, "--ack", ack, "--timeout", "2", *extra, '{"m": 1}'
    )


def test_a_forged_ack_from_a_plain_dealer_counts_for_nothing(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    ctx = zmq.Context()
    reader = cluster.reader_nodes[0]
    try:
        start_and_wait(cluster)
        assert cluster.load(100, "--ack", "replicas=1").returncode == 0
        os.kill(reader.pid, signal.SIGSTOP)
        stray = dealer(ctx, cluster.control)
        stray.send(msgpack.packb(FORGED_ACK))
        assert receive(stray, 10).code == "unknown-session"
        # Even an ack no further than the head, from a connection that never hand-shook.
        stray.send(wire.encode(wire.Ack("reader-1", 100, 100)))
        assert receive(stray, 10).code == "unknown-session"
        # With the only reader stopped, replicas=1 cannot be met: the outcome is unknown.
        assert append(cluster, "replicas=1").returncode != 0
        status = leader_status(cluster)
        assert status["leader"]["refused_acks"] >= 2
        assert reader_row(status, "reader-1")["durable_seq"] == 100
        assert "refused-ack" in cluster.leader.log_text()
        os.kill(reader.pid, signal.SIGCONT)
        assert append(cluster, "replicas=1").returncode == 0
    finally:
        if reader.running():
            os.kill(reader.pid, signal.SIGCONT)
        ctx.destroy(linger=0)
        cluster.stop()


def test_under_curve_another_readers_key_cannot_ack_or_hello_for_a_reader(tmp_path, keys):  # noqa: F811
    cluster = secure_cluster(tmp_path, keys, readers=2)
    ctx = zmq.Context()
    reader_1 = cluster.reader_nodes[0]
    try:
        start_and_wait(cluster)
        load = cluster.load(100, "--ack", "replicas=2", *client_keys(keys))
        assert load.returncode == 0, load.stderr
        os.kill(reader_1.pid, signal.SIGSTOP)
        public, secret = load_secret(str(keys / "reader-2.key"))
        options = client_options(public, secret, load_public(str(keys / "leader.pub")))
        impostor = ctx.socket(zmq.DEALER)  # an allow-listed reader key: reader-2's
        impostor.setsockopt(zmq.LINGER, 0)
        for option, value in options.items():
            impostor.setsockopt(option, value)
        impostor.connect(cluster.control)
        impostor.send(msgpack.packb(FORGED_ACK))
        assert receive(impostor, 10).code == "unknown-session"
        # Nor may it take reader-1's id, whose key is reader-1's.
        impostor.send(wire.encode(wire.Hello("reader-1", None, 0, 0)))
        refusal = receive(impostor, 10)
        assert refusal.code == "reader-id-taken" and "reader-1" in refusal.message
        impostor.send(wire.encode(wire.Ack("reader-1", 100, 100)))
        assert receive(impostor, 10).code == "unknown-session"
        assert append(cluster, "replicas=2", *client_keys(keys)).returncode != 0
        status = leader_status(cluster, *client_keys(keys, "reader-2"))
        assert reader_row(status, "reader-1")["durable_seq"] == 100
        assert status["leader"]["refused_acks"] >= 2
        assert status["leader"]["refused_hellos"] >= 1
        os.kill(reader_1.pid, signal.SIGCONT)
        assert append(cluster, "replicas=2", *client_keys(keys)).returncode == 0
    finally:
        if reader_1.running():
            os.kill(reader_1.pid, signal.SIGCONT)
        ctx.destroy(linger=0)
        cluster.stop()


def test_a_squatter_with_a_readers_id_does_not_cut_that_reader_off(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    ctx = zmq.Context()
    reader = cluster.reader_nodes[0]
    try:
        start_and_wait(cluster)
        # The reader id as the routing id (what the real reader used to set), and a hello.
        squatter = dealer(ctx, cluster.control, IDENTITY=b"reader-1")
        squatter.send(wire.encode(wire.Hello("reader-1", None, 0, 0)))
        assert receive(squatter, 10).code == "reader-id-taken"
        load = cluster.load(2_000, "--ack", "replicas=1")
        assert load.returncode == 0, load.stderr
        assert cluster.wait_converged() == 2_000
        # The reader restarts while the squatter is still there: its credential gets it in.
        reader.stop()
        reader.start()
        wait_registered(cluster, 2)
        load = cluster.load(2_000, "--ack", "replicas=1")
        assert load.returncode == 0, load.stderr
        squatter.close()
        assert append(cluster, "replicas=1").returncode == 0
        log = cluster.leader.log_text()
        assert "reader-id-taken" in log and "127.0.0.1:" in log
    finally:
        ctx.destroy(linger=0)
        cluster.stop()


def _scrape(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_one_gib_frame_is_dropped_at_the_transport(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=0)
    ctx = zmq.Context()
    try:
        start_and_wait(cluster)
        sender = dealer(ctx, cluster.ingest)
        monitor = sender.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sender.send(bytes(1 << 30), copy=False)
        # libzmq cuts the connection on the frame's header, before buffering it.
        assert monitor.poll(60_000), "the leader never dropped the 1 GiB frame"
        assert _peak_rss_bytes(cluster.leader.pid) < 200 * 1024 * 1024
        sender.disable_monitor()
        sender.close()
        assert append(cluster, "local").returncode == 0
    finally:
        ctx.destroy(linger=0)
        cluster.stop()


def test_bad_ack_levels_are_refused_at_once_with_the_request_id(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    ctx = zmq.Context()
    try:
        start_and_wait(cluster)
        client = dealer(ctx, cluster.ingest)
        for request_id, ack in ((7, "bogus"), (8, "replicas=0"), (9, "replicas=abc")):
            client.send(wire.encode(wire.Append(request_id, [b"x"], ack=ack)))
            refusal = receive(client, 1.0)
            assert (refusal.code, refusal.request_id) == ("bad-request", request_id)
        # More replicas than the leader knows readers: it could only time out.
        client.send(wire.encode(wire.Append(10, [b"x"], ack="replicas=2")))
        refusal = receive(client, 1.0)
        assert (refusal.code, refusal.request_id) == ("not-enough-readers", 10)
        assert "knows 1 reader" in refusal.message
        # A malformed append still names its request.
        client.send(msgpack.packb([1, "append", {"request_id": 11, "payloads": ["not bytes"]}]))
        refusal = receive(client, 1.0)
        assert (refusal.code, refusal.request_id) == ("bad-request", 11)
        assert cluster.leader.last_seq() == 0  # nothing was written
    finally:
        ctx.destroy(linger=0)
        cluster.stop()


def test_two_thousand_single_entry_requests_in_flight_are_all_answered(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=0)
    try:
        start_and_wait(cluster)
        summary = tmp_path / "summary.json"
        started = time.monotonic()
        load = cluster.load(
            40_000,
            "--batch",
            "1",
            "--inflight",
            "2000",
            "--ack",
            "local",
            "--summary",
            str(summary),
            timeout=240,
        )
        assert load.returncode == 0, load.stderr
        assert json.loads(summary.read_text())["acknowledged"] == 40_000
        assert leader_status(cluster)["leader"]["replies_dropped"] == 0
        assert time.monotonic() - started < 240
    finally:
        cluster.stop()


def test_status_after_a_leader_restart_shows_saved_positions_as_unknown(tmp_path):
    (metrics_port,) = free_ports(1)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    cluster = LocalCluster(
        str(tmp_path / "c"), readers=1, leader_extra=["--metrics", f"127.0.0.1:{metrics_port}"]
    )
    reader = cluster.reader_nodes[0]
    try:
        start_and_wait(cluster)
        assert cluster.load(1_000, "--ack", "replicas=1").returncode == 0
        reader.stop()
        cluster.leader.stop()
        cluster.leader.start()
        wait_leader(cluster)
        assert cluster.load(5_000, "--ack", "local").returncode == 0
        row = reader_row(leader_status(cluster), "reader-1")
        assert (row["state"], row["durable_seq"], row["lag_bytes"]) == ("unknown", None, None)
        assert row["saved_durable_seq"] == 1_000

        # Metrics have no series for an unknown position (a gauge cannot say unknown).
        def scraped():
            text = _scrape(metrics)
            return text if text and "walrep_reader_connected" in text else None

        exposition = wait_for(scraped, 10, "the metrics to show the reader")
        assert 'walrep_reader_connected{reader="reader-1"} 0.0' in exposition
        assert 'walrep_reader_lag_entries{reader="reader-1"}' not in exposition
        reader.start()
        cluster.wait_converged()

        def spoke():
            row = reader_row(leader_status(cluster), "reader-1")
            return row if row["durable_seq"] == 6_000 else None

        row = wait_for(spoke, 30, "the reader to ack everything")
        assert row["lag_bytes"] == 0
        host, port = row["address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        # Stopped again, it lags by exactly the bytes appended since, counted on disk.
        reader.stop()
        assert cluster.load(3_000, "--ack", "local", "--size", "100").returncode == 0
        frame_bytes = 16 + 100
        row = reader_row(leader_status(cluster), "reader-1")
        assert row["lag_entries"] == 3_000
        assert row["lag_bytes"] == 3_000 * frame_bytes
    finally:
        cluster.stop()


def test_replies_wait_for_a_client_that_reads_late_instead_of_vanishing(tmp_path):
    """60,000 requests sent before reading a single reply: ZMQ's ROUTER dropped about
    5,000 of those replies silently at its default high-water mark."""
    cluster = LocalCluster(str(tmp_path / "c"), readers=0)
    ctx = zmq.Context()
    count = 60_000
    try:
        start_and_wait(cluster)
        client = dealer(ctx, cluster.ingest, RCVHWM=10)
        for request_id in range(1, count + 1):
            client.send(wire.encode(wire.Append(request_id, [b"x" * 10], ack="local")))
        wait_for(lambda: cluster.leader.last_seq() == count, 60, "the leader to commit all")
        answered = set()
        deadline = time.monotonic() + 60
        while len(answered) < count and time.monotonic() < deadline:
            if client.poll(1000):
                reply = wire.decode(client.recv())
                assert isinstance(reply, wire.Appended)
                answered.add(reply.request_id)
        assert len(answered) == count
        assert leader_status(cluster)["leader"]["replies_dropped"] == 0
    finally:
        ctx.destroy(linger=0)
        cluster.stop()


def test_subscribers_past_the_cap_are_refused_and_shown_in_status(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1, leader_extra=["--max-subscribers", "3"])
    ctx = zmq.Context()
    try:
        start_and_wait(cluster)
        # Subscribers that never read: each may hold publish_hwm batches of the leader.
        stalled = []
        for _ in range(5):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 1)
            sub.subscribe(b"")
            sub.connect(cluster.publish)
            stalled.append(sub)

        def refused():
            leader = leader_status(cluster)["leader"]
            settled = leader["subscribers_refused"] >= 3 and leader["subscribers"] == 3
            return leader if settled else None

        leader = wait_for(refused, 30, "subscribers past the cap to be refused")
        assert leader["subscribers"] == 3 and leader["max_subscribers"] == 3
        assert "subscriber-refused" in cluster.leader.log_text()
        # The real reader, connected first, keeps replicating.
        load = cluster.load(20_000, "--ack", "replicas=1")
        assert load.returncode == 0, load.stderr
        assert cluster.wait_converged() == 20_000
    finally:
        ctx.destroy(linger=0)
        cluster.stop()


def test_a_second_process_on_a_running_nodes_directory_is_refused_naming_it(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), readers=1)
    reader = cluster.reader_nodes[0]
    try:
        start_and_wait(cluster)
        assert cluster.load(100, "--ack", "replicas=1").returncode == 0
        ports = [f"tcp://127.0.0.1:{port}" for port in free_ports(3)]
        second = walrep(
            "leader",
            "--wal-dir",
            cluster.leader.wal_dir,
            "--ingest",
            ports[0],
            "--publish",
            ports[1],
            "--control",
            ports[2],
            timeout=30,
        )
        assert second.returncode == 2
        assert f"locked by process {cluster.leader.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        # A reader's directory, even with --resync (which would wipe it), is left alone.
        resync = walrep(
            "reader",
            "--wal-dir",
            reader.wal_dir,
            "--id",
            "reader-x",
            "--leader-publish",
            cluster.publish,
            "--leader-control",
            cluster.control,
            "--resync",
            timeout=30,
        )
        assert resync.returncode == 2
        assert f"locked by process {reader.pid}" in resync.stderr
        assert reader.last_seq() == 100
        assert cluster.load(100, "--ack", "replicas=1").returncode == 0
        assert cluster.wait_converged() == 200
    finally:
        cluster.stop()
