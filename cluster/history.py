"""Check `walrep load --log` histories against the final WAL directories of a cluster.

Usage:
    walrep check-history --history h1.jsonl [--history h2.jsonl] \\
        --node leader=DIR --node reader-1=DIR ... [--json]

Exit status: 0 no violation, 1 violations found, 2 usage errors (bad arguments, a
history line that is not a history record, a node directory that does not exist).

A history is JSON lines ``{"id": int, "seq": int | null, "outcome": "ok" | "failed" |
"unknown"}`` as `walrep load --log` writes them, optionally with ``"ack"`` (the ack
level of the request; "leader-default", or no "ack", means ``--default-ack``, the
leader's default_ack), ``"attempt"`` (a retry's number) or ``"attempts"`` (how many
sends the request took) and ``"client"`` (who sent it). A retried request may log
several lines for one id; an attempt above 1 or several lines mark the id retried.
Each history file is one client unless its lines name one: `walrep load` numbers
ids from 0 in every run, and entry payloads (``walrep.cluster.loadgen.payload_for``) carry
only the id, so two runs write the same ids; the checker allows an id to appear in
a log once per client that sent it.

What is checked (each kind is a list in ``Verdict``):

- ``lost``: acknowledged ("ok") entries whose level's promise does not hold on the
  final logs. The promise per ack level comes from a rule (``level -> Promise``):

  ``default_rule`` (the default): ``none`` promises nothing; any other level promises
  that the entry is present, with identical payload, at its acked seq on every node
  whose log covers that seq (first <= seq <= last), and on at least one node overall.

  ``strict_rule()``: ``none`` nothing; ``local`` present on the leader (a leader whose
  log ends before the seq lost it); ``replicas=N`` present on the leader and on at
  least N readers; and every node covering the seq agrees. ``strict_rule(
  leader_disk_lost=True)`` drops the leader requirement: ``local`` then needs the
  entry on at least one node, ``replicas=N`` on at least N readers.

  ``reader_rule``: "in at least one reader": any level but ``none`` must be on at
  least one reader, and every node covering the seq agrees.

  The payload expected for id ``i`` is ``payload_for(i, size)``; without ``size`` (the
  ``--size`` of `walrep load`) the stored payload must equal ``payload_for(i, its own
  length)``: the id and the padding are checked, not the length.
- ``duplicate_ids``: a load id present at two sequences of one node's log (more times
  than the number of clients that sent it). ``retried`` says some client logged
  several lines for the id (a retry after "unknown" can legitimately write twice);
  ``tolerate_retry_duplicates`` keeps those from failing the verdict.
- ``seq_conflicts``: one sequence acknowledged to two different requests.
- ``divergences``: per pair of nodes, the first sequence both hold with different
  bytes (timestamp or payload), found by comparing ``WALReader.digest`` over the
  range both hold and bisecting it (cluster.bisection, as `walrep verify` does);
  only the overlap of the two logs is compared.
- ``not_converged``: a reader whose last seq is below the leader's (``behind``),
  past it (``ahead``), or that differs from the leader where both hold entries
  (``diverged``).

Convergence time is reported when given the time the last fault healed and either a
mapping node -> time it reached the leader's head (``convergence_from_reached``) or a
series of observations (``convergence_from_observations``); ``wait_converged`` polls
WAL directories until every reader holds the leader's head, for a chaos driver.

Python API: ``check(histories, nodes, ...) -> Verdict``; ``lost(history, logs,
level_rule)``; ``load_history``; ``read_node``; ``first_divergence`` (with a
``Digests`` cache); ``observe``; ``wait_converged``; ``Verdict.ok``,
``Verdict.table()``, ``Verdict.to_json()``; ``text_table``. The command line is
``walrep check-history`` (``add_arguments`` and ``run``; ``main`` parses argv
itself). This module reads WAL directories and never writes them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from walrep import node

from . import bisection
from .config import parse_ack

OUTCOMES = ("ok", "failed", "unknown")
# What `walrep load` logs as "ack" when --ack was not given: the leader's default_ack.
LEADER_DEFAULT = ("leader-default", "default")
LOAD_PREFIX = b"load-"
_ID_DIGITS = 12  # payload_for writes b"load-%012d-"


class HistoryError(ValueError):
    """A history that cannot be read: a line that is not a history record."""


class UsageError(ValueError):
    """Arguments the checker cannot work with (exit status 2)."""


def _ignore(_problem: Any) -> None:
    pass


# --- histories -------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One history line: a request's outcome for one entry id."""

    id: int
    seq: int | None
    outcome: str
    ack: str  # the request's ack level, or the default when the line names none
    client: str  # the line's "client", else the history it came from
    attempt: int | None = None  # "attempt" (a retry's number) or "attempts" (how many)
    source: str = ""  # file:line


@dataclass
class History:
    records: list[Record] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def normalize_level(level: str) -> str:
    """'none', 'local' or 'replicas=N'; ValueError for anything else."""
    parse_ack(level)
    return level


def level_replicas(level: str) -> int | None:
    """Readers the level waits for: None for none, 0 for local, N for replicas=N."""
    return parse_ack(level)


