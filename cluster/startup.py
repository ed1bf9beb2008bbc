"""What a node checks before it opens its WAL or any socket: the disk and the ports.

`walrep leader` and `walrep reader` run these right after the config checks, so a
WAL directory it cannot write, or a port another process holds, stops the node with
one line naming the key and the config file, before it creates anything or a reader
announces itself to the leader (a reader on a read-only disk would otherwise
hand-shake first and then sit in the leader's status, unable to write).

The checks are probes of the moment, not promises: the disk or a port can change
right after, and the node's own errors still apply then. Nothing here keeps a file
or socket open, and nothing imports trio or zmq.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from walrep.node.files import ensure_private_dir

from .config import ConfigError, LeaderConfig, endpoint_address

# In wal_dir, not ending in .wal and starting with a dot: no WAL code takes it for a
# segment, should a crash leave it behind.
PROBE_PREFIX = ".walrep-probe-"


def check_node(config) -> None:
    """Every startup check for a leader or reader config; ConfigError if one fails."""
    check_ports_free(config)  # first: it leaves nothing behind
    check_wal_dir(config.wal_dir, config.source)


def check_wal_dir(wal_dir: str, where: str) -> None:
    """wal_dir is a directory this process can create files in, and fsync them.

    Creates it (mode 0700, as the writer would) if it does not exist. ConfigError
    naming the key, the directory and what is wrong otherwise.
    """

    def fail(why: str):
        raise ConfigError(f"{where}: key 'wal_dir': {why}")

    try:
        mode = os.stat(wal_dir).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        fail(f"{wal_dir}: {_file_in_the_way(wal_dir) or 'a part of it'} is not a directory")
    except OSError as exc:
        fail(f"{wal_dir}: {exc.strerror}")
    if mode is not None and not stat.S_ISDIR(mode):
        kind = "a regular file" if stat.S_ISREG(mode) else "not a directory"
        fail(f"{wal_dir} is {kind}; wal_dir must be a directory (it holds the segments)")
    if mode is None:
        blocker = _file_in_the_way(wal_dir)
        if blocker is not None:
            fail(f"{wal_dir}: {blocker} is not a directory")
        try:
            ensure_private_dir(wal_dir)
        except OSError as exc:
            fail(f"cannot create {wal_dir}: {_why(exc)}")
    probe = os.path.join(wal_dir, f"{PROBE_PREFIX}{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        fail(f"cannot write in {wal_dir}: {_why(exc)}")


def bind_addresses(config) -> dict[str, tuple[str, int]]:
    """Every TCP address the node will bind, by config key (port 0: the OS picks)."""
    if isinstance(config, LeaderConfig):
        endpoints = {"ingest": config.ingest, "publish": config.publish, "control": config.control}
    else:
        endpoints = {"control": config.control} if config.control else {}
    binds = {key: endpoint_address(ep, key, config.source) for key, ep in endpoints.items()}
    if config.metrics:
        host, _, port = config.metrics.rpartition(":")
        binds["metrics"] = (host, int(port))
    return binds


def check_ports_free(config) -> None:
    """ConfigError naming the key if another process holds one of the node's ports."""
    for key, (host, port) in bind_addresses(config).items():
        problem = port_problem(host, port, zmq_endpoint=key != "metrics")
        if problem is not None:
            raise ConfigError(f"{config.source}: key {key!r}: {problem}")


def port_problem(host: str, port: int, *, zmq_endpoint: bool = True) -> str | None:
    """Why binding host:port would fail now, or None if it would work (or cannot tell)."""
    if port == 0:
        return None
    if host == "*":  # ZeroMQ's "every interface"
        host = "0.0.0.0"
    host = host.strip("[]")  # an IPv6 literal as written in an endpoint
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        if zmq_endpoint and host in {name for _index, name in socket.if_nameindex()}:
            return None  # ZeroMQ also binds to an interface by name
        return f"{host!r} is not an address or host name of this machine"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the real listener does: a port whose last connections are in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use by another process"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            if exc.errno == errno.EACCES:
                return f"no permission to bind port {port} on {host}"
            return None  # something the real bind will report in its own words
    return None


def _file_in_the_way(path: str) -> str | None:
    """The nearest existing ancestor of path, if it is not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)
