"""Baselines for scripts/bench.py: raw pyzmq PUB/SUB and Redis master + replica.

Used as a module by scripts/bench.py, and as the entry point of the baseline's own
processes:

    python scripts/bench_baselines.py zmq-pub --pub EP --pull EP --subscribers 2 \
        --entries N --batch K --size BYTES
    python scripts/bench_baselines.py zmq-sub --sub EP --push EP --entries N

The PUB/SUB baseline is one publisher process and N subscriber processes on
loopback. The publisher probes until every subscriber has seen a message (the
"slow joiner"), then sends the entries in batches of K (one message per batch:
K prebuilt ARCW frames of BYTES-byte payloads, as walrep publishes them); each
subscriber counts entries, writes nothing, and reports the CLOCK_MONOTONIC time it
had them all. The figure is entries / (last subscriber done - first batch sent).

The Redis helpers start redis-server processes (by pid, stopped by pid), talk
RESP over a plain socket (no client library needed) and run redis-benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import zmq

from walrep.cluster.procs import free_ports
from walrep.node import format as fmt

HERE = os.path.abspath(__file__)

# --- raw pyzmq PUB/SUB -------------------------------------------------------------


def zmq_publisher(args: argparse.Namespace) -> int:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # never drop: this is the transport's best case
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(args.pub)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(args.pull)
    try:
        frame = fmt.encode_entry(time.time_ns() // 1000, os.urandom(args.size))
        batches = []
        for start in range(0, args.entries, args.batch):
            n = min(args.batch, args.entries - start)
            batches.append((n.to_bytes(4, "big"), frame * n))
        ready: set[bytes] = set()
        deadline = time.monotonic() + 30
        while len(ready) < args.subscribers:
            if time.monotonic() > deadline:
                raise SystemExit("zmq-pub: subscribers did not join within 30 s")
            pub.send_multipart([b"probe", b""])
            if pull.poll(10):
                kind, who, _ = pull.recv_multipart()
                if kind == b"ready":
                    ready.add(who)
        # Let late probes drain so they are not counted in the timing.
        time.sleep(0.05)
        started = time.monotonic()
        for head, block in batches:
            pub.send_multipart([head, block])
        sent = time.monotonic()
        done: dict[bytes, float] = {}
        deadline = time.monotonic() + 600
        while len(done) < args.subscribers:
            if not pull.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                raise SystemExit("zmq-pub: subscribers did not finish within 600 s")
            kind, who, when = pull.recv_multipart()
            if kind == b"done":
                done[who] = float(when.decode())
        finished = max(done.values())
        print(
            json.dumps(
                {
                    "entries": args.entries,
                    "batch": args.batch,
                    "size": args.size,
                    "subscribers": args.subscribers,
                    "send_seconds": sent - started,
                    "seconds": finished - started,
                    "entries_per_s": args.entries / (finished - started),
                }
            ),
            flush=True,
        )
    finally:
        pub.close()
        pull.close()
        ctx.term()
    return 0


def zmq_subscriber(args: argparse.Namespace) -> int:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(args.sub)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(args.push)
    me = str(os.getpid()).encode()
    try:
        announced = False
        count = 0
        while count < args.entries:
            head, _block = sub.recv_multipart(copy=False)
            head = head.bytes
            if head == b"probe":
                if not announced:
                    push.send_multipart([b"ready", me, b""])
                    announced = True
                continue
            count += int.from_bytes(head, "big")
        push.send_multipart([b"done", me, repr(time.monotonic()).encode()])
    finally:
        sub.close()
        push.close()
        ctx.term()
    return 0


def stop_pid(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM by pid, then SIGKILL by pid if it does not exit; always reaped."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def run_zmq_pubsub(entries: int, batch: int, size: int, subscribers: int = 2) -> dict:
    """One publisher process and `subscribers` subscriber processes; returns the figures."""
    pub_port, pull_port = free_ports(2)
    pub_ep, pull_ep = f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{pull_port}"
    procs: list[subprocess.Popen] = []
    try:
        publisher = subprocess.Popen(
            [sys.executable, HERE, "zmq-pub", "--pub", pub_ep, "--pull", pull_ep]
            + ["--subscribers", str(subscribers), "--entries", str(entries)]
            + ["--batch", str(batch), "--size", str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(publisher)
        for _ in range(subscribers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, HERE, "zmq-sub", "--sub", pub_ep, "--push", pull_ep]
                    + ["--entries", str(entries)]
                )
            )
        out, _ = publisher.communicate(timeout=900)
        if publisher.returncode != 0:
            raise RuntimeError(f"zmq publisher exited {publisher.returncode}")
        for proc in procs[1:]:
            proc.wait(timeout=30)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs:
            stop_pid(proc)


# --- Redis ---------------------------------------------------------------------------


class Resp:
    """A minimal RESP2 client: enough for PING, INFO, XLEN, CONFIG on loopback."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def command(self, *args: str | bytes):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected RESP reply {line!r}")


