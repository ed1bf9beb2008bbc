"""cluster.wire: every message survives encode/decode, and decode trusts nothing.

A peer's bytes may be anything: whatever decode() is given, it returns a valid
Message or raises BadMessage, never another exception (the service shells catch
BadMessage, log it next to the peer, and keep running; anything else would kill
a task). Building a bad message locally is our own bug and raises a plain
ValueError, so the two are never confused.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walrep.cluster import wire
from walrep.cluster.wire import BadMessage
from walrep.node.format import encode_entry

FRAMES = encode_entry(1_700_000_000_000_000, b"one") + encode_entry(1_700_000_000_000_001, b"two")

# One valid instance of every kind, with optional fields both set and unset.
SAMPLES: list[wire.Message] = [
    wire.Batch("log-a", 7, 2, FRAMES),
    wire.Heartbeat("log-a", "boot-1", 41, 3, 1_700_000_000_000_000),
    wire.Heartbeat("log-a", "boot-1", 0, 1, 0),
    wire.Hello("reader-1", "log-a", 40, 39, hello_id=3),
    wire.Hello("reader-1", None, 0, 0),
    wire.Welcome("log-a", "boot-1", 41, 3, hello_id=3),
    wire.Welcome("log-a", "boot-1", 41, 3),
    wire.Refused("too-old", "sequence 2 was purged", request_id=5, earliest_seq=3),
    wire.Refused("busy", "try later"),
    wire.Fetch(5, 10, 20, 4),
    wire.Credit(5, 1),
    wire.Chunk(5, 10, 2, FRAMES, False),
    wire.Chunk(5, 12, 2, FRAMES, True),
    wire.Ack("reader-1", 41, 40),
    wire.StatusRequest(),
    wire.StatusReply({"head_seq": 3, "readers": [{"id": "r", "lag_entries": 0}]}),
    wire.Append(9, [b"p1", b"", b"p3"], ack="replicas=2"),
    wire.Append(10, [b"x"]),
    wire.Append(11, [b"y"], client_id="client-7", nowait=True),
    wire.Appended(9, 100, 102),
    wire.ForgetReader("reader-2"),
    wire.DigestRequest(3, 1, 100),
    wire.DigestReply(3, 1, 100, "00ff", 1, 100),
    wire.DigestReply(4, 1, 100, None, None, None),
]


FIRST_OF_KIND: dict[str, wire.Message] = {}
for _message in SAMPLES:
    FIRST_OF_KIND.setdefault(_message.KIND, _message)


def raw(kind: str, fields: dict, version=wire.PROTOCOL_VERSION) -> bytes:
    """Hand-made bytes, bypassing the dataclasses' own checks (what a bad peer can send)."""
    return msgpack.packb([version, kind, fields], use_bin_type=True)


def fields_of(message: wire.Message) -> dict:
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}


def refused(data: bytes, *words: str) -> BadMessage:
    with pytest.raises(BadMessage) as info:
        wire.decode(data)
    # Exactly BadMessage: a subclass of ValueError, but the point is which one.
    assert type(info.value) is BadMessage
    text = str(info.value)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    return info.value


def test_every_kind_is_sampled():
    assert {type(m) for m in SAMPLES} == set(wire.KINDS.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.KIND)
def test_round_trip(message):
    decoded = wire.decode(wire.encode(message))
    assert type(decoded) is type(message)
    assert decoded == message
    # Frames come back byte for byte, as bytes (not str, not a list of ints).
    for name, value in fields_of(message).items():
        assert type(getattr(decoded, name)) is type(value), name


def test_optional_fields_may_be_left_out_by_the_peer():
    message = wire.decode(raw("refused", {"code": "busy", "message": "later"}))
    assert message == wire.Refused("busy", "later", None, None)
    assert wire.decode(raw("append", {"request_id": 1, "payloads": [b"x"]})) == wire.Append(
        1, [b"x"]
    )


def test_batch_last_seq():
    assert wire.Batch("l", 7, 2, FRAMES).last_seq == 8


# --- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, -1, 2**40, True, 1.0, "1", None, [1], b"\x01"])
def test_wrong_version(version):
    refused(raw("status", {}, version=version), "version")


@pytest.mark.parametrize("kind", ["nope", "", "BATCH", 1, None, b"batch", ["batch"]])
def test_unknown_kind(kind):
    refused(msgpack.packb([1, kind, {}], use_bin_type=True), "kind")


@pytest.mark.parametrize(
    "value",
    [
        [1, "status"],
        [1, "status", {}, {}],
        {"version": 1},
        1,
        "status",
        None,
        b"",
        [],
    ],
    ids=repr,
)
def test_not_a_message_shape(value):
    refused(msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("fields", [[], None, "x", 3, [["code", "busy"]]], ids=repr)
def test_fields_not_a_map(fields):
    refused(raw("refused", fields), "map")


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.KIND)
def test_unknown_field(message):
    refused(raw(message.KIND, {**fields_of(message), "extra": 1}), "unknown fields", "extra")


