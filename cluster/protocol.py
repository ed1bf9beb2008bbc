"""The replication protocol as pure state machines (sans-IO, like h11).

Inputs are decoded wire messages and a time value; outputs are actions for a
shell to carry out: messages to send, runs of frames to append, a log to adopt,
a fatal stop. Nothing here touches a socket, a file or a clock, which is what
lets tests drive a leader and a reader through a fake wire that drops,
duplicates and reorders.

Reader side, in the shape of the ZeroMQ guide's Clone pattern: subscribe
first, hand-shake, then apply only the next sequence; a batch that starts past
it, or a heartbeat whose head is past it, opens a gap that is fetched over the
control channel while live batches wait in a bounded buffer.
"""

from __future__ import annotations

import collections
import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

from walrep.node.format import WALError, frames_offset

from . import wire

HEARTBEAT_INTERVAL_S = 0.25
# A leader silent for this long is treated as gone: the reader re-handshakes.
LEADER_SILENT_S = 4 * HEARTBEAT_INTERVAL_S
# A fetch that brings no chunk for this long is asked again from where it stands.
FETCH_STALL_S = 5.0
FETCH_CREDIT = 4  # chunks in flight per fetch (the zguide fileio3 pipeline)
# Live batches held while a gap is fetched. Past this they are dropped: the fetch
# is simply extended to cover them, so the bound costs time, never entries.
LIVE_BUFFER_BYTES = 64 * 1024 * 1024
# Acks go out on every sync of the reader's WAL (that already batches them);
# this only caps them when syncs come faster than the leader needs to hear.
# Every known reader costs retention and status work; past this many, a new one
# is refused until an old one is forgotten.
MAX_READERS = 256
ACK_INTERVAL_S = 0.001
# An idle reader still acks this often, so the leader can tell idle from gone.
ACK_KEEPALIVE_S = 1.0
# A reader not heard from for this long is shown as disconnected.
READER_SILENT_S = 3 * ACK_KEEPALIVE_S


class ReaderState(enum.StrEnum):
    CONNECTING = "connecting"  # hello sent (or to send), no welcome yet
    STREAMING = "streaming"
    CATCHING_UP = "catching-up"
    DISCONNECTED = "disconnected"  # the leader went silent
    FAILED = "failed"
    # Anti-entropy found this log differs from the leader's: stopped like FAILED
    # (nothing applied, fetched or acked), but the process stays up to say so.
    DIVERGED = "diverged"


# --- actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a message on the control channel (to the leader, or from it to peer)."""

    message: wire.Message
    peer: bytes | None = None


@dataclass(frozen=True, slots=True)
class AppendRun:
    """Append these frames at first_seq (always the log's next sequence)."""

    first_seq: int
    count: int
    frames: bytes


@dataclass(frozen=True, slots=True)
class StartLog:
    """An empty reader adopts the leader's log, starting at first_seq."""

    log_id: str
    first_seq: int


