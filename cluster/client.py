"""The Python client: append entries to a leader over its ingest endpoint.

    async with open_client("tcp://127.0.0.1:7100") as client:
        seq = await client.append(payload)
        first, last = await client.append_batch([p1, p2])

A reply that does not come within the timeout raises AppendUnknown: the entry
may still have been committed, so it is never reported as failed.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from walrep.node import format as fmt

from . import security, wire, zmqtrio


class ClientError(Exception):
    pass


class AppendRefused(ClientError):
    """The leader refused the request: nothing was written."""

    def __init__(self, code: str, message: str, attempts: int = 1):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.attempts = attempts


class AppendUnknown(ClientError, TimeoutError):
    """No answer in time: the entries may or may not be committed."""

    def __init__(self, message: str, attempts: int = 1, request: wire.Append | None = None):
        super().__init__(message)
        self.attempts = attempts
        self.request = request  # what Client.retry sends again


@dataclass(frozen=True, slots=True)
class Receipt:
    first_seq: int
    last_seq: int
    attempts: int  # 1, or more when retries after an unknown outcome were needed


class Client:
    """Made by open_client, which runs the loops that deliver replies and time out
    requests; a Client built by hand and not run that way never answers."""

    def __init__(self, socket, timeout: float, ack: str | None, client_id: str | None = None):
        self._socket = socket
        self.timeout = timeout
        self._closed = False
        self.ack = ack
        # Names this client's requests, so the leader recognises a retry.
        self.client_id = client_id or secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Answer] = {}
        self._send_lock = trio.Lock()
        # The sleep of _expire_loop: a request whose deadline falls before its end
        # moves it earlier (the loop replaces it each time it wakes).
        self._expiry = trio.CancelScope()

    @property
    def timeout(self) -> float:
        """Seconds each attempt waits for its answer; a new value holds for the
        attempts that start after it is set."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        if not seconds > 0:  # also refuses NaN
            raise ValueError(f"timeout must be a positive number of seconds, got {seconds!r}")
        self._timeout = seconds

    async def append(self, payload: bytes, *, ack: str | None = None, **options) -> int:
        first, _last = await self.append_batch([payload], ack=ack, **options)
        return first

    async def append_records(
        self,
        records: list[dict[str, Any]],
        *,
        database: str | None = None,
        ack: str | None = None,
        **options,
    ) -> int:
        payload = fmt.encode_records(records)
        if database is not None:
            payload = fmt.encode_envelope(database, payload)
        return await self.append(payload, ack=ack, **options)

    async def append_batch(
        self,
        payloads: Sequence[bytes],
        *,
        ack: str | None = None,
        retries: int = 0,
        nowait: bool = False,
    ) -> tuple[int, int]:
        receipt = await self.append_batch_receipt(payloads, ack=ack, retries=retries, nowait=nowait)
        return receipt.first_seq, receipt.last_seq

    async def append_batch_receipt(
        self,
        payloads: Sequence[bytes],
        *,
        ack: str | None = None,
        retries: int = 0,
        nowait: bool = False,
    ) -> Receipt:
        """Append payloads as consecutive entries; (first, last) once the ack level holds.

        Each retry after an unknown outcome resends the same request (same client id
        and request id), so the leader answers with the original sequences instead of
        appending twice. nowait=True asks for AppendRefused("busy") rather than
        waiting when the leader's queue is full.
        """
        request = wire.Append(
            next(self._ids),
            list(payloads),
            ack or self.ack,
            client_id=self.client_id,
            nowait=nowait,
        )
        return await self._send(request, retries)

    async def retry(self, unknown: AppendUnknown, *, retries: int = 0) -> Receipt:
        """Send again the request an AppendUnknown came from: the original sequences
        come back if it was committed, and it is appended once if it was not.

        The error must come from this client (replies are matched by request id,
        which only this client's counter keeps unique)."""
        request = unknown.request
        if request is None or request.client_id != self.client_id:
            raise ValueError("retry() takes an AppendUnknown raised by this same client")
        return await self._send(request, retries, unknown.attempts)

    async def _send(self, request: wire.Append, retries: int, attempts_before: int = 0) -> Receipt:
        request_id = request.request_id
        if self._closed:
            raise trio.ClosedResourceError("this client is closed")
        if request_id in self._waiting:
            raise ClientError(
                f"request {request_id} is already waiting for its answer in another call"
            )
        data = wire.encode(request)
        answer = self._waiting[request_id] = _Answer()
        try:
            attempt = attempts_before
            while answer.message is None and attempt <= retries + attempts_before:
                attempt += 1
                # No cancel scope per request: _expire_loop wakes whoever waits past its
                # deadline. Two scopes per request (entered and closed) were a quarter
                # of the client's CPU on the VM of README's Performance section.
                timeout = self.timeout
                answer.deadline = deadline = trio.current_time() + timeout
                if deadline < self._expiry.deadline:
                    self._expiry.deadline = deadline
                sent = await zmqtrio.send_in_turn(self._socket, self._send_lock, [data], deadline)
                # Checked with no yield before the wait: once closed, nothing wakes it.
                if sent and not self._closed:
                    await answer.wait()
                if self._closed and answer.message is None:
                    raise AppendUnknown(
                        f"the client closed while request {request_id} waited for its "
                        "answer: the entries may or may not be committed",
                        attempts=attempt,
                        request=request,
                    )
            reply = answer.message
            if reply is None:
                raise AppendUnknown(
                    f"no answer from the leader within {timeout} s for request "
                    f"{request_id} ({attempt} attempts): the entries may or may not be "
                    "committed; client.retry(error) sends it again without duplicating it",
                    attempts=attempt,
                    request=request,
                )
        finally:
            del self._waiting[request_id]
        if isinstance(reply, wire.Refused):
            if attempt > 1:
                # The refusal may answer an earlier attempt (busy, say) while a later
                # one is still queued at the leader and gets appended.
                raise AppendUnknown(
                    f"request {request_id} was refused ({reply.code}: {reply.message}) "
                    f"after {attempt} attempts, and a later attempt may still be "
                    "appended: the entries may or may not be committed; "
                    "client.retry(error) sends it again without duplicating it",
                    attempts=attempt,
                    request=request,
                )
            raise AppendRefused(reply.code, reply.message, attempts=attempt)
        return Receipt(reply.first_seq, reply.last_seq, attempt)

    async def _receive_loop(self) -> None:
        while True:
            self._deliver(await self._socket.recv())
            # Replies that arrived together are taken without a scheduler pass each.
            for _ in range(zmqtrio.DRAIN_MAX_MESSAGES):
                try:
                    self._deliver(self._socket.recv_nowait())
                except zmqtrio.WouldBlock:
                    break

    def _deliver(self, data: bytes) -> None:
        try:
            reply = wire.decode(data)
        except wire.BadMessage:
            return  # nothing to match it to; the request times out as unknown
        answer = self._waiting.get(getattr(reply, "request_id", None))
        if answer is not None and answer.message is None:  # else a late duplicate
            answer.message = reply
            answer.wake()

    async def _expire_loop(self) -> None:
        """Wake every request still waiting at its deadline (it finds no message)."""
        while True:
            now = trio.current_time()
            earliest = math.inf
            for answer in self._waiting.values():
                if answer.deadline <= now:
                    answer.wake()  # no-op for one still sending: answer.wait checks
                elif answer.deadline < earliest:
                    earliest = answer.deadline
            with trio.CancelScope(deadline=earliest) as self._expiry:
                await trio.sleep_forever()

    def _close(self) -> None:
        """Wake every request still waiting (from tasks outside open_client's block,
        which outlive the loops): each raises AppendUnknown."""
        self._closed = True
        for answer in self._waiting.values():
            answer.wake()


