"""Writer(background=False): the caller commits with flush(), in its own thread."""

from __future__ import annotations

import os
import threading
import time

import pytest
import walhelpers

from walrep import node


def _writer(tmp_path, **options) -> node.Writer:
    return node.Writer(str(tmp_path / "wal"), background=False, **options)


def test_no_thread_and_nothing_written_until_flush(tmp_path):
    before = threading.active_count()
    w = _writer(tmp_path)
    try:
        assert threading.active_count() == before
        first, last = w.append_batch_nowait([walhelpers.payload_for(s) for s in range(1, 11)])
        assert (first, last) == (1, 10)
        assert w.committed_sequence() == w.durable_sequence() == 0
        assert walhelpers.read_all(w.wal_dir)[0] == []
        assert w.flush() == 10
        assert w.committed_sequence() == w.durable_sequence() == 10
        assert w.stats().total_syncs == 1  # one group, one sync
    finally:
        w.close()
    entries, problems = walhelpers.read_all(w.wal_dir)
    assert problems == []
    assert [p for _s, _t, p in entries] == [walhelpers.payload_for(s) for s in range(1, 11)]


@pytest.mark.parametrize("with_hook", [False, True])
def test_a_group_of_more_chunks_than_one_writev_takes_is_written_whole(tmp_path, with_hook):
    # Each batch queues one chunk, and one flush writes them all: without a commit
    # hook, as writev calls of at most 1024 buffers (Linux's limit), so three here;
    # with one, joined, since the hook gets the run in one piece.
    batches, per_batch = 2500, 10
    count = batches * per_batch
    w = _writer(tmp_path, buffer_entries=count)
    runs = []
    if with_hook:
        w.set_commit_hook(runs.append)
    try:
        for b in range(batches):
            first = b * per_batch + 1
            w.append_batch_nowait([walhelpers.payload_for(s) for s in range(first, first + 10)])
        assert w.flush() == count
    finally:
        w.close()
    entries, problems = walhelpers.read_all(w.wal_dir)
    assert problems == []
    assert [p for _s, _t, p in entries] == [walhelpers.payload_for(s) for s in range(1, count + 1)]
    if with_hook:
        assert [(r.first_seq, r.last_seq) for r in runs] == [(1, count)]
        segment = os.path.join(w.wal_dir, sorted(os.listdir(w.wal_dir))[0])
        with open(segment, "rb") as f:
            assert f.read().endswith(runs[0].data)  # the bytes as they are on disk


def test_what_is_left_after_a_short_write():
    from walrep.node.writer import _after

    chunks = [b"abc", b"de", b"fgh"]
    assert [bytes(c) for c in _after(chunks, 0)] == [b"abc", b"de", b"fgh"]
    assert [bytes(c) for c in _after(chunks, 2)] == [b"c", b"de", b"fgh"]
    assert [bytes(c) for c in _after(chunks, 3)] == [b"de", b"fgh"]
    assert [bytes(c) for c in _after(chunks, 4)] == [b"e", b"fgh"]
    assert _after(chunks, 8) == []


def test_hooks_run_in_the_flushing_thread(tmp_path):
    w = _writer(tmp_path)
    seen: list[tuple[str, int, int]] = []
    w.set_commit_hook(lambda run: seen.append(("commit", run.last_seq, threading.get_ident())))
    w.set_durable_hook(lambda seq: seen.append(("durable", seq, threading.get_ident())))
    try:
        w.append_raw_nowait(b"a")
        w.append_raw_nowait(b"b")
        w.flush()
    finally:
        w.close()
    me = threading.get_ident()
    assert ("durable", 2, me) in seen and ("commit", 2, me) in seen
    assert {ident for _k, _s, ident in seen} == {me}


