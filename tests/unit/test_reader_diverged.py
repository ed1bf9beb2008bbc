"""ReaderProtocol after anti-entropy found a different history: it stops like a failure.

A diverged reader must not append what the leader sends, fetch, hand-shake again or
ack: an ack would count toward replicas=N for entries appended on top of a log
that is not the leader's.
"""

from __future__ import annotations

from walrep.cluster import wire
from walrep.cluster.protocol import AppendRun, ReaderProtocol, ReaderState, Send
from walrep.node.format import encode_entry

LOG_ID = "log-0123"
BOOT_ID = "boot-1"


def frames(first: int, last: int) -> bytes:
    return b"".join(encode_entry(1_000 + s, b"entry %d" % s) for s in range(first, last + 1))


def streaming_reader() -> ReaderProtocol:
    reader = ReaderProtocol("reader-1", LOG_ID, 10, 10)
    reader.hello()
    reader.on_control(wire.Welcome(LOG_ID, BOOT_ID, 10, 1, hello_id=1), 0.0)
    assert reader.state is ReaderState.STREAMING
    return reader


def test_a_streaming_reader_applies_and_acks():
    # The same inputs as below, before divergence: they do lead to appends and acks.
    reader = streaming_reader()
    actions = reader.on_publish(wire.Batch(LOG_ID, 11, 2, frames(11, 12)), 1.0)
    assert [a for a in actions if isinstance(a, AppendRun)]
    assert [a for a in reader.on_durable(12, 1.1) if isinstance(a, Send)]


def test_a_diverged_reader_neither_applies_nor_acks():
    reader = streaming_reader()
    reader.diverge(7)
    assert reader.state is ReaderState.DIVERGED and reader.state.value == "diverged"
    assert reader.diverged_at == 7
    assert not reader.needs_handshake()
    now = 1.0
    assert reader.on_publish(wire.Batch(LOG_ID, 11, 2, frames(11, 12)), now) == []
    # A heartbeat past what it holds would open a gap and fetch: not any more.
    assert reader.on_publish(wire.Heartbeat(LOG_ID, BOOT_ID, 50, 1, 0), now) == []
    assert reader.on_durable(10, now) == [] and reader.on_durable(12, now + 5) == []
    assert reader.on_tick(now + 60) == []  # no "leader silent", so no new hand-shake
    assert reader.on_control(wire.Welcome(LOG_ID, BOOT_ID, 50, 1, hello_id=1), now) == []
    assert reader.state is ReaderState.DIVERGED and reader.applied == 10
