"""Operator requests to a node's control endpoint: status (any node), forget-reader (the leader)."""

from __future__ import annotations

from typing import Any

import trio

from . import security, wire, zmqtrio


class AdminError(Exception):
    pass


async def request(
    control: str, message: wire.Message, timeout: float, keys: security.ClientKeys | None = None
) -> wire.Message:
    ctx = zmqtrio.new_context()
    sock = zmqtrio.make_socket(ctx, zmqtrio.DEALER, options=keys.options() if keys else None)
    try:
        sock.connect(control)
        with trio.move_on_after(timeout):
            await sock.send(wire.encode(message))
            try:
                return wire.decode(await sock.recv())
            except wire.BadMessage as exc:
                raise AdminError(f"{control} answered with a bad message: {exc}") from None
        raise AdminError(f"no answer from {control} within {timeout} s (is the node running?)")
    finally:
        sock.close()
        ctx.term()


async def forget_reader(control: str, reader_id: str, timeout: float, keys=None) -> dict[str, Any]:
    reply = await request(control, wire.ForgetReader(reader_id), timeout, keys)
    if not isinstance(reply, wire.StatusReply):
        raise AdminError(f"{control} answered {reply.KIND}: {getattr(reply, 'message', '')}")
    return reply.status


async def status(control: str, timeout: float, keys=None) -> dict[str, Any]:
    reply = await request(control, wire.StatusRequest(), timeout, keys)
    if not isinstance(reply, wire.StatusReply):
        raise AdminError(f"{control} answered {reply.KIND}")
    return reply.status