@dataclass(frozen=True, slots=True)
class Fail:
    """Stop: replicating further would mix histories or cannot succeed."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line (the shell decides how to log it)."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Action = Send | AppendRun | StartLog | Fail | Note


@dataclass
class _Fetch:
    fetch_id: int
    to_seq: int
    last_progress: float


class ReaderProtocol:
    """One reader's view of replication. See the module docstring."""

    def __init__(
        self,
        reader_id: str,
        log_id: str | None,
        last_seq: int,
        durable_seq: int,
        credential: str | None = None,
    ):
        self.reader_id = reader_id
        self.credential = credential  # proves to the leader that we hold this reader's log
        self.log_id = log_id
        self.applied = last_seq
        self.durable = durable_seq
        self.state = ReaderState.CONNECTING
        # The first sequence where this log differs from the leader's (set by diverge()).
        self.diverged_at: int | None = None
        self.leader_boot_id: str | None = None
        # Hellos carry a number the welcome echoes. A welcome answering a hello sent
        # before the current handshake began is stale (it may come from before a
        # restart, with an old head): acting on it could fail us as "reader-ahead".
        self._hellos_sent = 0
        self._handshake_from = 1  # the first hello number of the current handshake
        self.leader_head = 0
        self.leader_earliest = 0
        self.last_heard: float | None = None
        self.fetch: _Fetch | None = None
        self._fetch_ids = 0
        self._pending: dict[int, wire.Batch] = {}  # first_seq -> live batch held during a gap
        self._pending_bytes = 0
        self._acked = -1
        self._last_ack_at = float("-inf")
        self.gaps_detected = 0
        self.fetches = 0
        self.entries_fetched = 0
        self.reconnects = 0

    # --- handshake ---------------------------------------------------------------

    def hello(self) -> wire.Hello:
        """The next hello to send (numbered: call it once per hello sent)."""
        self._hellos_sent += 1
        return wire.Hello(
            self.reader_id,
            self.log_id,
            self.applied,
            self.durable,
            hello_id=self._hellos_sent,
            credential=self.credential,
        )

    def _begin_handshake(self, state: ReaderState) -> None:
        self.state = state
        self._handshake_from = self._hellos_sent + 1

    def needs_handshake(self) -> bool:
        return self.state in (ReaderState.CONNECTING, ReaderState.DISCONNECTED)

    def stopped(self) -> bool:
        """FAILED or DIVERGED: nothing more is applied, fetched, hand-shaken or acked."""
        return self.state in (ReaderState.FAILED, ReaderState.DIVERGED)

    def diverge(self, seq: int) -> list[Action]:
        """The shell's anti-entropy found this log differs from the leader's at seq.

        Stop applying and acking: an ack would count entries appended on top of a
        history that is not the leader's toward replicas=N. Only a resync repairs it.
        """
        if self.state is not ReaderState.FAILED:
            self.state = ReaderState.DIVERGED
            self.diverged_at = seq
            self.fetch = None
            self._pending.clear()
            self._pending_bytes = 0
        return []

    def on_control(self, message: wire.Message, now: float) -> list[Action]:
        if self.stopped():
            return []
        if isinstance(message, wire.Welcome):
            return self._on_welcome(message, now)
        if isinstance(message, wire.Chunk):
            return self._on_chunk(message, now)
        if isinstance(message, wire.Refused):
            return self._on_refused(message, now)
        return [Note("unexpected-message", {"kind": message.KIND})]

    def _on_welcome(self, welcome: wire.Welcome, now: float) -> list[Action]:
        if not self.needs_handshake():
            # No hello is outstanding: this answers an earlier one (a repeat, or one from
            # before a leader restart). Acting on it could judge us by an old head.
            return []
        if welcome.hello_id is not None and welcome.hello_id < self._handshake_from:
            return [Note("stale-welcome", {"boot_id": welcome.boot_id, "head": welcome.head_seq})]
        if self.log_id is not None and welcome.log_id != self.log_id:
            return self._fail_log_mismatch(welcome.log_id)
        if self.applied > welcome.head_seq:
            return self._fail(
                "reader-ahead",
                f"this reader holds sequences up to {self.applied} but the leader's log ends at "
                f"{welcome.head_seq}: sequences {welcome.head_seq + 1}..{self.applied} diverge "
                "(the leader lost entries it had published). The reader's log is left untouched; "
                "inspect both logs (walrep dump), then resync the reader with --resync.",
            )
        actions: list[Action] = []
        if self.log_id is None:
            if self.applied != 0:
                return self._fail(
                    "no-log-id",
                    "this reader holds entries but no log id; resync it with --resync",
                )
            start = max(welcome.earliest_seq, 1)
            self.log_id = welcome.log_id
            self.applied = self.durable = start - 1
            actions.append(StartLog(welcome.log_id, start))
        elif self.applied + 1 < welcome.earliest_seq:
            return self._fail_too_old(welcome.earliest_seq)
        if self.leader_boot_id is not None and welcome.boot_id != self.leader_boot_id:
            self.reconnects += 1
        self.leader_boot_id = welcome.boot_id
        self.leader_head = welcome.head_seq
        self.leader_earliest = welcome.earliest_seq
        self.last_heard = now
        self.fetch = None  # any earlier fetch died with the old connection
        self.state = ReaderState.STREAMING
        actions.append(
            Note(
                "handshake",
                {"log_id": welcome.log_id, "head": welcome.head_seq, "applied": self.applied},
            )
        )
        actions += self._drain_pending()
        actions += self._maybe_fetch(now)
        return actions

    def _on_refused(self, refused: wire.Refused, now: float) -> list[Action]:
        if refused.request_id is not None:
            # The answer to a fetch. One we abandoned no longer matters; a current one
            # that is "too old" is final, anything else is retried from where we are.
            fetch = self.fetch
            if fetch is None or refused.request_id != fetch.fetch_id:
                return [Note("stale-refusal", {"code": refused.code})]
            if refused.code == "too-old":
                return self._fail_too_old(refused.earliest_seq or 0)
            self.fetch = None
            return [Note("fetch-refused", {"code": refused.code, "reason": refused.message})]
        if refused.code == "unknown-session":
            # The leader does not know this connection as us (it restarted, forgot us,
            # or our session was replaced): hand-shake again rather than stop.
            if self.needs_handshake():
                return []
            self._begin_handshake(ReaderState.CONNECTING)
            self.fetch = None
            return [Note("unknown-session", {"reason": refused.message}), Send(self.hello())]
        if refused.code == "log-mismatch":
            return self._fail_log_mismatch(None, refused.message)
        return self._fail(refused.code, f"the leader refused: {refused.message}")

    def _fail_log_mismatch(self, leader_log: str | None, detail: str = "") -> list[Action]:
        leader = f"the leader's log is {leader_log}" if leader_log else "the leader refused"
        context = f" ({detail})" if detail else ""
        return self._fail(
            "log-mismatch",
            f"{leader} but this reader holds log {self.log_id}{context}: they are different "
            "histories (was the leader's WAL directory wiped?). "
            "The reader's log is left untouched. Point the reader at the right leader, or "
            "resync it with --resync, which discards this reader's log.",
        )

    def _fail_too_old(self, earliest: int) -> list[Action]:
        return self._fail(
            "too-old",
            f"this reader needs sequence {self.applied + 1} but the leader's earliest retained "
            f"sequence is {earliest}: the entries between were purged. Restart the reader with "
            "--resync to discard its log and start again from the leader's earliest entry.",
        )

    def _fail(self, code: str, message: str) -> list[Action]:
        self.state = ReaderState.FAILED
        self._pending.clear()
        return [Fail(code, message)]

    # --- the live stream ---------------------------------------------------------

    def on_publish(self, message: wire.Message, now: float) -> list[Action]:
        if self.stopped():
            return []
        if isinstance(message, wire.Heartbeat):
            return self._on_heartbeat(message, now)
        if isinstance(message, wire.Batch):
            return self._on_batch(message, now)
        return [Note("unexpected-message", {"kind": message.KIND})]

    def _on_heartbeat(self, beat: wire.Heartbeat, now: float) -> list[Action]:
        if self.log_id is not None and beat.log_id != self.log_id:
            # Not our history; the handshake will say so if it is the leader we asked.
            return [Note("foreign-heartbeat", {"log_id": beat.log_id})]
        self.last_heard = now
        if self.needs_handshake():
            return []
        if beat.boot_id != self.leader_boot_id:
            # The leader restarted: its state (fetches, our registration) is gone.
            self._begin_handshake(ReaderState.CONNECTING)
            self.fetch = None
            return [Note("leader-restarted", {"boot_id": beat.boot_id}), Send(self.hello())]
        self.leader_head = max(self.leader_head, beat.head_seq)
        self.leader_earliest = beat.earliest_seq
        return self._maybe_fetch(now)

    def _on_batch(self, batch: wire.Batch, now: float) -> list[Action]:
        if self.log_id is not None and batch.log_id != self.log_id:
            return [Note("foreign-batch", {"log_id": batch.log_id})]
        if not _frames_hold(batch.frames, batch.count):
            return [Note("bad-batch", {"first_seq": batch.first_seq, "count": batch.count})]
        self.last_heard = now
        self.leader_head = max(self.leader_head, batch.last_seq)
        if batch.last_seq <= self.applied:
            return []  # already have it (a duplicate, or covered by a fetch)
        if self.needs_handshake() or batch.first_seq > self.applied + 1:
            self._hold(batch)
            if self.needs_handshake():
                return []
            return self._maybe_fetch(now)
        return self._apply(batch.first_seq, batch.count, batch.frames) + self._drain_pending()

    def _hold(self, batch: wire.Batch) -> None:
        if batch.first_seq in self._pending:
            return
        if self._pending_bytes + len(batch.frames) > LIVE_BUFFER_BYTES:
            return  # the fetch will cover it: see LIVE_BUFFER_BYTES
        self._pending[batch.first_seq] = batch
        self._pending_bytes += len(batch.frames)

    def _apply(self, first_seq: int, count: int, frames: bytes) -> list[Action]:
        """Append the part of a run past what we hold; the run must reach applied + 1."""
        skip = self.applied + 1 - first_seq
        if skip < 0:
            raise AssertionError("_apply called with a gap")
        if skip >= count:
            return []
        if skip:
            frames = frames[frames_offset(frames, skip) :]
        self.applied = first_seq + count - 1
        return [AppendRun(first_seq + skip, count - skip, frames)]

    def _drain_pending(self) -> list[Action]:
        actions: list[Action] = []
        while self._pending:
            ready = [s for s in self._pending if s <= self.applied + 1]
            if not ready:
                break
            for first in sorted(ready):
                batch = self._pending.pop(first)
                self._pending_bytes -= len(batch.frames)
                if batch.first_seq <= self.applied + 1:
                    actions += self._apply(batch.first_seq, batch.count, batch.frames)
        return actions

    # --- catch-up ----------------------------------------------------------------

    def _gap_end(self) -> int | None:
        """Last sequence we know exists but cannot apply from what we hold, or None."""
        if self.applied >= self.leader_head:
            return None
        if self._pending:
            first_held = min(self._pending)
            if first_held > self.applied + 1:
                return first_held - 1
            return None
        return self.leader_head

    def _maybe_fetch(self, now: float) -> list[Action]:
        if self.fetch is not None or self.stopped():
            self._update_state()
            return []
        end = self._gap_end()
        if end is None:
            self._update_state()
            return []
        self._fetch_ids += 1
        self.fetch = _Fetch(self._fetch_ids, end, now)
        self.gaps_detected += 1
        self.fetches += 1
        self._update_state()
        request = wire.Fetch(self._fetch_ids, self.applied + 1, end, FETCH_CREDIT)
        return [Note("gap", {"from": self.applied + 1, "to": end}), Send(request)]

    def _on_chunk(self, chunk: wire.Chunk, now: float) -> list[Action]:
        fetch = self.fetch
        if fetch is None or chunk.fetch_id != fetch.fetch_id:
            return []  # a chunk of an abandoned fetch
        if not _frames_hold(chunk.frames, chunk.count):
            # Drop it; the fetch stalls and is asked again (FETCH_STALL_S).
            return [Note("bad-chunk", {"first_seq": chunk.first_seq, "count": chunk.count})]
        if chunk.first_seq > self.applied + 1:
            # A chunk went missing (a reconnect in between): ask again from here.
            self.fetch = None
            return [Note("fetch-restart", {"from": self.applied + 1})] + self._maybe_fetch(now)
        fetch.last_progress = now
        before = self.applied
        actions = self._apply(chunk.first_seq, chunk.count, chunk.frames)
        self.entries_fetched += self.applied - before
        if chunk.last or self.applied >= fetch.to_seq:
            self.fetch = None
        else:
            actions.append(Send(wire.Credit(fetch.fetch_id, 1)))
        actions += self._drain_pending()
        actions += self._maybe_fetch(now)
        return actions

    def _update_state(self) -> None:
        if self.state in (ReaderState.STREAMING, ReaderState.CATCHING_UP):
            busy = self.fetch is not None
            self.state = ReaderState.CATCHING_UP if busy else ReaderState.STREAMING

    # --- time and durability -----------------------------------------------------

    def on_tick(self, now: float) -> list[Action]:
        if self.stopped():
            return []
        actions: list[Action] = []
        if (
            self.state in (ReaderState.STREAMING, ReaderState.CATCHING_UP)
            and self.last_heard is not None
            and now - self.last_heard > LEADER_SILENT_S
        ):
            self._begin_handshake(ReaderState.DISCONNECTED)
            self.fetch = None
            self.reconnects += 1
            actions.append(Note("leader-silent", {"for_s": round(now - self.last_heard, 3)}))
        fetch = self.fetch
        if fetch is not None and now - fetch.last_progress > FETCH_STALL_S:
            self.fetch = None
            actions.append(Note("fetch-stalled", {"from": self.applied + 1}))
            actions += self._maybe_fetch(now)
        return actions

    def on_durable(self, durable_seq: int, now: float) -> list[Action]:
        """The local WAL made durable_seq durable: tell the leader (not too often)."""
        self.durable = max(self.durable, durable_seq)
        if self.needs_handshake() or self.stopped():
            return []
        since = now - self._last_ack_at
        if self.durable == self._acked and since < ACK_KEEPALIVE_S:
            return []
        if since < ACK_INTERVAL_S and self.durable < self.leader_head:
            return []
        self._acked = self.durable
        self._last_ack_at = now
        ack = wire.Ack(
            self.reader_id, self.applied, self.durable, self.state.value, log_id=self.log_id
        )
        return [Send(ack)]


