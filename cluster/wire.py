"""Wire messages between walrep nodes and clients: msgpack, versioned, validated. No I/O.

Every message is one msgpack array ``[PROTOCOL_VERSION, kind, {field: value}]``.
Decoding never trusts the peer: the size is bounded before msgpack sees the
bytes, msgpack's own container limits are bounded, every field is type-checked,
and anything wrong raises ``BadMessage`` (the peer's fault) with a reason that
the caller logs next to the peer's address.

Messages are frozen dataclasses that check themselves when built, so a bug on
our side (``ValueError``/``TypeError``) is told apart from a bad peer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
# One message carries at most a batch of frames; 100 MiB payloads are the WAL's
# limit, so a single entry always fits, with room for the envelope.
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
# A live batch or fetch chunk aims at this many bytes of frames: large enough to
# amortise per-message costs (ZMQ_TRIO.md: batching is what makes PUB/SUB fast),
# small enough to keep latency and buffers modest.
TARGET_BATCH_BYTES = 256 * 1024
MAX_BATCH_ENTRIES = 100_000
MAX_ID_BYTES = 128
# What a node's control endpoint takes in one message: hellos, acks, fetches, credit,
# status and digest requests are all under 1 KiB. Set as ZMQ_MAXMSGSIZE on sockets
# that only receive these, so a peer declaring a huge frame is cut off by libzmq
# before it buffers anything.
MAX_CONTROL_MESSAGE_BYTES = 64 * 1024
# A PUB socket only receives subscriptions: a prefix (walrep subscribes to b"").
MAX_SUBSCRIPTION_BYTES = 256


class BadMessage(ValueError):
    """A peer sent something we cannot accept. The text says what was wrong."""


def _check(value: Any, kind: type | tuple[type, ...], name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) and kind is int:
        raise BadMessage(f"field {name!r} must be an integer, got bool")
    if not isinstance(value, kind):
        expected = getattr(kind, "__name__", str(kind))
        raise BadMessage(f"field {name!r} must be {expected}, got {type(value).__name__}")


def _seq(value: Any, name: str, optional: bool = False) -> None:
    _check(value, int, name, optional)
    if value is not None and not 0 <= value < 2**63:
        raise BadMessage(f"field {name!r} is out of range: {value}")


def _ident(value: Any, name: str, optional: bool = False) -> None:
    _check(value, str, name, optional)
    if value is not None and not 0 < len(value.encode("utf-8", "replace")) <= MAX_ID_BYTES:
        raise BadMessage(f"field {name!r} must be 1..{MAX_ID_BYTES} bytes")


class Message:
    KIND: ClassVar[str]

    def validate(self) -> None:  # overridden per message
        pass

    def __post_init__(self) -> None:
        try:
            self.validate()
        except BadMessage as exc:
            # Built by our own code: that is a local bug, not a bad peer.
            raise ValueError(f"{self.KIND}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """Leader -> readers (PUB): consecutive entries, as their on-disk frames."""

    KIND: ClassVar[str] = "batch"
    log_id: str
    first_seq: int
    count: int
    frames: bytes

    def validate(self):
        _ident(self.log_id, "log_id")
        _seq(self.first_seq, "first_seq")
        _check(self.count, int, "count")
        _check(self.frames, bytes, "frames")
        if self.first_seq < 1 or not 0 < self.count <= MAX_BATCH_ENTRIES:
            raise BadMessage(f"bad range: first_seq {self.first_seq}, count {self.count}")

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Leader -> readers (PUB): who I am and how far my log goes."""

    KIND: ClassVar[str] = "heartbeat"
    log_id: str
    boot_id: str
    head_seq: int  # last committed sequence (0: empty log)
    earliest_seq: int  # first sequence still held (head + 1 when empty)
    time_us: int

    def validate(self):
        _ident(self.log_id, "log_id")
        _ident(self.boot_id, "boot_id")
        _seq(self.head_seq, "head_seq")
        _seq(self.earliest_seq, "earliest_seq")
        _seq(self.time_us, "time_us")


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Reader -> leader (control): handshake, on start and after every reconnect."""

    KIND: ClassVar[str] = "hello"
    reader_id: str
    log_id: str | None  # None: an empty reader that has not adopted a log yet
    last_seq: int  # last sequence applied (0 when empty)
    durable_seq: int
    hello_id: int | None = None  # echoed by the welcome, so a late answer is told apart
    # A secret kept in the reader's wal.meta: a second session for a reader id that the
    # leader knows is accepted only with the same one (it proves it holds that log).
    credential: str | None = None

    def validate(self):
        _ident(self.reader_id, "reader_id")
        _ident(self.log_id, "log_id", optional=True)
        _seq(self.last_seq, "last_seq")
        _seq(self.durable_seq, "durable_seq")
        _seq(self.hello_id, "hello_id", optional=True)
        _ident(self.credential, "credential", optional=True)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    KIND: ClassVar[str] = "welcome"
    log_id: str
    boot_id: str
    head_seq: int
    earliest_seq: int
    hello_id: int | None = None  # the hello this answers

    def validate(self):
        _ident(self.log_id, "log_id")
        _ident(self.boot_id, "boot_id")
        _seq(self.head_seq, "head_seq")
        _seq(self.earliest_seq, "earliest_seq")
        _seq(self.hello_id, "hello_id", optional=True)


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """Leader -> reader or client: the request cannot be served, and why."""

    KIND: ClassVar[str] = "refused"
    code: str  # "log-mismatch", "reader-ahead", "too-old", "bad-request", "busy", ...
    message: str
    request_id: int | None = None
    earliest_seq: int | None = None

    def validate(self):
        _check(self.code, str, "code")
        _check(self.message, str, "message")
        _seq(self.request_id, "request_id", optional=True)
        _seq(self.earliest_seq, "earliest_seq", optional=True)


@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """Reader -> leader: send me from_seq..to_seq; credit says how many chunks at once."""

    KIND: ClassVar[str] = "fetch"
    fetch_id: int
    from_seq: int
    to_seq: int
    credit: int

    def validate(self):
        _seq(self.fetch_id, "fetch_id")
        _seq(self.from_seq, "from_seq")
        _seq(self.to_seq, "to_seq")
        _check(self.credit, int, "credit")
        if self.from_seq < 1 or self.to_seq < self.from_seq or not 0 < self.credit <= 64:
            raise BadMessage(f"bad fetch: {self.from_seq}..{self.to_seq} with credit {self.credit}")


@dataclass(frozen=True, slots=True)
class Credit(Message):
    """Reader -> leader: I have applied chunks; you may send this many more."""

    KIND: ClassVar[str] = "credit"
    fetch_id: int
    credit: int

    def validate(self):
        _seq(self.fetch_id, "fetch_id")
        _check(self.credit, int, "credit")
        if not 0 < self.credit <= 64:
            raise BadMessage(f"bad credit {self.credit}")


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """Leader -> reader: part of a fetch. last is True on the final chunk."""

    KIND: ClassVar[str] = "chunk"
    fetch_id: int
    first_seq: int
    count: int
    frames: bytes
    last: bool

    def validate(self):
        _seq(self.fetch_id, "fetch_id")
        _seq(self.first_seq, "first_seq")
        _check(self.count, int, "count")
        _check(self.frames, bytes, "frames")
        _check(self.last, bool, "last")
        if self.first_seq < 1 or not 0 < self.count <= MAX_BATCH_ENTRIES:
            raise BadMessage(f"bad range: first_seq {self.first_seq}, count {self.count}")


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Reader -> leader: my durable position."""

    KIND: ClassVar[str] = "ack"
    reader_id: str
    applied_seq: int
    durable_seq: int
    state: str | None = None  # the reader's own view: streaming, catching-up, ...
    log_id: str | None = None  # the log these positions are in (refused if not the leader's)

    def validate(self):
        _ident(self.reader_id, "reader_id")
        _seq(self.applied_seq, "applied_seq")
        _seq(self.durable_seq, "durable_seq")
        _ident(self.state, "state", optional=True)
        _ident(self.log_id, "log_id", optional=True)


