"""Are two logs the same over a range, where do they first differ, and is either damaged?

A log is a WAL directory or a running node's control endpoint; both answer
"digest of from..to" and "which sequences do you hold". Comparison splits the
range into chunks, compares chunk digests, and descends into the first chunk
that differs, so finding the first differing sequence reads each log about
twice (not log n times) and asks a node O(chunks * log n) questions.

A sequence that one side holds but cannot read (a CRC mismatch, a bad file
header, an impossible length, an entry cut short in a sealed segment) is damage,
not a difference: it is reported with its side, file, offset and sequence,
stepped over, and the search goes on after it. A torn tail (the end of the
newest segment, as a crash or a writer caught mid-append leaves it) is where a
log ends, not damage.

The reader's anti-entropy runs the same search against its leader
(find_divergence), and the history checker the same bisection (cluster.bisection)
on directories. This module reads logs and never repairs or writes them.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Protocol

import trio

from walrep import node
from walrep.node import format as fmt
from walrep.node.reader import scan

from . import bisection, wire, zmqtrio

# Each step of a descent is a round trip to a node: 16 chunks a step keep them few
# (a million entries take five steps), and each log is still read about twice.
CHUNKS = 16
# Ranges at most this long are compared entry by entry (one digest per sequence).
LEAF_ENTRIES = 16
# The largest sequence a message carries (wire._seq): held by no log.
_NO_SEQUENCE = 2**63 - 1
# Damaged places stepped over in one comparison before the rest is left unchecked:
# each costs another descent, and past a few the log needs repair, not a count.
MAX_DAMAGE = 16
# Problem kinds after which the rest of their file cannot be read (node.format.Problem).
_RUNS_TO_FILE_END = frozenset({"bad-header", "bad-length", "truncated", "count-mismatch"})
# Not damage of their own: a torn tail is where a log ends (a crash, or a writer caught
# mid-append), and "unplaceable" repeats a CRC mismatch already reported at the same
# place (the entries after it pass their CRCs and are compared like any other).
_NOT_DAMAGE = frozenset({"torn-tail", "unplaceable"})


class VerifyError(Exception):
    """A log could not be read or asked (exit status 2)."""


@dataclass(frozen=True)
class Damage:
    """A place one side holds but cannot read.

    through is the last sequence it makes unreadable (None: unknown, to the end of
    its file); file and offset are None when the side is a node asked remotely.
    """

    side: str
    kind: str
    sequence: int | None
    file: str | None
    offset: int | None
    detail: str
    through: int | None = None

    def __str__(self) -> str:
        seq = "?" if self.sequence is None else str(self.sequence)
        place = f" in {self.file} at offset {self.offset}" if self.file is not None else ""
        return f"{self.side}: {self.kind}{place} (sequence {seq}): {self.detail}"

    def covers(self, seq: int) -> bool:
        return (self.sequence is None or self.sequence <= seq) and (
            self.through is None or seq <= self.through
        )

    def overlaps(self, lo: int, hi: int) -> bool:
        return (self.sequence is None or self.sequence <= hi) and (
            self.through is None or lo <= self.through
        )


def _damage_from_problem(side: str, problem: node.Problem, starts: list[int]) -> Damage | None:
    """A reader's Problem as Damage, or None (see _NOT_DAMAGE)."""
    if problem.kind in _NOT_DAMAGE or problem.sequence is None:
        return None
    through: int | None = problem.sequence
    if problem.kind in _RUNS_TO_FILE_END:
        later = [s for s in starts if s > problem.sequence]
        through = later[0] - 1 if later else None
    return Damage(
        side,
        problem.kind,
        problem.sequence,
        problem.file,
        problem.offset,
        problem.detail,
        through,
    )


class LogSource(Protocol):
    name: str
    damage: list[Damage]  # what bounds() found (a directory reads everything once)

    async def bounds(self) -> tuple[int | None, int | None]: ...

    async def digest(self, from_seq: int, to_seq: int) -> str | None: ...

    async def explain(self, seq: int) -> Damage | None:
        """digest(seq, seq) was None: the damage there, or None if seq is simply not held."""
        ...