def _frames_hold(frames: bytes, count: int) -> bool:
    """Does this run hold exactly count frames? (Lengths only; the WAL checks CRCs.)"""
    try:
        return frames_offset(frames, count) == len(frames)
    except WALError:
        return False


# --- leader ------------------------------------------------------------------------


@dataclass
class ReaderInfo:
    reader_id: str
    peer: bytes  # the routing id of the session that hand-shook as this reader (b"": none)
    applied_seq: int
    durable_seq: int
    last_contact: float
    connected_at: float
    state: str = "unknown"  # as the reader last reported it
    # What binds this id to one reader: a digest of the credential in its wal.meta, and
    # under CURVE the name of its key. Set by the first hello, kept across restarts.
    credential_sha256: str | None = None
    key_name: str | None = None
    # False for positions restored from wal.meta: they still hold retention, but status
    # shows them as unknown until the reader speaks to this leader.
    heard: bool = True
    address: str = "unknown"  # host:port of the session, for status and logs


class LeaderProtocol:
    """The leader's decisions: handshakes, fetch ranges, reader positions, status."""

    def __init__(self, log_id: str, boot_id: str, head_seq: int, earliest_seq: int):
        self.log_id = log_id
        self.boot_id = boot_id
        self.head = head_seq
        self.earliest = earliest_seq
        self.readers: dict[str, ReaderInfo] = {}
        self.refused_acks = 0  # acks from no session, another session, or past the head
        self.refused_hellos = 0  # hellos for a reader id bound to another reader

    def on_commit(self, last_seq: int) -> None:
        self.head = max(self.head, last_seq)

    def on_purge(self, earliest_seq: int) -> None:
        self.earliest = earliest_seq

    def heartbeat(self, now_us: int) -> wire.Heartbeat:
        return wire.Heartbeat(self.log_id, self.boot_id, self.head, self.earliest, now_us)

    def on_control(
        self,
        peer: bytes,
        message: wire.Message,
        now: float,
        *,
        key_name: str | None = None,
        address: str = "unknown",
    ) -> list[Action]:
        """One control message from the session `peer` (its routing id, never chosen by the
        peer); key_name is its CURVE key's name (None without CURVE), address its host:port.
        """
        if isinstance(message, wire.Hello):
            return self._on_hello(peer, message, now, key_name, address)
        if isinstance(message, wire.Ack):
            return self._on_ack(peer, message, now, address)
        if isinstance(message, wire.StatusRequest):
            return [Send(wire.StatusReply(self.status(now)), peer)]
        if isinstance(message, wire.ForgetReader):
            known = self.readers.pop(message.reader_id, None) is not None
            return [
                Note("forgot-reader", {"reader": message.reader_id, "was_known": known}),
                Send(wire.StatusReply(self.status(now)), peer),
            ]
        if isinstance(message, wire.Fetch):
            return self.check_fetch(peer, message)
        return [Send(wire.Refused("bad-request", f"{message.KIND} is not a control request"), peer)]

    def _on_ack(self, peer: bytes, ack: wire.Ack, now: float, address: str) -> list[Action]:
        """Move a reader's position, but only on an ack it earned.

        A position counts toward replicas=N and lets retention purge: taking one from
        anyone who names a reader would let a single forged message acknowledge (and
        purge) entries that no reader holds.
        """
        info = self.readers.get(ack.reader_id)
        if info is None or info.peer != peer:
            # No session, or another one (a stray, or this reader before a re-handshake).
            why = "unknown-session"
            detail = (
                f"no session hand-shook as reader {ack.reader_id} on this connection; "
                "send a hello first"
            )
        elif ack.log_id is not None and ack.log_id != self.log_id:
            why, detail = "log-mismatch", f"ack for log {ack.log_id}; this log is {self.log_id}"
        elif ack.durable_seq > self.head or ack.applied_seq > self.head:
            why = "ack-past-head"
            detail = (
                f"ack of {ack.applied_seq}/{ack.durable_seq} is past this leader's head "
                f"{self.head}: nothing past it was ever sent"
            )
        else:
            info.applied_seq = max(info.applied_seq, ack.applied_seq)
            info.durable_seq = max(info.durable_seq, min(ack.durable_seq, ack.applied_seq))
            info.last_contact = now
            info.heard = True
            if ack.state is not None:
                info.state = ack.state
            return []
        self.refused_acks += 1
        return [
            Note(
                "refused-ack",
                {"reader": ack.reader_id, "peer": address, "code": why, "reason": detail},
            ),
            Send(wire.Refused(why, detail), peer),
        ]

    def _on_hello(
        self, peer: bytes, hello: wire.Hello, now: float, key_name: str | None, address: str
    ) -> list[Action]:
        if hello.log_id is not None and hello.log_id != self.log_id:
            return [
                Note("refused-reader", {"reader": hello.reader_id, "code": "log-mismatch"}),
                Send(
                    wire.Refused(
                        "log-mismatch",
                        f"reader {hello.reader_id} holds log {hello.log_id}; this leader's log is "
                        f"{self.log_id}",
                    ),
                    peer,
                ),
            ]
        info = self.readers.get(hello.reader_id)
        if info is None and len(self.readers) >= MAX_READERS:
            return [
                Note("refused-reader", {"reader": hello.reader_id, "code": "too-many-readers"}),
                Send(
                    wire.Refused(
                        "too-many-readers",
                        f"this leader already tracks {MAX_READERS} readers; forget one that is "
                        "gone (walrep forget-reader) before adding another",
                    ),
                    peer,
                ),
            ]
        credential = _digest_credential(hello.credential)
        if info is not None:
            refusal = self._check_binding(info, credential, key_name)
            if refusal is not None:
                self.refused_hellos += 1
                return [
                    Note(
                        "refused-reader",
                        {"reader": hello.reader_id, "code": "reader-id-taken", "peer": address},
                    ),
                    Send(wire.Refused("reader-id-taken", refusal), peer),
                ]
        welcome = wire.Welcome(
            self.log_id, self.boot_id, self.head, self.earliest, hello_id=hello.hello_id
        )
        if hello.last_seq > self.head or hello.durable_seq > hello.last_seq:
            # The welcome tells the reader it is ahead (it stops itself); its claimed
            # position is not taken: nothing past the head was ever sent.
            return [
                Note(
                    "reader-ahead",
                    {"reader": hello.reader_id, "last_seq": hello.last_seq, "head": self.head},
                ),
                Send(welcome, peer),
            ]
        actions: list[Action] = []
        if info is None:
            info = ReaderInfo(hello.reader_id, peer, hello.last_seq, hello.durable_seq, now, now)
            self.readers[hello.reader_id] = info
        elif info.peer and info.peer != peer and now - info.last_contact < READER_SILENT_S:
            # Only a session that proved it holds this reader's log (and key) gets here.
            actions.append(
                Note(
                    "reader-session-replaced",
                    {"reader": hello.reader_id, "old": info.address, "new": address},
                )
            )
        info.credential_sha256 = info.credential_sha256 or credential
        info.key_name = info.key_name or key_name
        info.peer = peer
        info.address = address
        info.applied_seq = hello.last_seq
        info.durable_seq = hello.durable_seq
        info.last_contact = now
        info.connected_at = now
        info.heard = True
        actions.append(
            Note("reader-hello", {"reader": hello.reader_id, "last_seq": hello.last_seq})
        )
        actions.append(Send(welcome, peer))
        return actions

    @staticmethod
    def _check_binding(
        info: ReaderInfo, credential: str | None, key_name: str | None
    ) -> str | None:
        """Why this hello may not speak for info's reader, or None if it may."""
        if info.key_name is not None and key_name != info.key_name:
            return (
                f"reader id {info.reader_id} is bound to the key {info.key_name!r}; this "
                f"connection uses {key_name!r}"
            )
        if info.credential_sha256 is not None and credential != info.credential_sha256:
            return (
                f"reader id {info.reader_id} is held by another reader (its wal.meta credential "
                "differs). Two readers share this id, or this reader's directory was replaced: "
                f"give each reader its own id, or run `walrep forget-reader {info.reader_id}` "
                "if the old one is gone for good"
            )
        return None

    def check_fetch(self, peer: bytes, fetch: wire.Fetch) -> list[Action]:
        """Refuse a fetch that cannot be served; else return nothing (the shell serves it)."""
        if fetch.from_seq < self.earliest:
            return [
                Send(
                    wire.Refused(
                        "too-old",
                        f"sequence {fetch.from_seq} was purged; the earliest retained is "
                        f"{self.earliest}",
                        request_id=fetch.fetch_id,
                        earliest_seq=self.earliest,
                    ),
                    peer,
                )
            ]
        if fetch.from_seq > self.head:
            return [
                Send(
                    wire.Refused(
                        "bad-request",
                        f"fetch from {fetch.from_seq} is past the head {self.head}",
                        request_id=fetch.fetch_id,
                    ),
                    peer,
                )
            ]
        return []

    def retention_floor(self) -> int | None:
        """Every known reader holds all entries up to this durably (None: no readers)."""
        if not self.readers:
            return None
        return min(r.durable_seq for r in self.readers.values())

    def positions(self, now: float, wall_now: float) -> dict[str, dict[str, Any]]:
        """Reader positions to persist, so a restarted leader keeps retaining for them,
        with what binds each id to its reader."""
        saved: dict[str, dict[str, Any]] = {}
        for r in self.readers.values():
            position: dict[str, Any] = {
                "applied_seq": r.applied_seq,
                "durable_seq": r.durable_seq,
                "last_contact_unix": round(wall_now - (now - r.last_contact), 3),
            }
            if r.credential_sha256 is not None:
                position["credential_sha256"] = r.credential_sha256
            if r.key_name is not None:
                position["key_name"] = r.key_name
            saved[r.reader_id] = position
        return saved

    def restore(self, positions: dict[str, dict], now: float, wall_now: float) -> None:
        for reader_id, pos in positions.items():
            if reader_id in self.readers:
                continue
            last_contact = now - max(0.0, wall_now - float(pos.get("last_contact_unix", wall_now)))
            self.readers[reader_id] = ReaderInfo(
                reader_id,
                b"",
                int(pos["applied_seq"]),
                int(pos["durable_seq"]),
                last_contact,
                last_contact,
                credential_sha256=pos.get("credential_sha256"),
                key_name=pos.get("key_name"),
                heard=False,
            )

    def status(self, now: float) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "boot_id": self.boot_id,
            "head_seq": self.head,
            "earliest_seq": self.earliest,
            "readers": [
                {
                    "id": r.reader_id,
                    # Saved positions are not shown as current until the reader speaks.
                    "applied_seq": r.applied_seq if r.heard else None,
                    "durable_seq": r.durable_seq if r.heard else None,
                    "lag_entries": max(0, self.head - r.durable_seq) if r.heard else None,
                    "last_contact_s_ago": round(now - r.last_contact, 3),
                }
                for r in sorted(self.readers.values(), key=lambda r: r.reader_id)
            ],
        }


