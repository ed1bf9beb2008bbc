"""What an operator sees when a node cannot start as configured: one line and exit 2, at once.

Real `walrep` processes on loopback. A node refused at start must not create anything
or announce itself to the leader; a client given an ack level that does not exist
must not send anything. Every process is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from walrep.cluster.procs import LocalCluster, free_ports, wait_for, walrep_command
from walrep.cluster.wire import MAX_ID_BYTES

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_INVALID = 2
# A refusal is a few config reads and a stat away; far less than the 10 s a client
# waits for an answer, so a command that got as far as sending would miss it.
PROMPTLY_S = 5.0


def walrep(*args: str, timeout: float = PROMPTLY_S) -> subprocess.CompletedProcess:
    """Run walrep; fail the test (the child killed) if it has not finished in time."""
    try:
        return subprocess.run(
            walrep_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"walrep {' '.join(args)[:200]} was still running after {timeout} s")


def assert_one_line_refusal(result: subprocess.CompletedProcess, command: str, *named: str):
    assert result.returncode == EXIT_INVALID, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"walrep {command}: "), lines[0]
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def unused_endpoints(count: int) -> list[str]:
    return [f"tcp://127.0.0.1:{port}" for port in free_ports(count)]


def node_args(role: str, wal_dir: str, *extra: str) -> list[str]:
    """A leader or reader on free loopback ports (a reader's leader: nobody)."""
    if role == "leader":
        ingest, publish, control = unused_endpoints(3)
        return [
            "leader",
            "--wal-dir",
            wal_dir,
            "--ingest",
            ingest,
            "--publish",
            publish,
            "--control",
            control,
            *extra,
        ]
    publish, control = unused_endpoints(2)
    return [
        "reader",
        "--wal-dir",
        wal_dir,
        "--id",
        "r1",
        "--leader-publish",
        publish,
        "--leader-control",
        control,
        *extra,
    ]


def tree(path) -> list[tuple[str, int]]:
    """Every name under path with its size: what a refused node must leave as it was."""
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            found.append((os.path.relpath(full, path), os.path.getsize(full)))
    return sorted(found)


# --- A: ack levels the leader would refuse are refused by the client itself -------------


@pytest.mark.parametrize(
    ("command", "ack"),
    [
        ("append", "bogus"),
        ("append", "replicas=0"),
        ("append", "replicas=abc"),
        ("append", "replicas=-1"),
        ("append", "replicas=+1"),
        ("load", "bogus"),
        ("load", "replicas=0"),
        ("load", "replicas=abc"),
    ],
)
def test_a_bad_ack_level_is_refused_before_anything_is_sent(tmp_path, command, ack):
    # Something listens on the ingest port but never answers: a sent request would wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        ingest = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        if command == "append":
            args = ["append", "--ingest", ingest, "--ack", ack, '{"v": 1}']
        else:
            args = [
                "load",
                "--ingest",
                ingest,
                "--count",
                "10",
                "--ack",
                ack,
                "--log",
                str(tmp_path / "h.jsonl"),
            ]
        started = time.monotonic()
        result = walrep(*args)
    line = assert_one_line_refusal(result, command, "--ack", repr(ack))
    assert "may or may not" not in line and result.stdout == ""
    assert time.monotonic() - started < PROMPTLY_S
    assert not (tmp_path / "h.jsonl").exists()


# --- B: a WAL directory the node cannot use ---------------------------------------------


@pytest.mark.parametrize("role", ["leader", "reader"])
def test_a_wal_dir_that_is_a_regular_file(tmp_path, role):
    path = tmp_path / "wal"
    path.write_bytes(b"not a directory")
    result = walrep(*node_args(role, str(path)))
    assert_one_line_refusal(result, role, "'wal_dir'", str(path), "regular file")
    assert path.read_bytes() == b"not a directory"


@pytest.mark.parametrize("role", ["leader", "reader"])
def test_a_wal_dir_under_a_regular_file(tmp_path, role):
    (tmp_path / "file").write_bytes(b"x")
    wal_dir = tmp_path / "file" / "sub" / "wal"
    result = walrep(*node_args(role, str(wal_dir)))
    assert_one_line_refusal(result, role, "'wal_dir'", str(tmp_path / "file"), "not a directory")
    assert tree(tmp_path) == [("file", 1)]


def test_a_leader_whose_newest_segment_is_not_a_wal_file(tmp_path):
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    segment = wal_dir / "arc-00000000000000000001.wal"
    segment.write_bytes(bytes(range(7, 107)))  # no ARCW header: not a WAL file
    result = walrep(*node_args("leader", str(wal_dir)), timeout=20)
    assert_one_line_refusal(result, "leader", "'wal_dir'", str(segment), "ARCW")
    # Nothing written: no log id, no repair (a lock file, if the WAL takes one, may stay).
    assert segment.read_bytes() == bytes(range(7, 107))
    assert {name for name, _size in tree(wal_dir)} <= {segment.name, "wal.lock"}


class ReadOnlyMount:
    """A small read-only tmpfs (root only), unmounted however the test ends."""

    def __init__(self, path) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a read-only tmpfs")
        os.makedirs(path, exist_ok=True)
        self.path = str(path)
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", self.path]
        proc = subprocess.run(mount, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")

    def unmount(self) -> None:
        if subprocess.run(["umount", self.path], capture_output=True).returncode:
            subprocess.run(["umount", "-l", self.path], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    mount = ReadOnlyMount(tmp_path / "ro")
    try:
        yield mount.path
    finally:
        mount.unmount()


@pytest.mark.parametrize("role", ["leader", "reader"])
@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create"])
def test_a_wal_dir_on_a_read_only_file_system(read_only, role, exists):
    wal_dir = read_only if exists else os.path.join(read_only, "wal")
    result = walrep(*node_args(role, wal_dir), timeout=20)
    assert_one_line_refusal(result, role, "'wal_dir'", wal_dir, "read-only")
    assert os.listdir(read_only) == []


def test_a_reader_on_a_read_only_disk_never_reaches_the_leader(tmp_path, read_only):
    cluster = LocalCluster(str(tmp_path / "c"), readers=0)
    reader = None
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        command = walrep_command(
            "reader",
            "--wal-dir",
            read_only,
            "--id",
            "ro-reader",
            "--leader-publish",
            cluster.publish,
            "--leader-control",
            cluster.control,
        )
        reader = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            code = reader.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the reader on a read-only disk is still running after 20 s")
        stderr = reader.stderr.read()
        assert code == EXIT_INVALID, stderr
        assert "read-only" in stderr and "Traceback" not in stderr
        status = walrep("status", "--control", cluster.control, "--json", timeout=30)
        assert status.returncode == 0, status.stderr
        assert [n["id"] for n in json.loads(status.stdout)["nodes"]] == ["leader"]
        # The leader's own probe left nothing behind in its WAL directory.
        assert not [n for n in os.listdir(cluster.leader.wal_dir) if n.startswith(".walrep")]
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
        if reader is not None:
            reader.stderr.close()
        cluster.stop()


# --- B: ids, endpoints, ports -----------------------------------------------------------


@pytest.mark.parametrize("role", ["leader", "reader"])
def test_an_id_longer_than_the_wire_takes(tmp_path, role):
    long_id = "r" * (MAX_ID_BYTES + 1)
    config = tmp_path / "node.toml"
    if role == "leader":
        config.write_text(f'wal_dir = "w"\nid = "{long_id}"\ningest = "tcp://127.0.0.1:7100"\n')
    else:
        config.write_text(
            f'wal_dir = "w"\nid = "{long_id}"\nleader_publish = "tcp://127.0.0.1:7101"\n'
        )
    checked = walrep("check-config", str(config))
    assert_one_line_refusal(checked, "check-config", "'id'", str(config), str(MAX_ID_BYTES))
    wal_dir = tmp_path / "wal"
    started = walrep(*node_args(role, str(wal_dir), "--id", long_id))
    assert_one_line_refusal(started, role, "'id'", str(MAX_ID_BYTES))
    assert not wal_dir.exists()


def test_check_config_says_when_it_cannot_tell_the_role(tmp_path):
    both = tmp_path / "both.toml"  # keys every role has
    both.write_text('wal_dir = "w"\nid = "node-1"\n')
    result = walrep("check-config", str(both))
    line = assert_one_line_refusal(result, "check-config", str(both), "--role")
    assert "leader_publish" in line and "ingest" in line
    for role in ("leader", "reader"):
        chosen = walrep("check-config", str(both), "--role", role)
        assert chosen.returncode == 0 and f"a valid {role} config" in chosen.stdout, chosen.stderr
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        'wal_dir = "w"\nid = "n"\ningest = "tcp://127.0.0.1:7100"\n'
        'leader_control = "tcp://127.0.0.1:7102"\n'
    )
    line = assert_one_line_refusal(walrep("check-config", str(mixed)), "check-config", "--role")
    assert "ingest" in line and "leader_control" in line
    reader = tmp_path / "reader.toml"
    reader.write_text('wal_dir = "w"\nid = "n"\nleader_control = "tcp://127.0.0.1:7102"\n')
    assert "a valid reader config" in walrep("check-config", str(reader)).stdout
    leader = tmp_path / "leader.toml"
    leader.write_text('wal_dir = "w"\nid = "n"\npublish = "tcp://127.0.0.1:7101"\n')
    assert "a valid leader config" in walrep("check-config", str(leader)).stdout


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--publish", "tcp://127.0.0.1:99999", "publish"),
        ("--publish-hwm", str(2**40), "publish_hwm"),
        ("--max-retained-age-s", "nan", "max_retained_age_s"),
        ("--metrics", "nohost.invalid:9101", "metrics"),
    ],
)
def test_bad_leader_values_that_used_to_end_in_a_traceback(tmp_path, flag, value, key):
    wal_dir = tmp_path / "wal"
    result = walrep(*node_args("leader", str(wal_dir), flag, value), timeout=20)
    assert_one_line_refusal(result, "leader", repr(key))
    assert not wal_dir.exists()


