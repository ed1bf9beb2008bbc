"""The WAL writer: sequences, group commit, sync modes, rotation and purges.

Callers append from any thread; each accepted entry gets the next sequence at once
and waits in an in-memory queue. One background thread (or, with
``background=False``, the caller's ``flush()``) takes everything queued, writes it
with one ``write`` and covers it with one sync (group commit), then moves the
committed and durable sequences and fires the commit hook with the exact bytes
written. An entry refused (queue full, too large, writer closed) gets no sequence
and reaches no hook.

With ``background=False`` there is no thread: the caller commits the queue with
``flush()``, in its own thread, and the hooks run there. An event loop that
appends everything that arrived and then flushes once groups commits just as well,
and saves the two thread hand-offs per commit, which dominate commit latency on
machines where waking another thread is expensive (see README, Performance).

The writer owns the files of its directory and is the only writer there: it locks
the directory (node.lockfile) before it looks at or repairs anything, and a second
writer, in this process or another, is refused with WALLocked. What it does on open
with a log a crash left damaged is node.repair's; which segments a purge may delete
is node.purge's; every fsync of a directory, cut and delete goes through node.files.
It never talks to the network; the cluster layer hangs replication off its hooks.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import files, purge
from . import format as fmt
from .lockfile import lock_dir
from .reader import Segment, count_frames, decode_frames, list_segments
from .repair import MODES as REPAIR_MODES
from .repair import open_log

log = logging.getLogger("walrep.node.writer")

DEFAULT_MAX_SIZE_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_AGE_S = 3600.0
DEFAULT_SYNC_INTERVAL_S = 0.100
DEFAULT_SYNC_BYTES = 1024 * 1024
DEFAULT_BUFFER_ENTRIES = 10_000
# After a failed write (a full disk, say) the writer retries the same group this
# often: the entries already have sequences, so they must go to disk in order.
WRITE_RETRY_INTERVAL_S = 0.5
SYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_pack_header = fmt.ENTRY_HEADER.pack
_crc32 = fmt.crc32
_MAX = fmt.MAX_PAYLOAD_BYTES

# The C framing of a batch (node/_scan.c), when it was built. As in node.reader,
# WALREP_PURE_PYTHON=1 (read at import) or setting this to None forces pure Python.
_frame_fast: Callable[[Sequence[bytes], int, Callable[[int], Exception]], bytes] | None = None
if os.environ.get("WALREP_PURE_PYTHON", "") in ("", "0"):
    try:
        from ._scan import frame_payloads as _frame_fast
    except ImportError:  # not built, or built from an older _scan.c
        pass


class SyncMode(enum.StrEnum):
    FSYNC = "fsync"
    FDATASYNC = "fdatasync"
    ASYNC = "async"  # write each group; sync every sync_interval_s or sync_bytes


class WALDropped(fmt.WALError):
    """The queue is full and the caller asked not to wait (or, with background=False,
    a concurrent append took the room a flush made). The entry got no sequence."""

    def __init__(self, queued: int):
        super().__init__(f"WAL entry dropped: queue full ({queued} entries waiting)")
        self.queued = queued


class WALClosed(fmt.WALError):
    """The writer was closed; nothing more is accepted."""


class WALFailed(fmt.WALError):
    """A sync failed: the kernel may have dropped written pages, so the writer stops.

    Reopening the directory rescans it and continues from what is really there.
    """


class OutOfOrder(fmt.WALError, ValueError):
    """A replicated run does not start at the writer's next sequence."""

    def __init__(self, got: int, expected: int):
        super().__init__(f"replicated entries start at {got}, the log expects {expected}")
        self.got = got
        self.expected = expected


class DurabilityTimeout(fmt.WALError, TimeoutError):
    """Accepted (the sequence is assigned and will be written) but not yet durable."""

    def __init__(self, seq: int, timeout: float):
        super().__init__(f"sequence {seq} not durable within {timeout} s (it is still queued)")
        self.seq = seq