@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    KIND: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    KIND: ClassVar[str] = "status-reply"
    status: dict

    def validate(self):
        _check(self.status, dict, "status")


@dataclass(frozen=True, slots=True)
class Append(Message):
    """Client -> leader (ingest): store these payloads as consecutive entries."""

    KIND: ClassVar[str] = "append"
    request_id: int
    payloads: list
    ack: str | None = None  # None: the leader's default_ack
    # With a client id, (client_id, request_id) names the request: sending it again
    # (a retry after an unknown outcome) returns the original sequences.
    client_id: str | None = None
    nowait: bool = False  # refuse with "busy" instead of waiting when the queue is full

    def validate(self):
        _seq(self.request_id, "request_id")
        _check(self.payloads, list, "payloads")
        _check(self.ack, str, "ack", optional=True)
        _ident(self.client_id, "client_id", optional=True)
        _check(self.nowait, bool, "nowait")
        if not 0 < len(self.payloads) <= MAX_BATCH_ENTRIES:
            raise BadMessage(f"an append carries 1..{MAX_BATCH_ENTRIES} payloads")
        # One pass in C first (a third of the Python loop's time over a 1000-payload
        # append: README, Performance). The loop only names the culprit.
        if list(map(type, self.payloads)).count(bytes) != len(self.payloads):
            for index, payload in enumerate(self.payloads):
                if not isinstance(payload, bytes):
                    raise BadMessage(f"payload {index} must be bytes, got {type(payload).__name__}")


