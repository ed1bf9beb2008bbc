"""cluster.protocol: the leader and reader state machines, with no network and no clock.

Most of this file is a simulation in the h11 style: a fake leader log, a
LeaderProtocol with the leader shell's duties done here (publish batches of
consecutive frames, heartbeat, serve fetches with FetchFlow credits), a
ReaderProtocol whose actions build a fake reader log, and a FakeWire between
them that drops, duplicates and reorders every message (seeded). Time is a
number the test advances. Whatever the wire does, once the leader stops writing
and the wire heals, the reader's log must equal the leader's, sequence for
sequence and byte for byte, and every run the reader appended must have started
at exactly its log's next sequence.
"""

from __future__ import annotations

import heapq
import pathlib
import random
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest

from walrep.cluster import protocol, wire
from walrep.cluster.protocol import (
    ACK_INTERVAL_S,
    ACK_KEEPALIVE_S,
    FETCH_CREDIT,
    FETCH_STALL_S,
    HEARTBEAT_INTERVAL_S,
    LEADER_SILENT_S,
    AppendRun,
    Fail,
    FetchFlow,
    LeaderProtocol,
    Note,
    ReaderProtocol,
    ReaderState,
    Send,
    StartLog,
)
from walrep.node.format import ENTRY_HEADER_BYTES, encode_entry

LOG_ID = "log-0123"
READER_ID = "reader-1"
PEER = b"\x00peer-1"
TICK_S = 0.01
# The leader shell abandons a fetch nobody gives credit to (cluster/leader.py FETCH_IDLE_S).
FLOW_IDLE_S = 10.0


def frame(seq: int) -> bytes:
    """The leader's frame for seq: varied sizes, distinct bytes, deterministic."""
    payload = (f"entry {seq};".encode() * (1 + seq % 7))[: 5 + (seq * 37) % 90]
    return encode_entry(1_700_000_000_000_000 + seq, payload)


def split(frames: bytes) -> list[bytes]:
    """A run of frames, one by one (checks the run is exactly whole frames)."""
    out, pos = [], 0
    while pos < len(frames):
        (length,) = struct.unpack_from(">I", frames, pos)
        end = pos + ENTRY_HEADER_BYTES + length
        assert end <= len(frames), "a run of frames ends mid-frame"
        out.append(frames[pos:end])
        pos = end
    return out


def run_of(first: int, last: int) -> bytes:
    return b"".join(frame(s) for s in range(first, last + 1))


def batch(first: int, last: int, log_id: str = LOG_ID) -> wire.Batch:
    return wire.Batch(log_id, first, last - first + 1, run_of(first, last))


def sends(actions, kind=wire.Message) -> list:
    return [a.message for a in actions if isinstance(a, Send) and isinstance(a.message, kind)]


def of(actions, kind) -> list:
    return [a for a in actions if isinstance(a, kind)]


# --- the fake wire -----------------------------------------------------------------------


@dataclass
class FakeWire:
    """Carries encoded messages with seeded drops, duplicates and reordering.

    Each copy gets its own random delay (up to jitter_s), which is what reorders;
    a partition drops everything; block_chunks drops every fetch chunk.
    """

    rng: random.Random
    drop: float = 0.0
    dup: float = 0.0
    jitter_s: float = 0.0
    latency_s: float = 0.002
    partitioned: bool = False
    block_chunks: bool = False
    _queue: list = field(default_factory=list)
    _n: int = 0
    sent: Counter = field(default_factory=Counter)
    dropped: int = 0

    def send(self, now: float, dest: str, message: wire.Message) -> None:
        self.sent[message.KIND] += 1
        if (
            self.partitioned
            or (self.block_chunks and isinstance(message, wire.Chunk))
            or self.rng.random() < self.drop
        ):
            self.dropped += 1
            return
        data = wire.encode(message)
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            at = now + self.latency_s + self.rng.random() * self.jitter_s
            self._n += 1
            heapq.heappush(self._queue, (at, self._n, dest, data))

    def due(self, now: float):
        while self._queue and self._queue[0][0] <= now:
            _at, _n, dest, data = heapq.heappop(self._queue)
            yield dest, wire.decode(data)

    def heal(self) -> None:
        self.drop = self.dup = self.jitter_s = 0.0
        self.partitioned = self.block_chunks = False

    @property
    def idle(self) -> bool:
        return not self._queue


# --- the simulation --------------------------------------------------------------------


