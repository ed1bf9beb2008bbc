"""PUB->SUB receive throughput through cluster.zmqtrio next to raw blocking pyzmq.

Usage: python scripts/bench_zmqtrio.py [--entries N] [--runs R] [--json FILE]

A child process publishes 100-byte entries from a blocking pyzmq XPUB with
XPUB_NODROP, so nothing is dropped and the rate is set by the receiver.
The receiver, in this process over loopback TCP, is one of:
- raw: a blocking pyzmq SUB, no trio (the ceiling);
- adapter: a TrioSocket in trio, one ``await recv()`` per message;
- adapter+drain: one ``await recv()``, then ``recv_nowait()`` until it
  would block (what a consumer that handles messages in batches does).
Each shape is run with one entry per message and with 100 entries per
message. Rates are entries per second, median of the runs, and every
adapter row gives its ratio to the raw row of the same shape. The raw row
can be limited by the Python publisher rather than by the receiver; the
load average is printed because other work on the machine moves all rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import trio
import zmq

from walrep.cluster.zmqtrio import make_socket

ENTRY_BYTES = 100
BATCH = 100
# Deep queues on both sides: the receiver, not back-pressure, sets the pace.
HWM = 100_000
# Bounds a broken run; a healthy one takes a few seconds at most.
RUN_TIMEOUT_S = 120.0


def publish(endpoint: str, messages: int, entries_per_message: int) -> None:
    """Child process: wait for the subscription, then publish as fast as possible."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, HWM)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.LINGER, -1)  # deliver everything before exiting
    pub.connect(endpoint)
    pub.recv()  # the subscription: from now on nothing is dropped
    message = b"e" * (ENTRY_BYTES * entries_per_message)
    for _ in range(messages):
        pub.send(message)
    pub.close()
    ctx.term()


def start_publisher(endpoint: str, messages: int, entries_per_message: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--publish",
            endpoint,
            str(messages),
            str(entries_per_message),
        ]
    )


def receive_raw(messages: int, entries_per_message: int) -> float:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, HWM)
    sub.setsockopt(zmq.RCVTIMEO, int(RUN_TIMEOUT_S * 1000))
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    endpoint = sub.bind("tcp://127.0.0.1:*").addr
    child = start_publisher(endpoint, messages, entries_per_message)
    try:
        recv = sub.recv
        recv()  # the clock starts at the first message
        started = time.perf_counter()
        for _ in range(messages - 1):
            recv()
        elapsed = time.perf_counter() - started
    finally:
        child.wait()
        sub.close()
        ctx.term()
    return (messages - 1) * entries_per_message / elapsed


def receive_adapter(messages: int, entries_per_message: int, drain: bool) -> float:
    async def main() -> float:
        ctx = zmq.Context()
        sub = make_socket(ctx, zmq.SUB, hwm=HWM)
        endpoint = sub.bind("tcp://127.0.0.1:*")
        sub.subscribe(b"")
        child = start_publisher(endpoint, messages, entries_per_message)
        try:
            with trio.fail_after(RUN_TIMEOUT_S):
                await sub.recv()
                started = time.perf_counter()
                left = messages - 1
                while left:
                    await sub.recv()
                    left -= 1
                    if drain:
                        while left:
                            try:
                                sub.recv_nowait()
                            except trio.WouldBlock:
                                break
                            left -= 1
                elapsed = time.perf_counter() - started
        finally:
            await sub.aclose()
            child.wait()
            ctx.term()
        return (messages - 1) * entries_per_message / elapsed

    return trio.run(main)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--publish":
        publish(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300_000, help="entries per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    receivers = {
        "raw": receive_raw,
        "adapter": lambda m, e: receive_adapter(m, e, drain=False),
        "adapter+drain": lambda m, e: receive_adapter(m, e, drain=True),
    }
    results = []
    print(
        f"PUB->SUB over tcp loopback, {ENTRY_BYTES}-byte entries, "
        f"{args.entries} entries per run, median of {args.runs}, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    print(f"{'shape':<22}{'receiver':<16}{'entries/s':>14}{'msg/s':>12}{'vs raw':>8}")
    for entries_per_message in (1, BATCH):
        shape = "1 entry/message" if entries_per_message == 1 else f"{BATCH} entries/message"
        messages = args.entries // entries_per_message
        raw_rate = None
        for name, receive in receivers.items():
            rate = statistics.median(
                receive(messages, entries_per_message) for _ in range(args.runs)
            )
            raw_rate = raw_rate or rate
            ratio = rate / raw_rate
            results.append(
                {
                    "shape": shape,
                    "receiver": name,
                    "entries_per_s": rate,
                    "messages_per_s": rate / entries_per_message,
                    "ratio_to_raw": ratio,
                }
            )
            print(
                f"{shape:<22}{name:<16}{rate:>14,.0f}"
                f"{rate / entries_per_message:>12,.0f}{ratio:>8.2f}"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
