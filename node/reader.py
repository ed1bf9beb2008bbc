"""Reading WAL segments: entries by sequence, raw frames for replication, range digests.

The reader never repairs anything (node.repair cuts torn tails when a writer
opens) and never returns damaged bytes as data: a CRC mismatch is reported with
file, offset and sequence and the entry is skipped; a length that cannot be right
ends the file, the rest reported lost. Where damage must be refused instead (a
fetch, a run from a peer) it is raised as the format's named exception. It may
read a segment the writer is appending to, so callers that must not see
half-written entries pass ``to_seq`` (the writer's committed sequence) and the
scan stops there before looking further.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn

from . import format as fmt

log = logging.getLogger("walrep.node.reader")

_HEADER = fmt.ENTRY_HEADER_BYTES
_crc32 = fmt.crc32
SCAN_SLICE_ENTRIES = 8192
# How much of a segment a seek by sequence reads at a time, walking the lengths.
SEEK_CHUNK_BYTES = 64 * 1024

# The C fast path of scan() and decode_frames() (node/_scan.c), when it was built:
# it passes good entries and stops before anything the Python code must judge.
# WALREP_PURE_PYTHON=1 (read at import) or setting this to None forces pure Python.
_scan_fast: Callable[..., tuple[int, int | None, int, int]] | None = None
if os.environ.get("WALREP_PURE_PYTHON", "") in ("", "0"):
    try:
        from ._scan import scan_entries as _scan_fast
    except ImportError:
        pass


# An entry as stored: (sequence, timestamp in µs, payload). A plain tuple because
# scans build millions of them and a named tuple costs twice as much to make;
# sequence is None for a file whose name carries none.
RawEntry = tuple[int | None, int, bytes]


@dataclass(frozen=True)
class Entry:
    """A decoded entry: the seed's Entry plus its sequence and database."""

    seq: int | None
    timestamp_us: int
    payload: bytes

    @cached_property
    def _decoded(self) -> fmt.DecodedPayload:
        return fmt.decode_payload(self.payload)

    @property
    def kind(self) -> str:
        return self._decoded.kind

    @property
    def database(self) -> str | None:
        return self._decoded.database

    @property
    def records(self) -> list[dict[str, Any]] | None:
        return self._decoded.records

    @property
    def columnar(self) -> fmt.ColumnarEntry | None:
        return self._decoded.columnar

    @property
    def crc32(self) -> int:
        return _crc32(self.payload)


@dataclass(frozen=True, slots=True)
class Segment:
    path: str
    first_seq: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True, slots=True)
class ScanEnd:
    """Where a scan of one buffer stopped and why."""

    valid_end: int  # offset just past the last complete entry (good CRC or not)
    next_seq: int | None  # sequence the next entry would have
    entries: int  # entries passed, including ones with a bad CRC
    problem: fmt.Problem | None  # torn tail or bad length that ended the scan


class RangeNotAvailable(fmt.WALError, LookupError):
    """The requested sequence is not in this log (purged, or never written)."""

    def __init__(self, sequence: int, first: int | None, last: int | None):
        held = "nothing" if first is None else f"{first}..{last}"
        super().__init__(f"sequence {sequence} is not in this log (it holds {held})")
        self.sequence = sequence
        self.first = first
        self.last = last


def list_segments(directory: str) -> tuple[list[Segment], list[str]]:
    """Sequenced segments sorted by first sequence, and WAL files without a sequence."""
    sequenced: list[Segment] = []
    unsequenced: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return [], []
    for name in names:
        if not fmt.is_wal_file_name(name):
            continue
        seq = fmt.parse_segment_name(name)
        path = os.path.join(directory, name)
        if seq is None:
            unsequenced.append(path)
        else:
            sequenced.append(Segment(path, seq))
    sequenced.sort(key=lambda s: s.first_seq)
    unsequenced.sort()
    return sequenced, unsequenced