class Sim:
    """One leader, one reader, a FakeWire, and the shells' duties done by hand."""

    def __init__(
        self,
        seed: int,
        *,
        leader_first: int = 1,
        leader_head: int = 0,
        reader_last: int | None = None,  # None: an empty reader with no log id
        drop: float = 0.0,
        dup: float = 0.0,
        jitter_s: float = 0.0,
    ):
        self.rng = random.Random(seed)
        self.now = 0.0
        self.wire = FakeWire(random.Random(seed * 7919 + 1), drop, dup, jitter_s)
        # The leader's log: sequences earliest..head, as frames.
        self.log = {s: frame(s) for s in range(leader_first, leader_head + 1)}
        self.earliest = leader_first
        self.head = leader_head
        self.boots = 0
        self.leader = self._new_leader()
        self.flows: dict[tuple[bytes, int], list] = {}  # key -> [FetchFlow, last credit time]
        self.next_beat = 0.0
        self.hellos_seen = 0
        # The reader and its log.
        if reader_last is None:
            self.rlog: dict[int, bytes] = {}
            self.rnext: int | None = None  # no log adopted yet
            self.reader = ReaderProtocol(READER_ID, None, 0, 0)
        else:
            self.rlog = {s: frame(s) for s in range(1, reader_last + 1)}
            self.rnext = reader_last + 1
            self.reader = ReaderProtocol(READER_ID, LOG_ID, reader_last, reader_last)
        self.rdurable = self.reader.durable
        self.start_logs: list[StartLog] = []
        self.fails: list[Fail] = []
        self.notes: Counter = Counter()
        self.hello_attempts = 0
        self.next_hello = 0.0

    def _new_leader(self) -> LeaderProtocol:
        self.boots += 1
        return LeaderProtocol(LOG_ID, f"boot-{self.boots}", self.head, self.earliest)

    # leader shell ------------------------------------------------------------

    def write(self, n: int) -> None:
        """Commit n entries and publish them in one or more batches of consecutive frames."""
        first = self.head + 1
        for s in range(first, first + n):
            self.log[s] = frame(s)
        self.head += n
        self.leader.on_commit(self.head)
        start = first
        while start <= self.head:
            end = min(self.head, start + self.rng.randint(0, 4))
            self.wire.send(self.now, "pub", batch(start, end))
            start = end + 1

    def restart_leader(self) -> None:
        """The leader process restarts: same log, new boot id, its fetch flows gone."""
        self.leader = self._new_leader()
        self.flows.clear()
        self.next_beat = self.now

    def heartbeat(self) -> None:
        if self.now >= self.next_beat:
            self.wire.send(self.now, "pub", self.leader.heartbeat(int(self.now * 1e6)))
            self.next_beat = self.now + HEARTBEAT_INTERVAL_S

    def leader_receive(self, message: wire.Message) -> None:
        if isinstance(message, wire.Credit):
            entry = self.flows.get((PEER, message.fetch_id))
            if entry is not None:
                entry[0].add_credit(message.credit)
                entry[1] = self.now
            return
        if isinstance(message, wire.Hello):
            self.hellos_seen += 1
        actions = self.leader.on_control(PEER, message, self.now)
        for action in actions:
            if isinstance(action, Send):
                assert action.peer == PEER
                self.wire.send(self.now, "control", action.message)
        if isinstance(message, wire.Fetch) and not actions:
            to_seq = min(message.to_seq, self.leader.head)
            flow = FetchFlow(message.fetch_id, message.from_seq, to_seq, message.credit)
            self.flows[(PEER, message.fetch_id)] = [flow, self.now]

    def serve_fetches(self) -> None:
        for key, entry in list(self.flows.items()):
            flow = entry[0]
            while flow.can_send():
                first = flow.next_seq
                last = min(flow.to_seq, first + self.rng.randint(0, 6))
                frames = b"".join(self.log[s] for s in range(first, last + 1))
                self.wire.send(self.now, "control", flow.chunk(first, last - first + 1, frames))
            if flow.done or self.now - entry[1] > FLOW_IDLE_S:
                del self.flows[key]

    # reader shell ------------------------------------------------------------

    def run_reader(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, AppendRun):
                assert not self.fails, "appended after a Fail"
                assert self.rnext is not None, "AppendRun before the reader has a log"
                assert action.first_seq == self.rnext, (action.first_seq, self.rnext)
                pieces = split(action.frames)
                assert len(pieces) == action.count
                for offset, piece in enumerate(pieces):
                    self.rlog[action.first_seq + offset] = piece
                self.rnext += action.count
            elif isinstance(action, StartLog):
                assert self.rnext is None and not self.rlog, "StartLog on a reader with a log"
                assert action.log_id == LOG_ID
                self.start_logs.append(action)
                self.rnext = action.first_seq
            elif isinstance(action, Send):
                assert action.peer is None
                self.wire.send(self.now, "leader", action.message)
            elif isinstance(action, Fail):
                self.fails.append(action)
            else:
                assert isinstance(action, Note)
                self.notes[action.event] += 1
        if self.rnext is not None and not self.fails:
            # The protocol's position is always exactly what the shell has appended.
            assert self.reader.applied == self.rnext - 1

    def reader_hello_loop(self) -> None:
        """What the reader shell's back-off loop does: hello until welcomed."""
        if not self.reader.needs_handshake():
            self.hello_attempts = 0
            self.next_hello = self.now
            return
        if self.now >= self.next_hello:
            self.run_reader([Send(self.reader.hello())])
            self.hello_attempts += 1
            backoff = min(2.0, 0.1 * 2**self.hello_attempts)
            self.next_hello = self.now + backoff * (0.5 + self.rng.random())

    # time --------------------------------------------------------------------

    def step(self, *, write: bool) -> None:
        self.now += TICK_S
        if write and self.rng.random() < 0.5:
            self.write(self.rng.randint(1, 6))
        self.heartbeat()
        for dest, message in self.wire.due(self.now):
            if dest == "leader":
                self.leader_receive(message)
            elif dest == "pub":
                self.run_reader(self.reader.on_publish(message, self.now))
            else:
                self.run_reader(self.reader.on_control(message, self.now))
        self.serve_fetches()
        self.run_reader(self.reader.on_tick(self.now))
        # The local WAL makes what was appended durable a tick later.
        self.run_reader(self.reader.on_durable(self.rdurable, self.now))
        self.rdurable = (self.rnext or 1) - 1
        self.reader_hello_loop()
        assert not self.fails, self.fails

    def run(self, seconds: float, *, write: bool = False) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(write=write)

    def converged(self) -> bool:
        return (
            self.reader.state is ReaderState.STREAMING
            and self.rnext == self.head + 1
            and self.wire.idle
        )

    def heal_and_settle(self, limit_s: float = 60.0) -> None:
        self.wire.heal()
        end = self.now + limit_s
        while not self.converged():
            assert self.now < end, (
                f"no convergence: reader at {self.rnext}, head {self.head}, "
                f"state {self.reader.state}, notes {dict(self.notes)}"
            )
            self.step(write=False)

    def assert_same_log(self, first: int) -> None:
        assert not self.fails
        assert self.head >= first, "the scenario wrote nothing"
        assert min(self.rlog) == first
        assert sorted(self.rlog) == list(range(first, self.head + 1))
        for s in range(first, self.head + 1):
            assert self.rlog[s] == self.log[s], f"sequence {s} differs"
        assert self.reader.applied == self.head


