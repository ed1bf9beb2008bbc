"""Who may move a reader's position: the session that hand-shook as it, up to the head.

A position counts toward replicas=N and lets retention purge, so the leader takes
one only from the connection that said hello as that reader (with the credential
from that reader's wal.meta, and under CURVE its key), for this log, and never
past what it has committed.
"""

from __future__ import annotations

from walrep.cluster import wire
from walrep.cluster.protocol import (
    READER_SILENT_S,
    LeaderProtocol,
    Note,
    ReaderProtocol,
    ReaderState,
    Send,
)

LOG_ID = "0" * 32
OTHER_LOG = "f" * 32
READER = "reader-1"
PEER = b"\x00session1"
STRAY = b"\x00stray"
SECRET = "a" * 64


def sends(actions):
    return [a.message for a in actions if isinstance(a, Send)]


def notes(actions):
    return [a.event for a in actions if isinstance(a, Note)]


def leader_with_reader(head=100, **hello_fields) -> LeaderProtocol:
    leader = LeaderProtocol(LOG_ID, "boot-1", head, 1)
    fields = {"credential": SECRET, **hello_fields}
    (welcome,) = sends(leader.on_control(PEER, wire.Hello(READER, LOG_ID, 40, 30, **fields), 10.0))
    assert isinstance(welcome, wire.Welcome)
    return leader


def position(leader: LeaderProtocol) -> tuple[int, int]:
    info = leader.readers[READER]
    return info.applied_seq, info.durable_seq


def test_an_ack_from_another_connection_is_refused_and_counted():
    leader = leader_with_reader()
    actions = leader.on_control(STRAY, wire.Ack(READER, 10**12, 10**12), 11.0)
    (refusal,) = sends(actions)
    assert refusal.code == "unknown-session"
    assert all(a.peer == STRAY for a in actions if isinstance(a, Send))
    assert "refused-ack" in notes(actions)
    assert position(leader) == (40, 30)
    assert leader.refused_acks == 1
    assert leader.retention_floor() == 30


def test_an_ack_for_an_unknown_reader_is_refused():
    leader = leader_with_reader()
    (refusal,) = sends(leader.on_control(PEER, wire.Ack("reader-9", 50, 50), 11.0))
    assert refusal.code == "unknown-session"
    assert "reader-9" not in leader.readers


def test_an_ack_past_the_head_is_refused_even_from_the_session():
    leader = leader_with_reader(head=100)
    (refusal,) = sends(leader.on_control(PEER, wire.Ack(READER, 101, 101), 11.0))
    assert refusal.code == "ack-past-head"
    assert position(leader) == (40, 30)
    # Up to the head is fine.
    assert leader.on_control(PEER, wire.Ack(READER, 100, 100), 11.0) == []
    assert position(leader) == (100, 100)


def test_an_ack_for_another_log_is_refused():
    leader = leader_with_reader()
    (refusal,) = sends(leader.on_control(PEER, wire.Ack(READER, 50, 50, log_id=OTHER_LOG), 11.0))
    assert refusal.code == "log-mismatch"
    assert position(leader) == (40, 30)


def test_a_hello_ahead_of_the_head_is_welcomed_but_its_position_is_not_taken():
    leader = LeaderProtocol(LOG_ID, "boot-1", 100, 1)
    actions = leader.on_control(PEER, wire.Hello(READER, LOG_ID, 10**12, 10**12), 10.0)
    assert [type(m) for m in sends(actions)] == [wire.Welcome]  # it stops itself as ahead
    assert READER not in leader.readers


def test_a_second_hello_without_the_credential_is_refused_live_or_silent():
    leader = leader_with_reader()
    for now in (11.0, 10.0 + READER_SILENT_S + 100):  # the real reader live, then silent
        actions = leader.on_control(STRAY, wire.Hello(READER, LOG_ID, 90, 90), now)
        (refusal,) = sends(actions)
        assert refusal.code == "reader-id-taken"
        assert "forget-reader" in refusal.message
        assert leader.readers[READER].peer == PEER
        assert position(leader) == (40, 30)
    assert leader.refused_hellos == 2
    # Still refused as a session: its acks change nothing.
    leader.on_control(STRAY, wire.Ack(READER, 100, 100), 12.0)
    assert position(leader) == (40, 30)


