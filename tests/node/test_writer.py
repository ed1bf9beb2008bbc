"""The writer against DESIGN.md section 2: one test (or a few) per invariant.

Real files, real syncs. Where a test must catch the writer thread at a given
point (queue full, entry committed but not durable) it holds the sync seam shut
(conftest.GatedSync) rather than hoping for a slow disk.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time

import arcw_parser
import msgpack
import pytest
from walhelpers import file_bytes, first_seq_of, payload_for, read_all, segment_paths

from walrep import node
from walrep.node import format as fmt

WAIT_S = 20.0
HUGE = fmt.MAX_PAYLOAD_BYTES + 1


def seqs_on_disk(wal_dir: str) -> list[int]:
    entries, problems = read_all(wal_dir)
    assert problems == []
    return [s for s, _, _ in entries]


def payloads_on_disk(wal_dir: str) -> dict[int, bytes]:
    entries, problems = read_all(wal_dir)
    assert problems == []
    return {s: p for s, _, p in entries}


def bodies(wal_dir: str) -> bytes:
    """Every segment's entries, headers stripped, in sequence order."""
    return b"".join(file_bytes(p)[fmt.FILE_HEADER_BYTES :] for p in segment_paths(wal_dir))


# --- invariant 1: sequences start at 1, are contiguous, are never reused ---------------


def test_sequences_start_at_one_and_are_contiguous_over_every_append_kind(wal):
    w = wal.writer()
    assert w.current_sequence() == 0
    got = [
        w.append([{"a": 1}]),
        w.append_nowait([{"a": 2}]),
        w.append_raw(b"\x90"),
        w.append_raw_nowait(b"\x91\x01"),
        w.append_raw_with_meta("db", b"\x90"),
        w.append_raw_with_meta_nowait("db", b"\x90"),
    ]
    assert got == [1, 2, 3, 4, 5, 6]
    assert w.append_batch([b"\x90"] * 3) == (7, 9)
    assert w.append_batch_nowait([b"\x90"] * 2) == (10, 11)
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 12
    assert w.current_sequence() == 12
    w.close()
    assert seqs_on_disk(wal.dir()) == list(range(1, 13))


def test_sequences_continue_across_restarts_and_rotations(wal):
    expected: dict[int, bytes] = {}
    for restart in range(4):
        w = wal.writer(max_size_bytes=256)
        assert w.current_sequence() == len(expected)
        for _ in range(7):
            seq = len(expected) + 1
            assert w.append_raw(payload_for(seq)) == seq
            expected[seq] = payload_for(seq)
        if restart % 2:
            w.append_raw(b"", durable=True, timeout=WAIT_S)
            expected[len(expected) + 1] = b""
        w.close()
    assert len(segment_paths(wal.dir())) >= 3
    assert payloads_on_disk(wal.dir()) == expected


def test_size_rotation_names_segments_by_their_first_sequence(wal):
    max_size = 300
    w = wal.writer(max_size_bytes=max_size)
    for seq in range(1, 41):
        w.append_raw(payload_for(seq), durable=True, timeout=WAIT_S)
    rotations = w.stats().total_rotations
    w.close()
    segments = segment_paths(wal.dir())
    assert len(segments) > 3
    assert rotations == len(segments) - 1
    next_first = 1
    for path in segments:
        frames = arcw_parser.parse_file(path).frames
        assert first_seq_of(path) == next_first
        next_first += len(frames)
        size = os.path.getsize(path)
        if path != segments[-1]:
            # Sealed once it reached the limit, and not one entry later.
            last = frames[-1]
            assert size >= max_size
            assert last.offset < max_size
    assert next_first == 41