@dataclass(frozen=True, slots=True)
class Appended(Message):
    KIND: ClassVar[str] = "appended"
    request_id: int
    first_seq: int
    last_seq: int

    def validate(self):
        _seq(self.request_id, "request_id")
        _seq(self.first_seq, "first_seq")
        _seq(self.last_seq, "last_seq")


@dataclass(frozen=True, slots=True)
class ForgetReader(Message):
    """Operator -> leader (control): stop retaining the log for this reader."""

    KIND: ClassVar[str] = "forget-reader"
    reader_id: str

    def validate(self):
        _ident(self.reader_id, "reader_id")


@dataclass(frozen=True, slots=True)
class DigestRequest(Message):
    """Anyone -> a node (control): the digest of my entries from_seq..to_seq, please."""

    KIND: ClassVar[str] = "digest"
    request_id: int
    from_seq: int
    to_seq: int

    def validate(self):
        _seq(self.request_id, "request_id")
        _seq(self.from_seq, "from_seq")
        _seq(self.to_seq, "to_seq")
        if self.from_seq < 1 or self.to_seq < self.from_seq:
            raise BadMessage(f"bad range {self.from_seq}..{self.to_seq}")


@dataclass(frozen=True, slots=True)
class DigestReply(Message):
    """digest is None when the node does not hold the whole range (first/last say what)."""

    KIND: ClassVar[str] = "digest-reply"
    request_id: int
    from_seq: int
    to_seq: int
    digest: str | None
    first_seq: int | None
    last_seq: int | None

    def validate(self):
        _seq(self.request_id, "request_id")
        _seq(self.from_seq, "from_seq")
        _seq(self.to_seq, "to_seq")
        _check(self.digest, str, "digest", optional=True)
        _seq(self.first_seq, "first_seq", optional=True)
        _seq(self.last_seq, "last_seq", optional=True)


KINDS: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Batch,
        Heartbeat,
        Hello,
        Welcome,
        Refused,
        Fetch,
        Credit,
        Chunk,
        Ack,
        StatusRequest,
        StatusReply,
        Append,
        Appended,
        ForgetReader,
        DigestRequest,
        DigestReply,
    )
}


_REQUIRED = object()  # in _FIELDS: the field has no default, a peer must send it
# Each kind's fields as (name, default), read once: dataclasses.fields() builds a new
# tuple on every call, and every message on the commit path is encoded or decoded.
_FIELDS: dict[type[Message], tuple[tuple[str, Any], ...]] = {
    cls: tuple(
        (f.name, _REQUIRED if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(cls)
    )
    for cls in KINDS.values()
}
_FIELD_NAMES: dict[type[Message], frozenset[str]] = {
    cls: frozenset(name for name, _ in fields) for cls, fields in _FIELDS.items()
}


def encode(message: Message) -> bytes:
    fields = {name: getattr(message, name) for name, _ in _FIELDS[type(message)]}
    return msgpack.packb([PROTOCOL_VERSION, message.KIND, fields], use_bin_type=True)


def request_id_of(data: bytes) -> int | None:
    """The request id of a message that failed to decode, if one can be read at all.

    A refusal carries the request id whenever there is one, so that a client waiting
    for that request learns at once that it was refused instead of timing out.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=False, max_map_len=64, max_ext_len=0
        )
        request_id = value[2]["request_id"]
    except Exception:  # whatever is wrong with it, there is no request id to read
        return None
    if type(request_id) is int and 0 <= request_id < 2**63:
        return request_id
    return None


def decode(data: bytes) -> Message:
    """Parse and validate one message from a peer; raise BadMessage saying what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_BATCH_ENTRIES + 16,
            max_map_len=64,
            max_str_len=1024 * 1024,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for malformed input
        raise BadMessage(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, list) or len(value) != 3:
        raise BadMessage("a message is [version, kind, fields]")
    version, kind, fields = value
    # type() first: True and 1.0 compare equal to 1 but are not a version a peer may send.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise BadMessage(
            f"protocol version {version!r} is not supported (this is {PROTOCOL_VERSION})"
        )
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise BadMessage(f"unknown message kind {kind!r}")
    if not isinstance(fields, dict):
        raise BadMessage(f"{kind}: fields must be a map")
    unknown = fields.keys() - _FIELD_NAMES[cls]
    if unknown:
        raise BadMessage(f"{kind}: unknown fields {sorted(map(str, unknown))}")
    message = object.__new__(cls)
    for name, default in _FIELDS[cls]:
        value = fields.get(name, default)
        if value is _REQUIRED:
            raise BadMessage(f"{kind}: missing field {name!r}")
        object.__setattr__(message, name, value)
    message.validate()
    return message