class _Answer:
    """The leader's answer to one request, and the task waiting for it.

    A bare park (wait_task_rescheduled) rather than a trio.Event: the receive loop
    or the expiry loop wakes the one task, with nothing to allocate per request.
    """

    __slots__ = ("message", "deadline", "_task")

    def __init__(self) -> None:
        self.message: wire.Message | None = None
        self.deadline = math.inf  # of the current attempt, on trio's clock
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        """Until the reply arrives or the deadline passes; a checkpoint either way."""
        if self.message is not None or trio.current_time() >= self.deadline:
            # Arrived (or expired) while the send waited for room: that was a yield.
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _raise_cancel) -> trio.lowlevel.Abort:
        self._task = None  # cancelled: nobody to wake any more
        return trio.lowlevel.Abort.SUCCEEDED

    @trio.lowlevel.enable_ki_protection  # a task rescheduled twice breaks trio's run
    def wake(self) -> None:
        if self._task is not None:
            trio.lowlevel.reschedule(self._task)
            self._task = None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def open_client(
    endpoint: str,
    *,
    timeout: float = 10.0,
    ack: str | None = None,
    keys: security.ClientKeys | None = None,
) -> AsyncIterator[Client]:
    """A client of the leader's ingest endpoint; keys (CURVE) when the leader has them."""
    ctx = zmqtrio.new_context()
    socket = zmqtrio.make_socket(ctx, zmqtrio.DEALER, options=keys.options() if keys else None)
    try:
        socket.connect(endpoint)
        client = Client(socket, timeout, ack)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._receive_loop)
                nursery.start_soon(client._expire_loop)
                try:
                    yield client
                finally:
                    client._close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery only runs the client's own two loops: a caller's error comes
            # out alone, and callers should see it as it was raised, not in a group.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
    finally:
        socket.close()
        ctx.term()


__all__ = ["AppendRefused", "AppendUnknown", "Client", "ClientError", "open_client"]
