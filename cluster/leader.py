"""The leader service: ingest from clients, publish committed runs, serve fetches.

Shell only: decisions live in protocol.LeaderProtocol, bytes move through the
zmqtrio adapter, entries go through node.Writer.

In a syncing mode the ingest loop commits each burst of requests itself with
Writer.flush() and publishes it at once: the trio loop blocks for one write +
fdatasync per burst, which costs less here than handing every commit to a thread
and back (see README, Performance), at the price that a disk stall stalls the
whole leader. In async mode the writer's thread commits and reports through
run_sync_soon to a publish task.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import secrets
import signal
import time
from dataclasses import dataclass

import trio

from walrep import node
from walrep.node import format as fmt
from walrep.node.meta import load_meta, new_log_id, update_meta

from . import protocol, security, wire, zmqtrio
from .config import LeaderConfig, parse_ack
from .logs import event
from .metrics import NodeMetrics
from .verify import digest_reply
from .walloop import make_room

log = logging.getLogger("walrep.leader")

# A request waiting for its ack level is dropped after this long: the client
# has long since reported "unknown", and the leader must not hoard waiters.
WAITER_TTL_S = 300.0
# How many recent requests a retry can be matched against (client id + request id).
# A retry later than this many requests after its original is appended again.
DEDUP_REQUESTS = 200_000
# How often reader positions are saved and retention is applied.
HOUSEKEEPING_INTERVAL_S = 1.0
# A fetch whose reader grants no credit for this long is abandoned.
FETCH_IDLE_S = 30.0
# Replies the ingest socket queues for one client before it refuses more (ZMQ's
# ROUTER would otherwise drop them silently at its default of 1000): what a client
# may have in flight. A reply is ~40 bytes, so a client that never reads costs at
# most a few MB. One that still overflows it is counted and logged, never silent.
INGEST_REPLY_HWM = 100_000


@dataclass
class _Waiter:
    peer: bytes
    request_id: int
    first_seq: int
    last_seq: int
    replicas: int  # 0: durable on the leader; N: and on N readers
    since: float
    ack_label: str


class Leader:
    def __init__(self, config: LeaderConfig):
        self.config = config
        self.writer = node.Writer(
            config.wal_dir,
            sync_mode=config.sync_mode,
            buffer_entries=config.buffer_entries,
            max_size_bytes=config.max_segment_bytes,
            # In a syncing mode the ingest loop commits each burst of requests itself
            # (Writer.flush, group commit all the same): no hand-off to a writer thread
            # and back on the commit path. Async mode keeps the thread for its timer.
            background=config.writer_thread or config.sync_mode == node.SyncMode.ASYNC,
        )
        meta = load_meta(config.wal_dir)
        log_id = meta.get("log_id")
        if not isinstance(log_id, str):
            log_id = new_log_id()
            update_meta(config.wal_dir, log_id=log_id, role="leader")
            event(log, "new-log", log_id=log_id, wal_dir=config.wal_dir)
        head = self.writer.committed_sequence()
        first, _last = node.WALReader(config.wal_dir).bounds()
        self.protocol = protocol.LeaderProtocol(
            log_id, secrets.token_hex(8), head, first if first is not None else head + 1
        )
        self.default_ack = config.default_ack
        self.waiters: list[_Waiter] = []
        self.committed: list = []  # caller mode: runs flushed here, not yet published
        self.flows: dict[tuple[bytes, int], tuple[protocol.FetchFlow, trio.Event]] = {}
        self.durable = self.writer.durable_sequence()
        self.endpoints: dict[str, str] = {}
        self.rejected_messages = 0
        self.backpressure_waits = 0  # appends that waited for room in the WAL queue
        self.busy_refusals = 0  # nowait appends refused because the queue was full
        self.duplicate_requests = 0  # retries answered with their original sequences
        # (client_id, request_id) -> (first, last): how a retry finds its original.
        self.recent_requests: collections.OrderedDict[tuple[str, int], tuple[int, int]] = (
            collections.OrderedDict()
        )
        self.protocol.restore(meta.get("readers", {}), time.monotonic(), time.time())
        self.history = protocol.CommitHistory(head, time.monotonic())
        self.refused_entries = 0  # too large, or busy: refused with no sequence
        self.replies_dropped = 0  # replies a client's full queue could not take
        self.replies_undeliverable = 0  # replies to clients that had gone
        # seq -> (segment path, its first sequence, offset of seq + 1 in it)
        self._offsets: dict[int, tuple[str, int, int]] = {}
        # Built in the trio thread (housekeeping) and read by the metrics thread.
        self.metrics_snapshot: dict = {}
        self.metrics = NodeMetrics("leader", self.writer, lambda: self.metrics_snapshot)
        self.gatekeeper = None
        if config.key:
            readers = security.load_allow_list(config.allow_readers)
            self.gatekeeper = security.Gatekeeper(
                {
                    security.DOMAIN_READERS: readers,
                    security.DOMAIN_PUBLISH: readers,
                    security.DOMAIN_CLIENTS: security.load_allow_list(config.allow_clients),
                }
            )
        self.subscriber_fds: set[int] = set()  # the publish socket's connections
        self.subscriber_events = None  # their accept/disconnect events (serve() opens it)
        self.subscribers_refused = 0
        # Refused connections whose disconnect has not been seen: a burst of handshakes
        # all see each other's accepts before any refusal closes one.
        self.refusals_pending = 0
        self.saved_positions = self.protocol.positions(time.monotonic(), time.time())

    # --- running ---------------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()
        commits_in, commits_out = trio.open_memory_channel(math.inf)

        def from_thread(channel, value):
            try:
                token.run_sync_soon(channel.send_nowait, value)
            except trio.RunFinishedError:
                pass  # shutting down; the reopened writer rescans the files

        if self.writer.background:
            self.writer.set_commit_hook(lambda run: from_thread(commits_in, run))
        else:  # flush() runs in this trio thread, whose caller publishes what it committed
            self.writer.set_commit_hook(lambda run: self.committed.append(run))
        durable_out = None
        if self.writer.sync_mode is node.SyncMode.ASYNC:
            # Syncing modes commit only what is synced, so the commit hook already says
            # it; a second cross-thread call per group would only cost a task switch.
            durable_in, durable_out = trio.open_memory_channel(math.inf)
            self.writer.set_durable_hook(lambda seq: from_thread(durable_in, seq))
        ctx = zmqtrio.new_context()
        readers_opts, clients_opts = self._curve_options()
        # ZMQ_MAXMSGSIZE on every socket: a frame declared larger than what the socket
        # can take is dropped by libzmq with its connection, before any of it is buffered.
        self.pub = zmqtrio.make_socket(
            ctx,
            zmqtrio.PUB,
            hwm=self.config.publish_hwm,
            options={
                zmqtrio.MAXMSGSIZE: wire.MAX_SUBSCRIPTION_BYTES,
                **readers_opts,
                # Every subscriber passes the ZAP handler, keys or not: it caps how many
                # there are (each can hold publish_hwm messages of the leader's memory).
                zmqtrio.ZAP_DOMAIN: security.DOMAIN_PUBLISH,
            },
        )
        self.subscriber_events = zmqtrio.open_monitor(
            self.pub, zmqtrio.EVENT_ACCEPTED | zmqtrio.EVENT_DISCONNECTED
        )
        self.control = zmqtrio.make_socket(
            ctx,
            zmqtrio.ROUTER,
            options={
                zmqtrio.ROUTER_MANDATORY: 0,
                zmqtrio.MAXMSGSIZE: wire.MAX_CONTROL_MESSAGE_BYTES,
                **readers_opts,
            },
        )
        self.ingest = zmqtrio.make_socket(
            ctx,
            zmqtrio.ROUTER,
            options={
                # A reply that cannot be queued raises instead of vanishing (_reply).
                zmqtrio.ROUTER_MANDATORY: 1,
                zmqtrio.SNDHWM: INGEST_REPLY_HWM,
                zmqtrio.MAXMSGSIZE: wire.MAX_MESSAGE_BYTES,
                **clients_opts,
            },
        )
        self.control_send_lock = trio.Lock()
        zap = zmqtrio.make_socket(ctx, zmqtrio.REP)
        try:
            # The ZAP handler must listen before any socket takes a connection.
            zap.bind(security.ZAP_ENDPOINT)
            self.endpoints["publish"] = self.pub.bind(self.config.publish)
            self.endpoints["control"] = self.control.bind(self.config.control)
            self.endpoints["ingest"] = self.ingest.bind(self.config.ingest)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._zap_loop, zap)
                if self.writer.background:
                    nursery.start_soon(self._publish_loop, commits_out)
                if durable_out is not None:
                    nursery.start_soon(self._durable_loop, durable_out)
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._control_loop)
                nursery.start_soon(self._ingest_loop)
                nursery.start_soon(self._housekeeping_loop)
                if self.config.metrics:
                    host, port = self.metrics.serve(self.config.metrics)
                    self.endpoints["metrics"] = f"http://{host}:{port}/metrics"
                if self.gatekeeper is None:
                    level = logging.WARNING if self.config.insecure else logging.INFO
                    event(
                        log,
                        "unencrypted",
                        level,
                        insecure=self.config.insecure,
                        note="no keys: anyone who can reach these endpoints can read and "
                        "write the log",
                    )
                event(
                    log,
                    "leader-started",
                    log_id=self.protocol.log_id,
                    head=self.protocol.head,
                    earliest=self.protocol.earliest,
                    **self.endpoints,
                )
                task_status.started(self)
        finally:
            self.writer.set_commit_hook(None)
            self.writer.set_durable_hook(None)
            with trio.CancelScope(shield=True):
                await self._save_positions()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.writer.close)
            for sock in (self.subscriber_events, self.pub, self.control, self.ingest, zap):
                sock.close()
            self.metrics.close()
            ctx.term()
            event(log, "leader-stopped", head=self.writer.committed_sequence())

    # --- security --------------------------------------------------------------------

    def _curve_options(self) -> tuple[dict, dict]:
        """Socket options for the reader-facing and client-facing sockets."""
        if self.gatekeeper is None:
            return {}, {}
        _public, secret = security.load_secret(self.config.key)
        return (
            security.server_options(secret, security.DOMAIN_READERS),
            security.server_options(secret, security.DOMAIN_CLIENTS),
        )

    async def _zap_loop(self, zap) -> None:
        """Answer libzmq's authentication requests: only allow-listed keys get in, and no
        more than max_subscribers subscribers at once."""
        while True:
            request = await zap.recv_multipart()
            request_id, domain, address = security.zap_request_fields(request)
            if domain == security.DOMAIN_PUBLISH:
                # The newcomer's accept event is already queued: count it in.
                self._take_subscriber_events()
                if len(self.subscriber_fds) - self.refusals_pending > self.config.max_subscribers:
                    self.subscribers_refused += 1
                    self.refusals_pending += 1
                    event(
                        log,
                        "subscriber-refused",
                        logging.WARNING,
                        peer=address,
                        subscribers=len(self.subscriber_fds) - self.refusals_pending,
                        max_subscribers=self.config.max_subscribers,
                    )
                    await zap.send_multipart(security.zap_reply(request_id, False))
                    continue
                if self.gatekeeper is None:
                    await zap.send_multipart(security.zap_reply(request_id, True))
                    continue
            reply, _name, refusal = self.gatekeeper.decide(request)
            if refusal is not None:
                event(log, "connection-refused", logging.WARNING, peer=refusal)
            await zap.send_multipart(reply)

    def _subscriber_count(self) -> int:
        if self.subscriber_events is not None and not self.subscriber_events.closed:
            self._take_subscriber_events()
        return max(0, len(self.subscriber_fds) - self.refusals_pending)

    def _take_subscriber_events(self) -> None:
        """Keep subscriber_fds to the publish socket's open connections."""
        while True:
            try:
                events = self.subscriber_events.recv_multipart_nowait()
                kind, fd = zmqtrio.parse_monitor_event(events)
            except zmqtrio.WouldBlock:
                return
            if kind == zmqtrio.EVENT_ACCEPTED:
                self.subscriber_fds.add(fd)
            elif kind == zmqtrio.EVENT_DISCONNECTED:
                self.subscriber_fds.discard(fd)
                # Which connection closed is not known, only its fd: count it against
                # the refused ones first, which can only refuse more, never fewer.
                self.refusals_pending = max(0, self.refusals_pending - 1)

    # --- publishing ------------------------------------------------------------------

    async def _publish_loop(self, commits: trio.MemoryReceiveChannel) -> None:
        """Publish what the writer thread commits (background mode)."""
        async for run in commits:
            pieces = [run]
            # Coalesce whatever else is already committed into as few messages as fit.
            while True:
                try:
                    pieces.append(commits.receive_nowait())
                except trio.WouldBlock:
                    break
            await self._publish(pieces)

    async def _flush_and_publish(self) -> None:
        """Commit what is queued and, in caller mode, publish it from this task (with the
        writer thread, flush only wakes it and _publish_loop publishes).

        A publish task woken by the commit hook put a task switch between the sync and
        the readers on every commit: 130 us at p50 and 430 at p90 in traces of a 1000
        requests/s run, against 30 and 80 for a bare pyzmq loop doing the same.
        """
        self.writer.flush()
        await self._publish_committed()

    async def _publish_committed(self) -> None:
        """Publish the runs a flush in this thread committed (none in background mode)."""
        if self.committed:
            pieces, self.committed = self.committed, []
            await self._publish(pieces)

    async def _publish(self, pieces: list) -> None:
        log_id = self.protocol.log_id
        first = pieces[0].first_seq
        data = pieces[0].data if len(pieces) == 1 else b"".join(p.data for p in pieces)
        last = pieces[-1].last_seq
        self.protocol.on_commit(last)
        self.history.record(last, len(data), time.monotonic())
        for piece_first, count, frames in fmt.split_frames(data, first, wire.TARGET_BATCH_BYTES):
            # A PUB socket drops at its high-water mark rather than block, so this never
            # waits, and runs committed by two tasks go out in the order they committed.
            self.pub.send_nowait(wire.encode(wire.Batch(log_id, piece_first, count, frames)))
        if self.writer.sync_mode is not node.SyncMode.ASYNC:
            self.durable = max(self.durable, last)
        await self._resolve_waiters()

    async def _durable_loop(self, durables: trio.MemoryReceiveChannel) -> None:
        async for seq in durables:
            self.durable = max(self.durable, seq)
            await self._resolve_waiters()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._flush_and_publish()  # retries a write a full disk refused
            first, _ = _first_segment_seq(self.writer)
            if first is not None:
                self.protocol.on_purge(first)
            beat = self.protocol.heartbeat(time.time_ns() // 1000)
            await self.pub.send(wire.encode(beat))
            self._expire_waiters()
            await trio.sleep(protocol.HEARTBEAT_INTERVAL_S)

    # --- reader positions and retention --------------------------------------------

    async def _housekeeping_loop(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL_S)
            self.metrics_snapshot = self._metrics_snapshot()
            await self._save_positions()
            await self.apply_retention()

    async def _save_positions(self) -> None:
        positions = self.protocol.positions(time.monotonic(), time.time())
        if positions == self.saved_positions:
            return
        try:
            await trio.to_thread.run_sync(
                functools.partial(update_meta, self.config.wal_dir, readers=positions)
            )
        except OSError as exc:
            # A full disk must not stop the leader: the positions are saved next time.
            event(log, "positions-not-saved", logging.WARNING, reason=str(exc))
            return
        self.saved_positions = positions

    async def apply_retention(self) -> int:
        """Purge segments every known reader holds durably, or that exceed the bounds."""
        floor = self.protocol.retention_floor()  # read here: the protocol is the trio thread's
        head = self.protocol.head
        removed, first = await trio.to_thread.run_sync(self._purge, floor, head)
        if removed:
            self.protocol.on_purge(first)
            too_old = [
                r.reader_id for r in self.protocol.readers.values() if r.durable_seq + 1 < first
            ]
            event(log, "purged", segments=removed, earliest=first, too_old_readers=too_old)
        return removed

    def _purge(self, floor: int | None, head: int) -> tuple[int, int | None]:
        """In a worker thread: purge what retention allows; (segments removed, earliest)."""
        segments = self.writer.segments()
        if len(segments) < 2:
            return 0, None
        if floor is not None:
            keep_from = floor + 1  # every known reader holds everything below durably
        elif self.config.purge_without_readers:
            keep_from = head + 1
        else:
            keep_from = 0
        keep_from = max(keep_from, self._bounded_keep_from(segments))
        if keep_from <= segments[0].first_seq:
            return 0, None
        removed = self.writer.purge_before(keep_from)
        return removed, self.writer.segments()[0].first_seq

    def _bounded_keep_from(self, segments) -> int:
        """The first sequence the size and age bounds let us keep (0: no bound applies)."""
        max_bytes = self.config.max_retained_bytes
        max_age = self.config.max_retained_age_s
        if not (max_bytes or max_age):
            return 0
        total = sum(_size(s.path) for s in segments)
        now = time.time()
        keep_from = 0
        for segment, following in zip(segments, segments[1:], strict=False):
            too_big = max_bytes and total > max_bytes
            too_old = max_age and now - _mtime(segment.path) > max_age
            if not (too_big or too_old):
                break
            total -= _size(segment.path)
            keep_from = following.first_seq
        return keep_from

    # --- control: handshakes, fetches, acks, status ---------------------------------

    async def _control_loop(self) -> None:
        while True:
            acked = await self._on_control(*await self.control.recv_multipart_with_sender())
            # Take what already arrived without a scheduler pass per message (acks from
            # every reader for every commit), and settle the waiters once for them all.
            for _ in range(zmqtrio.DRAIN_MAX_MESSAGES):
                try:
                    received = self.control.recv_multipart_with_sender_nowait()
                except zmqtrio.WouldBlock:
                    break
                acked = await self._on_control(*received) or acked
            if acked:
                await self._resolve_waiters()

    async def _on_control(self, frames: list[bytes], sender: zmqtrio.Sender) -> bool:
        """Handle one control message; True if it moved a reader's position (waiters may
        be ready)."""
        address = sender.address
        if len(frames) != 2:
            self._reject(address, "control", "expected [identity, message]")
            return False
        peer, data = frames
        try:
            message = wire.decode(data)
        except wire.BadMessage as exc:
            self._reject(address, "control", str(exc))
            await self._send_control(peer, wire.Refused("bad-request", str(exc)))
            return False
        if isinstance(message, wire.Credit):
            entry = self.flows.get((peer, message.fetch_id))
            if entry is not None:
                entry[0].add_credit(message.credit)
                entry[1].set()
            return False
        if isinstance(message, wire.StatusRequest):
            await self._send_control(peer, wire.StatusReply(self.status()))
            return False
        if isinstance(message, wire.DigestRequest):
            self.nursery.start_soon(self._answer_digest, peer, message)
            return False
        key_name = None
        if isinstance(message, wire.Hello):
            # Only a hello binds a session: read who it is now (see zmqtrio.Sender).
            address = sender.host_port()
            if self.gatekeeper is not None:
                key_name = sender.key_name()
        actions = self.protocol.on_control(
            peer, message, time.monotonic(), key_name=key_name, address=address
        )
        await self._run_actions(actions)
        if isinstance(message, wire.Fetch) and not actions:
            self.nursery.start_soon(self._serve_fetch, peer, message)
        # A hello carries the reader's durable position too (after a reconnect).
        return isinstance(message, wire.Ack | wire.Hello)

    def status(self) -> dict:
        """Every node as a row (leader first), with lag in entries, bytes and seconds."""
        now = time.monotonic()
        head = self.protocol.head
        earliest = self.protocol.earliest
        entries_rate, bytes_rate = self.history.rate(now)
        retained = sum(_size(s.path) for s in self.writer.segments())
        nodes = [
            {
                "id": self.config.id,
                "role": "leader",
                "state": "leading",
                "address": self.endpoints.get("control", self.config.control),
                "connected": True,
                "applied_seq": head,
                "durable_seq": self.durable,
                "lag_entries": 0,
                "lag_bytes": 0,
                "lag_seconds": 0.0,
                "last_contact_s_ago": 0.0,
                "earliest_seq": earliest,
                "retained_bytes": retained,
            }
        ]
        for info in sorted(self.protocol.readers.values(), key=lambda r: r.reader_id):
            silent_for = now - info.last_contact
            connected = bool(info.peer) and silent_for < protocol.READER_SILENT_S
            if not info.heard:
                # Saved before a restart of this leader: it still holds retention, but it
                # is not where the reader is now. Unknown until the reader speaks.
                nodes.append(
                    {
                        "id": info.reader_id,
                        "role": "reader",
                        "state": "unknown",
                        "address": "unknown",
                        "connected": False,
                        "applied_seq": None,
                        "durable_seq": None,
                        "saved_durable_seq": info.durable_seq,
                        "lag_entries": None,
                        "lag_bytes": None,
                        "lag_seconds": None,
                        "last_contact_s_ago": round(silent_for, 3),
                        "time_until_too_old_s": None,
                    }
                )
                continue
            lag_bytes, lag_seconds = self.history.lag(info.durable_seq, now)
            if not self.history.covers(info.durable_seq):
                # Behind what this leader saw committed: count the bytes on disk.
                lag_bytes = self._bytes_after(info.durable_seq)
            if info.durable_seq + 1 < earliest:
                state = "too-old"
            elif not connected:
                state = "disconnected"
            else:
                state = info.state
            nodes.append(
                {
                    "id": info.reader_id,
                    "role": "reader",
                    "state": state,
                    "address": info.address,
                    "connected": connected,
                    "applied_seq": info.applied_seq,
                    "durable_seq": info.durable_seq,
                    "lag_entries": max(0, head - info.durable_seq),
                    "lag_bytes": lag_bytes,
                    "lag_seconds": round(lag_seconds, 3),
                    "last_contact_s_ago": round(silent_for, 3),
                    "time_until_too_old_s": self._time_until_too_old(
                        lag_bytes, lag_seconds, bytes_rate, state
                    ),
                }
            )
        return {
            "log_id": self.protocol.log_id,
            "head_seq": head,
            "earliest_seq": earliest,
            "write_rate": {
                "entries_per_s": round(entries_rate, 1),
                "bytes_per_s": round(bytes_rate),
            },
            "nodes": nodes,
            "leader": {
                "endpoints": self.endpoints,
                "sync_mode": self.writer.sync_mode.value,
                "waiting_requests": len(self.waiters),
                "backpressure_waits": self.backpressure_waits,
                "busy_refusals": self.busy_refusals,
                "duplicate_requests": self.duplicate_requests,
                "rejected_messages": self.rejected_messages,
                "subscribers": self._subscriber_count(),
                "max_subscribers": self.config.max_subscribers,
                "subscribers_refused": self.subscribers_refused,
                "refused_acks": self.protocol.refused_acks,
                "refused_hellos": self.protocol.refused_hellos,
                "replies_dropped": self.replies_dropped,
                "replies_undeliverable": self.replies_undeliverable,
                "rejected_connections": self.gatekeeper.rejected if self.gatekeeper else 0,
                "encrypted": self.gatekeeper is not None,
                "max_retained_bytes": self.config.max_retained_bytes,
                "max_retained_age_s": self.config.max_retained_age_s,
                "wal": self.writer.stats().as_dict(),
            },
        }

    def _metrics_snapshot(self) -> dict:
        status = self.status()
        readers = [n for n in status["nodes"] if n["role"] == "reader"]
        # A reader whose position is unknown (saved before a restart) has no lag series
        # until it speaks: a gauge has no "unknown".
        known = [n for n in readers if n["lag_entries"] is not None]
        return {
            "plain": {
                "walrep_head_sequence": ("gauge", "Last committed sequence", status["head_seq"]),
                "walrep_earliest_sequence": (
                    "gauge",
                    "Earliest retained sequence",
                    status["earliest_seq"],
                ),
                "walrep_refused_entries_total": (
                    "counter",
                    "Entries refused with no sequence (too large, busy)",
                    self.refused_entries,
                ),
                "walrep_backpressure_waits_total": (
                    "counter",
                    "Appends that waited for room in the WAL queue",
                    self.backpressure_waits,
                ),
                "walrep_rejected_messages_total": (
                    "counter",
                    "Malformed or unexpected messages from peers",
                    self.rejected_messages,
                ),
                "walrep_refused_acks_total": (
                    "counter",
                    "Acks refused: not from the session that hand-shook as that reader, "
                    "for another log, or past the head",
                    self.protocol.refused_acks,
                ),
                "walrep_refused_hellos_total": (
                    "counter",
                    "Hellos refused for a reader id bound to another reader's log or key",
                    self.protocol.refused_hellos,
                ),
                "walrep_replies_dropped_total": (
                    "counter",
                    "Append replies a client's full queue could not take",
                    self.replies_dropped,
                ),
                "walrep_rejected_connections_total": (
                    "counter",
                    "Connections refused by CURVE authentication (unknown or wrong keys)",
                    self.gatekeeper.rejected if self.gatekeeper else 0,
                ),
                "walrep_duplicate_requests_total": (
                    "counter",
                    "Retried appends answered with their original sequences",
                    self.duplicate_requests,
                ),
            },
            "labelled": {
                "walrep_reader_lag_entries": (
                    "Entries a reader lacks durably",
                    "reader",
                    {n["id"]: n["lag_entries"] for n in known},
                ),
                "walrep_reader_lag_bytes": (
                    "Bytes a reader lacks durably",
                    "reader",
                    {n["id"]: n["lag_bytes"] for n in known},
                ),
                "walrep_reader_lag_seconds": (
                    "Seconds since the leader committed the oldest entry a reader lacks",
                    "reader",
                    {n["id"]: n["lag_seconds"] for n in known},
                ),
                "walrep_reader_connected": (
                    "1 if the reader was heard from recently",
                    "reader",
                    {n["id"]: int(n["connected"]) for n in readers},
                ),
            },
        }

    def _bytes_after(self, seq: int) -> int:
        """Bytes of the log after seq, from the segment files (entry offsets cached: a
        reader far behind is asked about once a second, by the metrics)."""
        found = self._offsets.get(seq)
        if found is None or not os.path.exists(found[0]):
            located = node.WALReader(self.config.wal_dir).offset_of(seq + 1)
            if located is None:
                return 0 if seq >= self.protocol.head else _retained(self.writer)
            if len(self._offsets) >= 64:
                self._offsets.clear()
            found = self._offsets[seq] = (located[0].path, located[0].first_seq, located[1])
        path, first_seq, offset = found
        total = max(0, _size(path) - offset)
        for segment in self.writer.segments():
            if segment.first_seq > first_seq:
                total += max(0, _size(segment.path) - fmt.FILE_HEADER_BYTES)
        return total

    def _time_until_too_old(
        self, lag_bytes: int, lag_seconds: float, bytes_rate: float, state: str
    ) -> float | None:
        """How long this reader can stay away before retention purges what it needs.

        None when no bound applies (it is then kept for as long as the disk lasts).
        """
        if state == "too-old":
            return 0.0
        limits = []
        if self.config.max_retained_bytes:
            room = self.config.max_retained_bytes - lag_bytes
            limits.append(float("inf") if bytes_rate <= 0 else max(0.0, room / bytes_rate))
        if self.config.max_retained_age_s:
            limits.append(max(0.0, self.config.max_retained_age_s - lag_seconds))
        if not limits:
            return None
        value = min(limits)
        return None if value == float("inf") else round(value, 1)

    async def _run_actions(self, actions) -> None:
        for action in actions:
            if isinstance(action, protocol.Send):
                await self._send_control(action.peer, action.message)
            elif isinstance(action, protocol.Note):
                level = logging.WARNING if action.event.startswith("refused") else logging.INFO
                event(log, action.event, level, **action.fields)

    async def _send_control(self, peer: bytes, message: wire.Message) -> None:
        await zmqtrio.send_in_turn(
            self.control, self.control_send_lock, [peer, wire.encode(message)]
        )

    async def _answer_digest(self, peer: bytes, request: wire.DigestRequest) -> None:
        reply = await trio.to_thread.run_sync(
            digest_reply, self.config.wal_dir, request, self.protocol.head
        )
        await self._send_control(peer, reply)

    def _reject(self, address: str, socket: str, why: str) -> None:
        self.rejected_messages += 1
        event(log, "bad-message", logging.WARNING, peer=address, socket=socket, reason=why)

    async def _serve_fetch(self, peer: bytes, request: wire.Fetch) -> None:
        """Stream a fetch from the WAL files, a chunk per credit, off the trio thread."""
        to_seq = min(request.to_seq, self.protocol.head)
        flow = protocol.FetchFlow(request.fetch_id, request.from_seq, to_seq, request.credit)
        key = (peer, request.fetch_id)
        reader = node.WALReader(self.config.wal_dir)
        try:
            while not flow.done:
                while not flow.can_send():
                    wake = trio.Event()
                    self.flows[key] = (flow, wake)
                    with trio.move_on_after(FETCH_IDLE_S) as idle:
                        await wake.wait()
                    if idle.cancelled_caught:
                        event(log, "fetch-abandoned", peer=peer.hex(), at=flow.next_seq)
                        return
                self.flows[key] = (flow, trio.Event())
                try:
                    first, count, frames = await trio.to_thread.run_sync(
                        functools.partial(
                            reader.read_frames,
                            flow.next_seq,
                            flow.to_seq,
                            max_bytes=wire.TARGET_BATCH_BYTES,
                        )
                    )
                except node.RangeNotAvailable:
                    earliest = self.protocol.earliest
                    await self._send_control(
                        peer,
                        wire.Refused(
                            "too-old",
                            f"sequence {flow.next_seq} is no longer held; earliest is {earliest}",
                            request_id=request.fetch_id,
                            earliest_seq=earliest,
                        ),
                    )
                    return
                except (node.WALError, OSError) as exc:
                    # A damaged entry is never served, and a file error ends this fetch
                    # only: the reader is told (it asks again), the leader lives.
                    event(log, "fetch-failed", logging.ERROR, peer=peer.hex(), reason=str(exc))
                    await self._send_control(
                        peer,
                        wire.Refused("unavailable", str(exc), request_id=request.fetch_id),
                    )
                    return
                await self._send_control(peer, flow.chunk(first, count, frames))
        finally:
            self.flows.pop(key, None)

    # --- ingest ------------------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        while True:
            await self._on_ingest(*await self.ingest.recv_multipart_with_peer())
            # Requests that already arrived are taken without a scheduler pass each; the
            # writer groups them into one commit all the same.
            for _ in range(zmqtrio.DRAIN_MAX_MESSAGES):
                try:
                    received = self.ingest.recv_multipart_with_peer_nowait()
                except zmqtrio.WouldBlock:
                    break
                await self._on_ingest(*received)
            await self._flush_and_publish()  # one commit for the whole burst

    async def _on_ingest(self, frames: list[bytes], address: str) -> None:
        if len(frames) != 2:
            self._reject(address, "ingest", "expected [identity, message]")
            return
        peer, data = frames
        message = None
        try:
            message = wire.decode(data)
            if not isinstance(message, wire.Append):
                raise wire.BadMessage(f"{message.KIND} is not an ingest request")
            replicas = parse_ack(message.ack or self.default_ack)
        except (wire.BadMessage, ValueError) as exc:
            # The request id, whenever there is one: the client is told at once.
            request_id = getattr(message, "request_id", None)
            if request_id is None:
                request_id = wire.request_id_of(data)
            self._reject(address, "ingest", str(exc))
            await self._reply(peer, wire.Refused("bad-request", str(exc), request_id=request_id))
            return
        if replicas and replicas > len(self.protocol.readers):
            # It could only time out. Known readers count even while down (their acks
            # may still come); `walrep forget-reader` removes one for good.
            self.refused_entries += len(message.payloads)
            refusal = wire.Refused(
                "not-enough-readers",
                f"replicas={replicas} asked, but this leader knows {len(self.protocol.readers)} "
                "reader(s); nothing was written",
                request_id=message.request_id,
            )
            await self._reply(peer, refusal)
            return
        await self._append(peer, message, replicas)

    async def _append(self, peer: bytes, request: wire.Append, replicas: int | None) -> None:
        received_at = time.monotonic()
        key = (request.client_id, request.request_id) if request.client_id else None
        if key is not None and key in self.recent_requests:
            # A retry: answer with the original sequences once the ack level holds for them.
            self.duplicate_requests += 1
            first, last = self.recent_requests[key]
            await self._wait_for_level(peer, request.request_id, first, last, replicas, received_at)
            return
        waited = False
        while True:
            try:
                # The writer checks every size before it takes anything (all or nothing),
                # so an oversized payload is refused here, before any back-pressure wait.
                first, last = self.writer.append_batch_nowait(request.payloads)
                break
            except fmt.PayloadTooLarge as exc:
                self.refused_entries += len(request.payloads)
                refusal = wire.Refused(
                    "too-large",
                    f"payload of {exc.size} bytes exceeds {fmt.MAX_PAYLOAD_BYTES}",
                    request_id=request.request_id,
                )
                await self._reply(peer, refusal)
                return
            except node.WALDropped as exc:
                if request.nowait:
                    self.busy_refusals += 1
                    self.refused_entries += len(request.payloads)
                    refusal = wire.Refused("busy", str(exc), request_id=request.request_id)
                    await self._reply(peer, refusal)
                    return
                # Back-pressure: the queue is full. Wait here, so every client waits,
                # rather than drop anything.
                if not waited:
                    self.backpressure_waits += 1
                    waited = True
                await make_room(self.writer)
                # make_room may have flushed: publish that now, not after the burst.
                await self._publish_committed()
            except (node.WALClosed, node.WALFailed) as exc:
                await self._reply(
                    peer, wire.Refused("unavailable", str(exc), request_id=request.request_id)
                )
                return
        if key is not None:
            self.recent_requests[key] = (first, last)
            if len(self.recent_requests) > DEDUP_REQUESTS:
                self.recent_requests.popitem(last=False)
        await self._wait_for_level(peer, request.request_id, first, last, replicas, received_at)

    async def _wait_for_level(
        self,
        peer: bytes,
        request_id: int,
        first: int,
        last: int,
        replicas: int | None,
        received_at: float,
    ) -> None:
        if replicas is None:
            self.metrics.observe_commit_latency("none", time.monotonic() - received_at)
            await self._reply(peer, wire.Appended(request_id, first, last))
            return
        label = "local" if replicas == 0 else f"replicas={replicas}"
        self.waiters.append(_Waiter(peer, request_id, first, last, replicas, received_at, label))
        if self.writer.sync_mode is node.SyncMode.ASYNC:
            self.writer.request_sync()
        # A fresh append is not durable before the flush at the end of its burst, which
        # resolves the waiters itself; only a retry of a durable request can be ready now.
        # Resolving for every request of a burst walked every waiter once per request.
        if self.durable >= last:
            await self._resolve_waiters()

    async def _resolve_waiters(self) -> None:
        if not self.waiters:
            return
        durable_readers = sorted(
            (r.durable_seq for r in self.protocol.readers.values()), reverse=True
        )
        ready: list[_Waiter] = []
        still: list[_Waiter] = []
        for waiter in self.waiters:
            ok = self.durable >= waiter.last_seq
            if ok and waiter.replicas:
                ok = (
                    len(durable_readers) >= waiter.replicas
                    and durable_readers[waiter.replicas - 1] >= waiter.last_seq
                )
            (ready if ok else still).append(waiter)
        # Settle the list before the first await: appends made while we send must stay.
        self.waiters = still
        now = time.monotonic()
        for waiter in ready:
            self.metrics.observe_commit_latency(waiter.ack_label, now - waiter.since)
            reply = wire.Appended(waiter.request_id, waiter.first_seq, waiter.last_seq)
            await self._reply(waiter.peer, reply)

    def _expire_waiters(self) -> None:
        cutoff = time.monotonic() - WAITER_TTL_S
        self.waiters = [w for w in self.waiters if w.since >= cutoff]

    async def _reply(self, peer: bytes, message: wire.Message) -> None:
        # Never waits: the ingest loop must not stall on one client. The socket queues
        # up to INGEST_REPLY_HWM replies per client, and says so past that (or when
        # the client is gone) instead of dropping the reply silently.
        try:
            self.ingest.send_multipart_nowait([peer, wire.encode(message)])
        except zmqtrio.WouldBlock:
            self.replies_dropped += 1
            event(
                log,
                "reply-dropped",
                logging.WARNING,
                client=peer.hex(),
                queued=INGEST_REPLY_HWM,
                request_id=getattr(message, "request_id", None),
                reason="the client is not reading its replies",
            )
        except zmqtrio.ZMQError:
            self.replies_undeliverable += 1  # EHOSTUNREACH: the client went away


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _retained(writer: node.Writer) -> int:
    return sum(max(0, _size(s.path) - fmt.FILE_HEADER_BYTES) for s in writer.segments())


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return time.time()


def _first_segment_seq(writer: node.Writer) -> tuple[int | None, int]:
    segments = writer.segments()
    return (segments[0].first_seq if segments else None), len(segments)


async def run_leader(config: LeaderConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain, sync and close."""
    leader = Leader(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(leader.serve)
            async for signum in signals:
                event(log, "signal", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0