def test_a_port_another_process_holds_stops_the_node_before_anything_is_created(tmp_path):
    wal_dir = tmp_path / "wal"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        args = node_args("leader", str(wal_dir), "--control", f"tcp://127.0.0.1:{port}")
        result = walrep(*args, timeout=20)
    assert_one_line_refusal(result, "leader", "'control'", f"port {port}", "in use")
    assert not wal_dir.exists()


# --- C: the demo with its ports taken ---------------------------------------------------


def test_the_demo_stops_at_once_when_a_port_of_its_configs_is_taken():
    port = 7102  # configs/leader.toml's control
    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", port))
        except OSError as exc:
            pytest.skip(f"port {port} is in use here already ({exc}); cannot take it for the test")
        data = os.path.join(ROOT, "demo-data")
        before = tree(data) if os.path.isdir(data) else None
        demo = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "demo.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            out, err = demo.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            # SIGINT by its pid: the demo's finally then stops the nodes it started.
            demo.send_signal(signal.SIGINT)
            try:
                demo.communicate(timeout=60)
            finally:
                if demo.poll() is None:
                    demo.kill()
                    demo.wait(timeout=10)
            pytest.fail("the demo was still running 15 s after it started, its port taken")
    finally:
        holder.close()
    assert demo.returncode == EXIT_INVALID, out + err
    assert "Traceback" not in err
    assert str(port) in err and "'control'" in err and "configs/leader.toml" in err, err
    assert "started" not in out  # it started nothing
    assert (tree(data) if os.path.isdir(data) else None) == before  # and removed nothing