def _record(obj: Any, label: str, where: str, default_ack: str) -> Record:
    if not isinstance(obj, dict):
        raise HistoryError(f"{where}: not a JSON object")
    entry_id = obj.get("id")
    if type(entry_id) is not int:
        raise HistoryError(f"{where}: 'id' must be an integer, got {entry_id!r}")
    outcome = obj.get("outcome")
    if outcome not in OUTCOMES:
        raise HistoryError(f"{where}: 'outcome' must be one of {', '.join(OUTCOMES)}")
    seq = obj.get("seq")
    if seq is not None and (type(seq) is not int or seq < 1):
        raise HistoryError(f"{where}: 'seq' must be a positive integer or null, got {seq!r}")
    if outcome == "ok" and seq is None:
        raise HistoryError(f"{where}: an 'ok' outcome without a seq")
    ack = obj.get("ack")
    if ack is None or ack in LEADER_DEFAULT:
        ack = default_ack
    try:
        ack = normalize_level(ack) if isinstance(ack, str) else normalize_level(str(ack))
    except ValueError as exc:
        raise HistoryError(f"{where}: {exc}") from None
    attempt = obj.get("attempt", obj.get("attempts"))
    if attempt is not None and type(attempt) is not int:
        raise HistoryError(f"{where}: 'attempt(s)' must be an integer, got {attempt!r}")
    client = obj.get("client")
    if client is not None and not isinstance(client, str):
        raise HistoryError(f"{where}: 'client' must be a string, got {client!r}")
    return Record(entry_id, seq, outcome, ack, client or label, attempt, where)


