"""ARCW v1: the seed system's WAL file format, byte for byte. Pure encode/decode; no I/O.

A WAL file (a *segment*) is a 7-byte file header followed by entries::

    file header : b"ARCW" | u16 version (1) | u8 checksum type (1 = CRC-32 IEEE)
    entry       : u32 payload length | u64 timestamp (µs since epoch) | u32 CRC-32 of payload
                  | payload

All integers are big-endian; the entry header is 16 bytes. A payload is at most
100 MiB. It is msgpack, optionally wrapped in a database envelope::

    envelope    : 0x01 | u16 name length | name (UTF-8) | msgpack

0x01 can never start a msgpack map or array (those start at 0x80 and above), so the
marker is unambiguous.

walrep names segments by the sequence of their first entry
(``arc-00000000000000000001.wal``, 20 decimal digits, so names sort like numbers);
entry *i* of a segment has sequence ``base + i``. The seed names its files by time
(``arc-20261125_074806.093906951.wal``): those read fine but carry no sequence.

Damage has one description, Problem (kind, file, offset, sequence), which the
reader reports, and one exception per kind, which Problem.error() builds for the
callers that must refuse damage instead.

This module must never open a file: the writer, repair, reader, recovery and files
modules do that.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = b"ARCW"
VERSION = 1
CHECKSUM_CRC32 = 0x01
FILE_HEADER = MAGIC + struct.pack(">HB", VERSION, CHECKSUM_CRC32)
FILE_HEADER_BYTES = len(FILE_HEADER)  # 7
ENTRY_HEADER = struct.Struct(">IQI")
ENTRY_HEADER_BYTES = ENTRY_HEADER.size  # 16
# The seed's limit: it keeps length arithmetic far from overflow and matches the
# replication protocol's own message limit.
MAX_PAYLOAD_BYTES = 100 * 1024 * 1024
ENVELOPE_MARKER = 0x01
# The envelope stores the name length in a u16, but the seed's writer crashes above
# 255 bytes; we refuse there so every file we write is one the seed can read.
MAX_DATABASE_NAME_BYTES = 255

SEGMENT_PREFIX = "arc-"
SEGMENT_SUFFIX = ".wal"
SEQUENCE_DIGITS = 20
_SEQUENCED_NAME = re.compile(r"^arc-([0-9]{20})\.wal\Z")  # ASCII digits; no trailing newline

crc32 = zlib.crc32


class WALError(Exception):
    """Base of the errors this package raises."""


class PayloadTooLarge(WALError, ValueError):
    """A payload exceeds MAX_PAYLOAD_BYTES. Nothing was written and no sequence was used."""

    def __init__(self, size: int):
        super().__init__(
            f"WAL payload of {size} bytes exceeds the maximum of {MAX_PAYLOAD_BYTES} bytes"
        )
        self.size = size


class InvalidDatabaseName(WALError, ValueError):
    """A database name that the envelope cannot carry (too long, or not text)."""


def encode_entry(timestamp_us: int, payload: bytes) -> bytes:
    """One entry as it sits on disk: header and payload."""
    return ENTRY_HEADER.pack(len(payload), timestamp_us, crc32(payload)) + payload


def check_payload_size(size: int) -> None:
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(size)


def encode_envelope(database: str, msgpack_payload: bytes) -> bytes:
    """Wrap msgpack bytes with the database name, as the seed's AppendRawWithMeta does."""
    if not isinstance(database, str):
        raise InvalidDatabaseName(f"database name must be str, not {type(database).__name__}")
    try:
        name = database.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDatabaseName(f"database name is not valid UTF-8 text: {exc}") from None
    if len(name) > MAX_DATABASE_NAME_BYTES:
        raise InvalidDatabaseName(
            f"database name is {len(name)} bytes; "
            f"at most {MAX_DATABASE_NAME_BYTES} fit the envelope"
        )
    return bytes((ENVELOPE_MARKER,)) + struct.pack(">H", len(name)) + name + msgpack_payload


def parse_envelope(payload: bytes, default_database: str | None = None) -> tuple[str | None, bytes]:
    """(database, msgpack bytes) of a payload; (default_database, payload) if not enveloped.

    Like the seed's ParseEnvelope, a payload that starts with the marker but is too
    short for the name it declares is returned unchanged.
    """
    if len(payload) >= 3 and payload[0] == ENVELOPE_MARKER:
        name_len = (payload[1] << 8) | payload[2]
        end = 3 + name_len
        if len(payload) >= end:
            try:
                name = bytes(payload[3:end]).decode("utf-8")
            except UnicodeDecodeError:
                return default_database, payload
            return name, payload[end:]
    return default_database, payload