def scan(
    data: bytes,
    file: str,
    first_seq: int | None,
    *,
    start_seq: int | None = None,
    stop_seq: int | None = None,
    is_tail: bool = True,
    out: list[RawEntry] | None = None,
    on_problem: Callable[[fmt.Problem], None] | None = None,
    resume: ScanEnd | None = None,
    file_size: int | None = None,
) -> ScanEnd:
    """Walk the entries of one segment's bytes, appending each good one to ``out``.

    Entries before ``start_seq`` are skipped without a CRC check (only their
    lengths are read); scanning stops after ``stop_seq``. ``is_tail`` says whether
    an incomplete last entry is a torn write (the newest segment) or damage.
    ``resume`` continues a scan that an earlier call ended at its stop_seq.
    ``file_size`` is the file's length when ``data`` holds only its start (the rest
    being zeros): a problem then counts the bytes lost to the end of the file.
    """
    if resume is None:
        pos, seq, entries = fmt.FILE_HEADER_BYTES, first_seq, 0
    else:
        pos, seq, entries = resume.valid_end, resume.next_seq, resume.entries
    size = len(data)
    file_end = size if file_size is None else file_size
    skip_before = start_seq if (start_seq is not None and first_seq is not None) else 0
    add = out.append if out is not None else None
    fast = _scan_fast
    if fast is not None and not (
        type(data) is bytes
        and (out is None or type(out) is list)
        and all(v is None or type(v) is int for v in (first_seq, skip_before, stop_seq))
    ):
        fast = None  # what the C code does not take: the Python code does it all
    while pos < size:
        if fast is not None:
            # Good entries in C; whatever stopped it is judged below, one entry at a time.
            pos, seq, passed, _status = fast(data, pos, seq, skip_before, stop_seq, out)
            entries += passed
            if pos >= size:
                break
        # Entries before skip_before are passed by length, without a CRC check, and
        # none after stop_seq is looked at.
        unchecked = skip_before - seq if skip_before and seq < skip_before else 0
        limit = None if stop_seq is None or seq is None else max(0, stop_seq - seq + 1)
        for status, at, end, timestamp, payload in fmt.walk_frames(
            data, pos, limit=limit, verify_from=unchecked
        ):
            if status >= fmt.PARTIAL_HEADER:
                # Nothing after this frame can be located: the scan of this file ends.
                what = fmt.frame_detail(status, data, at, end)
                if status == fmt.BAD_LENGTH:
                    problem = fmt.Problem(
                        "bad-length",
                        file,
                        at,
                        seq,
                        f"{what}; the remaining {file_end - at} bytes of the file are lost",
                        file_end - at,
                    )
                else:
                    problem = _tail_problem(file_end, at, file, seq, is_tail, what)
                return _end(at, seq, entries, problem, on_problem)
            if end == at + _HEADER and timestamp == 0 and fmt.is_all_zero(data, at):
                # A zeroed header is a file extended by a crash, not an empty entry.
                problem = _tail_problem(file_end, at, file, seq, is_tail, "zero-filled tail")
                return _end(at, seq, entries, problem, on_problem)
            if status == fmt.GOOD:
                if add is not None:
                    add((seq, timestamp, payload))
            elif status == fmt.CRC_MISMATCH:
                if is_tail and (end == size or fmt.is_all_zero(data, end)):
                    # The last entry of the newest file (only zeros after it, as a crash
                    # that extended the file leaves it): a write the crash interrupted.
                    problem = fmt.Problem(
                        "torn-tail", file, at, seq, "last entry fails its CRC", file_end - at
                    )
                    return _end(at, seq, entries, problem, on_problem)
                if on_problem is not None:
                    detail = fmt.frame_detail(status, data, at, end)
                    on_problem(fmt.Problem("crc-mismatch", file, at, seq, detail))
            pos = end
            entries += 1
            if seq is not None:
                seq += 1
            if fast is not None:
                break  # back to the C code for the good entries after this one
        else:
            break  # the walk ended: at the end of data, or after stop_seq
    return ScanEnd(pos, seq, entries, None)


