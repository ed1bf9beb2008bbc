"""Every decoder fed hostile bytes: it refuses with its own error, never crashes, never
returns damaged data. A few thousand examples each here; `make fuzz` runs many more."""

from __future__ import annotations

import os
import tempfile
import zlib

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from walrep.cluster import config as cfg
from walrep.cluster import security
from walrep.node import format as fmt
from walrep.node.reader import decode_frames, scan

EXAMPLES = int(os.environ.get("WALREP_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(payload: bytes, ts: int = 1) -> bytes:
    return fmt.encode_entry(ts, payload)


frames_like = st.one_of(
    st.binary(max_size=300),
    st.lists(st.binary(max_size=40), max_size=6).map(lambda ps: b"".join(map(frame, ps))),
    st.tuples(
        st.lists(st.binary(max_size=40), min_size=1, max_size=6),
        st.integers(min_value=0, max_value=10**6),
        st.integers(min_value=0, max_value=255),
    ).map(lambda t: _mutate(b"".join(map(frame, t[0])), t[1], t[2])),
    # Huge declared lengths.
    st.integers(min_value=0, max_value=2**32 - 1).map(
        lambda n: n.to_bytes(4, "big") + b"\0" * 12 + b"x" * 8
    ),
)


def _mutate(data: bytes, where: int, mask: int) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[where % len(out)] ^= mask or 1
    return bytes(out[: len(out) - where % 7])


@FUZZ
@given(frames_like, st.integers(min_value=1, max_value=2**40))
def test_decode_frames_refuses_or_returns_only_crc_valid_entries(data, first_seq):
    try:
        entries = decode_frames(data, first_seq)
    except fmt.WALError:
        return
    for seq, (s, _ts, payload) in enumerate(entries, start=first_seq):
        assert s == seq
        assert len(payload) <= fmt.MAX_PAYLOAD_BYTES
    # Whatever came back re-encodes to exactly the input: nothing skipped or invented.
    assert b"".join(frame(p, ts) for _, ts, p in entries) == data


@FUZZ
@given(frames_like, st.booleans())
def test_scan_never_raises_and_returns_only_good_entries(body, is_tail):
    data = fmt.FILE_HEADER + body
    out: list = []
    problems: list = []
    scan(data, "fuzz.wal", 1, is_tail=is_tail, out=out, on_problem=problems.append)
    for _seq, _ts, payload in out:
        assert payload in data
        assert zlib.crc32(payload) == zlib.crc32(payload)  # bytes, not a view
        assert isinstance(payload, bytes)
    for problem in problems:
        assert problem.file == "fuzz.wal" and problem.offset >= fmt.FILE_HEADER_BYTES


deep = st.integers(min_value=1, max_value=5000).map(lambda n: b"\x91" * n + b"\x80")


@FUZZ
@given(st.one_of(st.binary(max_size=200), deep, st.binary(max_size=50).map(lambda b: b"\x01" + b)))
def test_payload_decoding_never_raises(payload):
    decoded = fmt.decode_payload(payload)
    assert decoded.kind in ("records", "columnar", "raw")
    database, body = fmt.parse_envelope(payload)
    assert body in payload or body == payload


toml_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=30).map(lambda t: '"' + t.replace("\\", "").replace('"', "") + '"'),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.just("[1, 2]"),
)
keys = st.sampled_from(
    cfg.key_names(cfg.LeaderConfig) + cfg.key_names(cfg.ReaderConfig) + ["bogus", "a.b"]
)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.tuples(keys, toml_values), max_size=8).map(
            lambda kv: "\n".join(f"{k} = {v}" for k, v in dict(kv).items())
        ),
    )
)
def test_config_loading_refuses_with_config_error_only(text):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        for cls in (cfg.LeaderConfig, cfg.ReaderConfig):
            try:
                cfg.load(cls, f.name, {})
            except cfg.ConfigError as exc:
                assert f.name in str(exc)
    finally:
        os.unlink(f.name)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=9))
def test_zap_decisions_never_raise_and_refuse_unknown_keys(frames):
    gatekeeper = security.Gatekeeper({security.DOMAIN_READERS: {b"k" * 32: "reader-1"}})
    reply, name, refusal = gatekeeper.decide(frames)
    assert len(reply) == 6 and reply[2] in (b"200", b"400")
    if reply[2] == b"200":
        assert frames[2] == security.DOMAIN_READERS and frames[6] == b"k" * 32
        assert name == "reader-1" and refusal is None
    else:
        assert refusal is not None


def test_msgpack_limits_hold_for_a_huge_declared_length():
    # A bin32 header that claims 4 GiB: the wire decoder must refuse before allocating.
    from walrep.cluster import wire

    bomb = msgpack.packb([1, "batch", {}])[:-1] + b"\x81\xa6frames\xc6\xff\xff\xff\xff"
    try:
        wire.decode(bomb)
    except wire.BadMessage:
        pass
    else:
        raise AssertionError("a 4 GiB declared length was accepted")
