"""`walrep load`: a load generator that keeps many requests in flight.

Each entry's payload carries its id, so a checker can match the log against the
history written with --log (one JSON line per entry: id, seq, outcome).

It is one thread driving one DEALER socket with plain pyzmq and epoll, not the
trio client: a load generator shares the machine with the nodes it measures, and
this loop spends about half the trio client's CPU per request (README,
Performance).
The messages, the client id, the request ids and the retry rule are the trio
client's (cluster.client): a retry resends the same request, and the leader
answers it with the original sequences.

Pacing (--rate) has the resolution of epoll's timeout, a millisecond, as trio's
had: a request goes out on the first wake-up at or after its time, so when a
wake-up is late the requests that fell due go out together, and the rate over
any few milliseconds is exact. (Spacing them to the microsecond with select()
measured worse: README, Performance.)
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import os
import secrets
import select
import signal
import sys
import time
from dataclasses import dataclass

import zmq

from . import wire


def payload_for(entry_id: int, size: int) -> bytes:
    head = b"load-%012d-" % entry_id
    return (head + b"x" * max(0, size - len(head)))[: max(size, len(head))]


@dataclass(slots=True)
class _Request:
    first_id: int  # the id of its first entry
    count: int
    data: bytes  # the encoded Append, resent as is by a retry
    sent_at: float  # first send: latency runs from here to the acknowledgement
    deadline: float  # of the current attempt
    attempts: int


class _History:
    """Outcomes per entry, and the --log file that records them as they are known."""

    def __init__(self, path: str | None, ack: str | None):
        self.ack_level = ack or "leader-default"
        self.ok = 0
        self.unacknowledged = 0  # unknown or refused
        self.latencies: list[float] = []  # seconds from first send to acknowledgement
        self.file = open(path, "w") if path else None  # noqa: SIM115 (closed by close())

    def record(self, request: _Request, seq_first: int | None, outcome: str) -> None:
        if outcome == "ok":
            self.ok += request.count
        else:
            self.unacknowledged += request.count
        if self.file is None:
            return
        lines = []
        for i in range(request.count):
            line = {
                "id": request.first_id + i,
                "seq": None if seq_first is None else seq_first + i,
                "outcome": outcome,
                "ack": self.ack_level,
                "attempts": request.attempts,
            }
            lines.append(json.dumps(line) + "\n")
        self.file.write("".join(lines))
        self.file.flush()  # a history that survives this process being killed

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Interrupted(Exception):
    pass


def run_load(args) -> int:
    """Run the load from the main thread (it takes over SIGINT and SIGTERM)."""
    count, batch = args.count, args.batch
    batches = [(start, min(batch, count - start)) for start in range(0, count, batch)]
    in_flight: collections.OrderedDict[int, _Request] = collections.OrderedDict()
    interrupted: list[int] = []
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        history = _History(args.log, args.ack)
        cleanup.callback(history.close)
        ctx = zmq.Context()
        cleanup.callback(ctx.term)
        sock = ctx.socket(zmq.DEALER)
        cleanup.callback(sock.close, linger=0)
        wake_fd = _wake_on_signals(cleanup, interrupted)
        sock.setsockopt(zmq.LINGER, 0)
        # Room for every request in flight, both ways: at the default of 1000 a send
        # found the queue full while 2000 were in flight and that request was lost
        # until its timeout (reported unknown although the leader was healthy).
        queue = max(1000, 2 * args.inflight)
        sock.setsockopt(zmq.SNDHWM, queue)
        sock.setsockopt(zmq.RCVHWM, queue)
        for option, value in (args.keys.options() if args.keys else {}).items():
            sock.setsockopt(option, value)
        sock.connect(args.ingest)
        try:
            _drive(args, sock, wake_fd, batches, in_flight, history, interrupted)
        except _Interrupted:
            # Replies already here still count; whatever else is in flight may or may
            # not be committed, and the history must say so, or a checker would take
            # those entries for appends nobody asked for.
            _take_replies(sock, in_flight, history)
            for request in in_flight.values():
                history.record(request, None, "unknown")
            print(
                f"walrep load: interrupted; {len(in_flight)} requests in flight logged as unknown",
                file=sys.stderr,
            )
            return 128 + interrupted[0]
    return _report(args, history, time.monotonic() - started)


def _wake_on_signals(cleanup: contextlib.ExitStack, interrupted: list[int]) -> int:
    """SIGINT/SIGTERM only note the signal and wake the poll through a pipe, so they
    never land between a reply and its history line. Returns the pipe's read end."""
    wake_r, wake_w = os.pipe()
    cleanup.callback(os.close, wake_r)
    cleanup.callback(os.close, wake_w)
    os.set_blocking(wake_w, False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.signal(signum, lambda signum, _frame: interrupted.append(signum))
        cleanup.callback(signal.signal, signum, previous)
    cleanup.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(wake_w))
    return wake_r


