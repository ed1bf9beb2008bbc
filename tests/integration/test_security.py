"""CURVE between real processes: allow-listed keys replicate, everything else gets nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from walrep import node
from walrep.cluster.procs import LocalCluster, free_ports, wait_for, walrep_command

pytestmark = pytest.mark.timeout(240)


def walrep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(walrep_command(*args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def keys(tmp_path):
    """Leader, two readers, one client, one stranger; allow lists for readers and clients."""
    base = tmp_path / "keys"
    (base / "readers").mkdir(parents=True)
    (base / "clients").mkdir()
    for name in ("leader", "reader-1", "reader-2", "client", "stranger"):
        assert walrep("keygen", str(base / name)).returncode == 0
    for name in ("reader-1", "reader-2"):
        shutil.copy(base / f"{name}.pub", base / "readers")
    shutil.copy(base / "client.pub", base / "clients")
    return base


def secure_cluster(tmp_path, keys, readers=2) -> LocalCluster:
    cluster = LocalCluster(
        str(tmp_path / "c"),
        readers=0,
        leader_extra=[
            "--key",
            str(keys / "leader.key"),
            "--allow-readers",
            str(keys / "readers"),
            "--allow-clients",
            str(keys / "clients"),
        ],
    )
    for i in range(1, readers + 1):
        cluster.reader_nodes.append(
            cluster.make_reader(
                f"reader-{i}",
                "--key",
                str(keys / f"reader-{i}.key"),
                "--leader-key",
                str(keys / "leader.pub"),
            )
        )
    return cluster


def client_keys(keys, who: str = "client") -> list[str]:
    return ["--key", str(keys / f"{who}.key"), "--leader-key", str(keys / "leader.pub")]


def status(cluster, keys) -> dict:
    result = walrep(
        "status", "--control", cluster.control, "--json", *client_keys(keys, "reader-1")
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_curve_cluster_replicates_and_refuses_strangers(tmp_path, keys):
    cluster = secure_cluster(tmp_path, keys)
    stranger = cluster.make_reader(
        "reader-9", "--key", str(keys / "stranger.key"), "--leader-key", str(keys / "leader.pub")
    )
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        stranger.start()
        load = cluster.load(20_000, *client_keys(keys))
        assert load.returncode == 0, load.stderr
        head = cluster.wait_converged(timeout=60)
        assert head == 20_000
        digest = node.WALReader(cluster.leader.wal_dir).digest(1, head)
        for reader in cluster.reader_nodes:
            assert node.WALReader(reader.wal_dir).digest(1, head) == digest
        # The stranger's key is not allowed: it got nothing, and the leader says so.
        wait_for(lambda: "connection-refused" in cluster.leader.log_text(), 30, "a refusal")
        assert node.WALReader(stranger.wal_dir).bounds() == (None, None)
        leader_log = cluster.leader.log_text()
        assert "127.0.0.1" in leader_log and "not allowed for readers" in leader_log
        assert status(cluster, keys)["leader"]["rejected_connections"] > 0
        # A reader's key cannot write: ingest only takes client keys.
        before = cluster.leader.last_seq()
        refused = walrep(
            "append",
            "--ingest",
            cluster.ingest,
            "--timeout",
            "2",
            *client_keys(keys, "reader-1"),
            '{"m": 1}',
        )
        assert refused.returncode == 1
        assert cluster.leader.last_seq() == before
        assert "not allowed for clients" in cluster.leader.log_text()
        # Without keys at all, a client gets nowhere either.
        plain = walrep("append", "--ingest", cluster.ingest, "--timeout", "2", '{"m": 1}')
        assert plain.returncode == 1 and cluster.leader.last_seq() == before
    finally:
        stranger.stop()
        cluster.stop()


def test_non_loopback_without_keys_is_refused_unless_insecure(tmp_path):
    (port,) = free_ports(1)
    args = [
        "leader",
        "--wal-dir",
        str(tmp_path / "wal"),
        "--ingest",
        f"tcp://0.0.0.0:{port}",
        "--publish",
        "tcp://127.0.0.1:0",
        "--control",
        "tcp://127.0.0.1:1",
    ]
    refused = walrep(*args, timeout=30)
    assert refused.returncode == 2
    assert "'ingest'" in refused.stderr and "not a loopback address" in refused.stderr
    assert "insecure = true" in refused.stderr
    check = walrep("check-config", "--role", "leader", str(_toml(tmp_path, port)))
    assert check.returncode == 2 and "not a loopback address" in check.stderr
    proc = subprocess.Popen(
        walrep_command(*args, "--insecure"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output = b""
        os.set_blocking(proc.stdout.fileno(), False)

        def started():
            nonlocal output
            output += proc.stdout.read() or b""
            return b"leader-started" in output

        wait_for(started, 30, "the insecure leader to start")
        assert b"unencrypted" in output and b"warning" in output
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _toml(tmp_path, port):
    path = tmp_path / "open.toml"
    path.write_text(f'wal_dir = "w"\ningest = "tcp://0.0.0.0:{port}"\n')
    return path


def test_key_files_readable_by_others_are_refused(tmp_path, keys):
    os.chmod(keys / "leader.key", 0o644)
    result = walrep(
        "leader",
        "--wal-dir",
        str(tmp_path / "w"),
        "--key",
        str(keys / "leader.key"),
        "--allow-readers",
        str(keys / "readers"),
        "--allow-clients",
        str(keys / "clients"),
        timeout=30,
    )
    assert result.returncode == 2
    assert "readable by group or others" in result.stderr and "chmod 600" in result.stderr
    os.chmod(keys / "client.key", 0o640)
    append = walrep("append", "--ingest", "tcp://127.0.0.1:1", *client_keys(keys), '{"m": 1}')
    assert append.returncode == 1 and "chmod 600" in append.stderr


def test_keygen_writes_a_private_secret_and_never_overwrites(tmp_path):
    prefix = str(tmp_path / "k")
    assert walrep("keygen", prefix).returncode == 0
    assert oct(os.stat(prefix + ".key").st_mode & 0o777) == "0o600"
    with open(prefix + ".pub") as f:
        assert len(f.read().strip()) == 40
    again = walrep("keygen", prefix)
    assert again.returncode == 1 and "not overwriting" in again.stderr
