"""Replication figures on this machine: real processes on loopback, fdatasync everywhere.

Usage: python scripts/bench_replication.py [--entries N] [--behind N] [--json FILE]

- replicated throughput: `walrep load` into a leader with 2 readers, timed until
  both readers hold every entry, for ack levels local and replicas=1;
- end-to-end lag at a steady 10 k entries/s: the commit latency of replicas=1
  requests (append, durable on a reader, ack back to the leader, reply), which
  bounds the append-to-durable-on-a-reader lag from above;
- catch-up: a reader N entries behind, timed from its start until it holds all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from walrep.cluster.procs import LocalCluster, wait_for


def started(cluster: LocalCluster) -> LocalCluster:
    cluster.start()
    wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
    return cluster


def run_load(cluster: LocalCluster, count: int, *extra: str) -> dict:
    summary = os.path.join(cluster.base, f"summary-{time.monotonic_ns()}.json")
    result = cluster.load(count, "--summary", summary, *extra, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"walrep load failed:\n{result.stdout}{result.stderr}")
    with open(summary) as f:
        return json.load(f)


def throughput(base: str, count: int, ack: str) -> dict:
    cluster = started(LocalCluster(os.path.join(base, f"tp-{ack}"), readers=2))
    try:
        began = time.monotonic()
        summary = run_load(cluster, count, "--ack", ack, "--batch", "1000", "--inflight", "16")
        cluster.wait_converged(timeout=300)
        elapsed = time.monotonic() - began
        return {
            "ack": ack,
            "entries": count,
            "acked_per_s": summary["entries_per_s"],
            "replicated_per_s": count / elapsed,
        }
    finally:
        cluster.stop()


def steady_latency(base: str, rate: int, seconds: float, ack: str) -> dict:
    cluster = started(LocalCluster(os.path.join(base, f"lat-{ack}"), readers=2))
    try:
        count = int(rate * seconds)
        summary = run_load(
            cluster, count, "--ack", ack, "--rate", str(rate), "--batch", "10", "--inflight", "64"
        )
        return {
            "ack": ack,
            "rate": rate,
            "latency_ms": summary["latency_ms"],
            "achieved_per_s": summary["entries_per_s"],
        }
    finally:
        cluster.stop()


def catch_up(base: str, behind: int) -> dict:
    cluster = started(LocalCluster(os.path.join(base, "catchup"), readers=1))
    try:
        reader = cluster.reader_nodes[0]
        run_load(cluster, 1000, "--batch", "1000")
        cluster.wait_converged(timeout=60)
        reader.stop()
        run_load(cluster, behind, "--batch", "1000", "--inflight", "16")
        began = time.monotonic()
        reader.start()
        cluster.wait_converged(timeout=600)
        elapsed = time.monotonic() - began
        return {"behind": behind, "seconds": elapsed, "entries_per_s": behind / elapsed}
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--behind", type=int, default=500_000)
    parser.add_argument("--json", default="bench-results/bench_replication.json")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="walrep-bench-repl-")
    try:
        results = {
            "throughput": [throughput(base, args.entries, ack) for ack in ("local", "replicas=1")],
            "latency": [steady_latency(base, 10_000, 10.0, ack) for ack in ("local", "replicas=1")],
            "catch_up": catch_up(base, args.behind),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("replicated throughput (100-byte entries, leader + 2 readers, fdatasync everywhere):")
    for row in results["throughput"]:
        print(
            f"  ack={row['ack']:11} acknowledged {row['acked_per_s']:10,.0f}/s   "
            f"held by both readers {row['replicated_per_s']:10,.0f}/s"
        )
    print("commit latency at a steady 10 k entries/s (requests of 10 entries):")
    for row in results["latency"]:
        lat = row["latency_ms"]
        print(
            f"  ack={row['ack']:11} p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  "
            f"p99.9 {lat['p99.9']:.2f} ms"
        )
    cu = results["catch_up"]
    print(
        f"catch-up of a reader {cu['behind']:,} entries behind: {cu['seconds']:.2f} s, "
        f"{cu['entries_per_s']:,.0f} entries/s"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