# --- payload decoding -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnarEntry:
    """A columnar payload: {"m": measurement, "columns": {name: [values...]}}."""

    database: str
    measurement: str
    columns: dict[str, list[Any]]

    @property
    def row_count(self) -> int:
        return max((len(values) for values in self.columns.values()), default=0)


@dataclass(frozen=True, slots=True)
class DecodedPayload:
    """What the seed's reader makes of a payload.

    kind is "records" (a msgpack array of maps), "columnar" or "raw" (valid CRC, but
    neither shape: the bytes are still the entry, they just carry no rows we know).
    """

    kind: str
    database: str | None
    records: list[dict[str, Any]] | None = None
    columnar: ColumnarEntry | None = None


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_payload(payload: bytes) -> DecodedPayload:
    """Decode like the seed's reader: row records first, then columnar, else raw."""
    database, body = parse_envelope(payload)
    try:
        value = _unpack(body)
    except Exception:  # msgpack raises several unrelated types for bad input
        return DecodedPayload("raw", database)
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return DecodedPayload("records", database, records=value)
    if (
        isinstance(value, dict)
        and isinstance(value.get("m"), str)
        and isinstance(value.get("columns"), dict)
        and all(isinstance(col, list) for col in value["columns"].values())
    ):
        columnar = ColumnarEntry(database or "", value["m"], value["columns"])
        return DecodedPayload("columnar", database, columnar=columnar)
    return DecodedPayload("raw", database)


def encode_records(records: list[dict[str, Any]]) -> bytes:
    """Row-format payload (what the seed's Append writes): a msgpack array of maps."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TypeError("records must be a list of dicts")
    return msgpack.packb(records, use_bin_type=True)


# --- segment names ----------------------------------------------------------------


def segment_name(first_sequence: int) -> str:
    if first_sequence < 1:
        raise ValueError(f"sequences start at 1, got {first_sequence}")
    return f"{SEGMENT_PREFIX}{first_sequence:0{SEQUENCE_DIGITS}d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first sequence a segment name carries, or None (seed-style or foreign name)."""
    match = _SEQUENCED_NAME.match(name)
    if match is None:
        return None
    sequence = int(match.group(1))
    return sequence if sequence >= 1 else None


def is_wal_file_name(name: str) -> bool:
    return name.endswith(SEGMENT_SUFFIX) and not name.startswith(".")