def test_unknown_field_with_a_binary_name():
    fields = {**fields_of(SAMPLES[0]), b"log_id": "x"}
    refused(raw("batch", fields), "unknown fields")


def test_class_attributes_are_not_fields():
    refused(raw("batch", {**fields_of(SAMPLES[0]), "KIND": "batch"}), "unknown fields")


REQUIRED = [
    (message.KIND, f.name, message)
    for message in SAMPLES
    for f in dataclasses.fields(message)
    if f.default is dataclasses.MISSING
]


@pytest.mark.parametrize(("kind", "name", "message"), REQUIRED, ids=lambda x: str(x)[:20])
def test_missing_field(kind, name, message):
    fields = fields_of(message)
    del fields[name]
    refused(raw(kind, fields), "missing field", name)


# (kind, field, bad value) for every type rule: bool where int, str where bytes,
# bytes where str, float where int, containers where scalars, None where required.
WRONG_TYPES = [
    ("batch", "first_seq", True),
    ("batch", "first_seq", 7.0),
    ("batch", "first_seq", "7"),
    ("batch", "count", False),
    ("batch", "count", 2.0),
    ("batch", "frames", "frames as text"),
    ("batch", "frames", [1, 2, 3]),
    ("batch", "frames", None),
    ("batch", "log_id", b"log-a"),
    ("batch", "log_id", 12),
    ("batch", "log_id", None),
    ("heartbeat", "head_seq", True),
    ("heartbeat", "time_us", 1.5),
    ("heartbeat", "boot_id", None),
    ("hello", "reader_id", b"r"),
    ("hello", "log_id", 5),
    ("hello", "last_seq", None),
    ("hello", "durable_seq", [1]),
    ("hello", "hello_id", True),
    ("welcome", "hello_id", "3"),
    ("welcome", "earliest_seq", "3"),
    ("refused", "code", None),
    ("refused", "message", b"text"),
    ("refused", "request_id", True),
    ("refused", "earliest_seq", 2.5),
    ("fetch", "credit", True),
    ("fetch", "from_seq", {}),
    ("credit", "credit", True),
    ("credit", "fetch_id", "5"),
    ("chunk", "last", 1),
    ("chunk", "last", 0),
    ("chunk", "last", "true"),
    ("chunk", "frames", "x"),
    ("ack", "applied_seq", False),
    ("ack", "reader_id", None),
    ("status-reply", "status", [1, 2]),
    ("status-reply", "status", None),
    ("append", "payloads", b"one"),
    ("append", "payloads", ["text, not bytes"]),
    ("append", "payloads", [b"ok", 3]),
    ("append", "ack", 1),
    ("appended", "last_seq", True),
]


@pytest.mark.parametrize(("kind", "name", "value"), WRONG_TYPES, ids=repr)
def test_wrong_field_type(kind, name, value):
    message = FIRST_OF_KIND[kind]
    refused(raw(kind, {**fields_of(message), name: value}))


OUT_OF_RANGE = [
    ("batch", "first_seq", 0),
    ("batch", "first_seq", -1),
    ("batch", "first_seq", 2**63),
    ("batch", "first_seq", 2**64 - 1),
    ("batch", "count", 0),
    ("batch", "count", -2),
    ("batch", "count", wire.MAX_BATCH_ENTRIES + 1),
    ("heartbeat", "head_seq", -1),
    ("heartbeat", "earliest_seq", 2**63),
    ("hello", "last_seq", -5),
    ("welcome", "head_seq", -(2**63)),
    ("welcome", "hello_id", -1),
    ("refused", "earliest_seq", -1),
    ("fetch", "from_seq", 0),
    ("fetch", "to_seq", 9),  # before from_seq (10)
    ("fetch", "credit", 0),
    ("fetch", "credit", 65),
    ("fetch", "fetch_id", -1),
    ("credit", "credit", 0),
    ("credit", "credit", 10**6),
    ("chunk", "first_seq", 0),
    ("chunk", "count", 0),
    ("ack", "durable_seq", -1),
    ("append", "payloads", []),
    ("appended", "first_seq", -3),
]


@pytest.mark.parametrize(("kind", "name", "value"), OUT_OF_RANGE, ids=repr)
def test_out_of_range(kind, name, value):
    message = FIRST_OF_KIND[kind]
    refused(raw(kind, {**fields_of(message), name: value}))


@pytest.mark.parametrize("ident", ["", "x" * (wire.MAX_ID_BYTES + 1), "é" * 65])
def test_identifier_length(ident):
    refused(raw("hello", {**fields_of(SAMPLES[3]), "reader_id": ident}), "reader_id")


def test_identifier_at_the_limit_is_fine():
    ident = "x" * wire.MAX_ID_BYTES
    assert wire.decode(raw("hello", {**fields_of(SAMPLES[3]), "reader_id": ident})).reader_id == (
        ident
    )


def test_oversized_message_is_refused_before_parsing():
    refused(bytes(wire.MAX_MESSAGE_BYTES + 1), "exceeds")