def chaos(rng: random.Random) -> dict:
    return {
        "drop": rng.choice([0.0, 0.02, 0.1, 0.25]),
        "dup": rng.choice([0.0, 0.05, 0.2]),
        "jitter_s": rng.choice([0.0, 0.02, 0.15, 0.4]),
    }


SEEDS = 35  # per scenario; seven scenarios make ~245 simulations


@pytest.mark.parametrize("seed", range(SEEDS))
def test_empty_reader_joins_a_live_leader(seed):
    rng = random.Random(seed)
    sim = Sim(seed, leader_head=rng.randint(0, 40), **chaos(rng))
    sim.run(rng.uniform(1.0, 4.0), write=True)
    sim.heal_and_settle()
    sim.assert_same_log(1)
    assert [s.first_seq for s in sim.start_logs] == [1]


@pytest.mark.parametrize("seed", range(SEEDS))
def test_empty_reader_starts_at_the_leaders_earliest(seed):
    rng = random.Random(seed)
    earliest = rng.randint(2, 500)
    sim = Sim(seed, leader_first=earliest, leader_head=earliest + rng.randint(0, 60), **chaos(rng))
    sim.run(rng.uniform(0.5, 3.0), write=True)
    sim.heal_and_settle()
    assert [(s.log_id, s.first_seq) for s in sim.start_logs] == [(LOG_ID, earliest)]
    sim.assert_same_log(earliest)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_reader_starting_in_the_middle(seed):
    rng = random.Random(seed)
    head = rng.randint(1, 300)
    sim = Sim(seed, leader_head=head, reader_last=rng.randint(0, head), **chaos(rng))
    sim.run(rng.uniform(0.5, 3.0), write=True)
    sim.heal_and_settle()
    sim.assert_same_log(1)
    assert not sim.start_logs


