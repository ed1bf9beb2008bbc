"""Running walrep nodes as child processes: for the demo, benchmarks and tests.

Every process is started here, remembered by its pid and stopped by that pid
(never by name). Waiting is always on a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from walrep import node


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago on 127.0.0.1 (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.05):
    """Poll condition until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def walrep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "walrep.cluster.cli", *args]


@dataclass
class NodeProcess:
    name: str
    args: list[str]
    wal_dir: str
    log_path: str
    proc: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> NodeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        self.proc = subprocess.Popen(
            walrep_command(*self.args), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by pid and reap."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by pid, wait for a clean exit (SIGKILL if it does not come)."""
        if self.proc is None:
            return None
        if self.running():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def last_seq(self) -> int:
        return node.WALReader(self.wal_dir).bounds()[1] or 0

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


@dataclass
class LocalCluster:
    """A leader and readers on loopback with free ports, under one base directory."""

    base: str
    readers: int = 2
    sync_mode: str = "fdatasync"
    leader_extra: list[str] = field(default_factory=list)
    reader_extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        os.makedirs(self.base, exist_ok=True)
        ingest, publish, control = free_ports(3)
        self.ingest = f"tcp://127.0.0.1:{ingest}"
        self.publish = f"tcp://127.0.0.1:{publish}"
        self.control = f"tcp://127.0.0.1:{control}"
        self.leader = NodeProcess(
            "leader",
            [
                "leader",
                "--wal-dir",
                os.path.join(self.base, "leader"),
                "--ingest",
                self.ingest,
                "--publish",
                self.publish,
                "--control",
                self.control,
                "--sync-mode",
                self.sync_mode,
                *self.leader_extra,
            ],
            os.path.join(self.base, "leader"),
            os.path.join(self.base, "leader.log"),
        )
        self.reader_nodes = [self.make_reader(f"reader-{i}") for i in range(1, self.readers + 1)]

    def make_reader(self, reader_id: str, *extra: str) -> NodeProcess:
        wal_dir = os.path.join(self.base, reader_id)
        return NodeProcess(
            reader_id,
            [
                "reader",
                "--wal-dir",
                wal_dir,
                "--id",
                reader_id,
                "--leader-publish",
                self.publish,
                "--leader-control",
                self.control,
                "--sync-mode",
                self.sync_mode,
                *self.reader_extra,
                *extra,
            ],
            wal_dir,
            os.path.join(self.base, f"{reader_id}.log"),
        )

    def nodes(self) -> list[NodeProcess]:
        return [self.leader, *self.reader_nodes]

    def start(self) -> LocalCluster:
        self.leader.start()
        for reader in self.reader_nodes:
            reader.start()
        return self

    def stop(self) -> None:
        for proc in reversed(self.nodes()):
            proc.stop()

    def load(self, count: int, *extra: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            walrep_command("load", "--ingest", self.ingest, "--count", str(count), *extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_converged(
        self, readers: list[NodeProcess] | None = None, timeout: float = 60.0
    ) -> int:
        """Wait until every reader's log ends where the leader's does; return that sequence."""
        readers = self.reader_nodes if readers is None else readers

        def converged():
            head = self.leader.last_seq()
            return head if all(r.last_seq() == head for r in readers) else 0

        return wait_for(converged, timeout, "readers to reach the leader's head")

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
