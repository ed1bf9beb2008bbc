"""Fixtures shared by every test directory.

The WAL tests use real files and real syncs. Anything that could wait forever
(a writer whose sync is held back, a child process) is bounded here, so a broken
writer fails a test instead of hanging the run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from walrep import node

# How long any single wait in a test may take before the test fails. Generous:
# a loaded CI machine can take a second over an fsync.
WAIT_S = 20.0


class GatedSync:
    """A sync_file seam that counts syncs and can hold them back.

    While the gate is closed, the writer thread blocks inside its sync call (for at
    most WAIT_S, then the sync fails with OSError): that is how tests fill the queue
    or keep entries committed-but-not-durable without racing the writer thread.
    Each call does a real fdatasync once released.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.sizes: list[int] = []  # file size seen by each sync, in call order
        self.entered = threading.Event()  # set whenever a sync call starts
        self._open = threading.Event()
        self._open.set()

    def __call__(self, fd: int) -> None:
        with self._lock:
            self.calls += 1
            self.sizes.append(os.fstat(fd).st_size)
        self.entered.set()
        if not self._open.wait(WAIT_S):
            raise OSError("test gate never opened")
        os.fdatasync(fd)

    def hold(self) -> None:
        """Block the next (and every later) sync until release()."""
        self.entered.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def wait_entered(self) -> None:
        assert self.entered.wait(WAIT_S), "the writer never reached its sync"


class WalKit:
    """Opens writers and gates for one test and closes them all at teardown."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self._writers: list[node.Writer] = []
        self._gates: list[GatedSync] = []

    def dir(self, name: str = "wal") -> str:
        return str(self.tmp_path / name)

    def writer(self, wal_dir: str | None = None, **options) -> node.Writer:
        w = node.Writer(wal_dir or self.dir(), **options)
        self._writers.append(w)
        return w

    def gate(self) -> GatedSync:
        g = GatedSync()
        self._gates.append(g)
        return g

    @staticmethod
    def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        """Poll condition until it holds; fail the test after timeout seconds."""
        ticker = threading.Event()  # never set: wait() is a bounded pause between polls
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            ticker.wait(0.005)

    def close_all(self) -> None:
        for g in self._gates:
            g.release()
        for w in self._writers:
            try:
                w.close(timeout=WAIT_S)
            except node.WALError:
                pass  # a test that broke its writer on purpose


@pytest.fixture
def wal(tmp_path) -> Iterator[WalKit]:
    kit = WalKit(tmp_path)
    try:
        yield kit
    finally:
        kit.close_all()