@pytest.mark.parametrize("seed", range(SEEDS))
def test_leader_restarts_mid_stream(seed):
    rng = random.Random(seed)
    sim = Sim(seed, leader_head=rng.randint(0, 50), reader_last=None, **chaos(rng))
    for _ in range(rng.randint(1, 3)):
        sim.run(rng.uniform(0.3, 2.0), write=True)
        sim.restart_leader()
    sim.run(rng.uniform(0.3, 2.0), write=True)
    sim.heal_and_settle()
    sim.assert_same_log(1)
    assert sim.reader.leader_boot_id == sim.leader.boot_id
    # The new leader learned where the reader stands from its hello.
    assert READER_ID in sim.leader.readers


@pytest.mark.parametrize("seed", range(SEEDS))
def test_silent_leader_then_handshake_again(seed):
    rng = random.Random(seed)
    sim = Sim(seed, leader_head=rng.randint(0, 50), reader_last=0, **chaos(rng))
    sim.run(rng.uniform(1.0, 2.0), write=True)
    sim.heal_and_settle()  # streaming before the silence, so the silence is noticed
    hellos = sim.hellos_seen
    sim.wire.partitioned = True
    sim.run(LEADER_SILENT_S + rng.uniform(0.2, 2.0), write=rng.random() < 0.5)
    assert sim.reader.state is ReaderState.DISCONNECTED
    assert sim.reader.needs_handshake()
    assert sim.notes["leader-silent"] >= 1
    sim.wire.partitioned = False
    sim.run(rng.uniform(0.0, 2.0), write=True)
    sim.heal_and_settle()
    assert sim.hellos_seen > hellos
    sim.assert_same_log(1)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_heavy_reordering_across_restarts_and_silences(seed):
    """Delays longer than LEADER_SILENT_S: late welcomes and heartbeats of old leader
    processes arrive after reconnects, and must not be taken for current ones."""
    rng = random.Random(seed)
    sim = Sim(seed, leader_head=rng.randint(0, 50), reader_last=0, drop=0.1, dup=0.3)
    sim.wire.jitter_s = rng.choice([0.8, 1.5, 3.0])
    for _ in range(rng.randint(1, 4)):
        sim.run(rng.uniform(0.5, 3.0), write=True)
        if rng.random() < 0.5:
            sim.restart_leader()
        else:
            sim.wire.partitioned = True
            sim.run(rng.uniform(0.5, 2.5), write=rng.random() < 0.5)
            sim.wire.partitioned = False
    sim.heal_and_settle()
    sim.assert_same_log(1)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_lost_fetch_chunks_recover_after_the_stall_timeout(seed):
    rng = random.Random(seed)
    head = rng.randint(20, 400)
    sim = Sim(seed, leader_head=head, reader_last=rng.randint(0, head - 10), **chaos(rng))
    sim.wire.block_chunks = True
    sim.run(FETCH_STALL_S + 1.0, write=rng.random() < 0.5)
    assert sim.notes["fetch-stalled"] >= 1
    assert sim.rnext <= head - 9  # nothing fetched while chunks were lost
    sim.wire.block_chunks = False
    sim.heal_and_settle()
    sim.assert_same_log(1)


def test_chunks_lost_in_the_middle_of_a_fetch():
    sim = Sim(1, leader_head=400, reader_last=0)
    lost = 0
    real_send = sim.wire.send

    def send(now, dest, message):
        nonlocal lost
        # Lose the second chunk of the first fetch, and everything it lets through after.
        if isinstance(message, wire.Chunk) and message.fetch_id == 1 and message.first_seq > 1:
            lost += 1
            return
        real_send(now, dest, message)

    sim.wire.send = send
    sim.run(1.0)
    assert 0 < sim.rnext - 1 < 400 and sim.reader.fetch is not None
    sim.run(FETCH_STALL_S)
    assert lost and sim.notes["fetch-stalled"] == 1
    sim.heal_and_settle()
    sim.assert_same_log(1)


# --- direct tests: the reader ------------------------------------------------------------


def welcomed(reader: ReaderProtocol, head: int, earliest: int = 1, now: float = 0.0) -> list:
    return reader.on_control(wire.Welcome(LOG_ID, "boot-1", head, earliest), now)