def test_age_rotation(wal):
    max_age_s = 0.2
    w = wal.writer(max_age_s=max_age_s)
    started = time.monotonic()
    w.append_raw(b"\x90", durable=True, timeout=WAIT_S)
    first_file = w.current_file()
    pause = threading.Event()  # never set: a bounded pause between appends
    deadline = started + WAIT_S
    while w.current_file() == first_file:
        assert time.monotonic() < deadline, "the segment never rotated by age"
        w.append_raw(b"\x90", durable=True, timeout=WAIT_S)
        pause.wait(0.02)
    rotated_after = time.monotonic() - started
    assert rotated_after >= max_age_s
    assert w.stats().total_rotations == 1
    last = w.current_sequence()
    assert os.path.basename(w.current_file()) == node.segment_name(last)
    w.close()
    assert seqs_on_disk(wal.dir()) == list(range(1, last + 1))


def _fill(w: node.Writer, count: int) -> None:
    for _ in range(count):
        seq = w.current_sequence() + 1
        w.append_raw(payload_for(seq), durable=True, timeout=WAIT_S)


def test_purge_all_keeps_the_sequence(wal):
    w = wal.writer(max_size_bytes=200)
    _fill(w, 12)
    assert len(segment_paths(wal.dir())) > 2
    removed = w.purge_all()
    assert removed >= 3
    # Only an empty segment named by the next sequence is left: it carries the position.
    (left,) = segment_paths(wal.dir())
    assert os.path.basename(left) == node.segment_name(13)
    assert node.WALReader(wal.dir()).bounds() == (None, None)
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 13
    w.purge_all()
    w.close()
    # Reopened on nothing but the empty segment: still no reuse.
    w = wal.writer(max_size_bytes=200)
    assert w.current_sequence() == 13
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 14
    w.close()
    assert seqs_on_disk(wal.dir()) == [14]


def test_purge_all_on_a_fresh_writer_and_twice_in_a_row(wal):
    w = wal.writer()
    assert w.purge_all() == 0
    assert w.purge_all() == 0
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 1
    w.close()
    w = wal.writer()
    assert w.current_sequence() == 1


def test_purge_inactive_keeps_the_active_segment(wal):
    w = wal.writer(max_size_bytes=200)
    _fill(w, 12)
    active = w.current_file()
    before = len(segment_paths(wal.dir()))
    assert before > 2
    assert w.purge_inactive() == before - 1
    assert segment_paths(wal.dir()) == [active]
    w.close()
    w = wal.writer(max_size_bytes=200)
    assert w.current_sequence() == 12
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 13


def test_purge_older_than_uses_modification_time_and_spares_the_active(wal):
    w = wal.writer(max_size_bytes=200)
    _fill(w, 12)
    segments = segment_paths(wal.dir())
    assert len(segments) >= 4
    long_ago = time.time() - 3600
    for path in segments[:2] + [segments[-1]]:  # the active one is old too
        os.utime(path, (long_ago, long_ago))
    assert w.purge_older_than(60) == 2
    assert segment_paths(wal.dir()) == segments[2:]
    assert w.purge_older_than(3600 * 24) == 0
    w.close()
    w = wal.writer(max_size_bytes=200)
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 13


def test_purge_before_keeps_every_entry_at_or_after_the_sequence(wal):
    w = wal.writer(max_size_bytes=200)
    _fill(w, 20)
    firsts = [first_seq_of(p) for p in segment_paths(wal.dir())]
    assert len(firsts) >= 4
    cut = firsts[2] + 1  # inside the third segment
    removed = w.purge_before(cut)
    assert removed == 2
    assert [first_seq_of(p) for p in segment_paths(wal.dir())] == firsts[2:]
    entries, problems = read_all(wal.dir(), cut)
    assert problems == [] and entries[0][0] == cut
    assert w.purge_before(10**9) == len(firsts) - 3  # never the active segment
    assert segment_paths(wal.dir()) == [w.current_file()]
    w.close()
    w = wal.writer(max_size_bytes=200)
    assert w.append_raw(b"\x90", durable=True, timeout=WAIT_S) == 21