# --- damage: where it is (Problem) and as exceptions (WALDamage) ---------------


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in a WAL file (or a run of frames), with where it is.

    kind is one of:

    - "torn-tail": the newest segment ends inside an entry (a partial header or
      payload, a zero-filled end, or a last entry failing its CRC), as a crash leaves
      it; the writer cuts it on open. For a run of frames: the run ends inside one.
    - "truncated": the same in a sealed segment, where no crash can explain it.
    - "crc-mismatch": a complete entry whose payload does not match its CRC.
    - "bad-length": a length no entry can have; the rest of the file is lost.
    - "bad-header": the file header is not ARCW v1 with CRC-32.
    - "unplaceable": entries after a CRC mismatch whose sequences are uncertain (the
      damaged entry's length may be wrong too), withheld.
    - "count-mismatch": a sealed segment holds fewer or more entries than the next
      segment's name says.

    file is None for a run of frames that is not a file (one received from a peer).
    sequence is the sequence the damaged entry would have had (None when the file's
    name carries no sequence).
    """

    kind: str
    file: str | None
    offset: int
    sequence: int | None
    detail: str
    lost_bytes: int = 0

    def __str__(self) -> str:
        where = "a run of frames" if self.file is None else self.file
        seq = "?" if self.sequence is None else str(self.sequence)
        return f"{self.kind} in {where} at offset {self.offset} (sequence {seq}): {self.detail}"

    def error(self) -> WALDamage:
        """The problem as an exception to raise, of the type its kind names."""
        return _DAMAGE_TYPES.get(self.kind, WALDamage)(
            self.file, self.offset, self.sequence, self.detail
        )


# --- damage as exceptions ---------------------------------------------------------


class WALDamage(WALError):
    """Damaged bytes where an operation needs good ones: a fetch, a replicated run, a
    writer's open. path is the file (None for a run of frames received from a peer),
    offset the byte where the damaged entry (or header) starts, seq the entry's
    sequence (None when unknown), detail what is wrong. Built by Problem.error(), the
    one place that turns damage into an exception."""

    kind = "damage"  # the Problem kind it stands for
    what = "damage"  # the same, for the message

    def __init__(self, path: str | None, offset: int, seq: int | None, detail: str):
        where = "a run of frames" if path is None else path
        seq_text = "?" if seq is None else str(seq)
        super().__init__(
            f"{self.what} in {where} at offset {offset} (sequence {seq_text}): {detail}"
        )
        self.path = path
        self.offset = offset
        self.seq = seq
        self.detail = detail


class CRCMismatch(WALDamage):
    """A complete entry whose payload does not match its CRC."""

    kind = "crc-mismatch"
    what = "CRC mismatch"


class TornTail(WALDamage):
    """The bytes end inside an entry: a partial header or payload."""

    kind = "torn-tail"
    what = "torn tail"


class BadLength(WALDamage):
    """An entry declares a length no entry can have (over MAX_PAYLOAD_BYTES)."""

    kind = "bad-length"
    what = "impossible length"


class BadHeader(WALDamage):
    """A file header that is not ARCW v1 with CRC-32."""

    kind = "bad-header"
    what = "bad file header"


_DAMAGE_TYPES: dict[str, type[WALDamage]] = {
    t.kind: t for t in (CRCMismatch, TornTail, BadLength, BadHeader)
}


def check_file_header(data: bytes) -> str | None:
    """None if data starts with a valid ARCW v1 header, else what is wrong."""
    if len(data) < FILE_HEADER_BYTES:
        return f"file is {len(data)} bytes, shorter than the {FILE_HEADER_BYTES}-byte header"
    if data[:4] != MAGIC:
        return f"magic is {bytes(data[:4])!r}, not {MAGIC!r}"
    version, checksum = struct.unpack_from(">HB", data, 4)
    if version != VERSION:
        return f"format version {version} is not supported (only {VERSION})"
    if checksum != CHECKSUM_CRC32:
        return f"checksum type {checksum} is not supported (only CRC-32)"
    return None


def is_all_zero(data, start: int) -> bool:
    view = memoryview(data)[start:]
    return not any(view) if len(view) < 4096 else view.tobytes().count(0) == len(view)


# --- walking a run of frames -------------------------------------------------------

# What walk_frames() says of each frame it reaches. The first three are whole frames
# and the walk goes on after them; the last three end the walk, since nothing after
# them can be located.
FRAME = 0  # whole; its CRC was not checked
GOOD = 1  # whole, and its payload matches its CRC
CRC_MISMATCH = 2  # whole, and its payload does not match its CRC
PARTIAL_HEADER = 3  # fewer than ENTRY_HEADER_BYTES bytes left
BAD_LENGTH = 4  # a length over max_length
PAST_END = 5  # the payload runs past the end of the data
# A length that max_length never refuses: for the walks by length alone, which (as
# their C twins) step over whatever a length says.
ANY_LENGTH = 0xFFFFFFFF

_unpack_header = ENTRY_HEADER.unpack_from
_HEADER = ENTRY_HEADER_BYTES

Frame = tuple[int, int, int | None, int | None, Any]


def walk_frames(
    data,
    pos: int = 0,
    *,
    limit: int | None = None,
    until: int | None = None,
    verify_from: int | None = None,
    max_length: int = MAX_PAYLOAD_BYTES,
) -> Iterator[Frame]:
    """Step through the entries (frames) of data from byte pos: the one Python walk of
    the frame layout, under the reader's scan and fetches, the checks of a replicated
    run, and batch splitting. node/_scan.c is its C twin, called first wherever it
    was built; this walk then goes on from where the C code stopped.

    Yields ``(status, pos, end, timestamp, payload)`` for each frame reached: its
    offset, the offset just past it (None after a partial header), its header's
    timestamp, and, for a frame whose CRC was checked, its payload (``data[pos + 16 :
    end]``, which the check needed anyway). Frames from number ``verify_from`` on
    (counting from 0 at pos) are checked: GOOD or CRC_MISMATCH; the others, and every
    frame when verify_from is None, are FRAME.

    The walk ends at the end of data; before a frame that starts at or past ``until``;
    after ``limit`` frames; or with the frame it cannot step over (PARTIAL_HEADER,
    BAD_LENGTH, PAST_END), which it yields last. What a status means (damage, a torn
    tail, bytes not yet read) is the caller's to judge.
    """
    size = len(data)
    stop = size if until is None else min(size, until)
    unpack = _unpack_header
    check = crc32
    # Frames to pass before checking CRCs: more than data can hold means never.
    unchecked = size if verify_from is None else verify_from
    for _ in range(size if limit is None else limit):
        if pos >= stop:
            return
        if size - pos < _HEADER:
            yield PARTIAL_HEADER, pos, None, None, None
            return
        length, timestamp, crc = unpack(data, pos)
        end = pos + _HEADER + length
        if length > max_length:
            yield BAD_LENGTH, pos, end, timestamp, None
            return
        if end > size:
            yield PAST_END, pos, end, timestamp, None
            return
        if unchecked:
            unchecked -= 1
            yield FRAME, pos, end, timestamp, None
        else:
            payload = data[pos + _HEADER : end]
            yield GOOD if check(payload) == crc else CRC_MISMATCH, pos, end, timestamp, payload
        pos = end


def frame_detail(status: int, data, pos: int, end: int | None) -> str:
    """What walk_frames() found wrong with the frame at pos, in words."""
    if status == PARTIAL_HEADER:
        return "partial entry header"
    length = end - pos - _HEADER
    if status == BAD_LENGTH:
        return f"entry declares {length} bytes, more than the {MAX_PAYLOAD_BYTES}-byte maximum"
    if status == PAST_END:
        return f"entry of {length} bytes, only {len(data) - pos - _HEADER} present"
    if status == CRC_MISMATCH:
        stored = _unpack_header(data, pos)[2]
        actual = crc32(memoryview(data)[pos + _HEADER : end])
        return f"stored CRC {stored:08x}, payload of {length} bytes has {actual:08x}"
    raise ValueError(f"walk status {status} is not damage")


# The Problem kind of each damaged frame in a run of frames: a run that ends inside an
# entry was cut short, whatever cut it.
_RUN_DAMAGE_KINDS = {
    PARTIAL_HEADER: "torn-tail",
    PAST_END: "torn-tail",
    BAD_LENGTH: "bad-length",
    CRC_MISMATCH: "crc-mismatch",
}


def frame_problem(
    status: int,
    data,
    pos: int,
    end: int | None,
    *,
    file: str | None,
    seq: int | None,
    offset: int = 0,
) -> Problem:
    """The Problem of a damaged frame that walk_frames() found at pos in a run of frames
    starting at byte offset of file (None: a run that is not in a file)."""
    detail = frame_detail(status, data, pos, end)
    return Problem(_RUN_DAMAGE_KINDS[status], file, offset + pos, seq, detail)


# The C walks of frames_offset() and split_frames() (node/_scan.c), when it was built.
# As in node.reader, WALREP_PURE_PYTHON=1 (read at import) or setting these to None
# forces pure Python.
_frames_offset_fast = _split_points_fast = None
if os.environ.get("WALREP_PURE_PYTHON", "") in ("", "0"):
    try:
        from ._scan import frames_offset as _frames_offset_fast
        from ._scan import split_points as _split_points_fast
    except ImportError:  # not built, or built from an older _scan.c
        pass


def frames_offset(data: bytes, skip: int) -> int:
    """Byte offset of frame number ``skip`` in a run of frames (for trimming overlaps,
    and to check that a run holds exactly its count). Reads lengths only."""
    if _frames_offset_fast is not None:
        pos = _frames_offset_fast(data, skip)
    else:
        pos = _frames_offset(data, skip)
    if pos < 0:
        raise WALError(f"run of frames ends before frame {skip}")
    return pos


def _frames_offset(data, skip: int) -> int:
    """The pure-Python frames_offset of node/_scan.c: -1 when the run ends before it."""
    pos = taken = 0
    for status, _pos, end, _timestamp, _payload in walk_frames(
        data, limit=max(skip, 0), max_length=ANY_LENGTH
    ):
        if status != FRAME:
            return -1
        pos = end
        taken += 1
    return pos if taken == max(skip, 0) else -1


def split_frames(data: bytes, first_seq: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
    """Cut a run of frames into pieces of about max_bytes: [(first_seq, count, bytes)].

    ValueError if the run ends inside an entry (it comes from a commit, so that is a bug).
    """
    if _split_points_fast is not None:
        points = _split_points_fast(data, max_bytes)
    else:
        points = _split_points(data, max_bytes)
    pieces = []
    start = 0
    seq = first_seq
    for count, end in points:
        pieces.append((seq, count, data[start:end]))  # the whole run is not copied
        seq += count
        start = end
    return pieces


def _split_points(data: bytes, max_bytes: int) -> list[tuple[int, int]]:
    """The pure-Python split_points of node/_scan.c: [(count, end), ...]."""
    points = []
    start = count = 0
    size = len(data)
    for status, pos, end, _timestamp, _payload in walk_frames(data, max_length=ANY_LENGTH):
        if status != FRAME:
            entry = sum(n for n, _end in points) + count
            raise ValueError(f"run of frames ends inside entry {entry} (at byte {pos} of {size})")
        count += 1
        if end - start >= max_bytes or end == size:
            points.append((count, end))
            start, count = end, 0
    return points