def _read_history_file(path: str, default_ack: str, history: History) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise HistoryError(f"cannot read history {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: a write cut short by a kill
                history.notes.append(f"{where}: incomplete last line skipped")
                continue
            raise HistoryError(f"{where}: not JSON: {line[:80]!r}") from None
        history.records.append(_record(obj, path, where, default_ack))
    history.sources.append(path)


def load_history(sources: Any, default_ack: str = "local") -> History:
    """Read histories: a path, a list of paths, a list of dicts (one history), Records.

    A History passes through unchanged. ``default_ack`` is the level of lines that
    name none (`walrep load --ack` defaults to the leader's default_ack, "local").
    """
    if isinstance(sources, History):
        return sources
    normalize_level(default_ack)
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    history = History()
    inline = 0
    for item in sources:
        if isinstance(item, Record):
            history.records.append(item)
        elif isinstance(item, dict):
            inline += 1
            history.records.append(_record(item, "history", f"history:{inline}", default_ack))
        elif isinstance(item, str | os.PathLike):
            _read_history_file(os.fspath(item), default_ack, history)
        else:
            raise HistoryError(f"not a history source: {item!r}")
    if inline:
        history.sources.append("history")
    return history


# --- node logs ---------------------------------------------------------------------------


def decode_id(payload: bytes) -> int | None:
    """The load id a payload_for payload carries, or None for any other payload."""
    if not payload.startswith(LOAD_PREFIX):
        return None
    digits = payload[5 : 5 + _ID_DIGITS]
    if len(digits) != _ID_DIGITS or not digits.isdigit() or payload[17:18] != b"-":
        return None
    return int(digits)


@dataclass
class NodeLog:
    """What the checker read from one node's WAL directory."""

    name: str
    path: str
    first: int | None = None
    last: int | None = None
    entries: int = 0
    load_entries: int = 0  # entries whose payload carries a load id
    log_id: str | None = None
    problems: list[str] = field(default_factory=list)
    payloads: dict[int, bytes] = field(default_factory=dict)  # at the seqs asked for
    wanted: set[int] | None = None
    duplicates: dict[int, list[int]] = field(default_factory=dict)  # id -> every seq
    gaps: int = 0  # sequences missing between first and last

    def holds_range(self, seq: int) -> bool:
        return self.first is not None and self.first <= seq <= self.last

    def payload_at(self, seq: int) -> bytes | None:
        if self.wanted is None or seq in self.wanted:
            return self.payloads.get(seq)
        for _seq, _ts, payload in node.WALReader(self.path, on_problem=_ignore).raw_entries(
            seq, seq
        ):
            return payload
        return None


def read_node(name: str, path: str, want: Iterable[int] | None = None) -> NodeLog:
    """Scan a node's log once: bounds, damage, load ids seen twice, payloads at ``want``.

    With ``want`` None every payload is kept (small logs only).
    """
    log = NodeLog(name, path)
    try:
        log.log_id = node.load_meta(path).get("log_id") if os.path.isdir(path) else None
    except node.WALError as exc:
        log.problems.append(str(exc))
    wanted = None if want is None else set(want)
    log.wanted = wanted
    reader = node.WALReader(path, on_problem=lambda p: log.problems.append(str(p)))
    first_seen: dict[int, int] = {}
    expected = None
    for seq, _ts, payload in reader.raw_entries():
        if log.first is None:
            log.first = seq
        elif seq != expected:
            log.gaps += seq - expected
        expected = seq + 1
        log.last = seq
        log.entries += 1
        if wanted is None or seq in wanted:
            log.payloads[seq] = payload
        entry_id = decode_id(payload)
        if entry_id is None:
            continue
        log.load_entries += 1
        earlier = first_seen.setdefault(entry_id, seq)
        if earlier != seq:
            log.duplicates.setdefault(entry_id, [earlier]).append(seq)
    return log


def _as_logs(logs: Mapping[str, NodeLog | str | os.PathLike], want: set[int] | None):
    out: dict[str, NodeLog] = {}
    for name, value in logs.items():
        out[name] = value if isinstance(value, NodeLog) else read_node(name, os.fspath(value), want)
    return out


# --- promises and lost entries -------------------------------------------------------------


@dataclass(frozen=True)
class Promise:
    """What an acknowledgement at one level promises about the final logs."""

    on_leader: bool = False  # the leader holds it (a leader ending before the seq lost it)
    min_readers: int = 0  # at least this many readers hold it
    min_nodes: int = 0  # at least this many nodes (leader included) hold it
    holders_agree: bool = False  # every node whose log covers the seq holds it, same bytes

    @property
    def promises_anything(self) -> bool:
        return self.on_leader or self.holders_agree or self.min_readers > 0 or self.min_nodes > 0

    def describe(self) -> str:
        if not self.promises_anything:
            return "nothing"
        parts = []
        if self.on_leader:
            parts.append("on the leader")
        if self.min_readers:
            parts.append(f"on >= {self.min_readers} reader{'s' * (self.min_readers > 1)}")
        if self.min_nodes:
            parts.append(f"on >= {self.min_nodes} node{'s' * (self.min_nodes > 1)}")
        if self.holders_agree:
            parts.append("same bytes on every node covering its seq")
        return ", ".join(parts)


LevelRule = Callable[[str], Promise]
NOTHING = Promise()


def default_rule(level: str) -> Promise:
    """Any level but none: on every node covering the seq, and on at least one node."""
    if level_replicas(level) is None:
        return NOTHING
    return Promise(min_nodes=1, holders_agree=True)


def strict_rule(leader_disk_lost: bool = False) -> LevelRule:
    """Per level: local on the leader, replicas=N also on N readers (see module doc)."""

    def rule(level: str) -> Promise:
        replicas = level_replicas(level)
        if replicas is None:
            return NOTHING
        if leader_disk_lost:
            return Promise(min_readers=replicas, min_nodes=1, holders_agree=True)
        return Promise(on_leader=True, min_readers=replicas, holders_agree=True)

    rule.__name__ = "strict_rule(leader_disk_lost=True)" if leader_disk_lost else "strict_rule"
    return rule


def reader_rule(level: str) -> Promise:
    """The promise is "in at least one reader" for every level but none."""
    if level_replicas(level) is None:
        return NOTHING
    return Promise(min_readers=1, holders_agree=True)


RULES: dict[str, Callable[[bool], LevelRule]] = {
    "default": lambda leader_disk_lost: default_rule,
    "strict": strict_rule,
    "reader": lambda leader_disk_lost: reader_rule,
}


@dataclass
class Lost:
    """An acknowledged entry whose promise does not hold."""

    id: int
    seq: int
    ack: str
    client: str
    source: str
    kind: str  # "changed" (some node holds other bytes there) or "missing"
    missing_on: list[str]
    changed_on: list[str]
    copies: list[str]  # nodes holding exactly the expected bytes
    detail: str


def _expected(entry_id: int, actual: bytes, size: int | None) -> bytes:
    # Imported here: loadgen brings in zmq, and `walrep` builds this module's parser
    # for every command it runs.
    from .loadgen import payload_for

    return payload_for(entry_id, size if size is not None else len(actual))


def lost(
    history: Any,
    logs: Mapping[str, NodeLog | str | os.PathLike],
    level_rule: LevelRule = default_rule,
    *,
    leader: str = "leader",
    size: int | None = None,
    default_ack: str = "local",
) -> list[Lost]:
    """Acknowledged entries of ``history`` whose level's promise fails on ``logs``.

    ``logs`` maps node names to WAL directories (or NodeLogs from read_node); one of
    them is ``leader``. ``level_rule(level)`` gives each level's Promise.
    """
    history = load_history(history, default_ack)
    acked = [r for r in history.records if r.outcome == "ok"]
    logs = _as_logs(logs, {r.seq for r in acked})
    if leader not in logs:
        raise UsageError(f"no node named {leader!r} (the leader) among {sorted(logs)}")
    found: list[Lost] = []
    seen: set[tuple[str, int, int, str]] = set()
    for r in acked:
        key = (r.client, r.id, r.seq, r.ack)
        if key in seen:
            continue
        seen.add(key)
        promise = level_rule(r.ack)
        if not promise.promises_anything:
            continue
        state: dict[str, str] = {}
        for name, log in logs.items():
            if not log.holds_range(r.seq):
                state[name] = "outside"
                continue
            payload = log.payload_at(r.seq)
            if payload is None:
                state[name] = "missing"
            elif payload == _expected(r.id, payload, size):
                state[name] = "match"
            else:
                state[name] = "changed"
        reasons: list[str] = []
        blamed: set[str] = set()
        if promise.holders_agree:
            blamed.update(n for n, value in state.items() if value in ("missing", "changed"))
        if promise.on_leader and state[leader] != "match":
            blamed.add(leader)
            if state[leader] == "outside":
                held = logs[leader]
                where = "nothing" if held.first is None else f"{held.first}..{held.last}"
                reasons.append(f"the leader holds {where}")
        changed_on = [n for n in state if n in blamed and state[n] == "changed"]
        missing_on = [n for n in state if n in blamed and state[n] != "changed"]
        copies = [name for name, value in state.items() if value == "match"]
        reader_copies = [name for name in copies if name != leader]
        if len(reader_copies) < promise.min_readers:
            reasons.append(f"on {len(reader_copies)} of the {promise.min_readers} readers needed")
        if len(copies) < promise.min_nodes:
            reasons.append(f"on {len(copies)} nodes, {promise.min_nodes} needed")
        if not (missing_on or changed_on or reasons):
            continue
        if changed_on:
            reasons.insert(0, "other bytes on " + ", ".join(changed_on))
        if missing_on:
            reasons.insert(0, "missing on " + ", ".join(missing_on))
        found.append(
            Lost(
                r.id,
                r.seq,
                r.ack,
                r.client,
                r.source,
                "changed" if changed_on else "missing",
                missing_on,
                changed_on,
                copies,
                "; ".join(reasons),
            )
        )
    return found


# --- duplicates ----------------------------------------------------------------------------


@dataclass
class DuplicateId:
    """A load id present at more sequences of one log than clients sent it."""

    id: int
    seqs: list[int]
    nodes: list[str]
    clients: int  # clients whose histories hold this id (each may write it once)
    retried: bool  # some client logged several lines (retries) for it
    tolerated: bool = False


@dataclass
class SeqConflict:
    """One sequence acknowledged to two different requests."""

    seq: int
    acks: list[dict[str, Any]]  # {"client", "id", "source"}


def duplicate_ids(
    history: History, logs: Mapping[str, NodeLog], *, tolerate_retry_duplicates: bool = False
) -> list[DuplicateId]:
    clients: dict[int, set[str]] = defaultdict(set)
    lines: dict[tuple[str, int], int] = defaultdict(int)
    retried_ids: set[int] = set()
    for r in history.records:
        clients[r.id].add(r.client)
        lines[(r.client, r.id)] += 1
        if lines[(r.client, r.id)] > 1 or (r.attempt is not None and r.attempt > 1):
            retried_ids.add(r.id)
    found: dict[int, DuplicateId] = {}
    for name, log in logs.items():
        for entry_id, seqs in log.duplicates.items():
            allowed = max(1, len(clients.get(entry_id, ())))
            if len(seqs) <= allowed:
                continue
            dup = found.get(entry_id)
            if dup is None:
                retried = entry_id in retried_ids
                dup = found[entry_id] = DuplicateId(
                    entry_id, [], [], allowed, retried, tolerate_retry_duplicates and retried
                )
            dup.seqs = sorted(set(dup.seqs) | set(seqs))
            dup.nodes.append(name)
    return [found[k] for k in sorted(found)]


def seq_conflicts(history: History) -> list[SeqConflict]:
    by_seq: dict[int, dict[tuple[str, int], str]] = defaultdict(dict)
    for r in history.records:
        if r.outcome == "ok":
            by_seq[r.seq].setdefault((r.client, r.id), r.source)
    return [
        SeqConflict(seq, [{"client": c, "id": i, "source": s} for (c, i), s in acks.items()])
        for seq, acks in sorted(by_seq.items())
        if len(acks) > 1
    ]


# --- divergence ----------------------------------------------------------------------------


# The checker reads local files: halving asks the fewest digests (two per step,
# one per node) and still reads each log about twice.
CHUNKS = 2
LEAF_ENTRIES = 1


class Digests:
    """WALReader.digest per node, cached by range (pairs share the leader's ranges).

    ``calls`` counts the digests computed (cache misses).
    """

    def __init__(self) -> None:
        self.readers: dict[str, node.WALReader] = {}
        self.cache: dict[tuple[str, int, int], str] = {}
        self.calls = 0

    def reader(self, path: str) -> node.WALReader:
        reader = self.readers.get(path)
        if reader is None:
            reader = self.readers[path] = node.WALReader(path, on_problem=_ignore)
        return reader

    def __call__(self, path: str, lo: int, hi: int) -> str:
        key = (path, lo, hi)
        value = self.cache.get(key)
        if value is None:
            self.calls += 1
            value = self.cache[key] = self.reader(path).digest(lo, hi)
        return value


def _path(x: Any) -> str:
    return x.path if isinstance(x, NodeLog | node.WALReader) else os.fspath(x)


def first_divergence(a: Any, b: Any, lo: int, hi: int, digests: Digests | None = None):
    """The first seq in lo..hi where two logs differ (bytes or presence), or None.

    ``a`` and ``b``: WAL directories, NodeLogs or WALReaders. Bisects with digests
    of ranges (cluster.bisection, halving): about 2x the range is read per node. A
    range with a hole (damage) in either log has no digest; its entries are then
    compared one by one, and a sequence both logs lack is not a difference.
    """
    digests = digests or Digests()
    pa, pb = _path(a), _path(b)

    def same(lo: int, hi: int) -> bool:
        try:
            return digests(pa, lo, hi) == digests(pb, lo, hi)
        except node.RangeNotAvailable:
            ia = digests.reader(pa).raw_entries(lo, hi)
            ib = digests.reader(pb).raw_entries(lo, hi)
            return all(ea == eb for ea, eb in itertools.zip_longest(ia, ib))

    return bisection.first_difference(same, lo, hi, chunks=CHUNKS, leaf_entries=LEAF_ENTRIES)


def _entry(path: str, seq: int, digests: Digests):
    for entry in digests.reader(path).raw_entries(seq, seq):
        return entry
    return None


@dataclass
class Divergence:
    """The first sequence two nodes both cover where their entries differ."""

    a: str
    b: str
    seq: int
    compared: list[int]  # [lo, hi]: the range both logs cover
    detail: str


def divergences(logs: Mapping[str, NodeLog], digests: Digests | None = None) -> list[Divergence]:
    digests = digests or Digests()
    names = list(logs)
    found = []
    for i, na in enumerate(names):
        for nb in names[i + 1 :]:
            la, lb = logs[na], logs[nb]
            if la.first is None or lb.first is None:
                continue
            lo, hi = max(la.first, lb.first), min(la.last, lb.last)
            seq = first_divergence(la, lb, lo, hi, digests)
            if seq is None:
                continue
            ea, eb = _entry(la.path, seq, digests), _entry(lb.path, seq, digests)
            if ea is None or eb is None:
                detail = f"missing on {na if ea is None else nb}"
            elif ea[2] != eb[2]:
                ida, idb = decode_id(ea[2]), decode_id(eb[2])
                detail = "payloads differ"
                if ida is not None or idb is not None:
                    detail += f" (load id {ida} vs {idb})"
            else:
                detail = f"timestamps differ ({ea[1]} vs {eb[1]})"
            found.append(Divergence(na, nb, seq, [lo, hi], detail))
    return found


@dataclass
class NotConverged:
    """A reader whose log is not the leader's (a prefix that ends at its head)."""

    node: str
    first: int | None
    last: int | None
    leader_last: int | None
    kind: str  # "diverged", "ahead" or "behind"
    detail: str


def not_converged(
    logs: Mapping[str, NodeLog], leader: str, found: Sequence[Divergence]
) -> list[NotConverged]:
    head = logs[leader].last
    out = []
    for name, log in logs.items():
        if name == leader:
            continue
        diverged = [d for d in found if leader in (d.a, d.b) and name in (d.a, d.b)]
        if diverged:
            kind, detail = "diverged", f"differs from the leader at seq {diverged[0].seq}"
        elif log.last is not None and (head is None or log.last > head):
            kind, detail = "ahead", f"holds up to {log.last}, past the leader's head {head}"
        elif head is not None and (log.last is None or log.last < head):
            held = "nothing" if log.last is None else f"up to {log.last}"
            kind, detail = "behind", f"holds {held}, the leader {head}"
        else:
            continue
        out.append(NotConverged(name, log.first, log.last, head, kind, detail))
    return out


# --- convergence time ----------------------------------------------------------------------


@dataclass
class Convergence:
    """How long after the last fault healed each reader reached the leader's head."""

    healed_at: float
    reached: dict[str, float | None]  # node -> when it reached the target (None: never)
    target: int | None = None  # the leader's head it had to reach

    @property
    def per_node(self) -> dict[str, float | None]:
        return {
            n: None if t is None else max(0.0, t - self.healed_at) for n, t in self.reached.items()
        }

    @property
    def converged(self) -> bool:
        return all(t is not None for t in self.reached.values())

    @property
    def seconds(self) -> float | None:
        """Until the last reader reached the head; None if one never did."""
        values = self.per_node.values()
        if not self.converged:
            return None
        return max(values, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "healed_at": self.healed_at,
            "target": self.target,
            "reached": self.reached,
            "per_node_s": self.per_node,
            "seconds": self.seconds,
            "converged": self.converged,
        }


def convergence_from_reached(
    healed_at: float, reached: Mapping[str, float | None], target: int | None = None
) -> Convergence:
    return Convergence(healed_at, dict(reached), target)


def convergence_from_observations(
    healed_at: float,
    observations: Iterable[tuple[float, Mapping[str, int | None]]],
    *,
    leader: str = "leader",
    target: int | None = None,
) -> Convergence:
    """Observations are (time, {node: last seq}) snapshots, complete or partial.

    A reader reached the head at the first observation of it at or past ``target``
    (default: the highest leader head observed).
    """
    obs = sorted(((t, dict(pos)) for t, pos in observations), key=lambda o: o[0])
    if target is None:
        heads = [pos[leader] for _t, pos in obs if pos.get(leader) is not None]
        target = max(heads) if heads else None
    reached: dict[str, float | None] = {}
    for t, positions in obs:
        for name, last in positions.items():
            if name == leader:
                continue
            reached.setdefault(name, None)
            if reached[name] is None and (target is None or (last is not None and last >= target)):
                reached[name] = t
    return Convergence(healed_at, reached, target)


class ConvergenceTimeout(TimeoutError):
    def __init__(self, waited: float, positions: Mapping[str, int | None] | None, why: str):
        super().__init__(f"not converged after {waited:.1f} s: {why} (positions: {positions})")
        self.waited = waited
        self.positions = positions


def observe(nodes: Mapping[str, str | os.PathLike]) -> dict[str, int | None]:
    """{node: last seq on disk (None: empty)} right now; raises OSError/WALError mid-rotation."""
    return {
        name: node.WALReader(os.fspath(path), on_problem=_ignore).bounds()[1]
        for name, path in nodes.items()
    }


def _tail_digest(path: str, seq: int) -> str | None:
    try:
        return node.WALReader(path, on_problem=_ignore).digest(seq, seq)
    except node.RangeNotAvailable:
        return None


def wait_converged(
    nodes: Mapping[str, str | os.PathLike],
    deadline: float,
    *,
    leader: str = "leader",
    since: float | None = None,
    poll_s: float = 0.02,
) -> float:
    """Poll WAL dirs until every reader's last seq is the leader's, with the same bytes.

    ``deadline``: seconds to wait at most (ConvergenceTimeout after). Returns the
    seconds from ``since`` (a time.monotonic() stamp, e.g. when the fault healed;
    default: the call) to the poll that saw convergence. Blocking: from trio, call
    it with trio.to_thread.run_sync.
    """
    if leader not in nodes:
        raise UsageError(f"no node named {leader!r} (the leader) among {sorted(nodes)}")
    start = time.monotonic()
    since = start if since is None else since
    paths = {name: os.fspath(p) for name, p in nodes.items()}
    positions: dict[str, int | None] | None = None
    why = "no observation yet"
    while True:
        try:
            positions = observe(paths)
        except (OSError, node.WALError) as exc:  # a segment rotated or purged under us
            why = f"could not read: {exc}"
        else:
            head = positions[leader]
            behind = [n for n, last in positions.items() if last != head]
            if behind:
                why = "not at the leader's head: " + ", ".join(behind)
            elif head is None:
                return time.monotonic() - since
            else:
                want = _tail_digest(paths[leader], head)
                differ = [n for n in paths if n != leader and _tail_digest(paths[n], head) != want]
                if not differ:
                    return time.monotonic() - since
                why = f"entry {head} differs from the leader's on " + ", ".join(differ)
        if time.monotonic() - start >= deadline:
            raise ConvergenceTimeout(time.monotonic() - start, positions, why)
        time.sleep(poll_s)


# --- the verdict -----------------------------------------------------------------------------


@dataclass
class NodeSummary:
    name: str
    path: str
    first: int | None
    last: int | None
    entries: int
    load_entries: int
    gaps: int
    log_id: str | None
    problems: list[str]


@dataclass
class LevelSummary:
    level: str
    promise: str
    acked: int
    unknown: int
    failed: int
    lost: int


VIOLATION_KINDS = ("lost", "duplicate_ids", "seq_conflicts", "divergences", "not_converged")


@dataclass
class Verdict:
    lost: list[Lost] = field(default_factory=list)
    duplicate_ids: list[DuplicateId] = field(default_factory=list)
    seq_conflicts: list[SeqConflict] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)
    not_converged: list[NotConverged] = field(default_factory=list)
    nodes: list[NodeSummary] = field(default_factory=list)
    levels: list[LevelSummary] = field(default_factory=list)
    leader: str = "leader"
    rule: str = "default"
    histories: list[str] = field(default_factory=list)
    convergence: Convergence | None = None
    notes: list[str] = field(default_factory=list)

    def violations(self) -> dict[str, list]:
        """Each kind's violations that fail the verdict (tolerated duplicates left out)."""
        found = {kind: list(getattr(self, kind)) for kind in VIOLATION_KINDS}
        found["duplicate_ids"] = [d for d in self.duplicate_ids if not d.tolerated]
        return found

    @property
    def ok(self) -> bool:
        return not any(self.violations().values())

    def counts(self) -> dict[str, int]:
        return {kind: len(items) for kind, items in self.violations().items()}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "counts": self.counts()}
        for name in ("leader", "rule", "histories"):
            out[name] = getattr(self, name)
        for name in VIOLATION_KINDS + ("nodes", "levels"):
            out[name] = [asdict(item) for item in getattr(self, name)]
        out["convergence"] = None if self.convergence is None else self.convergence.to_dict()
        out["notes"] = list(self.notes)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_rows: int = 20) -> str:
        lines = [f"history check: {len(self.nodes)} nodes, leader {self.leader}, rule {self.rule}"]
        lines += text_table(
            ["node", "first", "last", "entries", "load ids", "gaps", "log id", "problems"],
            [
                [
                    n.name,
                    n.first,
                    n.last,
                    n.entries,
                    n.load_entries,
                    n.gaps,
                    (n.log_id or "-")[:12],
                    len(n.problems),
                ]
                for n in self.nodes
            ],
        )
        lines.append("")
        lines += text_table(
            ["ack level", "promise", "acked", "unknown", "failed", "lost"],
            [[v.level, v.promise, v.acked, v.unknown, v.failed, v.lost] for v in self.levels],
        )
        if self.convergence is not None:
            c = self.convergence
            lines.append("")
            total = "never" if c.seconds is None else f"{c.seconds:.3f} s"
            lines.append(f"convergence after the last fault healed: {total}")
            for name, seconds in c.per_node.items():
                lines.append(f"  {name}: {'never' if seconds is None else f'{seconds:.3f} s'}")
        rows = {
            "lost": lambda x: (
                f"id {x.id} seq {x.seq} ack {x.ack} ({x.client}): {x.kind}: {x.detail}"
            ),
            "duplicate_ids": lambda x: (
                f"id {x.id} at seqs {_short(x.seqs)} on {', '.join(x.nodes)}"
                + (" (retried" + (", tolerated)" if x.tolerated else ")") if x.retried else "")
            ),
            "seq_conflicts": lambda x: (
                f"seq {x.seq} acked to "
                + ", ".join(f"id {a['id']} ({a['client']})" for a in x.acks)
            ),
            "divergences": lambda x: (
                f"{x.a} / {x.b}: first difference at seq {x.seq} "
                f"(compared {x.compared[0]}..{x.compared[1]}): {x.detail}"
            ),
            "not_converged": lambda x: f"{x.node}: {x.kind}: {x.detail}",
        }
        for kind in VIOLATION_KINDS:
            items = getattr(self, kind)
            if not items:
                continue
            lines.append("")
            lines.append(f"{kind.replace('_', ' ')}: {len(items)}")
            for item in items[:max_rows]:
                lines.append("  " + rows[kind](item))
            if len(items) > max_rows:
                lines.append(f"  ... and {len(items) - max_rows} more (--json lists all)")
        problems = [(n.name, p) for n in self.nodes for p in n.problems]
        if problems or self.notes:
            lines.append("")
            lines.append("notes:")
            lines += [f"  {name}: {p}" for name, p in problems[:max_rows]]
            lines += [f"  {note}" for note in self.notes[:max_rows]]
        lines.append("")
        if self.ok:
            lines.append("verdict: OK")
        else:
            counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.counts().items() if v)
            lines.append(f"verdict: VIOLATIONS ({counts})")
        return "\n".join(lines)


