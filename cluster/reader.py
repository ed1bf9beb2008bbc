"""The reader service: follow a leader's log into a local WAL, byte for byte.

Shell only: protocol.ReaderProtocol decides; this module moves bytes between
the SUB and DEALER sockets, the local node.Writer and the clock. A silent or
unreachable leader is retried forever (tenacity, exponential back-off with
jitter); a refusal that would mix histories stops the reader with exit status 2.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import shutil
import signal
import sys
import time

import tenacity
import trio

from walrep import node
from walrep.node.meta import load_meta, update_meta

from . import protocol, security, wire, zmqtrio
from .config import ReaderConfig
from .logs import event
from .metrics import NodeMetrics
from .progress import Progress
from .verify import DirSource, RemoteSource, VerifyError, digest_reply, find_divergence
from .walloop import make_room

log = logging.getLogger("walrep.reader")

TICK_S = 0.05
# Anti-entropy: every anti_entropy_interval_s the newest ANTI_ENTROPY_ENTRIES durable
# entries are compared with the leader's first (a fresh divergence shows there, and
# it is cheap), then the whole common log (see Reader._anti_entropy_loop).
ANTI_ENTROPY_ENTRIES = 10_000
ANTI_ENTROPY_TIMEOUT_S = 10.0  # for one digest from the leader
# The older log is compared in ranges of at most this many entries, so one digest the
# leader computes (about 1 s per million small entries) stays well inside the timeout.
ANTI_ENTROPY_RANGE_ENTRIES = 1_000_000
# Whole-log comparisons take at most this share of the time: a long log is read less
# often than every interval instead of keeping the leader's disk busy for each reader.
ANTI_ENTROPY_MAX_DUTY = 0.1
DIVERGED_REMEDY = (
    "this reader's log is not the leader's history from that sequence on; it stopped "
    "applying and acking. Inspect both logs (walrep verify, walrep dump), then restart "
    "the reader with --resync, which discards its log and fetches the leader's"
)
HANDSHAKE_WAIT_S = 1.0  # how long one hello waits for its welcome before the next try
EXIT_REFUSED = 2
# The wal.meta key of this reader's secret: it proves to the leader that a new session
# for our id comes from the reader that holds this log (see LeaderProtocol._on_hello).
CREDENTIAL_KEY = "reader_credential"


class ReaderStopped(Exception):
    """The protocol refused to go on; code and message say why and what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _HandshakePending(Exception):
    pass


