"""The Python client: append entries to a leader over its ingest endpoint.

    async with open_client("tcp://127.0.0.1:7100") as client:
        seq = await client.append(payload)
        first, last = await client.append_batch([p1, p2])

A reply that does not come within the timeout raises AppendUnknown: the entry
may still have been committed, so it is never reported as failed.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from node import format as fmt

from . import wire, zmqtrio


class ClientError(Exception):
    pass


class AppendRefused(ClientError):
    """The leader refused the request: nothing was written."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class AppendUnknown(ClientError, TimeoutError):
    """No answer in time: the entries may or may not be committed."""


class Client:
    def __init__(self, socket, timeout: float, ack: str | None):
        self._socket = socket
        self.timeout = timeout
        self.ack = ack
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._send_lock = trio.Lock()

    async def append(self, payload: bytes, *, ack: str | None = None) -> int:
        first, _last = await self.append_batch([payload], ack=ack)
        return first

    async def append_records(
        self, records: list[dict[str, Any]], *, database: str | None = None, ack: str | None = None
    ) -> int:
        payload = fmt.encode_records(records)
        if database is not None:
            payload = fmt.encode_envelope(database, payload)
        return await self.append(payload, ack=ack)

    async def append_batch(
        self, payloads: Sequence[bytes], *, ack: str | None = None
    ) -> tuple[int, int]:
        request_id = next(self._ids)
        request = wire.Append(request_id, list(payloads), ack or self.ack)
        reply_in, reply_out = trio.open_memory_channel(1)
        self._waiting[request_id] = reply_in
        try:
            with trio.move_on_after(self.timeout) as scope:
                async with self._send_lock:
                    await self._socket.send(wire.encode(request))
                reply = await reply_out.receive()
            if scope.cancelled_caught:
                raise AppendUnknown(
                    f"no answer from the leader within {self.timeout} s for request "
                    f"{request_id}: the entries may or may not be committed"
                )
        finally:
            self._waiting.pop(request_id, None)
        if isinstance(reply, wire.Refused):
            raise AppendRefused(reply.code, reply.message)
        return reply.first_seq, reply.last_seq

    async def _receive_loop(self) -> None:
        while True:
            data = await self._socket.recv()
            try:
                reply = wire.decode(data)
            except wire.BadMessage:
                continue  # nothing to match it to; the request times out as unknown
            request_id = getattr(reply, "request_id", None)
            channel = self._waiting.get(request_id)
            if channel is not None:
                channel.send_nowait(reply)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def open_client(
    endpoint: str, *, timeout: float = 10.0, ack: str | None = None
) -> AsyncIterator[Client]:
    ctx = zmqtrio.new_context()
    socket = zmqtrio.make_socket(ctx, zmqtrio.DEALER)
    try:
        socket.connect(endpoint)
        client = Client(socket, timeout, ack)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._receive_loop)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery only runs our receive loop: a caller's error comes out alone,
            # and callers should see it as it was raised, not wrapped in a group.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
    finally:
        socket.close()
        ctx.term()


__all__ = ["AppendRefused", "AppendUnknown", "Client", "ClientError", "open_client"]