@dataclass(frozen=True, slots=True)
class ReplicationEntry:
    """An accepted entry, as the seed's replication hook receives it."""

    seq: int
    timestamp_us: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class CommittedRun:
    """Consecutive entries first_seq..last_seq that just became committed.

    data is the bytes written to the segment for them (headers and payloads), so
    a replica that writes these bytes holds an identical log.
    """

    first_seq: int
    last_seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WriterStats:
    sync_mode: str
    current_file: str | None
    current_sequence: int  # last sequence assigned
    committed_sequence: int  # last sequence written (and synced, in a syncing mode)
    durable_sequence: int  # last sequence covered by a completed sync
    queued_entries: int
    total_entries: int
    total_bytes: int
    total_syncs: int
    total_rotations: int
    dropped_entries: int
    write_errors: int
    last_sync_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class Writer:
    """A WAL writer for one directory. See the module docstring."""

    def __init__(
        self,
        wal_dir: str,
        *,
        sync_mode: SyncMode | str = SyncMode.FDATASYNC,
        max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
        sync_bytes: int = DEFAULT_SYNC_BYTES,
        buffer_entries: int = DEFAULT_BUFFER_ENTRIES,
        sync_file: Callable[[int], None] | None = None,
        repair: str = "tail",
        background: bool = True,
    ):
        self.wal_dir = wal_dir
        self.sync_mode = SyncMode(sync_mode)
        # What opening does with damage: see node.repair.MODES.
        if repair not in REPAIR_MODES:
            raise ValueError(f"repair must be one of {', '.join(REPAIR_MODES)}, got {repair!r}")
        self.repair = repair
        if max_size_bytes <= fmt.FILE_HEADER_BYTES:
            raise ValueError(f"max_size_bytes must exceed {fmt.FILE_HEADER_BYTES}")
        if buffer_entries < 1:
            raise ValueError("buffer_entries must be at least 1")
        self.max_size_bytes = max_size_bytes
        self.max_age_s = max_age_s
        self.sync_interval_s = sync_interval_s
        self.sync_bytes = sync_bytes
        self.buffer_entries = buffer_entries
        # A seam for tests and a choice for users: how a file is made durable.
        if sync_file is None:
            sync_file = os.fsync if self.sync_mode is SyncMode.FSYNC else _fdatasync
        self._sync_file = sync_file

        self._lock = threading.Lock()  # sequences, queue, hooks
        self._room = threading.Condition(self._lock)
        self._files_lock = threading.Lock()  # segment files: writes, rotation, purges
        self._progress = threading.Condition(threading.Lock())  # committed/durable moved
        self._wake = threading.Event()

        self._queue: list[bytes] = []
        self._queued_entries = 0
        self._room_waiters = 0
        self._durable_waiters = 0
        self._sync_requested = False
        self._closing = False
        self._failed: BaseException | None = None

        self._replication_hook: Callable[[ReplicationEntry], None] | None = None
        self._commit_hook: Callable[[CommittedRun], None] | None = None
        self._durable_hook: Callable[[int], None] | None = None

        self.total_entries = 0
        self.total_bytes = 0
        self.total_syncs = 0
        self.total_rotations = 0
        self.dropped_entries = 0
        self.write_errors = 0
        self.last_sync_seconds = 0.0
        # Sync latency as a histogram (upper bounds SYNC_BUCKETS_S, then +Inf), so a
        # metrics layer can export it without hooking into every sync.
        self.sync_bucket_counts = [0] * (len(SYNC_BUCKETS_S) + 1)
        self.sync_seconds_sum = 0.0
        self.repairs: list[fmt.Problem] = []

        files.ensure_private_dir(wal_dir)
        self._fd: int | None = None
        self._active: Segment | None = None
        self._active_size = 0
        self._active_opened = 0.0
        self._active_entries = 0
        # Before anything reads or repairs the directory: a second writer must not
        # cut a tail the first is still writing, nor hand out its sequences.
        self._dir_lock = lock_dir(wal_dir)
        try:
            self._start(background)
        except BaseException:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)  # nothing was written through it yet
            self._dir_lock.release()
            raise

    def _start(self, background: bool) -> None:
        """The rest of __init__, under the directory lock: open the log, start the thread."""
        wal_dir = self.wal_dir
        next_seq = self._open_newest()
        self._next_seq = next_seq  # next sequence to assign
        self._written_next = next_seq  # next sequence to write to disk
        self._committed = next_seq - 1
        self._durable = next_seq - 1
        self._unsynced_bytes = 0
        self._last_sync = time.monotonic()

        self.background = background  # False: the caller commits with flush()
        # Caller mode: flush() may be called by the owner and by close() in another
        # thread; one at a time, in order.
        self._flush_lock = threading.Lock()
        self._retry_write_at = 0.0  # after a full disk, flush() waits until then
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=self._run, name=f"wal-writer {wal_dir}", daemon=True
            )
            self._thread.start()

    # --- opening -------------------------------------------------------------------

    def _open_newest(self) -> int:
        """Repair the log as self.repair says (node.repair), attach to its newest
        segment, and return the next sequence."""
        end = open_log(self.wal_dir, self.repair, self.repairs)
        if end.segment is not None:
            self._attach(end.segment, end.size, end.entries)
        return end.next_seq

    def _attach(self, segment: Segment, size: int, entries: int) -> None:
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        self._active = segment
        self._active_size = size
        self._active_entries = entries
        self._active_opened = time.monotonic()

    # --- hooks ---------------------------------------------------------------------

    def set_replication_hook(self, hook: Callable[[ReplicationEntry], None] | None) -> None:
        """Called for each accepted entry, in sequence order, as soon as it has its sequence.

        Unlike the seed (which calls its hook before it knows the entry will be
        written), an entry reaches this hook only once it is accepted. It runs while
        the writer's lock is held: keep it short, and do not append from it.
        """
        with self._lock:
            self._replication_hook = hook

    def set_commit_hook(self, hook: Callable[[CommittedRun], None] | None) -> None:
        """Called each time a run of entries is committed: from the writer thread, or
        with background=False from whichever thread commits (flush(), close(), a
        waiting append or wait_*), so a hook that is not thread-safe must only be
        installed while one thread does all of those.

        Committed means written and synced in the fsync and fdatasync modes, and
        written to the OS in async mode. This is where replication publishes.
        """
        with self._lock:
            self._commit_hook = hook

    def set_durable_hook(self, hook: Callable[[int], None] | None) -> None:
        """Called with the new durable sequence after each sync, from the same thread
        as the commit hook (see set_commit_hook)."""
        with self._lock:
            self._durable_hook = hook

    def request_sync(self) -> None:
        """Ask for a sync now (async mode syncs on its interval otherwise)."""
        self._sync_requested = True
        if self._thread is not None:
            self._wake.set()

    # --- appending -----------------------------------------------------------------

    def append(self, records: list[dict[str, Any]], **wait: Any) -> int:
        """Append row records (a msgpack array of maps); return the sequence."""
        return self.append_raw(fmt.encode_records(records), **wait)

    def append_nowait(self, records: list[dict[str, Any]]) -> int:
        return self.append_raw_nowait(fmt.encode_records(records))

    def append_raw_with_meta(self, database: str, payload: bytes, **wait: Any) -> int:
        """Append msgpack bytes inside a database envelope."""
        return self.append_raw(fmt.encode_envelope(database, payload), **wait)

    def append_raw_with_meta_nowait(self, database: str, payload: bytes) -> int:
        return self.append_raw_nowait(fmt.encode_envelope(database, payload))

    def append_raw_nowait(self, payload: bytes) -> int:
        """Append one payload without waiting; raise WALDropped if the queue is full."""
        return self._append_one(payload, False, None)

    def append_raw(
        self, payload: bytes, *, durable: bool = False, timeout: float | None = None
    ) -> int:
        """Append one payload, waiting for room; with durable=True also until it is synced."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seq = self._append_one(payload, True, timeout)
        if durable:
            self.wait_durable(seq, _remaining(deadline))
        return seq

    def _append_one(self, payload: bytes, wait: bool, timeout: float | None) -> int:
        # The hot path: one lock round, no allocation beyond the frame itself.
        size = _nbytes(payload)
        if size > _MAX:
            raise fmt.PayloadTooLarge(size)
        if wait and self._thread is None:
            self._make_room_here(1, timeout)
        timestamp = time.time_ns() // 1000
        frame = _pack_header(size, timestamp, _crc32(payload)) + payload
        with self._lock:
            if self._closing or self._failed is not None:
                self._refuse_closed()
            if self._queued_entries >= self.buffer_entries:
                if not wait or self._thread is None:
                    self.dropped_entries += 1
                    raise WALDropped(self._queued_entries)
                self._wait_for_room(1, timeout)
            seq = self._next_seq
            self._next_seq = seq + 1
            queue = self._queue
            queue.append(frame)
            self._queued_entries += 1
            if self._replication_hook is not None:
                self._call_hooks(
                    lambda _first: [ReplicationEntry(seq, timestamp, bytes(payload))], seq
                )
        if len(queue) == 1 and self._thread is not None:
            self._wake.set()
        return seq

    def append_batch_nowait(self, payloads: Sequence[bytes]) -> tuple[int, int]:
        """Append many payloads as consecutive sequences; (first, last). All or nothing."""
        return self._append_frames(*_frame_payloads(payloads), wait=False, timeout=None)

    def append_batch(
        self,
        payloads: Sequence[bytes],
        *,
        durable: bool = False,
        timeout: float | None = None,
    ) -> tuple[int, int]:
        """Append many payloads as consecutive sequences, waiting for room; (first, last)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        first, last = self._append_frames(*_frame_payloads(payloads), wait=True, timeout=timeout)
        if durable:
            self.wait_durable(last, _remaining(deadline))
        return first, last

    def append_replicated(
        self,
        first_seq: int,
        data: bytes,
        *,
        count: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> int:
        """A reader's path: append frames received from the leader, byte for byte.

        The run must start at this log's next sequence; every frame is checked
        (length, CRC) before anything is queued. Returns the last sequence.
        """
        held = count_frames(data, first_seq)
        if not held:
            raise ValueError("no frames to append")
        if count is not None and held != count:
            raise fmt.WALError(
                f"replicated run at {first_seq} declares {count} entries but holds {held}"
            )

        def hook_entries(first: int) -> list[ReplicationEntry]:
            # Only when a hook wants them; the frames were checked above.
            return [ReplicationEntry(*entry) for entry in decode_frames(data, first_seq)]

        _first, last = self._append_frames(
            [data], held, hook_entries, wait=wait, timeout=timeout, expect_first=first_seq
        )
        return last

    def start_at(self, seq: int) -> None:
        """Make an empty log's first sequence seq (a reader joining mid-stream)."""
        if seq < 1:
            raise ValueError(f"sequences start at 1, got {seq}")
        with self._files_lock, self._lock:
            if self._next_seq != 1:
                raise fmt.WALError(
                    f"start_at({seq}) needs an empty log; this one is at {self._next_seq - 1}"
                )
            empty = self._active
            if empty is not None:
                self._close_active()
                os.unlink(empty.path)
            self._next_seq = self._written_next = seq
            self._committed = self._durable = seq - 1

    def _append_frames(
        self,
        chunks: list[bytes],
        n: int,
        hook_entries: Callable[[int], list[ReplicationEntry]],
        *,
        wait: bool,
        timeout: float | None,
        expect_first: int | None = None,
    ) -> tuple[int, int]:
        """Queue n entries already framed in chunks; hook_entries(first) builds hook input."""
        if not n:
            raise ValueError("nothing to append")
        if wait and self._thread is None:
            self._make_room_here(n, timeout)
        with self._lock:
            if self._queued_entries and self._queued_entries + n > self.buffer_entries:
                if not wait or self._thread is None:
                    self.dropped_entries += n
                    raise WALDropped(self._queued_entries)
                self._wait_for_room(n, timeout)
            if self._closing or self._failed is not None:
                self._refuse_closed()
            first = self._next_seq
            if expect_first is not None and first != expect_first:
                raise OutOfOrder(expect_first, first)
            self._next_seq = first + n
            was_empty = not self._queue
            self._queue.extend(chunks)
            self._queued_entries += n
            if self._replication_hook is not None:
                self._call_hooks(hook_entries, first)
        if was_empty and self._thread is not None:
            self._wake.set()
        return first, first + n - 1

    def _make_room_here(self, n: int, timeout: float | None) -> None:
        """Caller mode's wait for room: commit the queue in this thread, and while a
        full disk keeps it queued, retry at the interval until the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queued_entries and self._queued_entries + n > self.buffer_entries:
            if self._closing or self._failed is not None:
                return  # the append refuses under the lock
            self.flush()
            if not (self._queued_entries and self._queued_entries + n > self.buffer_entries):
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"no room in the WAL queue within {timeout} s; the entry was not accepted"
                )
            time.sleep(_retry_pause(remaining))

    def _wait_for_room(self, n: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._room_waiters += 1
        try:
            while self._queued_entries and self._queued_entries + n > self.buffer_entries:
                if self._closing or self._failed is not None:
                    self._refuse_closed()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"no room in the WAL queue within {timeout} s; the entry was not accepted"
                    )
                self._room.wait(remaining)
        finally:
            self._room_waiters -= 1

    def _call_hooks(
        self, hook_entries: Callable[[int], list[ReplicationEntry]], first: int
    ) -> None:
        try:
            # Built in here: a reader's entries are decoded from its frames only now,
            # and an error doing so must not refuse what is already queued either.
            for entry in hook_entries(first):
                self._replication_hook(entry)
        except Exception:
            # The entries are accepted whatever a hook does; a failing hook must not
            # make the caller believe they were refused.
            log.exception("replication hook failed for sequences %d..", first)

    def _refuse_closed(self):
        if self._failed is not None:
            raise WALFailed(f"the WAL writer for {self.wal_dir} failed: {self._failed}") from (
                self._failed
            )
        raise WALClosed(f"the WAL writer for {self.wal_dir} is closed")

    # --- waiting -------------------------------------------------------------------

    def wait_durable(self, seq: int, timeout: float | None = None) -> None:
        """Block until seq is covered by a sync (raise DurabilityTimeout otherwise)."""
        self._wait_progress(seq, timeout, durable=True)

    def wait_committed(self, seq: int, timeout: float | None = None) -> None:
        """Block until seq is committed (see set_commit_hook)."""
        self._wait_progress(seq, timeout, durable=False)

    def _wait_progress(self, seq: int, timeout: float | None, *, durable: bool) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread is None and self._closing:
            with self._flush_lock:
                pass  # close() may be writing it: its flush decides
        # Nobody else commits in caller mode: do it here (before taking _progress,
        # which a sync takes too), again after a full disk kept the entries queued.
        while self._thread is None and not self._closing and self._failed is None:
            if durable and self.sync_mode is SyncMode.ASYNC:
                self._sync_requested = True
            self.flush()
            if (self._durable if durable else self._committed) >= seq:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DurabilityTimeout(seq, timeout)
            time.sleep(_retry_pause(remaining))
        with self._progress:
            if durable:
                self._durable_waiters += 1
            try:
                self._wait_progress_locked(seq, timeout, deadline, durable)
            finally:
                if durable:
                    self._durable_waiters -= 1

    def _wait_progress_locked(self, seq, timeout, deadline, durable) -> None:
        while (self._durable if durable else self._committed) < seq:
            if self._failed is not None:
                self._refuse_closed()
            if self._closing and (self._thread is None or not self._thread.is_alive()):
                raise WALClosed(f"writer closed before sequence {seq} was durable")
            if durable and self.sync_mode is SyncMode.ASYNC and self._thread is not None:
                self._wake.set()  # someone waits: sync now rather than at the interval
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DurabilityTimeout(seq, timeout)
            self._progress.wait(remaining)

    # --- committing in the caller's thread ---------------------------------------

    def flush(self) -> int:
        """Commit what is queued, here and now; return the durable sequence.

        For a writer made with ``background=False`` (with the thread, this only wakes
        it). Everything queued goes out in one write, the sync mode decides the sync
        (async mode: when its interval, byte threshold or request_sync() makes one
        due), and the commit and durable hooks run in this thread before it returns.
        A full disk keeps the entries queued with their sequences, for a later flush
        to retry; any other failure stops the writer as in thread mode (later appends
        raise WALFailed). Nothing runs on a timer in this mode: in async mode the
        caller must flush at least every sync_interval_s for that bound to hold.
        """
        if self._thread is not None:
            self._wake.set()
            return self._durable
        if not self._closing and time.monotonic() < self._retry_write_at:
            return self._durable  # the disk was full a moment ago: retry at the interval
        with self._flush_lock:
            with self._lock:
                chunks, count = self._queue, self._queued_entries
                self._queue = []
                self._queued_entries = 0
                closing = self._closing
            if self._failed is not None:
                return self._durable
            try:
                if not self._commit(chunks, count, closing):
                    with self._lock:  # in front of what was appended meanwhile
                        self._queue[:0] = chunks
                        self._queued_entries += count
                    self._retry_write_at = time.monotonic() + WRITE_RETRY_INTERVAL_S
            except BaseException as exc:
                self._fail(exc)
                if not isinstance(exc, Exception):
                    raise
            return self._durable

    # --- the writer thread ---------------------------------------------------------

    def _commit(self, chunks: list[bytes], count: int, closing: bool) -> bool:
        """Write a group (if any) and sync if one is due; both modes commit through here.

        False when a full disk refused the write: counted and logged, and the caller
        keeps the group, whose sequences are promised, to retry. Other errors raise.
        """
        try:
            if chunks:
                self._write_group(chunks, count)
            if self._sync_due(closing):
                with self._files_lock:
                    self._sync_now()
        except OSError as exc:
            if chunks and exc.errno in (errno.ENOSPC, errno.EDQUOT) and not closing:
                self.write_errors += 1
                log.error(
                    "WAL write failed (%s); %d entries from sequence %d wait to be retried",
                    exc,
                    count,
                    self._written_next,
                )
                return False
            raise
        return True

    def _run(self) -> None:
        try:
            self._run_until_closed()
        finally:
            if self._closing:
                # close() timed out waiting for this thread and left the lock to it.
                self._dir_lock.release()

    def _run_until_closed(self) -> None:
        retry_group: tuple[list[bytes], int] | None = None
        while True:
            self._wake.wait(self._idle_timeout())
            self._wake.clear()
            if retry_group is None:
                with self._lock:
                    chunks, count = self._queue, self._queued_entries
                    self._queue = []
                    self._queued_entries = 0
                    closing = self._closing
                    if self._room_waiters:
                        self._room.notify_all()
            else:
                chunks, count = retry_group
                with self._lock:
                    closing = self._closing
            try:
                if not self._commit(chunks, count, closing):
                    retry_group = (chunks, count)
                    time.sleep(WRITE_RETRY_INTERVAL_S)
                    self._wake.set()  # retry now, not when the next append comes
                    continue
                if retry_group is not None:
                    # Appends made while we retried found a non-empty queue and did not
                    # wake us: take what they queued now.
                    self._wake.set()
                retry_group = None
            except BaseException as exc:  # the thread must report, never die silently
                self._fail(exc)
                return
            if closing:
                with self._lock:
                    if not self._queue:
                        break
        with self._files_lock:
            self._close_active()

    def _idle_timeout(self) -> float | None:
        if self.sync_mode is SyncMode.ASYNC and self._unsynced_bytes:
            return max(0.0, self.sync_interval_s - (time.monotonic() - self._last_sync))
        return None

    def _sync_due(self, closing: bool) -> bool:
        if not self._unsynced_bytes:
            return False
        if self.sync_mode is not SyncMode.ASYNC or closing:
            return True
        return (
            (self.sync_bytes and self._unsynced_bytes >= self.sync_bytes)
            or time.monotonic() - self._last_sync >= self.sync_interval_s
            or self._durable_waiters > 0  # someone waits: sync now, not at the interval
            or self._sync_requested
        )

    def _write_group(self, chunks: list[bytes], count: int) -> None:
        hook = self._commit_hook
        if len(chunks) > 1 and (
            hook is not None or count < _WRITEV_FROM_ENTRIES_PER_CHUNK * len(chunks)
        ):
            # The hook needs the run in one piece anyway; chunks of an entry or a few
            # are cheaper joined than as a writev of a thousand small buffers (README,
            # Performance).
            chunks = [b"".join(chunks)]
        size = sum(map(len, chunks))
        first = self._written_next
        with self._files_lock:
            if self._needs_rotation():
                self._rotate(first)
            self._write_all(chunks, size)
            self._active_size += size
            self._active_entries += count
            self._written_next = first + count
            self._unsynced_bytes += size
            self.total_entries += count
            self.total_bytes += size
            if self.sync_mode is not SyncMode.ASYNC:
                self._sync_now()  # syncing modes: committed means synced
        last = first + count - 1
        with self._progress:
            self._committed = last
            self._progress.notify_all()
        if hook is not None:
            try:
                hook(CommittedRun(first, last, chunks[0]))
            except Exception:
                log.exception("commit hook failed for sequences %d..%d", first, last)

    def _write_all(self, chunks: list[bytes], size: int) -> None:
        """Write the chunks (size bytes in all) in order with os.writev, which, unlike
        joining them first, copies nothing and lets go of the GIL for the whole copy
        into the page cache, so appending threads can frame their next batch meanwhile
        (README, Performance)."""
        start_size = self._active_size
        try:
            pending: list = chunks
            left = size
            while left:
                written = os.writev(self._fd, pending[:_IOV_MAX])
                left -= written
                if left:  # a short write, or more chunks than one call takes
                    pending = _after(pending, written)
        except OSError:
            # Leave no partial entry behind: the group is retried whole.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start_size)
            raise

    def _sync_now(self) -> None:
        if self._fd is None:
            return
        started = time.monotonic()
        try:
            self._sync_file(self._fd)
        except OSError as exc:
            raise WALFailed(f"sync of {self.current_file()} failed: {exc}") from exc
        self.last_sync_seconds = elapsed = time.monotonic() - started
        self.sync_seconds_sum += elapsed
        self.sync_bucket_counts[bisect.bisect_left(SYNC_BUCKETS_S, elapsed)] += 1
        self.total_syncs += 1
        self._unsynced_bytes = 0
        self._sync_requested = False
        self._last_sync = time.monotonic()
        with self._progress:
            self._durable = self._written_next - 1
            self._progress.notify_all()
        hook = self._durable_hook
        if hook is not None:
            try:
                hook(self._durable)
            except Exception:
                log.exception("durable hook failed at sequence %d", self._durable)

    def _needs_rotation(self) -> bool:
        if self._active is None:
            return True
        if self._active_entries == 0:
            return False
        return (
            self._active_size >= self.max_size_bytes
            or time.monotonic() - self._active_opened >= self.max_age_s
        )

    def _rotate(self, first_seq: int) -> None:
        """Seal the active segment and start one named by first_seq (files lock held)."""
        if self._active is not None:
            if self._unsynced_bytes:
                self._sync_now()
            self._close_active()
            self.total_rotations += 1
        path = os.path.join(self.wal_dir, fmt.segment_name(first_seq))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, fmt.FILE_HEADER)
            self._sync_file(fd)
        except BaseException:
            os.close(fd)
            # A full disk: remove the headerless file, so the retry can create it again.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        files.sync_dir(self.wal_dir)
        self._fd = fd
        self._active = Segment(path, first_seq)
        self._active_size = fmt.FILE_HEADER_BYTES
        self._active_entries = 0
        self._active_opened = time.monotonic()

    def _close_active(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._sync_file(fd)
            finally:
                os.close(fd)
        self._active = None

    def _fail(self, exc: BaseException) -> None:
        log.critical("WAL writer for %s stopped: %s", self.wal_dir, exc)
        with self._lock:
            self._failed = exc
            self._room.notify_all()
        with self._progress:
            self._progress.notify_all()

    # --- lifecycle -----------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, write and sync everything queued, close the files.

        timeout bounds the wait for the writer thread; with background=False the
        commit runs here, in the caller, and is not bounded.
        """
        with self._lock:
            self._closing = True
            self._room.notify_all()
        if self._thread is None:
            self.flush()
            with self._files_lock:
                self._close_active()
        else:
            self._wake.set()
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            # A thread still writing after the timeout lets go of it when it ends.
            self._dir_lock.release()
        with self._progress:
            self._progress.notify_all()
        if self._failed is not None:
            raise WALFailed(f"the WAL writer for {self.wal_dir} failed: {self._failed}")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- positions and stats -------------------------------------------------------

    @property
    def queued_entries(self) -> int:
        """Entries appended and not yet written."""
        return self._queued_entries

    def current_sequence(self) -> int:
        """The last sequence assigned (0 if none ever was)."""
        return self._next_seq - 1

    def committed_sequence(self) -> int:
        return self._committed

    def durable_sequence(self) -> int:
        return self._durable

    def current_file(self) -> str | None:
        active = self._active
        return active.path if active is not None else None

    def stats(self) -> WriterStats:
        return WriterStats(
            sync_mode=self.sync_mode.value,
            current_file=self.current_file(),
            current_sequence=self.current_sequence(),
            committed_sequence=self._committed,
            durable_sequence=self._durable,
            queued_entries=self._queued_entries,
            total_entries=self.total_entries,
            total_bytes=self.total_bytes,
            total_syncs=self.total_syncs,
            total_rotations=self.total_rotations,
            dropped_entries=self.dropped_entries,
            write_errors=self.write_errors,
            last_sync_seconds=self.last_sync_seconds,
        )

    # --- purges ----------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        return list_segments(self.wal_dir)[0]

    def purge_all(self) -> int:
        """Delete every segment, as after a clean shutdown whose data is stored elsewhere.

        The sequence is not reset: a fresh, empty segment named by the next sequence
        is created (and synced) before the old files go, so a reopen continues there.
        """
        with self._files_lock:
            if self._active is None or self._active_entries:
                self._rotate(self._written_next)
            return self._delete(purge.inactive(self.segments(), self.current_file()))

    def purge_inactive(self) -> int:
        """Delete every segment except the active one."""
        with self._files_lock:
            return self._delete(purge.inactive(self.segments(), self.current_file()))

    def purge_older_than(self, min_age_s: float) -> int:
        """Delete inactive segments whose modification time is older than min_age_s."""
        cutoff = time.time() - min_age_s
        with self._files_lock:
            return self._delete(
                purge.older_than(self.segments(), self.current_file(), cutoff, files.mtime_or_inf)
            )

    def purge_before(self, seq: int) -> int:
        """Delete inactive segments all of whose entries are below seq (retention)."""
        with self._files_lock:
            return self._delete(purge.before(self.segments(), seq, self.current_file()))

    def _delete(self, segments: Iterable[Segment]) -> int:
        return files.unlink_synced(self.wal_dir, (s.path for s in segments))


# How many buffers one writev call may take (POSIX guarantees at least 16; Linux 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
# With fewer entries than this per chunk on average (appends of an entry or a few),
# a group is joined and written at once; whole batches go out with writev.
_WRITEV_FROM_ENTRIES_PER_CHUNK = 8


def _after(chunks: list, written: int) -> list:
    """What is left of chunks once their first `written` bytes are out (a short write)."""
    for index, chunk in enumerate(chunks):
        size = len(chunk)
        if written < size:
            return [memoryview(chunk)[written:], *chunks[index + 1 :]]
        written -= size
    return []


def _frame_payloads(payloads: Sequence[bytes]):
    """Build the on-disk bytes of many payloads in one piece, before taking any lock.

    Returns the arguments of Writer._append_frames: chunks, count, hook_entries.
    Every size is checked first, so a batch with one oversized payload adds nothing.
    """
    fast = _frame_fast
    if fast is not None:
        timestamp = time.time_ns() // 1000
        data = fast(payloads, timestamp, fmt.PayloadTooLarge)
    else:
        sizes = [_nbytes(payload) for payload in payloads]
        for size in sizes:
            if size > _MAX:
                raise fmt.PayloadTooLarge(size)
        timestamp = time.time_ns() // 1000
        parts = []
        add = parts.append
        for payload, size in zip(payloads, sizes, strict=True):
            add(_pack_header(size, timestamp, _crc32(payload)))
            add(payload)
        data = b"".join(parts)

    def hook_entries(first: int) -> list[ReplicationEntry]:
        return [ReplicationEntry(first + i, timestamp, bytes(p)) for i, p in enumerate(payloads)]

    return [data], len(payloads), hook_entries


def _nbytes(payload) -> int:
    """The size in bytes: len() of a memoryview counts items, which may be wider."""
    return len(payload) if type(payload) is bytes else memoryview(payload).nbytes


def _retry_pause(remaining: float | None) -> float:
    return WRITE_RETRY_INTERVAL_S if remaining is None else min(remaining, WRITE_RETRY_INTERVAL_S)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _fdatasync(fd: int) -> None:
    os.fdatasync(fd)