class DirSource:
    """A WAL directory, read in a worker thread."""

    def __init__(self, path: str):
        self.name = path
        self.path = path
        self.damage: list[Damage] = []

    def _reader(self, problems: list[node.Problem]) -> node.WALReader:
        return node.WALReader(self.path, on_problem=problems.append)

    def _run(self, work):
        try:
            return work()
        except OSError as exc:
            raise VerifyError(f"{self.name}: cannot read: {exc}") from None

    async def bounds(self) -> tuple[int | None, int | None]:
        """The first and last sequence held, reading every entry once to find damage.

        Unlike WALReader.bounds (names and the newest segment only), the last is the
        last entry that passes its CRC: damaged entries and a torn tail after it do not
        count as held. Damage before the first good entry moves the first sequence
        back to it, so the damage is inside what is compared and reported.
        """

        def survey():
            problems: list[node.Problem] = []
            reader = self._reader(problems)
            segments = reader.segments()
            starts = [s.first_seq for s in segments]
            first = last = None
            for seq, _timestamp, _payload in reader.raw_entries():
                if first is None:
                    first = seq
                last = seq
            if segments:
                # The last entry that passes its CRC, even one raw_entries withholds
                # because a damaged entry before it makes its place uncertain: the side
                # holds it (the damage is reported), a torn tail after it it does not.
                newest = segments[-1]
                with open(newest.path, "rb") as f:
                    data = f.read()
                good: list = []
                if fmt.check_file_header(data) is None:
                    scan(data, newest.path, newest.first_seq, out=good)
                if good:
                    first = good[0][0] if first is None else first
                    last = good[-1][0]
            for problem in problems:
                self._note(_damage_from_problem(self.name, problem, starts))
            if last is None:
                return None, None
            damaged = [d.sequence for d in self.damage if d.sequence is not None]
            return min([first, *damaged]), last

        return await trio.to_thread.run_sync(self._run, survey)

    def _note(self, damage: Damage | None) -> None:
        key = lambda d: (d.kind, d.file, d.offset)  # noqa: E731
        if damage is not None and all(key(d) != key(damage) for d in self.damage):
            self.damage.append(damage)

    async def digest(self, from_seq: int, to_seq: int) -> str | None:
        def compute():
            try:
                return self._reader([]).digest(from_seq, to_seq)
            except node.RangeNotAvailable:
                return None

        return await trio.to_thread.run_sync(self._run, compute)

    async def explain(self, seq: int) -> Damage | None:
        def find():
            problems: list[node.Problem] = []
            reader = self._reader(problems)
            starts = [s.first_seq for s in reader.segments()]
            if any(s == seq for s, _, _ in reader.raw_entries(seq, seq)):
                return None  # readable now: not damage
            for problem in problems:
                damage = _damage_from_problem(self.name, problem, starts)
                if damage is not None and damage.covers(seq):
                    self._note(damage)
                    return damage
            return None

        return await trio.to_thread.run_sync(self._run, find)


class RemoteSource:
    """A node asked for digests over its control channel; _ask says how a request travels."""

    def __init__(self, name: str):
        self.name = name
        self.damage: list[Damage] = []  # a node says nothing of damage until explain()

    async def _ask(self, from_seq: int, to_seq: int) -> wire.DigestReply:
        raise NotImplementedError

    async def bounds(self) -> tuple[int | None, int | None]:
        # Ask for a sequence no log holds: the reply carries the bounds, and the node
        # reads no entry to make it.
        reply = await self._ask(_NO_SEQUENCE, _NO_SEQUENCE)
        return reply.first_seq, reply.last_seq

    async def digest(self, from_seq: int, to_seq: int) -> str | None:
        return (await self._ask(from_seq, to_seq)).digest

    async def explain(self, seq: int) -> Damage | None:
        reply = await self._ask(seq, seq)
        first, last = reply.first_seq, reply.last_seq
        if reply.digest is not None or first is None or not first <= seq <= last:
            return None  # readable now, or no longer held (purged meanwhile)
        return Damage(
            self.name,
            "unreadable",
            seq,
            None,
            None,
            f"the node holds {first}..{last} but cannot give a digest of this entry: it is "
            "damaged there; run walrep verify on its WAL directory for the file and offset",
            seq,
        )