def _tail_problem(file_end, pos, file, seq, is_tail, what) -> fmt.Problem:
    lost = file_end - pos
    if is_tail:
        return fmt.Problem(
            "torn-tail", file, pos, seq, f"{what}; the last {lost} bytes are incomplete", lost
        )
    return fmt.Problem(
        "truncated", file, pos, seq, f"{what} in a sealed segment; {lost} bytes lost", lost
    )


def _end(pos, seq, entries, problem, on_problem) -> ScanEnd:
    if on_problem is not None:
        on_problem(problem)
    return ScanEnd(pos, seq, entries, problem)


def read_file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class WALReader:
    """Reads a WAL directory (or one file) by sequence.

    Metrics as in the seed: total_entries, total_bytes (payload bytes returned) and
    corrupted_entries; ``problems`` keeps every problem found, with its place.
    """

    def __init__(
        self,
        path: str,
        *,
        on_problem: Callable[[fmt.Problem], None] | None = None,
    ):
        self.path = path
        self.total_entries = 0
        self.total_bytes = 0
        self.corrupted_entries = 0
        self.problems: list[fmt.Problem] = []
        self._on_problem = on_problem
        self._cursor: tuple[Segment, int, int] | None = None  # read_frames' position

    def _report(self, problem: fmt.Problem) -> None:
        self.problems.append(problem)
        self.corrupted_entries += 1
        if self._on_problem is not None:
            self._on_problem(problem)
        else:
            log.warning("WAL problem: %s", problem)

    # --- which files -------------------------------------------------------------

    def segments(self) -> list[Segment]:
        if os.path.isfile(self.path):
            seq = fmt.parse_segment_name(os.path.basename(self.path))
            return [Segment(self.path, seq)] if seq is not None else []
        return list_segments(self.path)[0]

    def files(self) -> list[tuple[str, int | None]]:
        """Every WAL file to read, in order: seed-named files first, then by sequence."""
        if os.path.isfile(self.path):
            return [(self.path, fmt.parse_segment_name(os.path.basename(self.path)))]
        sequenced, unsequenced = list_segments(self.path)
        return [(p, None) for p in unsequenced] + [(s.path, s.first_seq) for s in sequenced]

    # --- entries -----------------------------------------------------------------

    def raw_entries(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[RawEntry]:
        """Good entries with sequence in [from_seq, to_seq], found by segment name.

        Files without a sequence in their name are not part of a sequenced read.
        """
        segments = self.segments()
        start = _segment_index(segments, from_seq)
        for index in range(start, len(segments)):
            segment = segments[index]
            if to_seq is not None and segment.first_seq > to_seq:
                return
            is_tail = index == len(segments) - 1
            next_first = None if is_tail else segments[index + 1].first_seq
            yield from self._read_one(
                segment.path, segment.first_seq, is_tail, from_seq, to_seq, next_first
            )

    def all_raw_entries(self) -> Iterator[RawEntry]:
        """Every good entry of every WAL file, seed-named ones included."""
        files = self.files()
        for index, (path, first_seq) in enumerate(files):
            is_tail = index == len(files) - 1 or first_seq is None
            yield from self._read_one(path, first_seq, is_tail, None, None)

    def entries(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[Entry]:
        for raw in self.raw_entries(from_seq, to_seq):
            yield Entry(*raw)

    def all_entries(self) -> Iterator[Entry]:
        for raw in self.all_raw_entries():
            yield Entry(*raw)

    def _read_one(
        self, path, first_seq, is_tail, from_seq, to_seq, next_first=None
    ) -> Iterator[RawEntry]:
        try:
            data = read_file_bytes(path)
        except FileNotFoundError:
            return  # purged while we listed it
        header_problem = fmt.check_file_header(data)
        if header_problem is not None:
            if (
                len(data) < fmt.FILE_HEADER_BYTES
                and is_tail
                and data == fmt.FILE_HEADER[: len(data)]
            ):
                return  # a segment the writer is creating: nothing in it yet
            self._report(fmt.Problem("bad-header", path, 0, first_seq, header_problem, len(data)))
            return
        damaged: list[fmt.Problem] = []

        def report(problem: fmt.Problem) -> None:
            if problem.kind == "crc-mismatch":
                damaged.append(problem)
            self._report(problem)

        sequenced = first_seq is not None
        # Scan in slices of SCAN_SLICE_ENTRIES so memory stays bounded and result
        # objects are recycled instead of faulted in fresh for a whole segment.
        held: list[RawEntry] = []  # entries after a damaged one, until placement is known
        end = None
        while True:
            found: list[RawEntry] = []
            stop = to_seq
            if sequenced:
                next_seq = first_seq if end is None else end.next_seq
                slice_end = max(next_seq, from_seq or 0) + SCAN_SLICE_ENTRIES - 1
                stop = slice_end if to_seq is None else min(to_seq, slice_end)
            end = scan(
                data,
                path,
                first_seq,
                start_seq=from_seq if sequenced else None,
                stop_seq=stop if sequenced else None,
                is_tail=is_tail,
                out=found,
                on_problem=report,
                resume=end,
            )
            if damaged:
                first_bad = damaged[0].sequence
                safe = [e for e in found if e[0] < first_bad]
                held.extend(e for e in found if e[0] > first_bad)
                found = safe
            self.total_entries += len(found)
            self.total_bytes += sum(len(e[2]) for e in found)
            yield from found
            finished = end.problem is not None or end.valid_end >= len(data)
            if finished or not sequenced or (to_seq is not None and end.next_seq > to_seq):
                break
        if sequenced:
            held = self._check_placement(path, data, first_seq, next_first, end, damaged, held)
            self.total_entries += len(held)
            self.total_bytes += sum(len(e[2]) for e in held)
            yield from held

    def _check_placement(self, path, data, first_seq, next_first, end, damaged, found):
        """Keep only entries whose sequence is certain.

        ARCW frames carry no sequence and the CRC covers only the payload, so a
        damaged length can swallow the next entry and shift every later one. An
        entry failing its CRC is therefore trusted to have had the right length
        only when the segment's entry count matches the next segment's name;
        otherwise the entries after it are reported and withheld.
        """
        whole_file = end.problem is None and end.valid_end == len(data)
        expected = None if next_first is None else next_first - first_seq
        count_confirmed = whole_file and expected is not None and end.entries == expected
        if damaged and not count_confirmed:
            first_bad = damaged[0]
            withheld = sum(1 for e in found if e[0] > first_bad.sequence)
            self._report(
                fmt.Problem(
                    "unplaceable",
                    path,
                    first_bad.offset,
                    first_bad.sequence,
                    "the entry that failed its CRC may also have a damaged length, so the "
                    f"sequences of the {withheld} entries after it in this file are uncertain; "
                    "they are not returned",
                    len(data) - first_bad.offset,
                )
            )
            return []
        if whole_file and expected is not None and end.entries != expected:
            self._report(
                fmt.Problem(
                    "count-mismatch",
                    path,
                    end.valid_end,
                    first_seq + end.entries,
                    f"the segment holds {end.entries} entries but the next segment starts at "
                    f"{next_first}: sequences {first_seq + end.entries}..{next_first - 1} "
                    "are missing",
                )
            )
        return found

    # --- replication helpers -----------------------------------------------------

    def bounds(self) -> tuple[int | None, int | None]:
        """(first, last) sequence held on disk, by segment names and the newest segment."""
        segments = self.segments()
        if not segments:
            return None, None
        newest = segments[-1]
        data = read_file_bytes(newest.path)
        if fmt.check_file_header(data) is not None:
            end_seq = newest.first_seq
        else:
            end_seq = scan(data, newest.path, newest.first_seq).next_seq
        last = end_seq - 1
        first = segments[0].first_seq
        return (first, last) if last >= first else (None, None)

    def read_frames(
        self, from_seq: int, to_seq: int, *, max_bytes: int = 1 << 20
    ) -> tuple[int, int, bytes]:
        """Consecutive on-disk frames from from_seq: (first_seq, count, bytes).

        Stops at to_seq, at a segment's end, or once max_bytes is reached (at least
        one entry is returned). Frames are verified: a damaged entry raises, so a
        peer is never sent bytes that fail their CRC. Consecutive calls continue
        from a remembered file offset instead of rescanning the segment.
        """
        cursor = self._cursor
        if cursor is None or cursor[1] != from_seq:
            cursor = self._seek(from_seq)
        segment, seq, offset = cursor
        chunk_bytes = max(max_bytes, 64 * 1024)
        try:
            f = open(segment.path, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            # Purged since we found it: look again (RangeNotAvailable if it is gone).
            self._cursor = None
            segment, seq, offset = self._cursor = self._seek(from_seq)
            f = open(segment.path, "rb")  # noqa: SIM115
        with f:
            f.seek(offset)
            data = f.read(chunk_bytes + _HEADER)
            verified = count = 0
            if _scan_fast is not None:
                # The C scan verifies every entry that lies wholly in the first max_bytes,
                # most of a chunk; the code below goes on from where it stopped: an entry
                # that crosses max_bytes, and whatever the scan leaves to Python (a damaged
                # entry, which the check reports by file, offset and sequence).
                window = data if len(data) <= max_bytes else data[:max_bytes]
                verified, seq, count, _status = _scan_fast(window, 0, seq, 0, to_seq, None)
            if count == 0 and seq <= to_seq:
                data = _complete_first_frame(f, data, verified)
        # On from where the C scan stopped (or from the start): up to to_seq, and while
        # an entry starts before max_bytes, but at least one entry.
        pos = verified
        for status, at, end, _timestamp, _payload in fmt.walk_frames(
            data,
            verified,
            limit=max(0, to_seq - seq + 1),
            until=max_bytes if count else max(max_bytes, verified + 1),
            verify_from=0,
        ):
            if status == fmt.CRC_MISMATCH:
                _refuse(status, data, at, end, segment.path, seq, offset)
            if status != fmt.GOOD:
                break  # an incomplete entry (not yet written) or a bad length: never served
            pos = end
            seq += 1
            count += 1
        if count == 0:
            # The segment holds nothing more: the next one must start exactly here.
            following = [s for s in self.segments() if s.first_seq == seq]
            if following and following[0].path != segment.path and seq <= to_seq:
                self._cursor = (following[0], seq, fmt.FILE_HEADER_BYTES)
                return self.read_frames(from_seq, to_seq, max_bytes=max_bytes)
            first, last = self.bounds()
            raise RangeNotAvailable(from_seq, first, last)
        self._cursor = (segment, seq, offset + pos)
        return from_seq, count, data[:pos]

    def _seek(self, seq: int) -> tuple[Segment, int, int]:
        """(segment, seq, byte offset) of seq, walking the entry lengths of its segment
        (read SEEK_CHUNK_BYTES at a time; payloads are not checked)."""
        segments = self.segments()
        index = _segment_index(segments, seq)
        if index >= len(segments) or segments[index].first_seq > seq:
            first = segments[0].first_seq if segments else None
            raise RangeNotAvailable(seq, first, None)
        segment = segments[index]
        current = segment.first_seq
        offset = fmt.FILE_HEADER_BYTES
        try:
            f = open(segment.path, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            raise RangeNotAvailable(seq, None, None) from None  # purged meanwhile
        with f:
            while current < seq:
                f.seek(offset)
                chunk = f.read(SEEK_CHUNK_BYTES)
                base, stepped = offset, False
                for status, _at, end, _timestamp, _payload in fmt.walk_frames(
                    chunk, limit=seq - current, max_length=fmt.ANY_LENGTH
                ):
                    if status == fmt.PARTIAL_HEADER:
                        break  # read on from this header
                    offset, current, stepped = base + end, current + 1, True
                    if status == fmt.PAST_END:
                        break  # the next header is past this chunk
                if not stepped:
                    raise RangeNotAvailable(seq, segments[0].first_seq, current - 1)
        return segment, seq, offset

    def offset_of(self, seq: int) -> tuple[Segment, int] | None:
        """(segment, byte offset) where entry seq starts, by its lengths only; None when
        no segment holds it. One read of the segment: for status, not a hot path."""
        segments = self.segments()
        if not segments or seq < segments[0].first_seq:
            return None
        segment = segments[_segment_index(segments, seq)]
        try:
            data = read_file_bytes(segment.path)
        except FileNotFoundError:
            return None  # purged meanwhile
        try:
            within = fmt.frames_offset(
                memoryview(data)[fmt.FILE_HEADER_BYTES :], seq - segment.first_seq
            )
        except fmt.WALError:
            return None  # past the end of what the segment holds
        return segment, fmt.FILE_HEADER_BYTES + within

    def digest(self, from_seq: int, to_seq: int) -> str:
        """A digest of entries from_seq..to_seq: equal on any node holding the same log."""
        h = hashlib.blake2b(digest_size=16)
        expected = from_seq
        pack = struct.Struct(">Q").pack
        for seq, timestamp, payload in self.raw_entries(from_seq, to_seq):
            if seq != expected:
                # A damaged entry skipped mid-run, or segments purged under this read
                # (the log now starts past expected): say what is held either way.
                first, last = (from_seq, expected - 1) if expected > from_seq else self.bounds()
                raise RangeNotAvailable(expected, first, last)
            h.update(pack(seq))
            h.update(fmt.ENTRY_HEADER.pack(len(payload), timestamp, _crc32(payload)))
            h.update(payload)
            expected += 1
        if expected != to_seq + 1:
            raise RangeNotAvailable(expected, from_seq, expected - 1)
        return h.hexdigest()


def _complete_first_frame(f, data: bytes, pos: int) -> bytes:
    """data with the rest of the frame at pos read from f, where data ends inside it:
    a fetch serves its first entry whatever its size."""
    if len(data) - pos < _HEADER:
        data += f.read(_HEADER)
    for status, _at, end, _timestamp, _payload in fmt.walk_frames(data, pos):
        if status == fmt.PAST_END:
            data += f.read(end - len(data))
        break
    return data


def _segment_index(segments: list[Segment], seq: int) -> int:
    """Index of the segment that holds seq (the last one starting at or before it)."""
    lo, hi = 0, len(segments)
    while lo < hi:
        mid = (lo + hi) // 2
        if segments[mid].first_seq <= seq:
            lo = mid + 1
        else:
            hi = mid
    return max(lo - 1, 0)


def decode_frames(data: bytes, first_seq: int) -> list[RawEntry]:
    """Split and verify a run of frames received from a peer; raise on any damage."""
    out: list[RawEntry] = []
    _check_frames(data, first_seq, out)
    return out


def count_frames(data: bytes, first_seq: int) -> int:
    """decode_frames() without building the entries: the same checks and errors, and
    how many entries the run holds (a reader's append needs no tuple and payload copy
    per entry)."""
    return _check_frames(data, first_seq, None)


def _check_frames(data: bytes, first_seq: int, out: list[RawEntry] | None) -> int:
    """Check every frame of a run received from a peer: raise the first damage found
    (TornTail, BadLength, CRCMismatch); append the entries to out if given."""
    pos = 0
    size = len(data)
    seq = first_seq
    fast = _scan_fast if type(data) is bytes and type(first_seq) is int else None
    while pos < size:
        if fast is not None:
            pos, seq, _passed, _status = fast(data, pos, seq, 0, None, out)
            if pos >= size:
                break
        for status, at, end, timestamp, payload in fmt.walk_frames(data, pos, verify_from=0):
            if status != fmt.GOOD:
                _refuse(status, data, at, end, None, seq, 0)
            if out is not None:
                out.append((seq, timestamp, payload))
            pos = end
            seq += 1
            if fast is not None:
                break  # back to the C code for the good frames after this one
    return len(out) if out is not None else seq - first_seq


def _refuse(status, data, at, end, file, seq, offset) -> NoReturn:
    """Raise the damage a walk found where every frame must be good (a run from a peer,
    frames a fetch would serve): TornTail, BadLength or CRCMismatch, by file, offset
    and sequence. The one place a walk's damage is raised."""
    problem = fmt.frame_problem(status, data, at, end, file=file, seq=seq, offset=offset)
    raise problem.error()