def _digest_credential(credential: str | None) -> str | None:
    """What the leader keeps of a reader's credential: its digest, never the secret."""
    if credential is None:
        return None
    return hashlib.sha256(credential.encode()).hexdigest()


class FetchFlow:
    """Credit accounting for serving one fetch (zguide fileio3): pure bookkeeping."""

    def __init__(self, fetch_id: int, from_seq: int, to_seq: int, credit: int):
        self.fetch_id = fetch_id
        self.next_seq = from_seq
        self.to_seq = to_seq
        self.credit = credit

    @property
    def done(self) -> bool:
        return self.next_seq > self.to_seq

    def can_send(self) -> bool:
        return self.credit > 0 and not self.done

    def chunk(self, first_seq: int, count: int, frames: bytes) -> wire.Chunk:
        """Account for a chunk read from the WAL and build its message."""
        self.credit -= 1
        self.next_seq = first_seq + count
        return wire.Chunk(self.fetch_id, first_seq, count, frames, self.done)

    def add_credit(self, credit: int) -> None:
        self.credit = min(self.credit + credit, 64)


class CommitHistory:
    """Recent commits as (last_seq, cumulative bytes, time): lag in bytes and seconds.

    Pure bookkeeping: the shell records each committed run with the time it saw
    it; status asks how far behind a position is. Samples are thinned to one per
    SAMPLE_EVERY_S, so a bounded ring covers the last several minutes.
    """

    SAMPLE_EVERY_S = 0.01
    MAX_SAMPLES = 60_000

    def __init__(self, head_seq: int, now: float):
        self._samples: collections.deque[tuple[int, int, float]] = collections.deque(
            maxlen=self.MAX_SAMPLES
        )
        self._bytes = 0
        self._samples.append((head_seq, 0, now))

    def record(self, last_seq: int, nbytes: int, now: float) -> None:
        self._bytes += nbytes
        sample = (last_seq, self._bytes, now)
        if now - self._samples[-1][2] < self.SAMPLE_EVERY_S:
            self._samples[-1] = (last_seq, self._bytes, self._samples[-1][2])
        else:
            self._samples.append(sample)

    def _index_after(self, seq: int) -> int:
        """Index of the earliest sample whose run holds sequences after seq."""
        samples = self._samples
        lo, hi = 0, len(samples)
        while lo < hi:
            mid = (lo + hi) // 2
            if samples[mid][0] <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def covers(self, position: int) -> bool:
        """Do the samples reach back to position (so lag() knows its bytes exactly)?"""
        return self._samples[0][0] <= position

    def lag(self, position: int, now: float) -> tuple[int, float]:
        """(bytes, seconds) by which position trails the head; seconds since the leader
        committed the oldest entry the position lacks (0 when it lacks nothing)."""
        samples = self._samples
        index = self._index_after(position)
        if index >= len(samples):
            return 0, 0.0
        if index == 0:
            # Behind everything recorded (entries from before this leader started, or
            # older than the ring): bytes from the average entry size, time as a floor.
            head_seq, total, _ = samples[-1]
            recorded = head_seq - samples[0][0]
            per_entry = total / recorded if recorded > 0 else 0.0
            return int((head_seq - position) * per_entry), now - samples[0][2]
        return self._bytes - samples[index - 1][1], now - samples[index][2]

    def rate(self, now: float, window_s: float = 10.0) -> tuple[float, float]:
        """(entries/s, bytes/s) over the last window_s."""
        head_seq, total, _ = self._samples[-1]
        for seq, nbytes, when in self._samples:
            if now - when <= window_s:
                span = max(now - when, 1e-6)
                return (head_seq - seq) / span, (total - nbytes) / span
        return 0.0, 0.0
