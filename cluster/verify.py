"""Are two logs the same over a range, and where do they first differ?

A log is a WAL directory or a running node's control endpoint; both answer
"digest of from..to" and "which sequences do you hold". Comparison splits the
range into chunks, compares chunk digests, and descends into the first chunk
that differs, so finding the first differing sequence reads each log about
twice (not log n times) and asks a node O(chunks * log n) questions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import trio

import node

from . import wire, zmqtrio

CHUNKS = 16
# Ranges at most this long are compared entry by entry (one digest per sequence).
LEAF_ENTRIES = 16


class VerifyError(Exception):
    """A log could not be read or asked (exit status 2)."""


class LogSource(Protocol):
    name: str

    async def bounds(self) -> tuple[int | None, int | None]: ...

    async def digest(self, from_seq: int, to_seq: int) -> str | None: ...


class DirSource:
    """A WAL directory, read in a worker thread."""

    def __init__(self, path: str):
        self.name = path
        self.path = path

    async def bounds(self):
        return await trio.to_thread.run_sync(node.WALReader(self.path).bounds)

    async def digest(self, from_seq: int, to_seq: int) -> str | None:
        def compute():
            try:
                return node.WALReader(self.path, on_problem=lambda p: None).digest(from_seq, to_seq)
            except node.RangeNotAvailable:
                return None

        return await trio.to_thread.run_sync(compute)


class EndpointSource:
    """A running node, asked over its control endpoint."""

    def __init__(self, endpoint: str, socket, timeout: float):
        self.name = endpoint
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

    async def bounds(self):
        reply = await self._ask(1, 1)
        return reply.first_seq, reply.last_seq

    async def digest(self, from_seq: int, to_seq: int) -> str | None:
        return (await self._ask(from_seq, to_seq)).digest


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

    def text(self) -> str:
        if self.from_seq is None:
            return f"{self.a} and {self.b} are both empty"
        span = f"sequences {self.from_seq}..{self.to_seq}"
        lines = []
        if self.first_difference is None:
            where = " where both hold entries" if self.missing else ""
            lines.append(f"{span}: identical in {self.a} and {self.b}{where}")
        else:
            lines.append(f"{span}: first difference at sequence {self.first_difference}")
        lines += [f"missing: {m}" for m in self.missing]
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
    """The first sequence in lo..hi where a and b differ (or one lacks it); and digests asked."""
    counter = _Counter(a, b, progress)
    if await counter.same(lo, hi):
        return None, counter.asked
    while hi - lo + 1 > LEAF_ENTRIES:
        step = -(-(hi - lo + 1) // CHUNKS)
        for start in range(lo, hi + 1, step):
            end = min(hi, start + step - 1)
            if not await counter.same(start, end):
                lo, hi = start, end
                break
        else:
            # Every chunk agrees although the whole did not: cannot happen with a
            # deterministic digest unless a log changed while we read it.
            raise VerifyError("the logs changed while they were compared; run verify again")
    for seq in range(lo, hi + 1):
        if not await counter.same(seq, seq):
            return seq, counter.asked
    raise VerifyError("the logs changed while they were compared; run verify again")


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
    so a side that is behind is reported as missing the rest.
    """
    (a_first, a_last), (b_first, b_last) = await a.bounds(), await b.bounds()
    if a_first is None and b_first is None:
        return Report(a.name, b.name, None, None, equal=True)
    firsts = [f for f in (a_first, b_first) if f is not None]
    lasts = [x for x in (a_last, b_last) if x is not None]
    lo = from_seq if from_seq is not None else max(firsts)
    hi = to_seq if to_seq is not None else max(lasts)
    missing = []
    for src, first, last in ((a, a_first, a_last), (b, b_first, b_last)):
        if first is None:
            missing.append(f"{src.name} lacks {lo}..{hi} (it holds nothing)")
            continue
        if first > lo:
            missing.append(f"{src.name} lacks {lo}..{min(first - 1, hi)}")
        if last < hi:
            missing.append(f"{src.name} lacks {max(last + 1, lo)}..{hi}")
    common_lo = max([lo, *firsts]) if len(firsts) == 2 else None
    common_hi = min([hi, *lasts]) if len(lasts) == 2 else None
    if common_lo is None or common_lo > common_hi:
        return Report(a.name, b.name, lo, hi, equal=False, missing=missing)
    first_diff, asked = await first_difference(a, b, common_lo, common_hi, progress=progress)
    equal = first_diff is None and not missing
    return Report(a.name, b.name, lo, hi, equal, first_diff, missing, asked)


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
    """How a node answers a DigestRequest (called in a worker thread)."""
    reader = node.WALReader(wal_dir, on_problem=lambda p: None)
    first, last = reader.bounds()
    if last is not None:
        last = min(last, head)
    digest = None
    if first is not None and first <= request.from_seq and request.to_seq <= last:
        try:
            digest = reader.digest(request.from_seq, request.to_seq)
        except node.RangeNotAvailable:
            digest = None
    return wire.DigestReply(
        request.request_id, request.from_seq, request.to_seq, digest, first, last
    )
