"""Replaying WAL files into a callback: the seed's Recovery, in Python idiom.

Recovery reads every WAL file in a directory (seed-named and sequenced), hands
row records to one callback and columnar entries to another, and counts what it
did. Unlike the seed it deletes nothing unless asked (``delete_replayed=True``):
a leader's files are what readers catch up from.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import format as fmt
from .lockfile import lock_dir
from .reader import WALReader, list_segments

log = logging.getLogger("walrep.node.recovery")

RecoveryCallback = Callable[[list[dict[str, Any]]], None]
ColumnarCallback = Callable[[str, str, dict[str, list[Any]]], None]
LEGACY_RECOVERED_SUFFIX = ".recovered"


@dataclass
class RecoveryOptions:
    skip_active_file: str | None = None  # a file being written: not replayed
    batch_size: int = 0  # most records per callback call; 0 = a whole entry at once
    columnar_callback: ColumnarCallback | None = None
    min_file_age_s: float = 0.0  # skip files modified more recently than this
    delete_replayed: bool = False  # delete each file once replayed without error


@dataclass
class RecoveryStats:
    recovered_files: int = 0
    recovered_batches: int = 0
    recovered_entries: int = 0  # records (rows) handed to the callbacks
    corrupted_entries: int = 0
    skipped_files: int = 0
    recovery_duration_s: float = 0.0
    problems: list[fmt.Problem] = field(default_factory=list)


class Recovery:
    def __init__(self, wal_dir: str):
        self.wal_dir = wal_dir

    def list_wal_files(self) -> tuple[list[str], list[str]]:
        """(WAL files to replay, in order; legacy ``.recovered`` files)."""
        sequenced, unsequenced = list_segments(self.wal_dir)
        active = unsequenced + [s.path for s in sequenced]
        try:
            names = sorted(os.listdir(self.wal_dir))
        except FileNotFoundError:
            names = []
        recovered = [
            os.path.join(self.wal_dir, n) for n in names if n.endswith(LEGACY_RECOVERED_SUFFIX)
        ]
        return active, recovered

    def cleanup_old_wals(self, max_age_s: float) -> tuple[int, int]:
        """Delete legacy ``.recovered`` files older than max_age_s: (count, bytes freed)."""
        cutoff = time.time() - max_age_s
        count = freed = 0
        for path in self.list_wal_files()[1]:
            st = os.stat(path)
            if st.st_mtime < cutoff:
                os.unlink(path)
                count += 1
                freed += st.st_size
        return count, freed

    def recover(
        self, callback: RecoveryCallback, options: RecoveryOptions | None = None
    ) -> RecoveryStats:
        """Replay every WAL file; see RecoveryOptions. Callback errors propagate."""
        options = options or RecoveryOptions()
        stats = RecoveryStats()
        started = time.monotonic()
        files, _legacy = self.list_wal_files()
        now = time.time()
        skip = os.path.abspath(options.skip_active_file) if options.skip_active_file else None
        # Deleting files writes the directory: not while a Writer holds it (WALLocked).
        lock = (
            lock_dir(self.wal_dir)
            if options.delete_replayed and os.path.isdir(self.wal_dir)
            else None
        )
        try:
            self._replay_all(files, skip, now, callback, options, stats)
        finally:
            if lock is not None:
                lock.release()
        stats.recovery_duration_s = time.monotonic() - started
        return stats

    def _replay_all(self, files, skip, now, callback, options, stats) -> None:
        for path in files:
            if skip is not None and os.path.abspath(path) == skip:
                stats.skipped_files += 1
                continue
            if options.min_file_age_s and now - os.stat(path).st_mtime < options.min_file_age_s:
                stats.skipped_files += 1
                continue
            self._replay_file(path, callback, options, stats)
            stats.recovered_files += 1
            if options.delete_replayed:
                os.unlink(path)

    def _replay_file(self, path, callback, options, stats) -> None:
        reader = WALReader(path, on_problem=stats.problems.append)
        for entry in reader.all_entries():
            kind = entry.kind
            if kind == "records":
                records = entry.records
                step = options.batch_size or len(records) or 1
                for start in range(0, len(records), step):
                    callback(records[start : start + step])
                    stats.recovered_batches += 1
                stats.recovered_entries += len(records)
            elif kind == "columnar":
                columnar = entry.columnar
                if options.columnar_callback is not None:
                    options.columnar_callback(
                        columnar.database, columnar.measurement, columnar.columns
                    )
                    stats.recovered_batches += 1
                stats.recovered_entries += columnar.row_count
            else:
                log.warning(
                    "entry %s in %s is neither records nor columnar; skipped", entry.seq, path
                )
        stats.corrupted_entries += reader.corrupted_entries