def test_log_id_mismatch_in_the_welcome_fails_and_appends_nothing():
    reader = ReaderProtocol(READER_ID, "another-log", 10, 10)
    reader.on_publish(batch(11, 12), 0.0)  # held while handshaking
    actions = welcomed(reader, head=20)
    assert of(actions, AppendRun) == [] and of(actions, StartLog) == []
    (fail,) = of(actions, Fail)
    assert fail.code == "log-mismatch"
    assert LOG_ID in fail.message and "another-log" in fail.message
    assert reader.state is ReaderState.FAILED and not reader.needs_handshake()
    # Failed is final: nothing more comes out, whatever arrives.
    assert reader.on_publish(batch(11, 12), 1.0) == []
    assert welcomed(reader, head=20) == []
    assert reader.on_tick(100.0) == []
    assert reader.applied == 10


def test_log_id_mismatch_refused_by_the_leader():
    leader = LeaderProtocol(LOG_ID, "boot-1", 20, 1)
    reader = ReaderProtocol(READER_ID, "another-log", 10, 10)
    answer = leader.on_control(PEER, reader.hello(), 0.0)
    (refusal,) = sends(answer, wire.Refused)
    assert refusal.code == "log-mismatch"
    assert READER_ID not in leader.readers
    (fail,) = of(reader.on_control(refusal, 0.0), Fail)
    assert fail.code == "log-mismatch"
    assert reader.state is ReaderState.FAILED


def test_batches_of_another_log_are_never_applied():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    welcomed(reader, head=0)
    actions = reader.on_publish(batch(1, 3, log_id="other"), 0.1)
    assert of(actions, AppendRun) == [] and reader.applied == 0


def test_reader_ahead_of_the_leader_fails_naming_the_range():
    reader = ReaderProtocol(READER_ID, LOG_ID, 20, 20)
    actions = welcomed(reader, head=15)
    assert of(actions, AppendRun) == []
    (fail,) = of(actions, Fail)
    assert fail.code == "reader-ahead"
    assert "16..20" in fail.message and "--resync" in fail.message
    assert reader.state is ReaderState.FAILED


def test_too_old_in_the_welcome():
    reader = ReaderProtocol(READER_ID, LOG_ID, 5, 5)
    (fail,) = of(welcomed(reader, head=100, earliest=50), Fail)
    assert fail.code == "too-old"
    assert "6" in fail.message and "50" in fail.message and "--resync" in fail.message
    assert reader.applied == 5


def test_too_old_refused_fetch():
    leader = LeaderProtocol(LOG_ID, "boot-1", 100, 1)
    reader = ReaderProtocol(READER_ID, LOG_ID, 5, 5)
    welcomed(reader, head=100, earliest=1)
    leader.on_purge(50)  # purged after the welcome, before the fetch arrived
    fetch = reader.fetch
    assert fetch is not None
    (refusal,) = sends(leader.check_fetch(PEER, wire.Fetch(fetch.fetch_id, 6, 100, 4)))
    (fail,) = of(reader.on_control(refusal, 0.1), Fail)
    assert fail.code == "too-old"
    assert "sequence 6" in fail.message and "50" in fail.message and "--resync" in fail.message


def test_exactly_the_earliest_is_not_too_old():
    reader = ReaderProtocol(READER_ID, LOG_ID, 49, 49)
    actions = welcomed(reader, head=100, earliest=50)
    assert not of(actions, Fail)
    (fetch,) = sends(actions, wire.Fetch)
    assert (fetch.from_seq, fetch.to_seq) == (50, 100)


def test_empty_reader_adopts_the_log_at_the_earliest():
    reader = ReaderProtocol(READER_ID, None, 0, 0)
    actions = welcomed(reader, head=80, earliest=30)
    assert of(actions, StartLog) == [StartLog(LOG_ID, 30)]
    (fetch,) = sends(actions, wire.Fetch)
    assert (fetch.from_seq, fetch.to_seq) == (30, 80)
    assert reader.log_id == LOG_ID and reader.applied == 29


def test_duplicate_and_overlapping_batches():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    welcomed(reader, head=0)
    assert of(reader.on_publish(batch(1, 3), 0.1), AppendRun) == [AppendRun(1, 3, run_of(1, 3))]
    assert reader.on_publish(batch(1, 3), 0.2) == []
    assert reader.on_publish(batch(2, 3), 0.2) == []
    # Overlapping: only the new part, cut at a frame boundary.
    assert of(reader.on_publish(batch(2, 6), 0.3), AppendRun) == [AppendRun(4, 3, run_of(4, 6))]
    assert reader.applied == 6