# --- invariant 2: refused entries get no sequence and reach no hook ---------------------


def _recording_hook(w: node.Writer) -> list[node.ReplicationEntry]:
    entries: list[node.ReplicationEntry] = []
    w.set_replication_hook(entries.append)
    return entries


def test_dropped_entries_get_no_sequence(wal):
    gate = wal.gate()
    w = wal.writer(buffer_entries=2, sync_file=gate)
    entries = _recording_hook(w)
    gate.hold()
    assert w.append_raw_nowait(b"one") == 1
    gate.wait_entered()  # the writer thread took entry 1 and is stuck in a sync
    assert w.append_raw_nowait(b"two") == 2
    assert w.append_raw_nowait(b"three") == 3
    with pytest.raises(node.WALDropped) as info:
        w.append_raw_nowait(b"dropped")
    assert info.value.queued == 2
    with pytest.raises(node.WALDropped):
        w.append_batch_nowait([b"dropped", b"too"])
    with pytest.raises(node.WALDropped):
        w.append_nowait([{"dropped": True}])
    with pytest.raises(TimeoutError):  # waiting for room, bounded: not accepted either
        w.append_raw(b"dropped", timeout=0.05)
    assert w.current_sequence() == 3
    assert w.stats().dropped_entries == 4
    gate.release()
    w.wait_durable(3, WAIT_S)
    assert w.append_raw(b"four", durable=True, timeout=WAIT_S) == 4
    w.close()
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert payloads_on_disk(wal.dir()) == {1: b"one", 2: b"two", 3: b"three", 4: b"four"}


def test_payload_too_large_gets_no_sequence(wal):
    w = wal.writer()
    entries = _recording_hook(w)
    w.append_raw(b"before")
    huge = bytes(HUGE)
    for call in (
        lambda: w.append_raw(huge),
        lambda: w.append_raw_nowait(huge),
        lambda: w.append_raw(huge, durable=True, timeout=1),
        lambda: w.append_batch([b"ok", huge, b"ok"]),
        lambda: w.append_batch_nowait([huge]),
    ):
        with pytest.raises(node.PayloadTooLarge) as info:
            call()
        assert info.value.size == HUGE
    assert w.current_sequence() == 1
    assert w.append_raw(b"after", durable=True, timeout=WAIT_S) == 2
    w.close()
    assert [e.seq for e in entries] == [1, 2]
    # Nothing half-written: the batch with one oversized payload left no trace.
    assert payloads_on_disk(wal.dir()) == {1: b"before", 2: b"after"}
    assert bodies(wal.dir()).count(b"ok") == 0


def test_enveloped_payload_too_large_counts_the_envelope(wal):
    w = wal.writer()
    body = bytes(fmt.MAX_PAYLOAD_BYTES - 4)  # fits alone; not with "db" around it
    with pytest.raises(node.PayloadTooLarge) as info:
        w.append_raw_with_meta("db", body)
    assert info.value.size == fmt.MAX_PAYLOAD_BYTES + 1
    assert w.current_sequence() == 0


def test_invalid_database_name_gets_no_sequence(wal):
    w = wal.writer()
    entries = _recording_hook(w)
    for name in ("d" * 256, "\udc80", b"db"):
        with pytest.raises(node.InvalidDatabaseName):
            w.append_raw_with_meta(name, b"\x90")
        with pytest.raises(node.InvalidDatabaseName):
            w.append_raw_with_meta_nowait(name, b"\x90")
    with pytest.raises(TypeError):
        w.append({"not": "a list"})
    assert w.current_sequence() == 0 and entries == []