def test_a_full_queue_refuses_nowait_and_is_committed_by_a_waiting_append(tmp_path):
    w = _writer(tmp_path, buffer_entries=10)
    try:
        for seq in range(1, 11):
            assert w.append_raw_nowait(walhelpers.payload_for(seq)) == seq
        with pytest.raises(node.WALDropped):
            w.append_raw_nowait(b"no room")  # the queue holds what flush() has not written
        with pytest.raises(node.WALDropped):
            w.append_batch_nowait([b"no", b"room"])
        assert (w.queued_entries, w.stats().dropped_entries) == (10, 3)
        # An append that may wait makes the room itself: it flushes the queue.
        assert w.append_raw(walhelpers.payload_for(11)) == 11
        assert w.committed_sequence() == 10
        assert w.append_batch([walhelpers.payload_for(s) for s in range(12, 22)]) == (12, 21)
        assert w.committed_sequence() == 11
        w.flush()
        # A batch larger than the whole queue goes into an empty one, as with the thread.
        assert w.append_batch_nowait([b"x"] * 11) == (22, 32)
    finally:
        w.close()
    entries, _ = walhelpers.read_all(w.wal_dir)
    assert [s for s, _t, _p in entries] == list(range(1, 33))


def test_waiting_for_durability_commits_in_the_waiting_call(tmp_path):
    w = _writer(tmp_path)
    try:
        seq = w.append_raw(b"durable", durable=True, timeout=5)
        assert w.durable_sequence() == seq == 1
        w.append_raw_nowait(b"queued")
        w.wait_committed(2, timeout=5)
        assert w.committed_sequence() == 2
        with pytest.raises(node.DurabilityTimeout):
            w.wait_durable(3, timeout=0.2)  # never assigned: times out, no hang
    finally:
        w.close()


def test_async_mode_syncs_when_due_or_asked(tmp_path):
    w = _writer(tmp_path, sync_mode="async", sync_interval_s=3600, sync_bytes=0)
    try:
        w.append_raw_nowait(b"a")
        w.flush()
        assert (w.committed_sequence(), w.durable_sequence()) == (1, 0)
        w.request_sync()
        w.flush()
        assert w.durable_sequence() == 1
    finally:
        w.close()


def test_close_commits_what_is_queued_and_refuses_more(tmp_path):
    w = _writer(tmp_path, max_size_bytes=4096)
    payloads = [walhelpers.payload_for(s) for s in range(1, 301)]
    for seq, p in enumerate(payloads, 1):
        w.append_raw_nowait(p)
        if seq % 50 == 0 and seq < 300:
            w.flush()  # a group per flush, and rotation between groups
    w.close()
    with pytest.raises(node.WALClosed):
        w.append_raw_nowait(b"late")
    entries, problems = walhelpers.read_all(w.wal_dir)
    assert problems == []
    assert [p for _s, _t, p in entries] == payloads
    assert len(walhelpers.segment_paths(w.wal_dir)) > 1  # rotation works in caller mode
    reopened = node.Writer(w.wal_dir, background=False)
    try:
        assert reopened.append_raw_nowait(b"next") == 301
    finally:
        reopened.close()


def test_flush_on_a_background_writer_only_wakes_its_thread(tmp_path):
    w = node.Writer(str(tmp_path / "wal"))
    try:
        seq = w.append_raw_nowait(b"a")
        w.flush()
        w.wait_durable(seq, timeout=5)
    finally:
        w.close()


def test_waiting_for_an_entry_that_close_is_writing_succeeds(tmp_path):
    closing = threading.Event()

    def slow_sync(fd: int) -> None:
        closing.set()  # close() has started its flush
        time.sleep(0.3)
        os.fdatasync(fd)

    w = _writer(tmp_path, sync_file=slow_sync)
    seq = w.append_raw_nowait(b"written by close")
    closer = threading.Thread(target=w.close)
    closer.start()
    assert closing.wait(5)
    w.wait_durable(seq, timeout=5)  # not WALClosed: close() makes it durable
    closer.join(5)
    assert w.durable_sequence() == seq
