"""CURVE keys, allow lists and the ZAP decision: who may talk to a walrep node.

A WAL stream carries everything a database wrote, so a leader with keys accepts
only allow-listed public keys, separately for readers (publish and control) and
for clients (ingest): a reader's key cannot write. Keys live in files (the
secret one 0600, refused when group or world can read it), never inline in a
config. This module decides; the trio shell runs the ZAP socket.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import zmq
import zmq.utils.z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
DOMAIN_READERS = b"readers"
DOMAIN_CLIENTS = b"clients"
# The publish socket's own domain (with or without keys): its connections are counted
# and capped (max_subscribers), and under CURVE checked against the readers' list.
DOMAIN_PUBLISH = b"publish"


class KeyFileError(ValueError):
    """A key file that is missing, malformed or readable by others."""


def keygen(prefix: str) -> tuple[str, str]:
    """Write PREFIX.key (the secret, 0600) and PREFIX.pub; return both paths."""
    public, secret = zmq.curve_keypair()
    key_path, pub_path = f"{prefix}.key", f"{prefix}.pub"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    with open(pub_path, "xb") as f:
        f.write(public + b"\n")
    return key_path, pub_path


def _read_z85(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror}") from None
    if len(text) != 40:
        raise KeyFileError(f"{what} {path}: expected a 40-character Z85 key (walrep keygen)")
    try:
        zmq.utils.z85.decode(text)
    except (ValueError, KeyError):
        raise KeyFileError(f"{what} {path}: not a Z85 key") from None
    return text


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a .key file, refused when others can read it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise KeyFileError(f"secret key {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"secret key {path} is readable by group or others (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    secret = _read_z85(path, "secret key")
    return zmq.curve_public(secret), secret


def load_public(path: str) -> bytes:
    return _read_z85(path, "public key")


def load_allow_list(path: str) -> dict[bytes, str]:
    """Public keys (binary) -> name, from one .pub file or a directory of them."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".pub"))
    else:
        files = [path]
    allowed = {}
    for file in files:
        allowed[zmq.utils.z85.decode(load_public(file))] = os.path.basename(file).removesuffix(
            ".pub"
        )
    if not allowed:
        raise KeyFileError(f"allow list {path}: no .pub files")
    return allowed


@dataclass
class Gatekeeper:
    """Decides ZAP requests: CURVE clients whose key is on the list for the domain."""

    allowed: dict[bytes, dict[bytes, str]]  # domain -> key -> name
    rejected: int = 0
    last_rejections: list[str] = field(default_factory=list)

    def decide(self, frames: list[bytes]) -> tuple[list[bytes], str | None, str | None]:
        """ZAP reply frames, the peer's name if accepted, and a reason if refused."""
        if len(frames) < 6 or frames[0] != ZAP_VERSION:
            request_id = frames[1] if len(frames) > 1 else b""
            return self._reply(request_id, False), None, "malformed ZAP request"
        _version, request_id, domain, address, _identity, mechanism, *credentials = frames
        peer = address.decode(errors="replace")
        if mechanism != b"CURVE" or not credentials:
            return self._refuse(request_id, peer, f"mechanism {mechanism!r} without a key")
        key = credentials[0]
        name = self.allowed.get(domain, {}).get(key)
        if name is None:
            z85 = zmq.utils.z85.encode(key).decode() if len(key) == 32 else "?"
            return self._refuse(
                request_id, peer, f"key {z85} is not allowed for {domain.decode(errors='replace')}"
            )
        return self._reply(request_id, True, name), name, None

    def _refuse(self, request_id: bytes, peer: str, why: str):
        self.rejected += 1
        self.last_rejections = (self.last_rejections + [f"{peer}: {why}"])[-10:]
        return self._reply(request_id, False), None, f"{peer}: {why}"

    @staticmethod
    def _reply(request_id: bytes, ok: bool, user: str = "") -> list[bytes]:
        return zap_reply(request_id, ok, user)


def zap_reply(request_id: bytes, ok: bool, user: str = "") -> list[bytes]:
    """The ZAP reply frames that accept or refuse one connection."""
    code, text = (b"200", b"OK") if ok else (b"400", b"not allowed")
    return [ZAP_VERSION, request_id, code, text, user.encode(), b""]


def zap_request_fields(frames: list[bytes]) -> tuple[bytes, bytes, str]:
    """(request id, domain, peer address) of a ZAP request, as far as it has them."""
    request_id = frames[1] if len(frames) > 1 else b""
    domain = frames[2] if len(frames) > 2 else b""
    address = frames[3].decode(errors="replace") if len(frames) > 3 else "unknown"
    return request_id, domain, address


def is_loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or interface: assume it reaches other hosts


def server_options(secret: bytes, domain: bytes) -> dict[int, int | bytes]:
    return {zmq.CURVE_SERVER: 1, zmq.CURVE_SECRETKEY: secret, zmq.ZAP_DOMAIN: domain}


def client_options(public: bytes, secret: bytes, server_public: bytes) -> dict[int, int | bytes]:
    return {
        zmq.CURVE_PUBLICKEY: public,
        zmq.CURVE_SECRETKEY: secret,
        zmq.CURVE_SERVERKEY: server_public,
    }


@dataclass(frozen=True)
class ClientKeys:
    """--key and --leader-key of a reader or a command-line client."""

    public: bytes
    secret: bytes
    server_public: bytes

    def options(self) -> dict[int, int | bytes]:
        return client_options(self.public, self.secret, self.server_public)


def load_client_keys(key: str | None, leader_key: str | None) -> ClientKeys | None:
    if not key and not leader_key:
        return None
    if not (key and leader_key):
        raise KeyFileError("--key and --leader-key go together (CURVE needs both)")
    public, secret = load_secret(key)
    return ClientKeys(public, secret, load_public(leader_key))
