"""One writer per WAL directory: a second opener, here or in another process, is refused.

Real files and real processes: a child holds a Writer, the parent's open is refused
naming the child's pid, and once the child is killed with SIGKILL the kernel drops
its flock and the directory opens again.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import stat
import subprocess
import sys

import pytest
from walhelpers import file_bytes, payload_for, read_all, segment_paths

from walrep import node

WAIT_S = 20.0

# Opens a Writer on argv[1], appends one entry durably, says so, then holds the
# directory until the parent kills it (or closes its stdin).
CHILD = """
import sys
from walrep import node
w = node.Writer(sys.argv[1])
w.append_raw(b"child", durable=True, timeout=20)
print("locked", w.current_sequence(), flush=True)
sys.stdin.read()
"""


def _start_holder(wal_dir: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, wal_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = _read_line(proc, WAIT_S)
    if not line.startswith("locked"):
        _kill(proc)
        raise AssertionError(f"the child did not lock: {line!r} {proc.stderr.read()}")
    return proc


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's next stdout line, or fail after timeout seconds (never a bare sleep)."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            _kill(proc)
            raise AssertionError(f"no line from the child within {timeout} s")
    return proc.stdout.readline()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT_S)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


@pytest.fixture
def holder():
    """Start children holding a directory; every one is killed by its pid at teardown."""
    procs: list[subprocess.Popen] = []

    def start(wal_dir: str) -> subprocess.Popen:
        proc = _start_holder(wal_dir)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            _kill(proc)


def test_a_second_writer_in_the_same_process_is_refused_naming_the_pid(wal):
    first = wal.writer()
    assert first.append_raw(b"one", durable=True, timeout=WAIT_S) == 1
    for background in (True, False):
        with pytest.raises(node.WALLocked) as refused:
            node.Writer(wal.dir(), background=background)
        assert refused.value.pid == os.getpid()
        assert f"pid {os.getpid()}" in str(refused.value)
        assert wal.dir() in str(refused.value)
        assert isinstance(refused.value, node.WALError)  # callers catching WALError still do
    # The refused opener handed out nothing: the first writer goes on from where it was.
    assert first.append_raw(b"two", durable=True, timeout=WAIT_S) == 2
    first.close()
    assert [s for s, _, _ in read_all(wal.dir())[0]] == [1, 2]


def test_a_refused_opener_repairs_nothing(wal):
    """The lock comes before the repair: bytes a live writer has in flight are not cut."""
    first = wal.writer()
    first.append_raw(payload_for(1), durable=True, timeout=WAIT_S)
    active = first.current_file()
    # As the live writer's next group looks half-way through its write.
    with open(active, "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")
    before = file_bytes(active)
    for repair in ("tail", "cut"):
        with pytest.raises(node.WALLocked):
            node.Writer(wal.dir(), repair=repair)
    assert file_bytes(active) == before
    assert not [n for n in os.listdir(wal.dir()) if n.endswith(".broken")]


def test_after_close_the_same_process_can_reopen(wal):
    first = wal.writer()
    first.append_raw(payload_for(1), durable=True, timeout=WAIT_S)
    first.close()
    again = wal.writer()
    assert again.append_raw(payload_for(2), durable=True, timeout=WAIT_S) == 2
    again.close()
    caller_mode = wal.writer(background=False)  # a caller-mode close releases it too
    caller_mode.close()
    assert wal.writer().current_sequence() == 2


def test_a_writer_whose_open_fails_lets_go_of_the_directory(wal):
    first = wal.writer()
    first.append_raw(payload_for(1), durable=True, timeout=WAIT_S)
    first.close()
    newest = segment_paths(wal.dir())[-1]
    good = file_bytes(newest)
    with open(newest, "r+b") as f:
        f.write(b"XXXX")  # not an ARCW header: opening refuses after taking the lock
    with pytest.raises(node.WALError) as refused:
        node.Writer(wal.dir())
    assert not isinstance(refused.value, node.WALLocked)
    with open(newest, "wb") as f:
        f.write(good)
    assert wal.writer().current_sequence() == 1


def test_another_process_holding_the_directory_is_named_and_a_kill_frees_it(wal, holder):
    proc = holder(wal.dir())
    with pytest.raises(node.WALLocked) as refused:
        node.Writer(wal.dir())
    assert refused.value.pid == proc.pid
    assert f"process {proc.pid}" in str(refused.value)
    assert wal.dir() in str(refused.value)

    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(WAIT_S) == -signal.SIGKILL
    # The kernel dropped the dead process's flock: the directory opens and continues.
    w = wal.writer()
    assert w.current_sequence() == 1
    assert w.append_raw(b"parent", durable=True, timeout=WAIT_S) == 2
    w.close()
    assert [p for _, _, p in read_all(wal.dir())[0]] == [b"child", b"parent"]


def test_a_child_is_refused_while_this_process_holds_the_directory(wal):
    w = wal.writer()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, wal.dir()],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert proc.returncode != 0
    assert "WALLocked" in proc.stderr
    assert f"process {os.getpid()}" in proc.stderr
    assert w.current_sequence() == 0


def test_the_lock_file_is_private_and_no_segment(wal, caplog):
    w = wal.writer(max_size_bytes=200)
    for i in range(1, 8):
        w.append_raw(payload_for(i), durable=True, timeout=WAIT_S)
    lock_path = os.path.join(wal.dir(), node.LOCK_FILE_NAME)
    assert stat.S_IMODE(os.stat(lock_path).st_mode) == 0o600
    assert file_bytes(lock_path).strip() == str(os.getpid()).encode()
    assert lock_path not in [path for path, _seq in node.WALReader(wal.dir()).files()]
    assert lock_path not in node.Recovery(wal.dir()).list_wal_files()[0]
    # Purges delete segments only; the lock file and the lock stay.
    w.purge_all()
    assert os.path.exists(lock_path)
    with pytest.raises(node.WALLocked):
        node.Writer(wal.dir())
    w.close()
    # Reopening lists the directory: the lock file is not reported as a stray WAL file.
    with caplog.at_level(logging.INFO, logger="walrep.node.writer"):
        again = wal.writer()
    assert node.LOCK_FILE_NAME not in caplog.text
    assert again.current_sequence() == 7


def test_readers_do_not_take_the_lock(wal):
    w = wal.writer()
    w.append_raw(payload_for(1), durable=True, timeout=WAIT_S)
    reader = node.WALReader(wal.dir())
    assert [s for s, _, _ in reader.raw_entries()] == [1]
    assert w.append_raw(payload_for(2), durable=True, timeout=WAIT_S) == 2


def test_close_with_a_timeout_keeps_the_lock_until_the_thread_ends(wal):
    """A writer thread still syncing after close(timeout) may still write: no one else may."""
    gate = wal.gate()
    w = wal.writer(sync_file=gate)
    gate.hold()
    w.append_raw_nowait(b"held")
    gate.wait_entered()
    w.close(timeout=0.05)
    with pytest.raises(node.WALLocked):
        node.Writer(wal.dir())
    gate.release()
    opened: list[node.Writer] = []

    def opens() -> bool:
        try:
            opened.append(wal.writer())
        except node.WALLocked:
            return False
        return True

    wal.wait_until(opens)  # the thread lets go once its last sync is done
    assert opened[0].current_sequence() == 1


def test_recovery_that_deletes_files_is_refused_while_a_writer_holds_the_directory(tmp_path):
    wal_dir = str(tmp_path / "wal")
    writer = node.Writer(wal_dir)
    try:
        writer.append([{"m": 1}], durable=True)
        options = node.RecoveryOptions(delete_replayed=True)
        with pytest.raises(node.WALLocked) as info:
            node.Recovery(wal_dir).recover(lambda records: None, options)
        assert str(os.getpid()) in str(info.value)
        assert segment_paths(wal_dir)  # nothing was deleted
        # Reading alone takes no lock.
        node.Recovery(wal_dir).recover(lambda records: None)
    finally:
        writer.close()
    stats = node.Recovery(wal_dir).recover(lambda records: None, options)
    assert stats.recovered_files == 1 and segment_paths(wal_dir) == []