def redis_available() -> tuple[str | None, str | None]:
    return shutil.which("redis-server"), shutil.which("redis-benchmark")


def redis_version(server: str) -> str:
    out = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
    return out.strip()


def rss_hwm_kib(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a running process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def run_redis_replicated(base: str, entries: int, size: int, pipeline: int, clients: int) -> dict:
    """Redis master + replica (AOF, appendfsync everysec), pipelined XADD by
    redis-benchmark, timed from the benchmark's start until XLEN on the replica is
    `entries`."""
    server, benchmark = redis_available()
    if server is None or benchmark is None:
        raise FileNotFoundError("redis-server / redis-benchmark not installed")
    master_port, replica_port = free_ports(2)
    procs: list[subprocess.Popen] = []

    def start(name: str, port: int, *extra: str) -> subprocess.Popen:
        directory = os.path.join(base, name)
        os.makedirs(directory, exist_ok=True)
        log = open(os.path.join(directory, "redis.log"), "ab")  # noqa: SIM115 (child keeps it)
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory]
            + ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
            + ["--daemonize", "no", "--protected-mode", "no", *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(proc)
        return proc

    def wait(condition, timeout: float, what: str, poll: float = 0.02):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except (OSError, ConnectionError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(poll)

    def ping(port: int) -> bool:
        with Resp(port) as r:
            return r.command("PING") == "PONG"

    try:
        master = start("redis-master", master_port)
        wait(lambda: ping(master_port), 30, "the Redis master")
        replica = start("redis-replica", replica_port, "--replicaof", "127.0.0.1", str(master_port))
        wait(lambda: ping(replica_port), 30, "the Redis replica")

        def linked() -> bool:
            with Resp(replica_port) as r:
                info = r.command("INFO", "replication").decode()
            return "master_link_status:up" in info

        wait(linked, 30, "the Redis replica to link to its master")
        value = b"x" * size
        cmd = [benchmark, "-h", "127.0.0.1", "-p", str(master_port), "-q"]
        cmd += ["-c", str(clients), "-P", str(pipeline), "-n", str(entries)]
        cmd += ["XADD", "bench", "*", "d", value.decode()]
        with Resp(replica_port) as watcher:
            started = time.monotonic()
            bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(bench)
            length = 0
            deadline = started + 600
            while length < entries:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Redis replica holds {length} of {entries} entries")
                time.sleep(0.002)
                length = watcher.command("XLEN", "bench")
                if length < entries and bench.poll() not in (None, 0):
                    raise RuntimeError(f"redis-benchmark exited {bench.returncode}")
            replicated = time.monotonic()
        out, _ = bench.communicate(timeout=600)
        benched = time.monotonic()
        with Resp(master_port) as r:
            master_len = r.command("XLEN", "bench")
        peak = {"master": rss_hwm_kib(master.pid), "replica": rss_hwm_kib(replica.pid)}
        return {
            "entries": entries,
            "size": size,
            "pipeline": pipeline,
            "clients": clients,
            "master_xlen": master_len,
            "seconds": replicated - started,
            "entries_per_s": entries / (replicated - started),
            "benchmark_seconds": benched - started,
            "benchmark_output": out.decode(errors="replace").strip().splitlines()[-1:],
            "peak_rss_kib": peak,
            "version": redis_version(server),
        }
    finally:
        for proc in reversed(procs):
            stop_pid(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("zmq-pub")
    pub.add_argument("--pub", required=True)
    pub.add_argument("--pull", required=True)
    pub.add_argument("--subscribers", type=int, default=2)
    pub.add_argument("--entries", type=int, required=True)
    pub.add_argument("--batch", type=int, default=1000)
    pub.add_argument("--size", type=int, default=100)
    pub.set_defaults(func=zmq_publisher)
    subscriber = sub.add_parser("zmq-sub")
    subscriber.add_argument("--sub", required=True)
    subscriber.add_argument("--push", required=True)
    subscriber.add_argument("--entries", type=int, required=True)
    subscriber.set_defaults(func=zmq_subscriber)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