def test_a_closed_writer_accepts_nothing(wal):
    w = wal.writer()
    entries = _recording_hook(w)
    w.append_raw(b"kept")
    w.close()
    w.close()  # idempotent
    for call in (
        lambda: w.append_raw(b"x"),
        lambda: w.append_raw_nowait(b"x"),
        lambda: w.append([{"a": 1}]),
        lambda: w.append_raw_with_meta("db", b"\x90"),
        lambda: w.append_batch([b"x"]),
        lambda: w.append_batch_nowait([b"x"]),
        lambda: w.append_replicated(2, fmt.encode_entry(1, b"x")),
    ):
        with pytest.raises(node.WALClosed):
            call()
    assert w.current_sequence() == 1 and [e.seq for e in entries] == [1]
    with pytest.raises(node.WALClosed):
        w.wait_durable(2, WAIT_S)
    w.wait_durable(1, WAIT_S)  # what was accepted stays durable
    w = wal.writer()
    assert w.append_raw(b"next", durable=True, timeout=WAIT_S) == 2


def test_close_wakes_a_caller_waiting_for_room(wal):
    gate = wal.gate()
    w = wal.writer(buffer_entries=1, sync_file=gate)
    gate.hold()
    w.append_raw_nowait(b"1")
    gate.wait_entered()
    w.append_raw_nowait(b"2")  # queue full now
    outcome: list = []

    def blocked_append():
        try:
            outcome.append(w.append_raw(b"3", timeout=WAIT_S))
        except node.WALError as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked_append)
    t.start()
    # No public way to see that a caller is blocked for room; this private counter is it.
    wal.wait_until(lambda: w._room_waiters == 1)
    closer = threading.Thread(target=w.close, kwargs={"timeout": WAIT_S})
    closer.start()
    t.join(WAIT_S)
    assert not t.is_alive()
    gate.release()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    # Either refused (no sequence) or accepted and then written: never lost.
    written = seqs_on_disk(wal.dir())
    if isinstance(outcome[0], node.WALClosed):
        assert written == [1, 2]
    else:
        assert outcome == [3] and written == [1, 2, 3]


# --- hooks ---------------------------------------------------------------------------------