def _short(values: list[int], limit: int = 6) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (", ..." if len(values) > limit else "")


def text_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Lines of an aligned plain-text table (None prints as "-"), as the verdict shows."""
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i in (0, 1) and not v.isdigit() else v.rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return [fmt(row) for row in cells]


def _rule_name(rule: LevelRule) -> str:
    return getattr(rule, "__name__", repr(rule))


def check(
    histories: Any,
    nodes: Mapping[str, str | os.PathLike],
    *,
    leader: str = "leader",
    rule: LevelRule = default_rule,
    size: int | None = None,
    default_ack: str = "local",
    tolerate_retry_duplicates: bool = False,
    convergence: Convergence | None = None,
) -> Verdict:
    """Check histories against the final WAL directories ``nodes`` (name -> dir)."""
    if leader not in nodes:
        raise UsageError(f"no node named {leader!r} (the leader) among {sorted(nodes)}")
    history = load_history(histories, default_ack)
    want = {r.seq for r in history.records if r.outcome == "ok"}
    logs = {name: read_node(name, os.fspath(path), want) for name, path in nodes.items()}
    verdict = Verdict(leader=leader, rule=_rule_name(rule), histories=list(history.sources))
    verdict.notes += history.notes
    verdict.lost = lost(history, logs, rule, leader=leader, size=size)
    verdict.duplicate_ids = duplicate_ids(
        history, logs, tolerate_retry_duplicates=tolerate_retry_duplicates
    )
    verdict.seq_conflicts = seq_conflicts(history)
    digests = Digests()
    verdict.divergences = divergences(logs, digests)
    verdict.not_converged = not_converged(logs, leader, verdict.divergences)
    verdict.nodes = [
        NodeSummary(
            g.name, g.path, g.first, g.last, g.entries, g.load_entries, g.gaps, g.log_id, g.problems
        )
        for g in logs.values()
    ]
    log_ids = {g.log_id for g in logs.values() if g.log_id}
    if len(log_ids) > 1:
        verdict.notes.append(
            "the nodes hold different log ids: "
            + ", ".join(f"{g.name} {g.log_id}" for g in logs.values())
        )
    levels: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    for r in history.records:
        levels[r.ack][r.outcome] += 1
    lost_per_level: dict[str, int] = defaultdict(int)
    for item in verdict.lost:
        lost_per_level[item.ack] += 1
    verdict.levels = [
        LevelSummary(
            level,
            rule(level).describe(),
            counts["ok"],
            counts["unknown"],
            counts["failed"],
            lost_per_level[level],
        )
        for level, counts in sorted(levels.items(), key=lambda kv: _level_order(kv[0]))
    ]
    if convergence is not None:
        if convergence.target is None:
            convergence.target = logs[leader].last
        verdict.convergence = convergence
    return verdict


def _level_order(level: str) -> tuple[int, str]:
    replicas = level_replicas(level)
    return (-1 if replicas is None else replicas, level)


# --- command line -------------------------------------------------------------------------


def _name_value(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise UsageError(f"{what} takes NAME=VALUE, got {text!r}")
    return name, value


def _read_observations(path: str) -> list[tuple[float, dict[str, int | None]]]:
    """JSON lines: {"t": T, "positions": {node: last}} or {"t": T, "node": N, "last": L}."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if "positions" in obj:
                        out.append((float(obj["t"]), dict(obj["positions"])))
                    else:
                        out.append((float(obj["t"]), {str(obj["node"]): obj["last"]}))
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise UsageError(f"{path}:{number}: not an observation") from None
    except OSError as exc:
        raise UsageError(f"cannot read observations {path}: {exc.strerror or exc}") from None
    return out