class EndpointSource(RemoteSource):
    """A running node, asked over its control endpoint."""

    def __init__(self, endpoint: str, socket, timeout: float):
        super().__init__(endpoint)
        self._socket = socket
        self._timeout = timeout
        self._ids = itertools.count(1)

    async def _ask(self, from_seq: int, to_seq: int) -> wire.DigestReply:
        request_id = next(self._ids)
        with trio.move_on_after(self._timeout):
            await self._socket.send(wire.encode(wire.DigestRequest(request_id, from_seq, to_seq)))
            while True:
                try:
                    reply = wire.decode(await self._socket.recv())
                except wire.BadMessage as exc:
                    raise VerifyError(f"{self.name} answered with a bad message: {exc}") from None
                if isinstance(reply, wire.Refused):
                    raise VerifyError(f"{self.name} refused: {reply.message}")
                if isinstance(reply, wire.DigestReply) and reply.request_id == request_id:
                    return reply
        raise VerifyError(f"no answer from {self.name} within {self._timeout} s")


def _span(first: int | None, last: int | None) -> list[int] | None:
    return None if first is None else [first, last]


@dataclass
class Report:
    a: str
    b: str
    from_seq: int | None
    to_seq: int | None
    equal: bool
    first_difference: int | None = None
    missing: list[str] = field(default_factory=list)  # ranges one side lacks
    digests_asked: int = 0
    holds: dict[str, list[int] | None] = field(default_factory=dict)  # name -> [first, last]
    damage: list[Damage] = field(default_factory=list)
    unchecked_from: int | None = None  # damage stopped the search here (see Finding)

    def as_dict(self) -> dict:
        return asdict(self)  # damage too, each as a dict

    def text(self) -> str:
        lines = []
        for name in (self.a, self.b):
            span = self.holds.get(name)
            held = "no readable entry" if span is None else f"{span[0]}..{span[1]}"
            lines.append(f"{name} holds {held}")
        if self.from_seq is None:
            lines.append(f"{self.a} and {self.b} hold no readable entry")
        else:
            span = f"sequences {self.from_seq}..{self.to_seq}"
            if self.first_difference is None:
                where = " where both hold entries" if self.missing or self.damage else ""
                lines.append(f"{span}: identical in {self.a} and {self.b}{where}")
            else:
                lines.append(f"{span}: first difference at sequence {self.first_difference}")
        lines += [f"missing: {m}" for m in self.missing]
        if self.unchecked_from is not None:
            lines.append(
                f"not compared from sequence {self.unchecked_from} on: damage of unknown "
                f"extent, or more than {MAX_DAMAGE} damaged places, before it"
            )
        lines += [f"damage: {d}" for d in self.damage]
        return "\n".join(lines)


class _Counter:
    def __init__(self, a: LogSource, b: LogSource, progress=None):
        self.a, self.b = a, b
        self.asked = 0
        self.progress = progress

    async def same(self, lo: int, hi: int) -> bool:
        self.asked += 2
        async with trio.open_nursery() as nursery:
            results: dict[str, str | None] = {}

            async def get(side: str, source: LogSource):
                results[side] = await source.digest(lo, hi)

            nursery.start_soon(get, "a", self.a)
            nursery.start_soon(get, "b", self.b)
        if self.progress is not None:
            self.progress(hi)
        return results["a"] is not None and results["a"] == results["b"]


