"""walrep's node: one node's WAL on its own disk (ARCW v1 segments named by sequence).

No networking here; see cluster/ for replication.
"""

from .format import (
    MAX_DATABASE_NAME_BYTES,
    MAX_PAYLOAD_BYTES,
    BadHeader,
    BadLength,
    ColumnarEntry,
    CRCMismatch,
    InvalidDatabaseName,
    PayloadTooLarge,
    Problem,
    TornTail,
    WALDamage,
    WALError,
    parse_envelope,
    segment_name,
)
from .lockfile import LOCK_FILE_NAME, WALLocked, lock_dir
from .meta import load_meta, new_log_id, save_meta, update_meta
from .reader import Entry, RangeNotAvailable, RawEntry, WALReader
from .recovery import Recovery, RecoveryOptions, RecoveryStats
from .writer import (
    CommittedRun,
    DurabilityTimeout,
    OutOfOrder,
    ReplicationEntry,
    SyncMode,
    WALClosed,
    WALDropped,
    WALFailed,
    Writer,
    WriterStats,
)

__all__ = [
    "LOCK_FILE_NAME",
    "MAX_DATABASE_NAME_BYTES",
    "MAX_PAYLOAD_BYTES",
    "BadHeader",
    "BadLength",
    "CRCMismatch",
    "ColumnarEntry",
    "CommittedRun",
    "DurabilityTimeout",
    "Entry",
    "InvalidDatabaseName",
    "OutOfOrder",
    "PayloadTooLarge",
    "Problem",
    "RangeNotAvailable",
    "RawEntry",
    "Recovery",
    "RecoveryOptions",
    "RecoveryStats",
    "ReplicationEntry",
    "SyncMode",
    "TornTail",
    "WALClosed",
    "WALDamage",
    "WALDropped",
    "WALError",
    "WALFailed",
    "WALLocked",
    "lock_dir",
    "WALReader",
    "Writer",
    "WriterStats",
    "load_meta",
    "new_log_id",
    "parse_envelope",
    "save_meta",
    "segment_name",
    "update_meta",
]