DESCRIPTION = "Check walrep load --log histories against the final WAL of every node."
EXIT_OK = 0
EXIT_VIOLATIONS = 1
EXIT_USAGE = 2
EPILOG = (
    "exit status: 0 no violation, 1 violations found, 2 usage errors (bad arguments, a "
    "history line that is not a history record, a node directory that does not exist)"
)
# What errors are printed under, as the checker was first a script (check_history.py).
ERROR_PREFIX = "check_history"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The checker's flags, on `walrep check-history` or a parser of its own."""
    p.add_argument(
        "--history",
        action="append",
        required=True,
        metavar="FILE",
        help="a `walrep load --log` history (JSON lines); repeat for each client",
    )
    p.add_argument(
        "--node",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a node's name and final WAL directory; repeat for each node",
    )
    p.add_argument("--leader", default="leader", help="which node is the leader (leader)")
    p.add_argument(
        "--rule",
        choices=sorted(RULES),
        default="default",
        help="what an ack promises: default (on every node covering its seq and on one "
        "node), strict (local: on the leader, replicas=N: and on N readers), reader "
        "(on at least one reader)",
    )
    p.add_argument(
        "--leader-disk-lost",
        action="store_true",
        help="with --rule strict: the leader's disk was lost, do not require entries there",
    )
    p.add_argument("--default-ack", default="local", help="level of lines naming none (local)")
    p.add_argument("--size", type=int, default=None, help="payload size walrep load used (--size)")
    p.add_argument(
        "--tolerate-retry-duplicates",
        action="store_true",
        help="a duplicate of an id some client retried does not fail the verdict",
    )
    p.add_argument("--healed-at", type=float, default=None, help="when the last fault healed")
    p.add_argument(
        "--reached",
        action="append",
        default=[],
        metavar="NAME=T",
        help="when a reader reached the leader's head (with --healed-at)",
    )
    p.add_argument(
        "--observations",
        metavar="FILE",
        help="JSON lines of {t, positions} or {t, node, last} (with --healed-at)",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--max-rows", type=int, default=20, help="table rows per kind (20)")


def build_parser(prog: str = "walrep check-history") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    """The command, given add_arguments' flags parsed: prints the verdict, returns the status."""
    try:
        nodes: dict[str, str] = {}
        for text in args.node:
            name, path = _name_value(text, "--node")
            if name in nodes:
                raise UsageError(f"node {name!r} given twice")
            if not os.path.isdir(path):
                raise UsageError(f"node {name}: {path} is not a directory")
            nodes[name] = path
        if args.leader not in nodes:
            raise UsageError(f"no --node named {args.leader!r} (the leader; see --leader)")
        try:
            normalize_level(args.default_ack)
        except ValueError as exc:
            raise UsageError(f"--default-ack: {exc}") from None
        if args.size is not None and args.size < 0:
            raise UsageError("--size must not be negative")
        convergence = None
        if args.reached or args.observations:
            if args.healed_at is None:
                raise UsageError("--reached and --observations need --healed-at")
            if args.observations:
                convergence = convergence_from_observations(
                    args.healed_at, _read_observations(args.observations), leader=args.leader
                )
            else:
                reached: dict[str, float | None] = {}
                for text in args.reached:
                    name, value = _name_value(text, "--reached")
                    try:
                        reached[name] = None if value == "never" else float(value)
                    except ValueError:
                        raise UsageError(f"--reached {text}: not a time") from None
                convergence = convergence_from_reached(args.healed_at, reached)
        verdict = check(
            args.history,
            nodes,
            leader=args.leader,
            rule=RULES[args.rule](args.leader_disk_lost),
            size=args.size,
            default_ack=args.default_ack,
            tolerate_retry_duplicates=args.tolerate_retry_duplicates,
            convergence=convergence,
        )
    except (UsageError, HistoryError) as exc:
        print(f"{ERROR_PREFIX}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(verdict.to_json() if args.json else verdict.table(args.max_rows))
    return EXIT_OK if verdict.ok else EXIT_VIOLATIONS


def main(argv: Sequence[str] | None = None, prog: str = "walrep check-history") -> int:
    return run(build_parser(prog).parse_args(argv))
