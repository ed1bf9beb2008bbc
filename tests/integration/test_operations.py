"""What an operator sees: walrep status, metrics, verify and check-config against real nodes."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
import trio

from walrep.cluster.admin import status as leader_status
from walrep.cluster.procs import LocalCluster, free_ports, wait_for, walrep_command

pytestmark = pytest.mark.timeout(240)


def walrep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(walrep_command(*args), capture_output=True, text=True, timeout=timeout)


def status_json(cluster: LocalCluster) -> dict:
    result = walrep("status", "--control", cluster.control, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def node_row(status: dict, node_id: str) -> dict:
    """The node's row, or {} while the leader has not heard of it yet."""
    return next((n for n in status["nodes"] if n["id"] == node_id), {})


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("walrep_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_status_and_metrics_show_a_stopped_reader_and_one_catching_up(tmp_path):
    leader_metrics, reader_metrics = free_ports(2)
    cluster = LocalCluster(
        str(tmp_path / "c"), readers=2, leader_extra=["--metrics", f"127.0.0.1:{leader_metrics}"]
    )
    cluster.reader_nodes[0].args += ["--metrics", f"127.0.0.1:{reader_metrics}"]
    slow = cluster.make_reader("reader-3", "--sync-mode", "fsync", "--buffer-entries", "50")
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        assert cluster.load(100_000, "--batch", "500").returncode == 0
        cluster.wait_converged(timeout=60)
        stopped = cluster.reader_nodes[1]
        stopped.stop()
        assert cluster.load(400_000, "--batch", "1000").returncode == 0
        slow.start()
        # Catching up 500 k entries takes about a second here: ask the leader directly
        # (a few ms a query) rather than through a `walrep status` process.
        seen = wait_for(
            lambda: (
                (s := trio.run(leader_status, cluster.control, 10.0))
                and node_row(s, "reader-3").get("state") == "catching-up"
                and s
            ),
            60,
            "reader-3 to be seen catching up",
            poll=0.01,
        )
        assert node_row(seen, "reader-3")["lag_entries"] > 0
        first = wait_for(
            lambda: (
                (s := status_json(cluster))
                and node_row(s, "reader-2")["state"] == "disconnected"
                and s
            ),
            30,
            "reader-2 to be shown disconnected",
        )
        # The table leads with the leader and has a row per node.
        assert [n["role"] for n in first["nodes"]][0] == "leader"
        assert {n["id"] for n in first["nodes"]} == {"leader", "reader-1", "reader-2", "reader-3"}
        for row in first["nodes"]:
            for key in (
                "id",
                "role",
                "state",
                "applied_seq",
                "durable_seq",
                "lag_entries",
                "lag_seconds",
            ):
                assert key in row
        stopped_row = node_row(first, "reader-2")
        assert stopped_row["connected"] is False
        assert stopped_row["lag_entries"] == 400_000
        assert stopped_row["lag_bytes"] > 400_000 * 100
        assert stopped_row["lag_seconds"] >= 0
        assert cluster.load(1_000).returncode == 0
        later = wait_for(
            lambda: (
                (s := status_json(cluster))
                and node_row(s, "reader-2")["lag_seconds"] > stopped_row["lag_seconds"]
                and s
            ),
            30,
            "reader-2's lag in seconds to grow while it is stopped",
        )
        assert node_row(later, "reader-2")["lag_entries"] == 401_000
        assert node_row(later, "reader-1")["state"] == "streaming"

        table = walrep("status", "--control", cluster.control)
        assert table.returncode == 0
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["NODE", "ROLE", "STATE"]
        assert lines[1].startswith("leader") and "disconnected" in table.stdout

        # The leader refreshes its metrics once a second, so a scrape can predate what
        # `walrep status` (asked live) already showed: wait for the scrape to catch up.
        metrics = wait_for(
            lambda: (
                (m := scrape(leader_metrics))
                and m.get('walrep_reader_lag_entries{reader="reader-2"}', 0) > 0
                and m.get('walrep_reader_connected{reader="reader-2"}') == 0
                and m
            ),
            10,
            "leader metrics to show reader-2 disconnected and behind",
        )
        assert metrics["walrep_entries_appended_total"] >= 501_000
        assert metrics['walrep_reader_connected{reader="reader-2"}'] == 0
        assert metrics['walrep_commit_latency_seconds_count{ack="local"}'] > 0
        assert metrics["walrep_sync_duration_seconds_count"] > 0
        reader = scrape(reader_metrics)  # reader-1's
        assert reader["walrep_entries_appended_total"] >= 501_000
        assert "walrep_gaps_detected_total" in reader and "walrep_reconnects_total" in reader
    finally:
        slow.stop()
        cluster.stop()


def test_verify_two_running_nodes_through_their_control_endpoints(tmp_path):
    (reader_control,) = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{reader_control}"
    cluster = LocalCluster(
        str(tmp_path / "c"),
        readers=1,
        reader_extra=["--control", endpoint, "--anti-entropy-interval-s", "0.5"],
    )
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        assert cluster.load(20_000).returncode == 0
        cluster.wait_converged(timeout=60)
        same = walrep("verify", cluster.control, endpoint)
        assert same.returncode == 0, same.stdout + same.stderr
        assert "identical" in same.stdout
        mixed = walrep("verify", cluster.leader.wal_dir, endpoint, "--json")
        assert mixed.returncode == 0 and json.loads(mixed.stdout)["equal"] is True
        # The reader's background check compared its log with the leader's, and agreed.
        reader_status = walrep("status", "--control", endpoint, "--json")
        row = json.loads(reader_status.stdout)["nodes"][0]
        wait_for(
            lambda: (
                json.loads(walrep("status", "--control", endpoint, "--json").stdout)["nodes"][0][
                    "anti_entropy_checked"
                ]
                > 0
            ),
            30,
            "a background comparison",
        )
        assert row["divergences"] == 0
    finally:
        cluster.stop()
    unreachable = walrep("verify", cluster.control, endpoint, "--timeout", "1")
    assert unreachable.returncode == 2 and "no answer" in unreachable.stderr


def test_check_config_reports_each_kind_of_error(tmp_path):
    ok = walrep("check-config", "configs/leader.toml")
    assert ok.returncode == 0 and "valid leader config" in ok.stdout
    reader_ok = walrep("check-config", "configs/reader-2.toml")
    assert reader_ok.returncode == 0 and "valid reader config" in reader_ok.stdout
    cases = {
        'wal_dir = "x"\nnonsense = 1\n': "unknown key 'nonsense'",
        'wal_dir = "x"\nsync_mode = 3\n': "key 'sync_mode' must be str",
        'wal_dir = "x"\nid = "r"\nleader_publish = "tcp://127.0.0.1:9"\n'
        'leader_control = "tcp://127.0.0.1:9"\n': "same address",
        'wal_dir = "x"\nleader_publish = "tcp://127.0.0.1:9"\n': "key 'id'",
        'wal_dir = "x"\nmetrics = "nowhere"\n': "key 'metrics'",
    }
    for index, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"bad-{index}.toml"
        path.write_text(text)
        # Without a key only one role has, check-config asks for the role (it no longer
        # guesses "leader").
        role = [] if "leader_publish" in text else ["--role", "leader"]
        result = walrep("check-config", *role, str(path))
        assert result.returncode == 2, text
        assert expected in result.stderr and str(path) in result.stderr, result.stderr
    # The same check stops a node at start, naming the key and the file.
    path = tmp_path / "bad-leader.toml"
    path.write_text('wal_dir = "x"\npublish = "tcp://127.0.0.1:7100"\n')
    started = walrep("leader", "--config", str(path), timeout=30)
    assert started.returncode == 2 and "'publish'" in started.stderr and str(path) in started.stderr