def test_hooks_see_accepted_entries_in_order_and_one_run_per_call(wal):
    w = wal.writer()
    entries = _recording_hook(w)
    calls: list[tuple[int, int]] = []
    calls_lock = threading.Lock()

    def appender(tid: int):
        for i in range(40):
            if i % 4 == 0:
                first, last = w.append_batch([b"%d-%d-%d" % (tid, i, k) for k in range(3)])
            else:
                first = last = w.append_raw(b"%d-%d" % (tid, i))
            with calls_lock:
                calls.append((first, last))

    threads = [threading.Thread(target=appender, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    w.close()
    total = w.current_sequence()
    assert [e.seq for e in entries] == list(range(1, total + 1))
    # Each call got a run of consecutive sequences, and the runs cover every one.
    runs = sorted(calls)
    assert [first for first, _ in runs] == [1] + [last + 1 for _, last in runs[:-1]]
    assert runs[-1][1] == total and all(first <= last for first, last in runs)
    on_disk = payloads_on_disk(wal.dir())
    assert {e.seq: e.payload for e in entries} == on_disk
    assert [e.timestamp_us for e in entries] == [t for _, t, _ in read_all(wal.dir())[0]]


def test_commit_hook_data_is_exactly_the_bytes_on_disk(wal):
    w = wal.writer(max_size_bytes=500)
    runs: list[node.CommittedRun] = []
    durable_at_hook: list[int] = []

    def on_commit(run):
        runs.append(run)
        durable_at_hook.append(w.durable_sequence())

    w.set_commit_hook(on_commit)
    for seq in range(1, 31):
        if seq % 7 == 0:
            w.append_batch([payload_for(seq)], durable=True, timeout=WAIT_S)
        else:
            w.append_raw(payload_for(seq))
    w.close()
    assert runs[0].first_seq == 1 and runs[-1].last_seq == 30
    for before, after in zip(runs, runs[1:], strict=False):
        assert after.first_seq == before.last_seq + 1
    # fdatasync mode: committed means synced, so a published run is durable.
    assert all(d >= r.last_seq for d, r in zip(durable_at_hook, runs, strict=True))
    assert b"".join(r.data for r in runs) == bodies(wal.dir())
    for run in runs:
        frames = arcw_parser.parse(arcw_parser.FILE_HEADER + run.data).frames
        assert len(frames) == run.last_seq - run.first_seq + 1


def test_a_failing_hook_does_not_refuse_the_entry(wal):
    w = wal.writer()

    def broken(_entry):
        raise RuntimeError("hook bug")

    w.set_replication_hook(broken)
    w.set_commit_hook(broken)
    assert w.append_raw(b"kept", durable=True, timeout=WAIT_S) == 1
    w.set_replication_hook(None)
    assert w.append_raw(b"also", durable=True, timeout=WAIT_S) == 2
    w.close()
    assert payloads_on_disk(wal.dir()) == {1: b"kept", 2: b"also"}


def test_a_failure_building_a_readers_hook_entries_does_not_refuse_its_frames(wal, monkeypatch):
    # A reader's hook entries are decoded from the frames under the writer's lock,
    # after the frames are queued: a failure there (memory, say) is the hook's, and
    # the frames stay accepted and get written.
    frames = fmt.encode_entry(1, b"one") + fmt.encode_entry(2, b"two")
    w = wal.writer()
    seen = []
    w.set_replication_hook(seen.append)

    def out_of_memory(*_args):
        raise MemoryError("building hook entries")

    monkeypatch.setattr(node.writer, "decode_frames", out_of_memory)
    assert w.append_replicated(1, frames) == 2
    w.close()
    assert seen == []
    assert payloads_on_disk(wal.dir()) == {1: b"one", 2: b"two"}


# --- invariant 4: sync modes, group commit, durable waits ----------------------------------


def test_group_commit_covers_many_entries_with_one_sync(wal):
    gate = wal.gate()
    w = wal.writer(sync_file=gate)
    gate.hold()
    w.append_raw_nowait(b"first")
    gate.wait_entered()  # the writer thread is inside a sync; the next 100 queue up
    for seq in range(2, 102):
        assert w.append_raw_nowait(payload_for(seq)) == seq
    gate.release()
    w.wait_durable(101, WAIT_S)
    stats = w.stats()
    # One sync for the new segment's header, one for entry 1, one for the 100 others.
    assert stats.total_syncs <= 2
    assert gate.calls <= 3
    assert gate.sizes[-1] == os.path.getsize(w.current_file())
    assert stats.durable_sequence == stats.committed_sequence == 101


def test_concurrent_durable_appends_share_syncs(wal):
    w = wal.writer()
    per_thread = 50
    not_durable: list[int] = []

    def appender():
        for _ in range(per_thread):
            seq = w.append_raw(b"x" * 100, durable=True, timeout=WAIT_S)
            if w.durable_sequence() < seq:
                not_durable.append(seq)

    threads = [threading.Thread(target=appender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert not_durable == []
    stats = w.stats()
    assert stats.total_entries == 8 * per_thread
    assert stats.total_syncs < stats.total_entries


def test_durable_append_waits_for_the_sync(wal):
    gate = wal.gate()
    w = wal.writer(sync_file=gate)
    gate.hold()
    with pytest.raises(node.DurabilityTimeout) as info:
        w.append_raw(b"slow", durable=True, timeout=0.1)
    # Accepted all the same: the sequence is taken and the entry will be written.
    assert info.value.seq == 1
    assert w.current_sequence() == 1 and w.durable_sequence() == 0
    with pytest.raises(node.DurabilityTimeout):
        w.wait_durable(1, timeout=0.05)
    gate.release()
    w.wait_durable(1, WAIT_S)
    assert w.durable_sequence() == 1
    assert w.append_raw(b"fast", durable=True, timeout=WAIT_S) == 2
    assert w.durable_sequence() >= 2


@pytest.mark.parametrize("mode", ["fsync", "fdatasync"])
def test_syncing_modes_commit_only_synced_entries(wal, mode):
    w = wal.writer(sync_mode=mode)
    first, last = w.append_batch([b"a", b"b", b"c"], durable=True, timeout=WAIT_S)
    assert (first, last) == (1, 3)
    stats = w.stats()
    assert stats.sync_mode == mode
    assert stats.committed_sequence == stats.durable_sequence == 3
    assert stats.total_syncs >= 1


def test_async_mode_syncs_when_someone_waits(wal):
    w = wal.writer(sync_mode="async", sync_interval_s=3600, sync_bytes=0)
    w.append_raw(b"a")
    w.append_raw(b"b")
    w.wait_committed(2, WAIT_S)
    # Written to the OS, not yet synced: nobody asked and the interval is an hour.
    assert w.committed_sequence() == 2
    assert w.durable_sequence() == 0
    w.wait_durable(2, WAIT_S)
    assert w.durable_sequence() == 2
    assert w.append_raw(b"c", durable=True, timeout=WAIT_S) == 3


def test_async_mode_syncs_after_sync_bytes(wal):
    w = wal.writer(sync_mode="async", sync_interval_s=3600, sync_bytes=1000)
    for _ in range(20):
        w.append_raw(b"x" * 100)
    # 20 * 116 bytes crosses the threshold at least twice, with no one waiting.
    wal.wait_until(lambda: w.stats().total_syncs >= 1 and w.durable_sequence() >= 8)


def test_async_mode_syncs_after_sync_interval(wal):
    w = wal.writer(sync_mode="async", sync_interval_s=0.05, sync_bytes=0)
    w.append_raw(b"x")
    wal.wait_until(lambda: w.durable_sequence() == 1)


def test_close_writes_and_syncs_everything_queued(wal):
    gate = wal.gate()
    w = wal.writer(sync_mode="async", sync_interval_s=3600, sync_bytes=0, sync_file=gate)
    for seq in range(1, 201):
        w.append_raw_nowait(payload_for(seq))
    w.close()
    assert w.committed_sequence() == w.durable_sequence() == 200
    path = segment_paths(wal.dir())[-1]
    assert gate.sizes[-1] == os.path.getsize(path)  # the last sync saw every byte
    assert payloads_on_disk(wal.dir()) == {s: payload_for(s) for s in range(1, 201)}


# --- invariant 5: private files ------------------------------------------------------------


def test_files_are_0600_in_a_0700_directory(wal):
    old_umask = os.umask(0)  # the writer must not rely on the caller's umask
    try:
        wal_dir = os.path.join(wal.dir("parent"), "deeper", "wal")
        w = wal.writer(wal_dir, max_size_bytes=100)
        _fill(w, 5)
        w.close()
        node.save_meta(wal_dir, {"log_id": node.new_log_id()})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(wal_dir).st_mode) == 0o700
    names = os.listdir(wal_dir)
    assert "wal.meta" in names and len(segment_paths(wal_dir)) > 1
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(wal_dir, name)).st_mode) == 0o600, name


# --- positions, stats -----------------------------------------------------------------------


def test_stats_is_a_frozen_record(wal):
    w = wal.writer()
    w.append_raw(b"abc", durable=True, timeout=WAIT_S)
    stats = w.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.total_entries = 5
    d = stats.as_dict()
    assert d["total_entries"] == 1 and d["total_bytes"] == 16 + 3
    assert d["current_sequence"] == d["committed_sequence"] == d["durable_sequence"] == 1
    assert d["current_file"] == w.current_file()
    assert d["total_rotations"] == 0 and d["dropped_entries"] == 0


# --- replication: append_replicated, start_at, digest --------------------------------------


def _leader_runs(wal, count: int, max_size: int = 400) -> list[node.CommittedRun]:
    leader = wal.writer(wal.dir("leader"), max_size_bytes=max_size)
    runs: list[node.CommittedRun] = []
    leader.set_commit_hook(runs.append)
    for seq in range(1, count + 1):
        if seq % 5 == 0:
            leader.append_batch([payload_for(seq)], durable=True, timeout=WAIT_S)
        else:
            leader.append_raw(payload_for(seq))
    leader.close()
    return runs


def test_append_replicated_keeps_the_leaders_bytes(wal):
    runs = _leader_runs(wal, 40)
    follower = wal.writer(wal.dir("follower"), max_size_bytes=10_000)
    seen: list[int] = []
    follower.set_replication_hook(lambda e: seen.append(e.seq))
    for run in runs:
        assert follower.append_replicated(run.first_seq, run.data) == run.last_seq
    follower.close()
    assert seen == list(range(1, 41))
    assert bodies(wal.dir("follower")) == bodies(wal.dir("leader"))
    assert read_all(wal.dir("follower"))[0] == read_all(wal.dir("leader"))[0]


def test_catch_up_through_read_frames_is_byte_identical(wal):
    _leader_runs(wal, 40)
    reader = node.WALReader(wal.dir("leader"))
    assert reader.bounds() == (1, 40)
    follower = wal.writer(wal.dir("follower"))
    next_seq = 1
    while next_seq <= 40:
        first, count, data = reader.read_frames(next_seq, 40, max_bytes=150)
        assert first == next_seq and count >= 1
        follower.append_replicated(first, data)
        next_seq += count
    follower.close()
    assert bodies(wal.dir("follower")) == bodies(wal.dir("leader"))


def test_append_replicated_refuses_a_gap_or_an_overlap(wal):
    runs = _leader_runs(wal, 10)
    follower = wal.writer(wal.dir("follower"))
    seen: list[int] = []
    follower.set_replication_hook(lambda e: seen.append(e.seq))
    later = next(r for r in runs if r.first_seq > 1)
    with pytest.raises(node.OutOfOrder) as info:
        follower.append_replicated(later.first_seq, later.data)
    assert (info.value.got, info.value.expected) == (later.first_seq, 1)
    assert follower.current_sequence() == 0 and seen == []
    follower.append_replicated(runs[0].first_seq, runs[0].data)
    with pytest.raises(node.OutOfOrder):  # the same run again
        follower.append_replicated(runs[0].first_seq, runs[0].data)
    assert follower.current_sequence() == runs[0].last_seq
    follower.close()
    assert bodies(wal.dir("follower")) == runs[0].data


def test_append_replicated_refuses_damaged_frames(wal):
    frames = fmt.encode_entry(1, b"payload one") + fmt.encode_entry(2, b"payload two")
    follower = wal.writer()
    damaged = bytearray(frames)
    damaged[-1] ^= 0xFF
    for bad in (bytes(damaged), frames[:-3], frames + b"\x00" * 5, b""):
        with pytest.raises((node.WALError, ValueError)):
            follower.append_replicated(1, bad)
    assert follower.current_sequence() == 0
    assert follower.append_replicated(1, frames) == 2
    follower.close()
    assert bodies(wal.dir()) == frames


def test_start_at_lets_an_empty_log_join_mid_stream(wal):
    w = wal.writer()
    with pytest.raises(ValueError):
        w.start_at(0)
    w.start_at(1000)
    assert w.current_sequence() == 999
    frames = fmt.encode_entry(7, b"from the leader")
    assert w.append_replicated(1000, frames) == 1000
    assert w.append_raw(b"next", durable=True, timeout=WAIT_S) == 1001
    with pytest.raises(node.WALError):
        w.start_at(5000)  # no longer empty
    w.close()
    assert [os.path.basename(p) for p in segment_paths(wal.dir())] == [node.segment_name(1000)]
    w = wal.writer()
    assert w.current_sequence() == 1001
    assert w.append_raw(b"after restart", durable=True, timeout=WAIT_S) == 1002
    with pytest.raises(node.WALError):
        w.start_at(1)


def test_start_at_is_refused_once_anything_was_written(wal):
    w = wal.writer()
    w.append_raw(b"x", durable=True, timeout=WAIT_S)
    w.purge_all()  # no entries left on disk, but the position is not 1 any more
    with pytest.raises(node.WALError):
        w.start_at(50)
    assert w.append_raw(b"y", durable=True, timeout=WAIT_S) == 2


def test_digest_is_equal_on_equal_logs_and_differs_on_any_change(wal):
    runs = _leader_runs(wal, 30, max_size=300)
    follower = wal.writer(wal.dir("follower"), max_size_bytes=5000)  # other segment layout
    for run in runs:
        follower.append_replicated(run.first_seq, run.data)
    follower.close()
    leader = node.WALReader(wal.dir("leader"))
    copy = node.WALReader(wal.dir("follower"))
    assert len(segment_paths(wal.dir("leader"))) != len(segment_paths(wal.dir("follower")))
    for lo, hi in [(1, 30), (1, 1), (7, 22), (30, 30)]:
        assert leader.digest(lo, hi) == copy.digest(lo, hi)
    assert leader.digest(1, 30) != leader.digest(1, 29)
    assert leader.digest(2, 30) != leader.digest(1, 30)

    # One payload different at one sequence: a different log.
    other = wal.writer(wal.dir("other"))
    for run in runs:
        data = run.data
        if run.first_seq <= 17 <= run.last_seq:
            frames = arcw_parser.parse(arcw_parser.FILE_HEADER + data).frames
            data = b"".join(
                fmt.encode_entry(
                    f.timestamp_us,
                    b"changed" if run.first_seq + i == 17 else f.payload,
                )
                for i, f in enumerate(frames)
            )
        other.append_replicated(run.first_seq, data)
    other.close()
    changed = node.WALReader(wal.dir("other"))
    assert changed.digest(1, 16) == leader.digest(1, 16)
    assert changed.digest(1, 30) != leader.digest(1, 30)
    assert changed.digest(18, 30) == leader.digest(18, 30)
    with pytest.raises(node.RangeNotAvailable):
        leader.digest(1, 31)


def test_records_written_by_append_decode_back(wal):
    w = wal.writer()
    records = [{"measurement": "cpu", "value": 0.5, "tags": {"h": "a"}, "n": None}]
    w.append(records, durable=True, timeout=WAIT_S)
    body = msgpack.packb({"m": "mem", "columns": {"used": [1, 2]}})
    w.append_raw_with_meta("telemetry", body, durable=True, timeout=WAIT_S)
    w.close()
    first, second = node.WALReader(wal.dir()).entries(1)
    assert (first.kind, first.records, first.database) == ("records", records, None)
    assert second.kind == "columnar" and second.database == "telemetry"
    assert second.columnar == node.ColumnarEntry("telemetry", "mem", {"used": [1, 2]})


def test_append_replicated_checks_the_declared_count_and_every_crc(wal):
    runs = _leader_runs(wal, 10)
    run = runs[0]
    held = run.last_seq - run.first_seq + 1
    follower = wal.writer(wal.dir("follower"))
    with pytest.raises(fmt.WALError, match=f"declares {held + 1} entries but holds {held}"):
        follower.append_replicated(run.first_seq, run.data, count=held + 1)
    damaged = bytearray(run.data)
    damaged[-1] ^= 0x01  # the last payload's last byte
    with pytest.raises(fmt.WALError, match="CRC mismatch"):
        follower.append_replicated(run.first_seq, bytes(damaged), count=held)
    assert follower.current_sequence() == 0
    assert follower.append_replicated(run.first_seq, run.data, count=held) == run.last_seq
    follower.close()
