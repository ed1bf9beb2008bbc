"""An independent ARCW v1 parser, written from the seed's documented constants only.

It deliberately imports nothing from ``node``: if our writer and reader shared a
misunderstanding of the format, tests that use this parser would still catch it.

From the seed (Basekick-Labs/arc, package wal)::

    WALMagic            = "ARCW"
    WALVersion          = uint16(0x0001)
    WALChecksumCRC32    = 0x01
    WALFileHeaderSize   = 7     // Magic(4) + Version(2) + ChecksumType(1)
    WALEntryHeaderSize  = 16    // [Length: 4][Timestamp: 8][Checksum: 4], then payload
    MaxWALPayloadSize   = 100 * 1024 * 1024
    WALEnvelopeMarker   = 0x01  // [0x01][2-byte db name length][db name][msgpack]

Integers are big-endian; the checksum is CRC-32 (IEEE) of the payload alone.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

WAL_MAGIC = b"ARCW"
WAL_VERSION = 0x0001
WAL_CHECKSUM_CRC32 = 0x01
WAL_FILE_HEADER_SIZE = 7
WAL_ENTRY_HEADER_SIZE = 16
MAX_WAL_PAYLOAD_SIZE = 100 * 1024 * 1024
WAL_ENVELOPE_MARKER = 0x01


class ARCWError(Exception):
    pass


@dataclass(frozen=True)
class Frame:
    offset: int  # of the entry header in the file
    timestamp_us: int
    payload: bytes


@dataclass
class Parsed:
    frames: list[Frame] = field(default_factory=list)
    # Bytes after the last complete entry (a torn tail), and where they start.
    tail_offset: int = 0
    tail_bytes: int = 0
    bad_crc_offsets: list[int] = field(default_factory=list)


def _u16(b: bytes, at: int) -> int:
    return (b[at] << 8) | b[at + 1]


def _u32(b: bytes, at: int) -> int:
    return (b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]


def _u64(b: bytes, at: int) -> int:
    return (_u32(b, at) << 32) | _u32(b, at + 4)


def parse(data: bytes, *, strict: bool = True) -> Parsed:
    """Parse one ARCW v1 file.

    strict: any damage (bad CRC, incomplete tail, bad length) raises ARCWError.
    Otherwise, like the seed's reader: bad-CRC entries are skipped and an
    incomplete tail ends the file.
    """
    if len(data) < WAL_FILE_HEADER_SIZE:
        raise ARCWError(f"file of {len(data)} bytes has no complete header")
    if data[:4] != WAL_MAGIC:
        raise ARCWError(f"bad magic {data[:4]!r}")
    if _u16(data, 4) != WAL_VERSION:
        raise ARCWError(f"unsupported version {_u16(data, 4)}")
    if data[6] != WAL_CHECKSUM_CRC32:
        raise ARCWError(f"unsupported checksum type {data[6]}")
    out = Parsed()
    pos = WAL_FILE_HEADER_SIZE
    while pos < len(data):
        if len(data) - pos < WAL_ENTRY_HEADER_SIZE:
            break
        length = _u32(data, pos)
        timestamp = _u64(data, pos + 4)
        checksum = _u32(data, pos + 12)
        if length > MAX_WAL_PAYLOAD_SIZE:
            if strict:
                raise ARCWError(f"length {length} at offset {pos} exceeds the maximum")
            break
        start = pos + WAL_ENTRY_HEADER_SIZE
        if start + length > len(data):
            break
        payload = bytes(data[start : start + length])
        if binascii.crc32(payload) & 0xFFFFFFFF != checksum:
            if strict:
                raise ARCWError(f"CRC mismatch at offset {pos}")
            out.bad_crc_offsets.append(pos)
        else:
            out.frames.append(Frame(pos, timestamp, payload))
        pos = start + length
    out.tail_offset = pos
    out.tail_bytes = len(data) - pos
    if strict and out.tail_bytes:
        raise ARCWError(f"{out.tail_bytes} bytes of incomplete entry at offset {pos}")
    return out


def parse_file(path: str, *, strict: bool = True) -> Parsed:
    with open(path, "rb") as f:
        return parse(f.read(), strict=strict)


def split_envelope(payload: bytes) -> tuple[str | None, bytes]:
    """(database, msgpack) of an enveloped payload; (None, payload) otherwise."""
    if len(payload) >= 3 and payload[0] == WAL_ENVELOPE_MARKER:
        n = _u16(payload, 1)
        if len(payload) >= 3 + n:
            return payload[3 : 3 + n].decode("utf-8"), payload[3 + n :]
    return None, payload


def build_envelope(database: str, body: bytes) -> bytes:
    name = database.encode("utf-8")
    return bytes([WAL_ENVELOPE_MARKER, len(name) >> 8, len(name) & 0xFF]) + name + body


def build_frame(timestamp_us: int, payload: bytes) -> bytes:
    """One entry, encoded by hand (used to craft files the seed could have written)."""
    crc = binascii.crc32(payload) & 0xFFFFFFFF
    return (
        len(payload).to_bytes(4, "big")
        + timestamp_us.to_bytes(8, "big")
        + crc.to_bytes(4, "big")
        + payload
    )


FILE_HEADER = WAL_MAGIC + WAL_VERSION.to_bytes(2, "big") + bytes([WAL_CHECKSUM_CRC32])
