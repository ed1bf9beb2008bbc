"""Latency baseline for scripts/bench.py: walrep's commit path, bare, on blocking pyzmq.

The latency rows send `walrep load` to a walrep leader with two readers. This runs
the same path with the same messages and nothing else, so that the bench can put
beside walrep's figure what Python, pyzmq, loopback TCP and this disk cost by
themselves on the same machine in the same run:

- leader: a ROUTER takes `walrep load`'s Append requests. Each burst of requests
  that has arrived is encoded into ARCW frames, written with one os.write and one
  fdatasync, and published on a PUB. A request is answered with Appended once its
  entries are synced here and acked by as many readers as its ack level asks.
- reader: a SUB takes each burst, writes it with one os.write and one fdatasync,
  and acks the last sequence on a DEALER.

One thread per process, blocking on zmq.Poller: no trio, no protocol state, no
dedup, no metrics, no retention, no recovery. Tuned like walrep's processes
(cluster.cli.tune_for_latency).

    python scripts/bench_pipeline.py leader --dir D --ingest EP --publish EP \\
        --acks EP --readers 2
    python scripts/bench_pipeline.py reader --dir D --publish EP --acks EP --id reader-1

The leader prints one line, "ready", once every reader receives what it
publishes (the PUB/SUB slow joiner), and only then binds --ingest.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time

import zmq
from bench_baselines import stop_pid

from walrep.cluster import wire
from walrep.cluster.cli import tune_for_latency
from walrep.cluster.config import parse_ack
from walrep.cluster.procs import free_ports
from walrep.node import format as fmt

BURST_HEAD = struct.Struct(">QI")  # first sequence, entry count; then the frames
PROBE = b"probe"
JOIN_TIMEOUT_S = 30.0
HERE = os.path.abspath(__file__)


def _open_log(directory: str) -> int:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(
        os.path.join(directory, fmt.segment_name(1)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    os.write(fd, fmt.FILE_HEADER)
    os.fdatasync(fd)
    return fd


def _wait_for_readers(pub: zmq.Socket, acks: zmq.Socket, readers: int) -> None:
    """Probe on the PUB until every reader has answered one (it then gets everything)."""
    joined: set[bytes] = set()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while len(joined) < readers:
        if time.monotonic() > deadline:
            raise SystemExit(f"pipeline leader: {len(joined)} of {readers} readers joined")
        pub.send(PROBE)
        while acks.poll(10):
            reader, body = acks.recv_multipart()
            if body == PROBE:
                joined.add(reader)


def run_leader(args: argparse.Namespace) -> int:
    ctx = zmq.Context()
    pub, acks, ingest = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (pub, acks, ingest):
        sock.setsockopt(zmq.LINGER, 0)
    fd = _open_log(args.dir)
    try:
        pub.bind(args.publish)
        acks.bind(args.acks)
        _wait_for_readers(pub, acks, args.readers)
        ingest.bind(args.ingest)
        print("ready", flush=True)
        _lead(fd, pub, acks, ingest)
    finally:
        os.close(fd)
        for sock in (pub, acks, ingest):
            sock.close()
        ctx.term()
    return 0


def _lead(fd: int, pub: zmq.Socket, acks: zmq.Socket, ingest: zmq.Socket) -> None:
    head = 0  # last sequence written and synced
    acked: dict[bytes, int] = {}  # reader -> last sequence it has synced
    waiting: list[tuple[bytes, int, int, int, int]] = []  # peer, request, first, last, replicas
    poller = zmq.Poller()
    poller.register(ingest, zmq.POLLIN)
    poller.register(acks, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if ingest in ready:
            first = head + 1
            frames = []
            now_us = time.time_ns() // 1000
            while True:
                try:
                    peer, data = ingest.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                request = wire.decode(data)
                replicas = parse_ack(request.ack or "local") or 0
                request_first = first + len(frames)
                frames.extend(fmt.encode_entry(now_us, p) for p in request.payloads)
                last = first + len(frames) - 1
                waiting.append((peer, request.request_id, request_first, last, replicas))
            if frames:
                block = b"".join(frames)
                os.write(fd, block)
                os.fdatasync(fd)
                head += len(frames)
                pub.send_multipart([BURST_HEAD.pack(first, len(frames)), block])
        if acks in ready:
            while True:
                try:
                    reader, body = acks.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if body != PROBE:
                    acked[reader] = max(acked.get(reader, 0), int.from_bytes(body, "big"))
        if waiting:
            by_reader = sorted(acked.values(), reverse=True)
            still = []
            for peer, request_id, first_seq, last_seq, replicas in waiting:
                held = head if not replicas else min(head, _nth(by_reader, replicas))
                if last_seq <= held:
                    reply = wire.encode(wire.Appended(request_id, first_seq, last_seq))
                    ingest.send_multipart([peer, reply])
                else:
                    still.append((peer, request_id, first_seq, last_seq, replicas))
            waiting = still


def _nth(values: list[int], n: int) -> int:
    return values[n - 1] if len(values) >= n else 0


def run_reader(args: argparse.Namespace) -> int:
    ctx = zmq.Context()
    sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
    for sock in (sub, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, args.id.encode())
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    fd = _open_log(args.dir)
    try:
        sub.connect(args.publish)
        dealer.connect(args.acks)
        _follow(fd, sub, dealer)
    finally:
        os.close(fd)
        sub.close()
        dealer.close()
        ctx.term()
    return 0


def _follow(fd: int, sub: zmq.Socket, dealer: zmq.Socket) -> None:
    while True:
        parts = [sub.recv_multipart()]
        while True:
            try:
                parts.append(sub.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        blocks, last = [], 0
        for message in parts:
            if message == [PROBE]:
                dealer.send(PROBE)
                continue
            first, count = BURST_HEAD.unpack(message[0])
            blocks.append(message[1])
            last = first + count - 1
        if blocks:
            os.write(fd, b"".join(blocks))
            os.fdatasync(fd)
            dealer.send(last.to_bytes(8, "big"))


class _Process:
    """One pipeline process, as scripts/bench.py's run_load and dead_nodes see a node."""

    def __init__(self, name: str, base: str, argv: list[str]):
        self.name = name
        self.log_path = os.path.join(base, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, HERE, *argv], stdout=subprocess.PIPE, stderr=log
            )
        self.pid = self.proc.pid

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_pid(self.proc)
        self.proc.stdout.close()


