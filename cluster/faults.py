"""Fault injectors: network namespaces, nftables rules, TCP proxies, small tmpfs mounts, WAL damage.

What scripts/chaos.py strikes a cluster with, and what fault tests use. The network
is one namespace per node (``leader``, ``reader-1``, ``reader-2``), joined by veth
pairs to a bridge in a namespace of its own where the clients run (NetnsNet), or,
without root, 127.0.0.1 with a proxy in front of each reader (LoopbackNet). Both
offer the same faults (partition, isolate the leader, packet loss, delay) and heal
each. The proxy runs as a child process (``python -m walrep.cluster.faults proxy``)
taking commands on its stdin; this kernel has no netem, so delay goes through it.

Namespaces, nftables and mounts need root (netns_problem() says why they cannot be
used). This module injects and heals; it never decides which fault comes when (the
chaos driver does) nor judges what the cluster did (cluster.history does). Every
process it starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from walrep.node import format as fmt
from walrep.node.reader import scan

from .procs import free_ports

# The faults a chaos run injects, by name (scripts/chaos.py has a fault_<kind> method
# for each; its docstring says what each does).
KINDS = (
    "kill-leader",
    "kill-reader",
    "stall",
    "partition",
    "isolate-leader",
    "loss",
    "delay",
    "wal-truncate",
    "wal-bitflip",
    "disk-full",
)
READERS = ("reader-1", "reader-2")
SUBNET = "10.77.0"
ADDRESSES = {"leader": f"{SUBNET}.1", "reader-1": f"{SUBNET}.11", "reader-2": f"{SUBNET}.12"}
CLIENT_ADDRESS = f"{SUBNET}.100"  # the bridge namespace, where the load clients run
PORTS = {"ingest": 7100, "publish": 7101, "control": 7102}
LINK = "wr0"  # each node's end of its veth pair, inside its namespace


class CannotRun(Exception):
    """The environment does not allow this run (exit status 2)."""


def run(cmd: list[str], *, check: bool = True, input: str | None = None) -> str:
    """Run a short command; raise CannotRun with its error output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode != 0:
        raise CannotRun(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root: network namespaces, nftables and tmpfs mounts need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"walrep-probe-{os.getpid()}"
    try:
        run(["ip", "netns", "add", probe])
        run(["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"])
    except (CannotRun, subprocess.SubprocessError) as exc:
        return f"ip netns does not work here: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    if shutil.which("nft") is None:
        return "nftables (`nft`) is not installed: apt-get install -y nftables"
    return None


def ensure_nftables() -> None:
    """Install nftables with apt when missing (the test setup's job; root only)."""
    if shutil.which("nft") is not None or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "nftables"],
        capture_output=True,
        timeout=300,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )


# --- the proxy: `python -m walrep.cluster.faults proxy LISTEN=TARGET ...`, commands on stdin


