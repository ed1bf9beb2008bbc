"""Node configuration: TOML files, command-line overrides, and the checks on both.

Every key can be set in the file or as a flag (``wal_dir`` <-> ``--wal-dir``);
flags win. Unknown keys, wrong types and impossible combinations are errors
that name the key and the file.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from walrep.node.writer import SyncMode

from .wire import MAX_ID_BYTES

ACK_LEVELS_HELP = "none, local, or replicas=N"
# ASCII digits only: int() would also take "+1", " 1", "1_0" and other scripts' digits.
# Nine at most keeps int() far from its digit limit; no cluster has a billion readers.
_REPLICAS = re.compile(r"replicas=([0-9]{1,9})")
# ZeroMQ keeps high-water marks in a C int; a larger value fails deep inside setsockopt.
MAX_HWM = 2**31 - 1


class ConfigError(ValueError):
    """A configuration that cannot run; the text names the key and where it came from."""


@dataclass
class LeaderConfig:
    wal_dir: str = ""
    id: str = "leader"
    ingest: str = "tcp://127.0.0.1:7100"
    publish: str = "tcp://127.0.0.1:7101"
    control: str = "tcp://127.0.0.1:7102"
    sync_mode: str = "fdatasync"
    # Commit on a writer thread instead of in the event loop (see README, Performance):
    # costs latency, but a disk that stalls for seconds then stalls only the commits.
    writer_thread: bool = False
    default_ack: str = "local"
    # Messages queued per subscriber before PUB drops (readers then fetch the gap). A
    # subscriber that stops reading holds up to this many batches (~256 KiB each under
    # load) of the leader's memory; a reader's own receive_hwm buffers on its side.
    publish_hwm: int = 256
    # Connections the publish socket takes at once (readers, plus room for restarts);
    # more are refused at the handshake and counted in status (subscribers_refused).
    max_subscribers: int = 32
    # Retention: segments every known reader holds durably are purged; these bounds
    # purge older segments anyway (0 = no bound), and readers that needed them get
    # "too old" (like PostgreSQL's max_slot_wal_keep_size).
    max_retained_bytes: int = 0
    max_retained_age_s: float = 0.0
    # With no reader known, keep everything (false) or only the active segment (true).
    purge_without_readers: bool = False
    # CURVE: the leader's secret key file, and the public keys allowed to connect
    # (a .pub file or a directory of them): readers on publish/control, clients on
    # ingest. Without keys the leader binds loopback only, unless insecure = true.
    key: str = ""
    allow_readers: str = ""
    allow_clients: str = ""
    insecure: bool = False
    buffer_entries: int = 100_000
    max_segment_bytes: int = 64 * 1024 * 1024
    metrics: str = ""  # HOST:PORT to serve Prometheus metrics on; empty: off
    log_json: bool = False
    log_level: str = "info"
    source: str = field(default="(flags)", repr=False)


@dataclass
class ReaderConfig:
    wal_dir: str = ""
    id: str = ""
    leader_publish: str = "tcp://127.0.0.1:7101"
    leader_control: str = "tcp://127.0.0.1:7102"
    sync_mode: str = "fdatasync"
    writer_thread: bool = False  # as for the leader
    buffer_entries: int = 100_000
    max_segment_bytes: int = 64 * 1024 * 1024
    receive_hwm: int = 10_000  # messages the SUB socket queues before it drops
    # Optional: bind a control endpoint answering walrep verify / walrep status.
    control: str = ""
    # Seconds between background comparisons with the leader (0 = off).
    anti_entropy_interval_s: float = 30.0
    key: str = ""  # this reader's secret key file (CURVE)
    leader_key: str = ""  # the leader's public key file
    insecure: bool = False
    resync: bool = False
    metrics: str = ""  # HOST:PORT to serve Prometheus metrics on; empty: off
    log_json: bool = False
    log_level: str = "info"
    source: str = field(default="(flags)", repr=False)


def key_names(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.name != "source"]


def load(cls, path: str | None, overrides: dict[str, Any]):
    """Build a config from a TOML file (optional) and flag overrides, then check it."""
    values: dict[str, Any] = {}
    source = "(flags)"
    if path is not None:
        source = path
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    for key in values:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = cls(source=source)
    for key, value in values.items():
        expected = type(getattr(config, key))
        if expected is float and type(value) is int:
            value = float(value)  # TOML writes 3600 for 3600.0
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(
                f"{source}: key {key!r} must be {expected.__name__}, got {type(value).__name__} "
                f"({value!r})"
            )
        setattr(config, key, value)
    check(config)
    return config


def check(config) -> None:
    where = config.source

    def fail(key: str, why: str):
        raise ConfigError(f"{where}: key {key!r}: {why}")

    if not config.wal_dir:
        fail("wal_dir", "is required")
    if "\0" in config.wal_dir:
        fail("wal_dir", f"{config.wal_dir!r} contains a NUL character")
    for key in ("max_retained_age_s", "anti_entropy_interval_s"):
        value = getattr(config, key, None)
        if value is not None and not math.isfinite(value):
            fail(key, f"{value} is not a number of seconds")
    for key in ("publish_hwm", "receive_hwm"):
        value = getattr(config, key, None)
        if value is not None and value > MAX_HWM:
            fail(key, f"{value} is more than ZeroMQ takes ({MAX_HWM})")
    try:
        SyncMode(config.sync_mode)
    except ValueError:
        fail("sync_mode", f"{config.sync_mode!r} is not one of fsync, fdatasync, async")
    if config.buffer_entries < 1:
        fail("buffer_entries", "must be at least 1")
    if config.max_segment_bytes < 4096:
        fail("max_segment_bytes", "must be at least 4096")
    if config.metrics:
        host, _, port = config.metrics.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            fail("metrics", f"{config.metrics!r} is not HOST:PORT, like 127.0.0.1:9101")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        fail("log_level", f"{config.log_level!r} is not one of debug, info, warning, error")
    if isinstance(config, LeaderConfig):
        endpoints = {"ingest": config.ingest, "publish": config.publish, "control": config.control}
        _check_id(config.id, fail)
        if config.max_retained_bytes < 0:
            fail("max_retained_bytes", "must be 0 (no bound) or more")
        if config.max_retained_age_s < 0:
            fail("max_retained_age_s", "must be 0 (no bound) or more")
        if config.publish_hwm < 0:
            fail("publish_hwm", "must be 0 (no limit) or more")
        if config.max_subscribers < 1:
            fail("max_subscribers", "must be at least 1")
        try:
            parse_ack(config.default_ack)
        except ValueError as exc:
            fail("default_ack", str(exc))
    else:
        if not config.id:
            fail("id", "every reader needs an id, unique in its cluster")
        _check_id(config.id, fail)
        endpoints = {
            "leader_publish": config.leader_publish,
            "leader_control": config.leader_control,
        }
        if config.control:
            endpoints["control"] = config.control
        if config.anti_entropy_interval_s < 0:
            fail("anti_entropy_interval_s", "must be 0 (off) or more")
        if config.receive_hwm < 0:
            fail("receive_hwm", "must be 0 (no limit) or more")
    _check_security(config, fail)
    seen: dict[tuple[str, int], str] = {}
    for key, endpoint in endpoints.items():
        host, port = endpoint_address(endpoint, key, where)
        if (host, port) in seen:
            fail(key, f"uses the same address as {seen[(host, port)]!r} ({endpoint})")
        seen[(host, port)] = key


def _check_id(node_id: str, fail) -> None:
    # The id travels in every hello (at most MAX_ID_BYTES there) and is a reader's ZeroMQ
    # identity; it is also a column of walrep status, a value in key=value logs and a
    # metrics label, where control characters and spaces would break the line.
    try:
        size = len(node_id.encode("utf-8"))
    except UnicodeEncodeError:
        fail("id", f"{node_id!r} is not valid UTF-8")
    if not 1 <= size <= MAX_ID_BYTES:
        fail("id", f"must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {size}")
    if not node_id.isprintable() or any(c.isspace() for c in node_id):
        fail("id", f"{node_id!r} must not contain spaces or control characters")


def endpoint_address(endpoint: str, key: str, where: str) -> tuple[str, int]:
    bad = ConfigError(
        f"{where}: key {key!r}: {endpoint!r} is not a ZeroMQ tcp endpoint like tcp://127.0.0.1:7101"
    )
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # a port outside 0..65535, or not a number
        raise bad from None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise bad
    return parts.hostname, port


def parse_ack(text: str) -> int | None:
    """Ack level as a number of replicas: none -> None, local -> 0, replicas=N -> N.

    ValueError, saying what is wrong, for anything else.
    """
    if text == "none":
        return None
    if text == "local":
        return 0
    if text.startswith("replicas="):
        match = _REPLICAS.fullmatch(text)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(
                f"ack level {text!r}: N in replicas=N must be a whole number of readers "
                "from 1 (for 0, use local)"
            )
        return int(match.group(1))
    raise ValueError(f"ack level {text!r} is not one of {ACK_LEVELS_HELP}")


def _check_security(config, fail) -> None:
    from . import security

    if isinstance(config, LeaderConfig):
        binds = {"ingest": config.ingest, "publish": config.publish, "control": config.control}
        if config.key:
            for key in ("allow_readers", "allow_clients"):
                if not getattr(config, key):
                    fail(key, "a leader with a key needs an allow list (a .pub file or directory)")
            try:
                security.load_secret(config.key)
                security.load_allow_list(config.allow_readers)
                security.load_allow_list(config.allow_clients)
            except security.KeyFileError as exc:
                fail("key", str(exc))
        elif config.allow_readers or config.allow_clients:
            fail("key", "allow lists need the leader's own key (walrep keygen)")
    else:
        binds = {"control": config.control} if config.control else {}
        try:
            security.load_client_keys(config.key or None, config.leader_key or None)
        except security.KeyFileError as exc:
            fail("key", str(exc))
    if not config.key and not config.insecure:
        for key, endpoint in binds.items():
            if not security.is_loopback(endpoint):
                fail(
                    key,
                    f"{endpoint} is not a loopback address and there are no keys: the stream "
                    "would cross the network unencrypted and unauthenticated. Set key (walrep "
                    "keygen) or, knowingly, insecure = true",
                )