class Pipeline:
    """A pipeline leader and its readers, started in base (stopped by stop())."""

    def __init__(self, base: str, readers: int = 2):
        self.base = base
        os.makedirs(base, exist_ok=True)
        ingest, publish, acks = free_ports(3)
        self.ingest = f"tcp://127.0.0.1:{ingest}"
        endpoints = ["--publish", f"tcp://127.0.0.1:{publish}", "--acks", f"tcp://127.0.0.1:{acks}"]
        self.processes: list[_Process] = []
        try:
            self.processes.append(
                _Process(
                    "leader",
                    base,
                    ["leader", "--dir", os.path.join(base, "leader"), "--ingest", self.ingest]
                    + endpoints
                    + ["--readers", str(readers)],
                )
            )
            for i in range(1, readers + 1):
                name = f"reader-{i}"
                self.processes.append(
                    _Process(
                        name,
                        base,
                        ["reader", "--dir", os.path.join(base, name), "--id", name] + endpoints,
                    )
                )
            line = self.processes[0].proc.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(
                    f"the pipeline leader did not start: {self.processes[0].log_text().strip()}"
                )
        except BaseException:
            self.stop()
            raise

    def nodes(self) -> list[_Process]:
        return self.processes

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    leader = roles.add_parser("leader")
    leader.add_argument("--dir", required=True)
    leader.add_argument("--ingest", required=True)
    leader.add_argument("--publish", required=True)
    leader.add_argument("--acks", required=True)
    leader.add_argument("--readers", type=int, required=True)
    reader = roles.add_parser("reader")
    reader.add_argument("--dir", required=True)
    reader.add_argument("--publish", required=True)
    reader.add_argument("--acks", required=True)
    reader.add_argument("--id", required=True)
    args = parser.parse_args()
    tune_for_latency()
    return run_leader(args) if args.role == "leader" else run_reader(args)


if __name__ == "__main__":
    sys.exit(main())
