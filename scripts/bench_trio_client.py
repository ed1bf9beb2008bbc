"""The paced load of `make bench`'s latency rows, sent by the trio client
(`cluster.client.open_client`) instead of `walrep load`: one task per request,
started on schedule, at most 64 in flight. Tuned like every walrep process
(cluster.cli.tune_for_latency) and run as its own process, so that it shares
neither a GIL nor a switch interval with the bench.

    python scripts/bench_trio_client.py --ingest EP --rate 10000 --seconds 8 \\
        --batch 10 --ack replicas=1 --summary FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

from walrep.cluster.cli import tune_for_latency
from walrep.cluster.client import open_client
from walrep.cluster.loadgen import latency_percentiles, payload_for

IN_FLIGHT = 64


async def paced_load(ingest: str, rate: float, seconds: float, batch: int, ack: str):
    latencies: list[float] = []
    window = trio.Semaphore(IN_FLIGHT)

    async def one(client, payloads: list[bytes]) -> None:
        async with window:
            sent_at = time.monotonic()
            await client.append_batch(payloads, ack=ack)
            latencies.append(time.monotonic() - sent_at)

    async with open_client(ingest) as client, trio.open_nursery() as nursery:
        paced_from = trio.current_time()
        for i in range(int(rate * seconds / batch)):
            await trio.sleep_until(paced_from + i * batch / rate)
            nursery.start_soon(one, client, [payload_for(i * batch + j, 100) for j in range(batch)])
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest", required=True)
    parser.add_argument("--rate", type=float, required=True, help="entries/s")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--batch", type=int, required=True, help="entries per request")
    parser.add_argument("--ack", required=True)
    parser.add_argument("--summary", required=True, help="JSON like walrep load --summary")
    args = parser.parse_args()
    tune_for_latency()
    started = time.monotonic()
    latencies = trio.run(paced_load, args.ingest, args.rate, args.seconds, args.batch, args.ack)
    elapsed = time.monotonic() - started
    with open(args.summary, "w") as f:
        json.dump(
            {
                "acknowledged": len(latencies) * args.batch,
                "seconds": elapsed,
                "entries_per_s": len(latencies) * args.batch / elapsed,
                "ack": args.ack,
                "latency_ms": latency_percentiles(latencies),
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