def _drive(args, sock, wake_fd, batches, in_flight, history, interrupted) -> None:
    """Send on schedule, collect replies, retry or give up on the silent ones."""
    pacer = _Pacer(args, batches)
    poller = select.epoll()
    poller.register(sock.getsockopt(zmq.FD), select.EPOLLIN)
    poller.register(wake_fd, select.EPOLLIN)
    try:
        while not pacer.done() or in_flight:
            if interrupted:
                raise _Interrupted
            # Replies first: they free window slots for the sends below, and a reply
            # already here must not be taken for a timeout.
            _take_replies(sock, in_flight, history)
            _expire(args, sock, in_flight, history, time.monotonic())
            next_due = pacer.send_due(sock, in_flight)
            # A send may have consumed the FD's edge for a reply that arrived meanwhile:
            # this EVENTS read, after the last send, decides whether it is safe to sleep.
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                continue
            wake_at = min(
                next_due, next(iter(in_flight.values())).deadline if in_flight else math.inf
            )
            if wake_at == math.inf:
                continue  # nothing left to send or to wait for: the loop ends
            for ready_fd, _ in poller.poll(max(0.0, wake_at - time.monotonic())):
                if ready_fd == wake_fd:
                    os.read(wake_fd, 64)
    finally:
        poller.close()


def _take_replies(sock, in_flight, history) -> None:
    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        _on_reply(sock.recv(), in_flight, history)


class _Pacer:
    """Hands out the batches at --rate (or at once), keeping --inflight requests out."""

    def __init__(self, args, batches: list[tuple[int, int]]):
        self.args = args
        self.batches = batches
        self.next_batch = 0
        self.interval = args.batch / args.rate if args.rate else 0.0
        self.paced_from = time.monotonic()
        self.client_id = secrets.token_hex(8)
        self.request_ids = itertools.count(1)

    def done(self) -> bool:
        return self.next_batch == len(self.batches)

    def send_due(self, sock, in_flight) -> float:
        """Send every request whose time has come; when the next one falls due
        (infinity when none is left, or the window is full: a reply frees it)."""
        args = self.args
        while not self.done() and len(in_flight) < args.inflight:
            due_at = self.paced_from + self.next_batch * self.interval
            if due_at > time.monotonic():
                return due_at
            first_id, count = self.batches[self.next_batch]
            request = wire.Append(
                next(self.request_ids),
                [payload_for(first_id + i, args.size) for i in range(count)],
                args.ack,
                client_id=self.client_id,
                nowait=args.nowait,
            )
            data = wire.encode(request)
            sent_at = time.monotonic()
            _send(sock, data)
            in_flight[request.request_id] = _Request(
                first_id, count, data, sent_at, sent_at + args.timeout, 1
            )
            self.next_batch += 1
        return math.inf


def _expire(args, sock, in_flight, history, now: float) -> None:
    # Every attempt waits the same timeout, so in_flight in send order (a retry
    # moves to the end) is also deadline order.
    while in_flight:
        request_id, request = next(iter(in_flight.items()))
        if request.deadline > now:
            return
        if request.attempts <= args.retries:
            request.attempts += 1
            request.deadline = now + args.timeout
            in_flight.move_to_end(request_id)
            _send(sock, request.data)
        else:
            del in_flight[request_id]
            history.record(request, None, "unknown")


def _send(sock, data: bytes) -> None:
    try:
        sock.send(data, zmq.NOBLOCK)
    except zmq.Again:
        # The queue to an unreachable leader is full: this attempt is lost, like a
        # request the leader never got, and is retried or ends unknown in time.
        pass


def _on_reply(data: bytes, in_flight, history) -> None:
    try:
        reply = wire.decode(data)
    except wire.BadMessage:
        return  # nothing to match it to; its request times out as unknown
    request = in_flight.pop(getattr(reply, "request_id", None), None)
    if request is None:
        return  # an answer to an attempt whose outcome is already known
    if isinstance(reply, wire.Appended):
        history.latencies.append(time.monotonic() - request.sent_at)
        history.record(request, reply.first_seq, "ok")
    elif request.attempts == 1:  # Refused: nothing was written
        history.record(request, None, "failed")
    else:
        # The refusal may answer an earlier attempt (busy, say) while a later one is
        # still queued at the leader and gets appended: the outcome is not known.
        history.record(request, None, "unknown")


def _report(args, history: _History, elapsed: float) -> int:
    rate = history.ok / elapsed
    print(
        f"{history.ok} of {args.count} entries acknowledged in {elapsed:.2f} s: "
        f"{rate:,.0f} entries/s"
    )
    percentiles = latency_percentiles(history.latencies)
    if percentiles:
        print(
            "commit latency per request: "
            + " ".join(f"{name} {value:.2f} ms" for name, value in percentiles.items())
        )
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(
                {
                    "count": args.count,
                    "acknowledged": history.ok,
                    "seconds": elapsed,
                    "entries_per_s": rate,
                    "ack": args.ack,
                    "latency_ms": percentiles,
                },
                f,
            )
    if history.unacknowledged:
        print(
            f"walrep load: {history.unacknowledged} entries not acknowledged (see --log)",
            file=sys.stderr,
        )
        return 1
    return 0


def latency_percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p99 and p99.9 in milliseconds (nearest rank), or {} with no samples."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {"p50": rank(0.50), "p99": rank(0.99), "p99.9": rank(0.999)}


__all__ = ["latency_percentiles", "payload_for", "run_load"]