def test_the_same_reader_reconnecting_with_its_credential_replaces_its_session():
    leader = leader_with_reader()
    new_peer = b"\x00session2"
    actions = leader.on_control(
        new_peer, wire.Hello(READER, LOG_ID, 50, 50, credential=SECRET), 11.0
    )
    assert "reader-session-replaced" in notes(actions)
    assert isinstance(sends(actions)[0], wire.Welcome)
    # The old connection no longer speaks for it.
    (refusal,) = sends(leader.on_control(PEER, wire.Ack(READER, 90, 90), 11.5))
    assert refusal.code == "unknown-session"
    assert leader.on_control(new_peer, wire.Ack(READER, 90, 90), 11.5) == []
    assert position(leader) == (90, 90)


def test_under_curve_a_reader_id_is_bound_to_its_key():
    leader = LeaderProtocol(LOG_ID, "boot-1", 100, 1)
    hello = wire.Hello(READER, LOG_ID, 40, 30, credential=SECRET)
    leader.on_control(PEER, hello, 10.0, key_name="reader-1")
    # Another allow-listed key, even with the credential, may not speak for reader-1.
    (refusal,) = sends(leader.on_control(STRAY, hello, 11.0, key_name="reader-2"))
    assert refusal.code == "reader-id-taken" and "reader-1" in refusal.message
    assert leader.readers[READER].peer == PEER


def test_bindings_survive_a_restart_and_saved_positions_show_as_unknown():
    leader = leader_with_reader(head=100)
    leader.on_control(PEER, wire.Ack(READER, 80, 80), 11.0)
    saved = leader.positions(11.0, 1000.0)
    restarted = LeaderProtocol(LOG_ID, "boot-2", 100, 1)
    restarted.restore(saved, 5.0, 1001.0)
    # Retention still honours the saved position; status does not show it as current.
    assert restarted.retention_floor() == 80
    (row,) = restarted.status(5.0)["readers"]
    assert (row["applied_seq"], row["durable_seq"], row["lag_entries"]) == (None, None, None)
    # A stranger cannot take the id after the restart; the reader with its credential can.
    (refusal,) = sends(restarted.on_control(STRAY, wire.Hello(READER, LOG_ID, 90, 90), 6.0))
    assert refusal.code == "reader-id-taken"
    hello = wire.Hello(READER, LOG_ID, 85, 85, credential=SECRET)
    assert isinstance(sends(restarted.on_control(PEER, hello, 6.0))[0], wire.Welcome)
    (row,) = restarted.status(6.0)["readers"]
    assert (row["applied_seq"], row["durable_seq"]) == (85, 85)


def test_forget_reader_releases_the_binding():
    leader = leader_with_reader()
    leader.on_control(PEER, wire.ForgetReader(READER), 11.0)
    actions = leader.on_control(STRAY, wire.Hello(READER, LOG_ID, 0, 0, credential="b" * 64), 12)
    assert isinstance(sends(actions)[-1], wire.Welcome)
    assert leader.readers[READER].peer == STRAY


def test_a_reader_told_its_session_is_unknown_hand_shakes_again():
    reader = ReaderProtocol(READER, LOG_ID, 40, 40, credential=SECRET)
    reader.on_control(reader_welcome(reader), 1.0)
    assert reader.state is ReaderState.STREAMING
    actions = reader.on_control(wire.Refused("unknown-session", "send a hello first"), 2.0)
    assert reader.state is ReaderState.CONNECTING
    (hello,) = sends(actions)
    assert isinstance(hello, wire.Hello) and hello.credential == SECRET
    # A refusal of the id itself stops the reader: two readers share an id.
    reader.on_control(reader_welcome(reader), 3.0)
    actions = reader.on_control(wire.Refused("reader-id-taken", "held by another"), 4.0)
    assert reader.state is ReaderState.FAILED


def test_acks_carry_the_log_id():
    reader = ReaderProtocol(READER, LOG_ID, 40, 40, credential=SECRET)
    reader.on_control(reader_welcome(reader), 1.0)
    (ack,) = sends(reader.on_durable(40, 5.0))
    assert ack.log_id == LOG_ID


def reader_welcome(reader: ReaderProtocol) -> wire.Welcome:
    hello = reader.hello()
    return wire.Welcome(LOG_ID, "boot-1", 40, 1, hello_id=hello.hello_id)