def run_proxy(argv: list[str]) -> int:
    """A TCP proxy that can delay, block (a partition) and reset its connections.

    Commands, one per line on stdin: ``delay SECONDS``, ``block``, ``unblock``,
    ``reset`` (close every connection), ``reset-prob P`` (close a connection with
    probability P per chunk forwarded). It exits when stdin closes.
    """
    import trio

    parser = argparse.ArgumentParser(prog="python -m walrep.cluster.faults proxy")
    parser.add_argument("routes", nargs="+", metavar="HOST:PORT=HOST:PORT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    routes = []
    for text in args.routes:
        listen, _, target = text.partition("=")
        lhost, _, lport = listen.rpartition(":")
        thost, _, tport = target.rpartition(":")
        routes.append(((lhost, int(lport)), (thost, int(tport))))

    class State:
        def __init__(self) -> None:
            self.delay = 0.0
            self.reset_prob = 0.0
            self.open = trio.Event()
            self.open.set()
            self.scopes: set[trio.CancelScope] = set()
            self.rng = random.Random(args.seed)

    state = State()

    async def pump(src, dst, scope: trio.CancelScope) -> None:
        send, receive = trio.open_memory_channel(256)  # at most 256 chunks of 64 KiB held

        async def read() -> None:
            async with send:
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        scope.cancel()
                        return
                    await state.open.wait()
                    if state.reset_prob and state.rng.random() < state.reset_prob:
                        scope.cancel()
                        return
                    await send.send((trio.current_time() + state.delay, data))

        async def write() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await state.open.wait()
                    await dst.send_all(data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()  # one side went away: close the other

    async def handle(target, client) -> None:
        try:
            await connect(target, client)
        except* Exception as group:  # one connection's trouble never ends the proxy
            print(f"proxy: connection failed: {group.exceptions[0]!r}", flush=True)

    async def connect(target, client) -> None:
        with trio.CancelScope() as scope:
            state.scopes.add(scope)
            try:
                await state.open.wait()
                try:
                    server = await trio.open_tcp_stream(*target)
                except OSError:
                    return
                async with server, trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, server, scope)
                    nursery.start_soon(pump, server, client, scope)
            finally:
                state.scopes.discard(scope)
        with contextlib.suppress(Exception):
            await client.aclose()

    async def commands() -> None:
        stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        async with stream:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    word, _, value = line.decode().strip().partition(" ")
                    if word == "delay":
                        state.delay = float(value)
                    elif word == "reset-prob":
                        state.reset_prob = float(value)
                    elif word == "block":
                        state.open = trio.Event()
                    elif word == "unblock":
                        state.open.set()
                    elif word == "reset":
                        for scope in list(state.scopes):
                            scope.cancel()
                    print(f"proxy {word} {value}".strip(), flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for (lhost, lport), target in routes:
                listeners = await trio.open_tcp_listeners(lport, host=lhost)
                nursery.start_soon(
                    trio.serve_listeners, functools.partial(handle, target), listeners
                )
            print("proxy-ready", flush=True)
            await commands()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0


@dataclasses.dataclass
class Proxy:
    name: str
    routes: list[str]
    prefix: list[str]
    log_path: str
    seed: int
    proc: subprocess.Popen | None = None

    def start(self) -> Proxy:
        ready = read_text(self.log_path).count("proxy-ready")
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        cmd = [sys.executable, "-m", "walrep.cluster.faults", "proxy", "--seed", str(self.seed)]
        self.proc = subprocess.Popen(
            [*self.prefix, *cmd, *self.routes],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        wait_until(
            lambda: read_text(self.log_path).count("proxy-ready") > ready, 20, f"{self.name} ready"
        )
        return self

    def command(self, line: str) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# --- helpers ---------------------------------------------------------------------------------

_TICK = threading.Event()  # never set: wait(t) is a bounded pause between polls


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        _TICK.wait(poll)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# --- networks -----------------------------------------------------------------------------


class _ProxyDelays:
    """What both networks do alike: delay goes through the proxy in front of a reader."""

    proxies: dict[str, Proxy]

    def loss_percent(self, rng: random.Random) -> int:
        return rng.randint(5, 30)

    def delay(self, reader: str, seconds: float) -> str:
        self.proxies[reader].command(f"delay {seconds}")
        return f"proxy delays {reader} <-> leader by {seconds * 1000:.0f} ms each way"

    def heal_delay(self, reader: str) -> None:
        self.proxies[reader].command("delay 0")


class NetnsNet(_ProxyDelays):
    """One namespace per node, veth pairs to a bridge in a namespace of its own."""

    kind = "netns"

    def __init__(self, prefix: str, base: str, seed: int):
        self.prefix = prefix
        self.base = base
        self.seed = seed
        self.bridge_ns = f"{prefix}-net"
        self.ns = {name: f"{prefix}-{name}" for name in ("leader", *READERS)}
        self.proxies: dict[str, Proxy] = {}
        self.created: list[str] = []

    # endpoints
    def leader_bind(self, port: str) -> str:
        return f"tcp://{ADDRESSES['leader']}:{PORTS[port]}"

    def client_ingest(self) -> str:
        return self.leader_bind("ingest")

    def reader_endpoint(self, reader: str, port: str) -> str:
        if reader in self.proxies:
            return f"tcp://127.0.0.1:{PORTS[port]}"
        return self.leader_bind(port)

    def node_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name]]

    def client_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.bridge_ns]

    def delay_targets(self) -> list[str]:
        return list(self.proxies)

    def leftovers(self) -> list[str]:
        out = run(["ip", "netns", "list"], check=False)
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix + "-")]

    def setup(self) -> None:
        for name in self.leftovers():
            run(["ip", "netns", "del", name], check=False)
        br = self.bridge_ns
        self._add_ns(br)
        run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", br, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "br0"])
        run(["ip", "-n", br, "link", "set", "br0", "up"])
        for index, (name, ns) in enumerate(self.ns.items()):
            self._add_ns(ns)
            peer = f"v{index}"
            run(
                [
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "add",
                    LINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "netns",
                    br,
                ]
            )
            run(["ip", "-n", ns, "addr", "add", f"{ADDRESSES[name]}/24", "dev", LINK])
            run(["ip", "-n", ns, "link", "set", LINK, "up"])
            run(["ip", "-n", br, "link", "set", peer, "master", "br0"])
            run(["ip", "-n", br, "link", "set", peer, "up"])
            run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=(
                    "table inet walrep {\n"
                    "  chain cut_in {}\n  chain cut_out {}\n"
                    "  chain loss_in {}\n  chain loss_out {}\n"
                    "  chain input {\n    type filter hook input priority 0; policy accept;\n"
                    "    jump cut_in\n    jump loss_in\n  }\n"
                    "  chain output {\n    type filter hook output priority 0; policy accept;\n"
                    "    jump cut_out\n    jump loss_out\n  }\n"
                    "}\n"
                ),
            )
        # reader-2 reaches the leader through a delaying proxy in its own namespace.
        leader = ADDRESSES["leader"]
        self.proxies["reader-2"] = Proxy(
            "proxy-reader-2",
            [
                f"127.0.0.1:{PORTS['publish']}={leader}:{PORTS['publish']}",
                f"127.0.0.1:{PORTS['control']}={leader}:{PORTS['control']}",
            ],
            self.node_prefix("reader-2"),
            os.path.join(self.base, "proxy-reader-2.log"),
            self.seed,
        ).start()

    def _add_ns(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self.created.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _nft(self, name: str, *words: str) -> None:
        run(["ip", "netns", "exec", self.ns[name], "nft", *words])

    # faults
    def partition(self, reader: str) -> str:
        leader = ADDRESSES["leader"]
        self._nft(reader, "add", "rule", "inet", "walrep", "cut_in", "ip", "saddr", leader, "drop")
        self._nft(reader, "add", "rule", "inet", "walrep", "cut_out", "ip", "daddr", leader, "drop")
        return f"nftables drops {reader} <-> leader ({leader})"

    def heal_partition(self, reader: str) -> None:
        self._nft(reader, "flush", "chain", "inet", "walrep", "cut_in")
        self._nft(reader, "flush", "chain", "inet", "walrep", "cut_out")

    def isolate_leader(self) -> str:
        run(["ip", "-n", self.ns["leader"], "link", "set", LINK, "down"])
        return f"ip link set {LINK} down in {self.ns['leader']}"

    def heal_isolate_leader(self) -> None:
        run(["ip", "-n", self.ns["leader"], "link", "set", LINK, "up"])

    def loss(self, name: str, percent: int) -> str:
        rule = ["numgen", "random", "mod", "100", "<", str(percent), "drop"]
        self._nft(name, "add", "rule", "inet", "walrep", "loss_in", "iifname", LINK, *rule)
        self._nft(name, "add", "rule", "inet", "walrep", "loss_out", "oifname", LINK, *rule)
        return f"nftables numgen random mod 100 < {percent} drop, both ways on {name}'s link"

    def heal_loss(self, name: str) -> None:
        self._nft(name, "flush", "chain", "inet", "walrep", "loss_in")
        self._nft(name, "flush", "chain", "inet", "walrep", "loss_out")

    def heal_all(self) -> None:
        for name in self.ns:
            with contextlib.suppress(CannotRun):
                self.heal_loss(name)
            if name != "leader":
                with contextlib.suppress(CannotRun):
                    self.heal_partition(name)
        with contextlib.suppress(CannotRun):
            self.heal_isolate_leader()
        for reader in self.proxies:
            self.heal_delay(reader)

    def teardown(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        for ns in reversed(self.created):
            run(["ip", "netns", "del", ns], check=False)
        for ns in self.leftovers():
            run(["ip", "netns", "del", ns], check=False)


class LoopbackNet(_ProxyDelays):
    """Everything on 127.0.0.1; proxies in front of the readers make the faults."""

    kind = "loopback"

    def __init__(self, prefix: str, base: str, seed: int):
        self.base = base
        self.seed = seed
        ports = free_ports(3 + 2 * len(READERS))
        self.leader_ports = dict(zip(PORTS, ports[:3], strict=True))
        self.proxy_ports = {
            reader: {"publish": ports[3 + 2 * i], "control": ports[4 + 2 * i]}
            for i, reader in enumerate(READERS)
        }
        self.proxies: dict[str, Proxy] = {}

    def leader_bind(self, port: str) -> str:
        return f"tcp://127.0.0.1:{self.leader_ports[port]}"

    def client_ingest(self) -> str:
        return self.leader_bind("ingest")

    def reader_endpoint(self, reader: str, port: str) -> str:
        return f"tcp://127.0.0.1:{self.proxy_ports[reader][port]}"

    def node_prefix(self, name: str) -> list[str]:
        return []

    def client_prefix(self) -> list[str]:
        return []

    def delay_targets(self) -> list[str]:
        return list(READERS)

    def setup(self) -> None:
        for i, reader in enumerate(READERS):
            routes = [
                f"127.0.0.1:{self.proxy_ports[reader][p]}=127.0.0.1:{self.leader_ports[p]}"
                for p in ("publish", "control")
            ]
            log_path = os.path.join(self.base, f"proxy-{reader}.log")
            self.proxies[reader] = Proxy(
                f"proxy-{reader}", routes, [], log_path, self.seed + i
            ).start()

    def partition(self, reader: str) -> str:
        self.proxies[reader].command("block")
        return f"the proxy of {reader} stops forwarding"

    def heal_partition(self, reader: str) -> None:
        self.proxies[reader].command("unblock")

    def isolate_leader(self) -> str:
        for proxy in self.proxies.values():
            proxy.command("block")
        return "both readers' proxies stop forwarding (clients still reach the leader)"

    def heal_isolate_leader(self) -> None:
        for proxy in self.proxies.values():
            proxy.command("unblock")

    def loss(self, name: str, percent: int) -> str:
        targets = list(self.proxies) if name == "leader" else [name]
        for reader in targets:
            self.proxies[reader].command(f"reset-prob {percent / 1000}")
        return f"proxies of {', '.join(targets)} reset a connection per chunk at {percent / 10} %"

    def heal_loss(self, name: str) -> None:
        for proxy in self.proxies.values():
            proxy.command("reset-prob 0")

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            for line in ("unblock", "reset-prob 0", "delay 0"):
                proxy.command(line)

    def teardown(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()


# --- the leader's disk: a small tmpfs -------------------------------------------------------


class Tmpfs:
    """A tmpfs of ``size`` (mount's size=, "8m" or bytes) mounted at ``path``: a disk to fill.

    mount() raises CannotRun when the mount fails (not root, say).
    """

    def __init__(self, path: str, size: str | int):
        self.path = path
        self.size = size
        self.filler = os.path.join(path, "filler")
        self.mounted = False

    def mount(self) -> Tmpfs:
        os.makedirs(self.path, exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", self.path])
        self.mounted = True
        return self

    def fill(self, chunks: tuple[int, ...] = (1 << 20, 1 << 12)) -> int:
        """Write a file until the file system is full (ENOSPC); the bytes written.

        Each chunk size in turn, largest first, so the last bytes are taken too. Any
        other error is raised.
        """
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        written = 0
        try:
            for chunk in chunks:
                block = b"\0" * chunk
                while True:
                    try:
                        written += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        os.unlink(self.filler)

    def unmount(self) -> None:
        """Unmount, lazily if something still holds it open."""
        if subprocess.run(["umount", self.path], capture_output=True).returncode:
            subprocess.run(["umount", "-l", self.path], capture_output=True)
        self.mounted = False


# --- a WAL's files: damage --------------------------------------------------------------


def entry_frames(path: str) -> list[tuple[int, int]]:
    """(offset, frame bytes) of each complete entry of a segment file, CRC good or not.

    Stepped through by node's reader (scan finds where the complete entries end,
    split_frames cuts them one by one), so damage is placed on real frame bounds.
    """
    with open(path, "rb") as f:
        data = f.read()
    end = scan(data, path, None, is_tail=False).valid_end
    if end <= fmt.FILE_HEADER_BYTES:
        return []
    out = []
    offset = fmt.FILE_HEADER_BYTES
    for _seq, _count, frame in fmt.split_frames(data[offset:end], 0, 1):
        out.append((offset, len(frame)))
        offset += len(frame)
    return out


def truncate_in_entry(path: str, offset: int, frame: int, pick: float) -> int:
    """Cut the file inside the entry at ``offset`` (``frame`` bytes), ``pick`` (0..1) of the
    way in; the file's new length."""
    cut = offset + 1 + int(pick * (frame - 1))
    os.truncate(path, cut)
    return cut


def flip_bit_in_entry(path: str, offset: int, frame: int, pick: float, bit: int) -> int:
    """Flip bit ``bit`` (0-7) of a byte of the entry at ``offset``, ``pick`` (0..1) of the way
    through its length, CRC and payload; the byte's offset.

    Never the 8 timestamp bytes: ARCW's CRC covers the payload only, so a flipped
    timestamp cannot be detected by any node.
    """
    spots = [*range(0, 4), *range(12, frame)]
    at = offset + spots[int(pick * len(spots))]
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << bit)]))
    return at


def main(argv: list[str] | None = None) -> int:
    """``python -m walrep.cluster.faults proxy ...``: the proxy's process (see run_proxy)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["proxy"]:
        print("usage: python -m walrep.cluster.faults proxy LISTEN=TARGET ...", file=sys.stderr)
        return 2
    return run_proxy(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
