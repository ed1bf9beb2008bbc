"""Replication with CURVE on versus off, in the same run: throughput and commit latency.

Usage: python scripts/bench_curve.py [--entries N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from walrep.cluster import security
from walrep.cluster.procs import LocalCluster, wait_for


def make_keys(base: str) -> dict[str, str]:
    os.makedirs(os.path.join(base, "readers"))
    os.makedirs(os.path.join(base, "clients"))
    paths = {}
    for name in ("leader", "reader-1", "reader-2", "client"):
        key, pub = security.keygen(os.path.join(base, name))
        paths[name] = key
        paths[name + ".pub"] = pub
        folder = "clients" if name == "client" else "readers" if name != "leader" else None
        if folder:
            shutil.copy(pub, os.path.join(base, folder))
    return paths


def run(base: str, curve: bool, entries: int) -> dict:
    keys = make_keys(os.path.join(base, "keys")) if curve else None
    leader_extra, client = [], []
    if keys:
        leader_extra = [
            "--key",
            keys["leader"],
            "--allow-readers",
            os.path.join(base, "keys", "readers"),
            "--allow-clients",
            os.path.join(base, "keys", "clients"),
        ]
        client = ["--key", keys["client"], "--leader-key", keys["leader.pub"]]
    cluster = LocalCluster(os.path.join(base, "c"), readers=0, leader_extra=leader_extra)
    for i in (1, 2):
        extra = ["--key", keys[f"reader-{i}"], "--leader-key", keys["leader.pub"]] if keys else []
        cluster.reader_nodes.append(cluster.make_reader(f"reader-{i}", *extra))
    try:
        cluster.start()
        wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader")
        began = time.monotonic()
        result = cluster.load(entries, "--batch", "1000", "--inflight", "16", *client, timeout=600)
        assert result.returncode == 0, result.stderr
        cluster.wait_converged(timeout=600)
        throughput = entries / (time.monotonic() - began)
        summary = os.path.join(base, "lat.json")
        result = cluster.load(
            50_000,
            "--rate",
            "10000",
            "--batch",
            "10",
            "--inflight",
            "64",
            "--ack",
            "replicas=1",
            "--summary",
            summary,
            *client,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        with open(summary) as f:
            latency = json.load(f)["latency_ms"]
        return {"curve": curve, "replicated_per_s": throughput, "latency_ms": latency}
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300_000)
    args = parser.parse_args()
    rows = []
    for curve in (False, True):
        base = tempfile.mkdtemp(prefix="walrep-curve-")
        try:
            rows.append(run(base, curve, args.entries))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    off, on = rows
    print("leader + 2 readers, fdatasync, 100-byte entries; latency at 10 k/s with replicas=1")
    for row in rows:
        lat = row["latency_ms"]
        print(
            f"  CURVE {'on ' if row['curve'] else 'off'}: {row['replicated_per_s']:10,.0f} "
            f"entries/s replicated   p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms"
        )
    print(f"  throughput ratio on/off: {on['replicated_per_s'] / off['replicated_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
