"""Driving a node.Writer from a trio loop, for the leader and the reader."""

from __future__ import annotations

import trio

from walrep import node


async def make_room(writer: node.Writer) -> None:
    """Wait until a full WAL queue may have room for the append that found it full.

    A writer in caller mode (background=False) is committed by this very loop, so
    waiting would wait forever: the burst appended so far is flushed instead, which
    empties the queue unless the disk is full.
    """
    if not writer.background:
        writer.flush()
        if not writer.queued_entries:
            await trio.lowlevel.checkpoint()
            return
    await trio.sleep(0.001)  # the writer thread, or a full disk, is behind