def test_a_gap_is_fetched_while_live_batches_wait():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    welcomed(reader, head=0)
    actions = reader.on_publish(batch(11, 12), 0.1)
    assert of(actions, AppendRun) == []
    (fetch,) = sends(actions, wire.Fetch)
    assert (fetch.from_seq, fetch.to_seq, fetch.credit) == (1, 10, FETCH_CREDIT)
    assert reader.state is ReaderState.CATCHING_UP
    assert reader.on_publish(batch(13, 13), 0.2) == []  # held too: no second fetch
    chunk = wire.Chunk(fetch.fetch_id, 1, 10, run_of(1, 10), True)
    runs = of(reader.on_control(chunk, 0.3), AppendRun)
    assert runs == [AppendRun(1, 10, run_of(1, 10)), AppendRun(11, 2, run_of(11, 12))] + [
        AppendRun(13, 1, run_of(13, 13))
    ]
    assert reader.state is ReaderState.STREAMING and reader.fetch is None


def test_a_heartbeat_past_the_reader_opens_a_gap():
    reader = ReaderProtocol(READER_ID, LOG_ID, 3, 3)
    welcomed(reader, head=3)
    beat = wire.Heartbeat(LOG_ID, "boot-1", 9, 1, 0)
    (fetch,) = sends(reader.on_publish(beat, 0.1), wire.Fetch)
    assert (fetch.from_seq, fetch.to_seq) == (4, 9)


def test_credit_is_returned_per_chunk():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    (fetch,) = sends(welcomed(reader, head=9), wire.Fetch)
    actions = reader.on_control(wire.Chunk(fetch.fetch_id, 1, 3, run_of(1, 3), False), 0.1)
    assert sends(actions, wire.Credit) == [wire.Credit(fetch.fetch_id, 1)]
    # A chunk of an older fetch is ignored.
    assert reader.on_control(wire.Chunk(99, 4, 3, run_of(4, 6), False), 0.2) == []


def test_a_stalled_fetch_is_asked_again_from_where_it_stands():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    (first,) = sends(welcomed(reader, head=20), wire.Fetch)
    reader.on_control(wire.Chunk(first.fetch_id, 1, 5, run_of(1, 5), False), 1.0)
    beat = wire.Heartbeat(LOG_ID, "boot-1", 20, 1, 0)
    before, after = 1.0 + FETCH_STALL_S - 0.01, 1.0 + FETCH_STALL_S + 0.01
    assert reader.on_publish(beat, before) == []  # the leader is alive, the fetch is not
    assert reader.on_tick(before) == []
    actions = reader.on_tick(after)
    assert "fetch-stalled" in [n.event for n in of(actions, Note)]
    (again,) = sends(actions, wire.Fetch)
    assert (again.from_seq, again.to_seq) == (6, 20) and again.fetch_id != first.fetch_id


def test_silent_leader_disconnects_and_a_welcome_reconnects():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    welcomed(reader, head=0, now=0.0)
    assert reader.on_tick(LEADER_SILENT_S - 0.01) == []
    actions = reader.on_tick(LEADER_SILENT_S + 0.01)
    assert [n.event for n in of(actions, Note)] == ["leader-silent"]
    assert reader.state is ReaderState.DISCONNECTED and reader.needs_handshake()
    hello = reader.hello()
    assert (hello.reader_id, hello.log_id, hello.last_seq, hello.durable_seq) == (
        READER_ID,
        LOG_ID,
        0,
        0,
    )
    welcomed(reader, head=0, now=2.0)
    assert reader.state is ReaderState.STREAMING


def test_a_new_boot_id_in_a_heartbeat_means_a_new_handshake():
    reader = ReaderProtocol(READER_ID, LOG_ID, 4, 4)
    welcomed(reader, head=4)
    actions = reader.on_publish(wire.Heartbeat(LOG_ID, "boot-2", 4, 1, 0), 0.1)
    (hello,) = sends(actions, wire.Hello)
    assert (hello.log_id, hello.last_seq) == (LOG_ID, 4)
    assert reader.needs_handshake()
    reader.on_control(wire.Welcome(LOG_ID, "boot-2", 4, 1, hello.hello_id), 0.2)
    assert reader.state is ReaderState.STREAMING and reader.leader_boot_id == "boot-2"


def answer(leader: LeaderProtocol, hello: wire.Hello, now: float = 0.0) -> wire.Welcome:
    (welcome,) = sends(leader.on_control(PEER, hello, now), wire.Welcome)
    return welcome