async def first_difference(
    a: LogSource, b: LogSource, lo: int, hi: int, *, progress=None
) -> tuple[int | None, int]:
    """The first sequence in lo..hi where a and b differ (or one lacks it); and digests asked.

    The bisection is cluster.bisection's, each range answered by both sides' digests.
    """
    counter = _Counter(a, b, progress)
    steps = bisection.descend(lo, hi, chunks=CHUNKS, leaf_entries=LEAF_ENTRIES)
    try:
        asked = next(steps)
        while True:
            asked = steps.send(await counter.same(*asked))
    except StopIteration as done:
        return done.value, counter.asked


@dataclass
class Finding:
    """What a search found: the first difference, and damage stepped over on the way."""

    first_difference: int | None = None
    damage: list[Damage] = field(default_factory=list)
    # The search stopped here: damage of unknown extent, or MAX_DAMAGE places of it.
    unchecked_from: int | None = None
    asked: int = 0
    checked: int = 0  # entries compared


async def _classify(a: LogSource, b: LogSource, seq: int) -> list[Damage]:
    """Why the digests of seq differ: [] for a real difference, else the damage there."""
    digests = [await a.digest(seq, seq), await b.digest(seq, seq)]
    if None not in digests:
        # The bisection may have found seq without asking it (see bisection.descend):
        # equal here means a log changed while the two were compared.
        if digests[0] == digests[1]:
            raise VerifyError("the logs changed while they were compared; run verify again")
        return []
    found = []
    for source, digest in zip((a, b), digests, strict=True):
        if digest is None:
            damage = await source.explain(seq)
            if damage is None:
                raise VerifyError(
                    f"{source.name} no longer holds sequence {seq} (purged while it was "
                    "compared?); run verify again"
                )
            found.append(damage)
    return found


async def search(
    a: LogSource, b: LogSource, lo: int, hi: int, *, progress=None, max_damage: int = MAX_DAMAGE
) -> Finding:
    """first_difference over lo..hi, stepping over damage instead of calling it a difference."""
    found = Finding(checked=max(0, hi - lo + 1))
    pos = lo
    while pos <= hi:
        seq, asked = await first_difference(a, b, pos, hi, progress=progress)
        found.asked += asked
        if seq is None:
            break
        here = await _classify(a, b, seq)
        if not here:
            found.first_difference = seq
            break
        found.damage += here
        ends = [d.through for d in here]
        if None in ends or len(found.damage) >= max_damage:
            found.unchecked_from = seq + 1 if seq < hi else None
            break
        pos = max(seq, *ends) + 1
    return found


async def find_divergence(
    local: LogSource,
    leader: LogSource,
    lo: int,
    hi: int,
    *,
    newest_entries: int,
    whole: bool = True,
    max_range: int | None = None,
) -> Finding:
    """Anti-entropy's pass over lo..hi: the newest entries first, then (whole) the rest.

    A fresh divergence (a leader that lost what it had published) shows in the newest
    entries, and comparing them is cheap. The rest is compared oldest first in ranges
    of at most max_range entries (one digest each while they agree, so no request runs
    long), so the difference reported is the first one in the log.
    """
    newest_lo = max(lo, hi - newest_entries + 1)
    found = await search(local, leader, newest_lo, hi)
    if not whole or newest_lo == lo:
        return found
    step = max_range or newest_lo - lo
    for start in range(lo, newest_lo, step):
        older = await search(local, leader, start, min(newest_lo - 1, start + step - 1))
        found.asked += older.asked
        found.checked += older.checked
        found.damage += older.damage
        if older.first_difference is not None:
            found.first_difference = older.first_difference
            break
    return found