class Reader:
    def __init__(self, config: ReaderConfig):
        self.config = config
        if config.resync:
            _discard_log(config.wal_dir)
        self.writer = node.Writer(
            config.wal_dir,
            sync_mode=config.sync_mode,
            buffer_entries=config.buffer_entries,
            max_size_bytes=config.max_segment_bytes,
            repair="cut",  # self-healing: damage is cut off and fetched again
            # In a syncing mode this loop commits what it appended (Writer.flush),
            # then acks: no hand-off to a writer thread and back on the ack path.
            background=config.writer_thread or config.sync_mode == node.SyncMode.ASYNC,
        )
        _report_self_heal(self.writer)
        meta = load_meta(config.wal_dir)
        credential = meta.get(CREDENTIAL_KEY)
        if not isinstance(credential, str):
            credential = secrets.token_hex(32)
            update_meta(config.wal_dir, **{CREDENTIAL_KEY: credential})
        self.protocol = protocol.ReaderProtocol(
            config.id,
            meta.get("log_id"),
            self.writer.current_sequence(),
            self.writer.durable_sequence(),
            credential=credential,
        )
        self.state_changed = trio.Event()
        self.signalled_state = self.protocol.state
        self.acking_inline = False  # the publish loop's flush is under way, and acks itself
        self.run_lock = trio.StrictFIFOLock()
        self.behind_since: float | None = None  # when we last fell behind the leader's head
        self.digest_waiters: dict[int, trio.MemorySendChannel] = {}
        self.control_socket = None
        self.catch_up: Progress | None = None  # shown on a terminal for a large gap
        self.divergences = 0
        self.anti_entropy_checked = 0
        self.metrics_snapshot: dict = {}
        self.metrics = NodeMetrics("reader", self.writer, lambda: self.metrics_snapshot)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        ctx = zmqtrio.new_context()
        # Subscribe first, then hand-shake (the Clone pattern): nothing published
        # after the welcome can be missed.
        keys = security.load_client_keys(self.config.key or None, self.config.leader_key or None)
        curve = keys.options() if keys is not None else {}
        self.sub = zmqtrio.make_socket(
            ctx,
            zmqtrio.SUB,
            options={
                zmqtrio.RCVHWM: self.config.receive_hwm,
                zmqtrio.MAXMSGSIZE: wire.MAX_MESSAGE_BYTES,
                **curve,
            },
        )
        # The DEALER keeps the routing id libzmq gives it: a reader id is something any
        # peer can claim, so it must not name the connection (the leader binds the id to
        # the connection that hand-shook, with the credential in our wal.meta).
        self.dealer = zmqtrio.make_socket(
            ctx,
            zmqtrio.DEALER,
            options={zmqtrio.MAXMSGSIZE: wire.MAX_MESSAGE_BYTES, **curve},
        )
        self.send_lock = trio.Lock()
        self.durable_moved = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def durable_from_thread(_seq: int) -> None:
            try:
                token.run_sync_soon(self.durable_moved.set)
            except trio.RunFinishedError:
                pass

        if self.writer.background:
            self.writer.set_durable_hook(durable_from_thread)
        else:  # flush() runs in this trio thread
            self.writer.set_durable_hook(self._durable_in_loop)
        try:
            self.sub.subscribe(b"")
            self.sub.connect(self.config.leader_publish)
            self.dealer.connect(self.config.leader_control)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_loop)
                nursery.start_soon(self._control_loop)
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._ack_loop)
                if self.config.anti_entropy_interval_s > 0:
                    nursery.start_soon(self._anti_entropy_loop)
                if self.config.control:
                    self.control_socket = zmqtrio.make_socket(
                        ctx,
                        zmqtrio.ROUTER,
                        options={zmqtrio.MAXMSGSIZE: wire.MAX_CONTROL_MESSAGE_BYTES},
                    )
                    self.control_socket.bind(self.config.control)
                    await nursery.start(self._serve_control)
                if self.config.metrics:
                    host, port = self.metrics.serve(self.config.metrics)
                    event(log, "metrics-serving", address=f"http://{host}:{port}/metrics")
                nursery.start_soon(self._handshake_loop)
                event(
                    log,
                    "reader-started",
                    id=self.config.id,
                    applied=self.protocol.applied,
                    leader=self.config.leader_control,
                )
                task_status.started(self)
        finally:
            self.writer.set_durable_hook(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.writer.close)
            self.sub.close()
            self.dealer.close()
            if self.control_socket is not None:
                self.control_socket.close()
            self.metrics.close()
            ctx.term()
            event(log, "reader-stopped", applied=self.writer.current_sequence())

    # --- loops -------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        peer = self.config.leader_publish
        while True:
            message = await self._receive(self.sub, peer)
            await self._run(self.protocol.on_publish(message, time.monotonic()))
            # Then take what already arrived without a trip through trio's scheduler
            # per message (at a high rate the trip costs more than the work), up to a
            # bound that lets the other loops run.
            for _ in range(zmqtrio.DRAIN_MAX_MESSAGES):
                try:
                    data = self.sub.recv_nowait()
                except zmqtrio.WouldBlock:
                    break
                message = self._decode(data, peer)
                if message is not None:
                    await self._run(self.protocol.on_publish(message, time.monotonic()))
            # One commit for the whole burst, acked from here: handing the ack to
            # _ack_loop put a task switch on every replicas=N commit, which traces of
            # a 1000 requests/s run measured at 120 us at p50 (and 320 at p90).
            self.acking_inline = True
            try:
                self.writer.flush()
            finally:
                self.acking_inline = False
            if not self.writer.background:
                await self._ack()

    def _durable_in_loop(self, _seq: int) -> None:
        """The durable hook of a writer this loop flushes (background=False)."""
        if not self.acking_inline:  # that flush acks by itself
            self.durable_moved.set()

    async def _receive(self, socket, peer: str) -> wire.Message:
        """The next well-formed message on socket; bad ones are logged and skipped."""
        while True:
            message = self._decode(await socket.recv(), peer)
            if message is not None:
                return message

    @staticmethod
    def _decode(data: bytes, peer: str) -> wire.Message | None:
        try:
            return wire.decode(data)
        except wire.BadMessage as exc:
            event(log, "bad-message", logging.WARNING, peer=peer, reason=str(exc))
            return None

    async def _control_loop(self) -> None:
        while True:
            message = await self._receive(self.dealer, self.config.leader_control)
            if isinstance(message, wire.DigestReply):
                channel = self.digest_waiters.get(message.request_id)
                if channel is not None:
                    channel.send_nowait(message)
                continue
            await self._run(self.protocol.on_control(message, time.monotonic()))
            self.writer.flush()

    # --- anti-entropy and the reader's own control endpoint -------------------------

    async def _anti_entropy_loop(self) -> None:
        """Every interval, compare this log with the leader's: the newest entries, then all.

        The newest ANTI_ENTROPY_ENTRIES durable entries first, then the whole common
        log, oldest first, by range digests the leader computes from its own files
        (verify.find_divergence: the bisection `walrep verify` uses, which descends
        only into a range that differs, so a log that agrees costs a few digests). A
        whole-log pass waits while it would take more than ANTI_ENTROPY_MAX_DUTY of
        the time. A difference stops this reader (ReaderProtocol.diverge): it logs
        DIVERGENCE with the first differing sequence, says so in its status and keeps
        answering until it is resynced. An entry one side cannot read is damage,
        logged once, and not a divergence.
        """
        leader = _LeaderDigests(self)
        local = DirSource(self.config.wal_dir)
        passes = 0
        whole_due = 0.0  # time.monotonic() from which the next whole-log pass may start
        logged: set[tuple] = set()
        while True:
            await trio.sleep(self.config.anti_entropy_interval_s)
            if self.protocol.needs_handshake() or self.protocol.stopped():
                continue
            segments = await trio.to_thread.run_sync(node.WALReader(self.config.wal_dir).segments)
            durable = self.writer.durable_sequence()
            try:
                leader_first, leader_last = await leader.bounds()
                if not segments or leader_first is None:
                    continue
                lo = max(segments[0].first_seq, leader_first)
                hi = min(durable, leader_last)
                if lo > hi:
                    continue
                passes += 1
                started = time.monotonic()
                whole = started >= whole_due
                found = await find_divergence(
                    local,
                    leader,
                    lo,
                    hi,
                    newest_entries=ANTI_ENTROPY_ENTRIES,
                    whole=whole,
                    max_range=ANTI_ENTROPY_RANGE_ENTRIES,
                )
            except VerifyError as exc:
                event(log, "anti-entropy-skipped", logging.WARNING, reason=str(exc))
                continue
            if whole:
                whole_due = started + (time.monotonic() - started) / ANTI_ENTROPY_MAX_DUTY
            self.anti_entropy_checked += found.checked
            for damage in found.damage:
                ours = damage.side == local.name
                key = (ours, damage.kind, damage.file, damage.offset, damage.sequence)
                if key in logged:
                    continue
                logged.add(key)
                event(
                    log,
                    "anti-entropy-damage",
                    logging.ERROR if ours else logging.WARNING,
                    side="this reader" if ours else "leader",
                    seq=damage.sequence,
                    problem=damage.kind,
                    file=damage.file,
                    offset=damage.offset,
                    detail=damage.detail,
                    leader=self.config.leader_control,
                    what="restart this reader: it cuts its log before the damage and fetches "
                    "the rest again"
                    if ours
                    else "the leader cannot read its copy; run walrep verify on its WAL directory",
                )
            if found.first_difference is None:
                continue
            self.divergences += 1
            await self._run(self.protocol.diverge(found.first_difference))
            event(
                log,
                "DIVERGENCE",
                logging.ERROR,
                seq=found.first_difference,
                leader=self.config.leader_control,
                checked=f"{lo}..{hi}",
                anti_entropy_pass=passes,
                what=DIVERGED_REMEDY,
            )
            return

    async def _serve_control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer digest and status requests (walrep verify, walrep status) on `control`."""
        task_status.started()
        while True:
            frames, address = await self.control_socket.recv_multipart_with_peer()
            if len(frames) != 2:
                continue
            peer, data = frames
            try:
                message = wire.decode(data)
            except wire.BadMessage as exc:
                event(log, "bad-message", logging.WARNING, peer=address, reason=str(exc))
                reply = wire.Refused("bad-request", str(exc))
            else:
                if isinstance(message, wire.DigestRequest):
                    reply = await trio.to_thread.run_sync(
                        digest_reply,
                        self.config.wal_dir,
                        message,
                        self.writer.durable_sequence(),
                    )
                elif isinstance(message, wire.StatusRequest):
                    reply = wire.StatusReply(self.status())
                else:
                    reply = wire.Refused("bad-request", f"{message.KIND} is not served here")
            await self.control_socket.send_multipart([peer, wire.encode(reply)])

    def status(self) -> dict:
        p = self.protocol
        durable = self.writer.durable_sequence()
        diverged = p.state is protocol.ReaderState.DIVERGED
        return {
            "nodes": [
                {
                    "id": self.config.id,
                    "role": "reader",
                    "state": p.state.value,
                    "address": self.config.control,
                    "connected": not p.needs_handshake() and not p.stopped(),
                    "applied_seq": p.applied,
                    "durable_seq": durable,
                    "lag_entries": max(0, p.leader_head - durable),
                    "leader": self.config.leader_control,
                    "divergences": self.divergences,
                    "anti_entropy_checked": self.anti_entropy_checked,
                    # Set once anti-entropy found this log differs from the leader's.
                    "diverged_seq": p.diverged_at if diverged else None,
                    "remedy": DIVERGED_REMEDY if diverged else None,
                }
            ]
        }

    async def _tick_loop(self) -> None:
        while True:
            self.writer.flush()  # retries a write a full disk refused
            now = time.monotonic()
            await self._run(self.protocol.on_tick(now))
            await self._run(self.protocol.on_durable(self.writer.durable_sequence(), now))
            behind = self.protocol.applied < self.protocol.leader_head
            if not behind:
                self.behind_since = None
            elif self.behind_since is None:
                self.behind_since = now
            self.metrics_snapshot = self._metrics_snapshot(now)
            await trio.sleep(TICK_S)

    def _metrics_snapshot(self, now: float) -> dict:
        p = self.protocol
        lag_seconds = 0.0 if self.behind_since is None else now - self.behind_since
        return {
            "plain": {
                "walrep_lag_entries": (
                    "gauge",
                    "Entries the leader has announced that this reader lacks durably",
                    max(0, p.leader_head - p.durable),
                ),
                "walrep_lag_seconds": (
                    "gauge",
                    "Seconds this reader has been behind the leader's head",
                    lag_seconds,
                ),
                "walrep_gaps_detected_total": (
                    "counter",
                    "Gaps found in the stream",
                    p.gaps_detected,
                ),
                "walrep_catchup_fetches_total": (
                    "counter",
                    "Fetches sent to the leader",
                    p.fetches,
                ),
                "walrep_entries_fetched_total": (
                    "counter",
                    "Entries received by fetches",
                    p.entries_fetched,
                ),
                "walrep_reconnects_total": (
                    "counter",
                    "Handshakes after losing the leader",
                    p.reconnects,
                ),
                "walrep_divergences_total": (
                    "counter",
                    "Background checks that found this log differs from the leader's",
                    self.divergences,
                ),
            },
        }

    async def _ack_loop(self) -> None:
        """Ack as soon as the local WAL syncs: replicas=N commits wait on this."""
        while True:
            await self.durable_moved.wait()
            self.durable_moved = trio.Event()
            await self._ack()

    async def _ack(self) -> None:
        durable = self.writer.durable_sequence()
        await self._run(self.protocol.on_durable(durable, time.monotonic()))

    async def _handshake_loop(self) -> None:
        """Say hello whenever the protocol needs a handshake, backing off while unanswered."""
        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_random_exponential(multiplier=0.1, max=5.0),
            retry=tenacity.retry_if_exception_type(_HandshakePending),
            sleep=trio.sleep,
            before_sleep=self._log_retry,
        )
        while True:
            while not self.protocol.needs_handshake():
                await self._wait_state_change()
            async for attempt in retrying:
                with attempt:
                    await self._send(self.protocol.hello())
                    with trio.move_on_after(HANDSHAKE_WAIT_S):
                        while self.protocol.needs_handshake():
                            await self._wait_state_change()
                    if self.protocol.needs_handshake():
                        raise _HandshakePending

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        if retry_state.attempt_number in (1, 5) or retry_state.attempt_number % 20 == 0:
            event(
                log,
                "leader-unreachable",
                logging.WARNING,
                leader=self.config.leader_control,
                attempts=retry_state.attempt_number,
            )

    async def _wait_state_change(self) -> None:
        await self.state_changed.wait()
        self.state_changed = trio.Event()

    # --- actions -----------------------------------------------------------------------

    async def _run(self, actions: list[protocol.Action]) -> None:
        # Actions are produced in order by several loops (live stream, fetches, ticks)
        # and an append may wait for room in the WAL queue: a strict FIFO lock keeps
        # them in the order the protocol produced them, so runs stay consecutive.
        try:
            # Uncontended (the usual case): take the lock without a scheduler pass.
            self.run_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.run_lock.acquire()
        try:
            await self._run_in_order(actions)
        finally:
            self.run_lock.release()

    async def _run_in_order(self, actions: list[protocol.Action]) -> None:
        for action in actions:
            if isinstance(action, protocol.AppendRun):
                await self._append(action)
                if self.catch_up is not None:
                    self.catch_up.update(self.protocol.applied)
                    if self.protocol.applied >= self.catch_up.total:
                        self.catch_up.done()
                        self.catch_up = None
            elif isinstance(action, protocol.Send):
                await self._send(action.message)
            elif isinstance(action, protocol.StartLog):
                self.writer.start_at(action.first_seq)
                update_meta(self.config.wal_dir, log_id=action.log_id, role="reader")
                event(log, "adopted-log", log_id=action.log_id, first_seq=action.first_seq)
            elif isinstance(action, protocol.Fail):
                event(log, "refused", logging.ERROR, code=action.code, reason=action.message)
                raise ReaderStopped(action.code, action.message)
            elif isinstance(action, protocol.Note):
                event(log, action.event, **action.fields)
                if action.event == "gap" and action.fields["to"] - action.fields["from"] > 100_000:
                    self.catch_up = Progress(
                        "catching up", total=action.fields["to"], start=action.fields["from"]
                    )
        if self.protocol.state is not self.signalled_state:
            # Only the hand-shake loop waits on this, and only for a change of state:
            # waking it for every run would cost a task switch per message.
            self.signalled_state = self.protocol.state
            self.state_changed.set()

    async def _append(self, run: protocol.AppendRun) -> None:
        while True:
            try:
                self.writer.append_replicated(
                    run.first_seq, run.frames, count=run.count, wait=False
                )
                return
            except node.WALDropped:
                await make_room(self.writer)

    async def _send(self, message: wire.Message) -> None:
        await zmqtrio.send_in_turn(self.dealer, self.send_lock, [wire.encode(message)])


class _LeaderDigests(RemoteSource):
    """The leader as a verify.LogSource, asked over the reader's own DEALER.

    The leader computes each digest from its files in a worker thread; the requests
    are the bisection's, a handful per pass while the logs agree.
    """

    def __init__(self, reader: Reader):
        super().__init__(reader.config.leader_control)
        self.reader = reader
        self._ids = itertools.count(1 << 40)  # apart from any other request ids

    async def _ask(self, from_seq: int, to_seq: int) -> wire.DigestReply:
        request_id = next(self._ids)
        channel_in, channel_out = trio.open_memory_channel(1)
        self.reader.digest_waiters[request_id] = channel_in
        try:
            with trio.move_on_after(ANTI_ENTROPY_TIMEOUT_S):
                await self.reader._send(wire.DigestRequest(request_id, from_seq, to_seq))
                return await channel_out.receive()
            raise VerifyError(f"no digest from {self.name} within {ANTI_ENTROPY_TIMEOUT_S} s")
        finally:
            del self.reader.digest_waiters[request_id]


def _report_self_heal(writer: node.Writer) -> None:
    """Log each repair the writer made on open: the entries from there are refetched."""
    for problem in writer.repairs:
        event(
            log,
            "self-healed",
            logging.WARNING,
            file=problem.file,
            offset=problem.offset,
            sequence=problem.sequence,
            problem=problem.kind,
            detail=problem.detail,
            refetch_from=writer.current_sequence() + 1,
        )


def _discard_log(wal_dir: str) -> None:
    """--resync: remove the reader's log so it starts again from the leader's earliest.

    Under the directory's lock (a running node on it is named, not wiped), and the lock
    file stays. The credential stays too: it names this reader to the leader, not the
    log it held.
    """
    if not os.path.isdir(wal_dir):
        return
    lock = node.lock_dir(wal_dir)
    try:
        credential = load_meta(wal_dir).get(CREDENTIAL_KEY)
        for name in os.listdir(wal_dir):
            if name == node.LOCK_FILE_NAME:
                continue
            path = os.path.join(wal_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        if isinstance(credential, str):
            update_meta(wal_dir, **{CREDENTIAL_KEY: credential})
    finally:
        lock.release()
    event(log, "resync", wal_dir=wal_dir)


def _leaves(group: BaseExceptionGroup) -> list:
    out = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def run_reader(config: ReaderConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or a refusal (exit 2, the reason logged)."""
    reader = Reader(config)
    stopped: list[ReaderStopped] = []
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(reader.serve)
                async for signum in signals:
                    event(log, "signal", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    except* ReaderStopped as group:
        stopped.extend(_leaves(group))
    if stopped:
        print(f"walrep reader: stopped ({stopped[0].code}): {stopped[0]}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