def test_the_welcome_echoes_the_hello():
    leader = LeaderProtocol(LOG_ID, "boot-1", 5, 1)
    assert answer(leader, wire.Hello(READER_ID, LOG_ID, 0, 0, hello_id=17)).hello_id == 17
    assert answer(leader, wire.Hello(READER_ID, LOG_ID, 0, 0)).hello_id is None
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    first, second = reader.hello(), reader.hello()
    assert second.hello_id == first.hello_id + 1


def test_a_late_welcome_after_a_reconnect_is_not_a_reader_ahead():
    """Two hellos were answered; the second welcome (old head) lands after a disconnect.

    Judged on that welcome the reader would look ahead of the leader (it holds 10, the
    welcome says 2) and stop for good; it is an answer to a hello of the previous
    handshake, so it is ignored and the next hello's answer is used.
    """
    leader = LeaderProtocol(LOG_ID, "boot-1", 2, 1)
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    first, retry = answer(leader, reader.hello()), answer(leader, reader.hello())
    reader.on_control(first, 0.0)
    leader.on_commit(10)
    reader.on_publish(batch(1, 10), 0.1)
    assert reader.applied == 10
    assert reader.on_control(retry, 0.2) == []  # streaming: no hello outstanding
    reader.on_tick(0.1 + LEADER_SILENT_S + 0.01)
    assert reader.state is ReaderState.DISCONNECTED
    actions = reader.on_control(retry, 2.0)  # the same late answer, after the disconnect
    assert not of(actions, Fail)
    assert [n.event for n in of(actions, Note)] == ["stale-welcome"]
    assert reader.needs_handshake()  # still waiting for a current answer
    reader.on_control(answer(leader, reader.hello(), 2.1), 2.2)
    assert reader.state is ReaderState.STREAMING and reader.applied == 10


def test_a_welcome_from_before_a_leader_restart_is_ignored():
    old = LeaderProtocol(LOG_ID, "boot-1", 3, 1)
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    late = answer(old, reader.hello())
    reader.on_control(answer(old, reader.hello()), 0.0)
    new = LeaderProtocol(LOG_ID, "boot-2", 20, 1)
    reader.on_publish(batch(1, 20), 0.1)
    (hello,) = sends(reader.on_publish(new.heartbeat(0), 0.2), wire.Hello)
    welcome = answer(new, hello)
    assert not of(reader.on_control(late, 0.3), Fail)  # boot-1's answer, head 3 < 20
    assert reader.needs_handshake()
    reader.on_control(welcome, 0.4)
    assert reader.state is ReaderState.STREAMING and reader.leader_boot_id == "boot-2"
    # Streaming on boot-2, the late boot-1 answer changes nothing either.
    assert reader.on_control(late, 0.5) == []
    assert reader.leader_boot_id == "boot-2"


def test_a_real_reader_ahead_is_still_caught_after_a_reconnect():
    leader = LeaderProtocol(LOG_ID, "boot-1", 10, 1)
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    reader.on_control(answer(leader, reader.hello()), 0.0)
    reader.on_publish(batch(1, 10), 0.1)
    reader.on_tick(0.1 + LEADER_SILENT_S + 0.01)
    wiped = LeaderProtocol(LOG_ID, "boot-2", 4, 1)  # restarted having lost 5..10
    (fail,) = of(reader.on_control(answer(wiped, reader.hello()), 2.0), Fail)
    assert fail.code == "reader-ahead" and "5..10" in fail.message


def test_acks_are_rate_limited_and_kept_alive():
    reader = ReaderProtocol(READER_ID, LOG_ID, 0, 0)
    assert reader.on_durable(0, 0.0) == []  # no ack before the handshake
    welcomed(reader, head=100)

    def acked(actions):
        return [(m.durable_seq, m.state) for m in sends(actions)]

    assert acked(reader.on_durable(10, 1.0)) == [(10, "catching-up")]
    assert reader.on_durable(10, 1.5) == []  # nothing new
    assert reader.on_durable(20, 1.0 + ACK_INTERVAL_S / 2) == []  # too soon
    assert acked(reader.on_durable(20, 1.0 + 2 * ACK_INTERVAL_S)) == [(20, "catching-up")]
    # Caught up with the leader's head: acked at once, rate limit or not.
    assert acked(reader.on_durable(100, 1.0 + 2 * ACK_INTERVAL_S + ACK_INTERVAL_S / 4)) == [
        (100, "catching-up")
    ]
    # Idle, the reader still says it is alive once per keepalive interval.
    assert reader.on_durable(100, 2.0) == []
    assert acked(reader.on_durable(100, 2.0 + ACK_KEEPALIVE_S)) == [(100, "catching-up")]