def test_size_limit_applies_to_valid_messages(monkeypatch):
    data = wire.encode(wire.Batch("log-a", 1, 1, encode_entry(1, b"x" * 2000)))
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 1024)
    refused(data, "exceeds")


def test_a_declared_length_past_the_end_is_refused():
    # bin32 claiming 4 GiB, with 3 bytes behind it.
    refused(b"\x93\x01\xa5batch\x81\xa6frames\xc6\xff\xff\xff\xffabc")


def test_too_many_entries_in_a_container():
    refused(raw("append", {"request_id": 1, "payloads": [b""] * (wire.MAX_BATCH_ENTRIES + 17)}))


def test_ext_types_are_refused():
    refused(msgpack.packb([1, "status", msgpack.ExtType(1, b"x")]))


def test_invalid_utf8_text_is_refused():
    good = raw("hello", fields_of(SAMPLES[3]))
    bad = good.replace(b"reader-1", b"reader\xff\xfe")
    assert len(bad) == len(good)
    refused(bad)


def test_non_string_map_keys_are_refused():
    refused(raw("status-reply", {"status": {1: "a"}}))


@pytest.mark.parametrize("cut", range(1, 40))
def test_truncated(cut):
    data = wire.encode(SAMPLES[0])
    assert cut < len(data)
    refused(data[:-cut])


def test_truncated_everywhere():
    for message in SAMPLES:
        data = wire.encode(message)
        for end in range(len(data)):
            refused(data[:end])


def test_trailing_bytes():
    refused(wire.encode(SAMPLES[1]) + b"\x00")


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deep_nesting(depth):
    # Nested one-element arrays: msgpack's own depth limit answers, never a RecursionError.
    refused(b"\x91" * depth + b"\x01")
    prefix = raw("status-reply", {"status": {}})[:-1]  # ends with the empty map
    refused(prefix + b"\x81\xa1a" * depth + b"\x80")


def test_moderate_nesting_inside_status_is_fine():
    status: dict = {}
    node = status
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    assert wire.decode(raw("status-reply", {"status": status})).status == status


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\xff" * 8, b"\x00", b"\x93", b"\x93\x01\xa5batch", bytes(range(256))]
)
def test_garbage(data):
    refused(data)


# --- local bugs are not bad peers ------------------------------------------------------

LOCAL_BUGS = [
    lambda: wire.Batch("log-a", 0, 1, b""),
    lambda: wire.Batch("log-a", 1, 0, b""),
    lambda: wire.Batch("log-a", True, 1, b""),
    lambda: wire.Batch("", 1, 1, b""),
    lambda: wire.Batch("log-a", 1, 1, "text"),
    lambda: wire.Batch("log-a", 1, 1, bytearray(b"x")),
    lambda: wire.Heartbeat("log-a", "boot", -1, 1, 0),
    lambda: wire.Hello("r", "log", 1.5, 0),
    lambda: wire.Welcome("log", None, 1, 1),
    lambda: wire.Refused(None, "x"),
    lambda: wire.Fetch(1, 5, 4, 4),
    lambda: wire.Fetch(1, 1, 4, 0),
    lambda: wire.Credit(1, 65),
    lambda: wire.Chunk(1, 1, 1, b"", 1),
    lambda: wire.Ack("r", 1, 2**63),
    lambda: wire.StatusReply([]),
    lambda: wire.Append(1, []),
    lambda: wire.Append(1, ["text"]),
    lambda: wire.Appended(1, -1, 1),
]


@pytest.mark.parametrize("build", LOCAL_BUGS)
def test_building_a_bad_message_is_a_local_error(build):
    with pytest.raises(ValueError) as info:
        build()
    assert not isinstance(info.value, BadMessage)
    assert info.value.__cause__ is None


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLES[0].first_seq = 9


# --- fuzz ------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
ENCODED = [wire.encode(m) for m in SAMPLES]


def check(data: bytes) -> None:
    try:
        message = wire.decode(data)
    except BadMessage:
        return
    # Whatever got through is a well-formed message that re-encodes to the same thing.
    assert isinstance(message, wire.Message)
    assert type(message) in wire.KINDS.values()
    message.validate()
    assert wire.decode(wire.encode(message)) == message


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    check(data)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(ENCODED)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            other = draw(st.sampled_from(ENCODED))
            start = draw(st.integers(0, len(other)))
            data[at:] = other[start:]
    return bytes(data)


@FUZZ
@given(mutated())
def test_fuzz_mutated_messages(data):
    check(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
field_names = st.sampled_from(
    sorted({f.name for cls in wire.KINDS.values() for f in dataclasses.fields(cls)}) + ["x"]
)


@settings(FUZZ, max_examples=1000)
@given(
    st.sampled_from([*wire.KINDS, "nope"]),
    st.dictionaries(field_names, msgpack_values, max_size=6),
)
def test_fuzz_structured(kind, fields):
    """Well-formed msgpack of the right shape, with arbitrary field values."""
    check(raw(kind, fields))