async def compare(
    a: LogSource,
    b: LogSource,
    from_seq: int | None = None,
    to_seq: int | None = None,
    *,
    progress=None,
) -> Report:
    """Compare a and b over from_seq..to_seq.

    By default the range starts where both logs have entries (a leader that purged
    old segments is not "missing" them) and ends at the longer log's last entry,
    so a side that is behind is reported as missing the rest. Damage on either side
    within the range is reported (Report.damage) and is not a difference.
    """
    (a_first, a_last), (b_first, b_last) = await a.bounds(), await b.bounds()
    holds = {a.name: _span(a_first, a_last), b.name: _span(b_first, b_last)}
    firsts = [f for f in (a_first, b_first) if f is not None]
    lasts = [x for x in (a_last, b_last) if x is not None]
    if not firsts:
        damage = [*a.damage, *b.damage]
        return Report(a.name, b.name, None, None, not damage, holds=holds, damage=damage)
    lo = from_seq if from_seq is not None else max(firsts)
    hi = to_seq if to_seq is not None else max(lasts)
    missing = []
    for src, first, last in ((a, a_first, a_last), (b, b_first, b_last)):
        if first is None:
            missing.append(f"{src.name} lacks {lo}..{hi} (it holds no readable entry)")
            continue
        if first > lo:
            missing.append(f"{src.name} lacks {lo}..{min(first - 1, hi)}")
        if last < hi:
            missing.append(f"{src.name} lacks {max(last + 1, lo)}..{hi}")
    report = Report(a.name, b.name, lo, hi, False, missing=missing, holds=holds)
    common_lo = max([lo, *firsts]) if len(firsts) == 2 else None
    common_hi = min([hi, *lasts]) if len(lasts) == 2 else None
    found = Finding()
    if common_lo is not None and common_lo <= common_hi:
        found = await search(a, b, common_lo, common_hi, progress=progress)
    report.first_difference = found.first_difference
    report.digests_asked = found.asked
    report.unchecked_from = found.unchecked_from
    for damage in [*found.damage, *a.damage, *b.damage]:
        same_place = (damage.side, damage.kind, damage.file, damage.offset)
        if damage.overlaps(lo, hi) and all(
            (d.side, d.kind, d.file, d.offset) != same_place for d in report.damage
        ):
            report.damage.append(damage)
    report.damage.sort(key=lambda d: (d.sequence or 0, d.side))
    report.equal = found.first_difference is None and not missing and not report.damage
    return report


async def verify(
    a_spec: str, b_spec: str, from_seq, to_seq, timeout: float, progress=None, keys=None
):
    """`walrep verify A B`: each side a WAL directory or a tcp:// control endpoint."""
    ctx = zmqtrio.new_context()
    sockets = []

    def source(spec: str) -> LogSource:
        if spec.startswith("tcp://"):
            sock = zmqtrio.make_socket(
                ctx, zmqtrio.DEALER, options=keys.options() if keys else None
            )
            sock.connect(spec)
            sockets.append(sock)
            return EndpointSource(spec, sock, timeout)
        return DirSource(spec)

    try:
        return await compare(source(a_spec), source(b_spec), from_seq, to_seq, progress=progress)
    finally:
        for sock in sockets:
            sock.close()
        ctx.term()


def digest_reply(wal_dir: str, request: wire.DigestRequest, head: int) -> wire.DigestReply:
    """How a node answers a DigestRequest (called in a worker thread).

    head is what the node's files are known to hold (a leader's committed sequence,
    a reader's durable one): the bounds come from it and the segment names, not from
    a scan of the newest segment, which cost as much as a digest on every request of
    a bisection. A range the files do not hold whole still gets no digest.
    """
    reader = node.WALReader(wal_dir, on_problem=lambda p: None)
    segments = reader.segments()
    first = segments[0].first_seq if segments else None
    if first is None or head < first:
        first = last = None
    else:
        last = head
    digest = None
    if first is not None and first <= request.from_seq and request.to_seq <= last:
        try:
            digest = reader.digest(request.from_seq, request.to_seq)
        except node.RangeNotAvailable:
            digest = None
    return wire.DigestReply(
        request.request_id, request.from_seq, request.to_seq, digest, first, last
    )