# --- direct tests: the leader --------------------------------------------------------------


def test_leader_records_reader_positions_and_reports_lag():
    leader = LeaderProtocol(LOG_ID, "boot-1", 100, 1)
    actions = leader.on_control(PEER, wire.Hello(READER_ID, LOG_ID, 40, 30), 10.0)
    assert sends(actions) == [wire.Welcome(LOG_ID, "boot-1", 100, 1)]
    assert all(a.peer == PEER for a in actions if isinstance(a, Send))
    info = leader.readers[READER_ID]
    assert (info.applied_seq, info.durable_seq, info.peer) == (40, 30, PEER)
    # Only the session that hand-shook as the reader moves its position.
    (refused,) = sends(leader.on_control(b"new-peer", wire.Ack(READER_ID, 90, 80), 11.0))
    assert refused.code == "unknown-session"
    assert (info.applied_seq, info.durable_seq) == (40, 30)
    assert leader.on_control(PEER, wire.Ack(READER_ID, 90, 80), 11.0) == []
    assert leader.on_control(PEER, wire.Ack(READER_ID, 70, 60), 11.5) == []  # reordered: kept max
    leader.on_control(PEER, wire.Ack("stranger", 1, 1), 11.0)  # no hello: ignored
    leader.on_commit(120)
    leader.on_control(PEER, wire.Hello("reader-0", None, 0, 0), 12.0)
    status = leader.status(12.0)
    assert (status["head_seq"], status["earliest_seq"], status["log_id"]) == (120, 1, LOG_ID)
    assert [r["id"] for r in status["readers"]] == ["reader-0", READER_ID]
    mine = status["readers"][1]
    assert (mine["applied_seq"], mine["durable_seq"], mine["lag_entries"]) == (90, 80, 40)
    assert mine["last_contact_s_ago"] == 0.5
    assert status["readers"][0]["lag_entries"] == 120
    # A reader that restarts with less (it lost its log) is believed.
    leader.on_control(PEER, wire.Hello(READER_ID, LOG_ID, 5, 5), 13.0)
    assert leader.readers[READER_ID].durable_seq == 5
    # The status travels as a message.
    (reply,) = sends(leader.on_control(PEER, wire.StatusRequest(), 13.0))
    assert wire.decode(wire.encode(reply)).status == leader.status(13.0)


def test_check_fetch():
    leader = LeaderProtocol(LOG_ID, "boot-1", 100, 20)
    assert leader.check_fetch(PEER, wire.Fetch(1, 20, 100, 4)) == []
    assert leader.check_fetch(PEER, wire.Fetch(1, 100, 200, 4)) == []  # the shell clamps
    (old,) = sends(leader.check_fetch(PEER, wire.Fetch(7, 19, 100, 4)))
    assert (old.code, old.earliest_seq, old.request_id) == ("too-old", 20, 7)
    assert "19" in old.message and "20" in old.message
    (past,) = sends(leader.check_fetch(PEER, wire.Fetch(8, 101, 110, 4)))
    assert (past.code, past.request_id) == ("bad-request", 8)
    # on_control routes fetches through check_fetch.
    assert sends(leader.on_control(PEER, wire.Fetch(9, 19, 100, 4), 0.0))[0].code == "too-old"


def test_leader_refuses_messages_that_are_not_control_requests():
    leader = LeaderProtocol(LOG_ID, "boot-1", 1, 1)
    (refusal,) = sends(leader.on_control(PEER, batch(1, 1), 0.0))
    assert refusal.code == "bad-request"


def test_fetch_flow_credits():
    flow = FetchFlow(3, 10, 19, 2)
    assert flow.can_send() and not flow.done
    first = flow.chunk(10, 4, run_of(10, 13))
    assert (first.fetch_id, first.first_seq, first.count, first.last) == (3, 10, 4, False)
    flow.chunk(14, 3, run_of(14, 16))
    assert not flow.can_send() and not flow.done  # out of credit
    flow.add_credit(1)
    last = flow.chunk(17, 3, run_of(17, 19))
    assert last.last and flow.done and not flow.can_send()
    flow.add_credit(1000)
    assert flow.credit <= 64


def test_protocol_has_no_io():
    """The state machines import neither sockets nor clocks (h11's rule)."""
    source = pathlib.Path(protocol.__file__).read_text()
    for forbidden in ("import socket", "import zmq", "import trio", "import time", "open("):
        assert forbidden not in source
