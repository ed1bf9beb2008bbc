"""`walrep load`: a load generator that keeps many requests in flight.

Each entry's payload carries its id, so a checker can match the log against the
history written with --log (one JSON line per entry: id, seq, outcome).
"""

from __future__ import annotations

import json
import sys
import time

import trio

from .client import AppendRefused, AppendUnknown, open_client


def payload_for(entry_id: int, size: int) -> bytes:
    head = b"load-%012d-" % entry_id
    return (head + b"x" * max(0, size - len(head)))[: max(size, len(head))]


async def run_load(args) -> int:
    count, batch = args.count, args.batch
    batches = [(start, min(batch, count - start)) for start in range(0, count, batch)]
    outcomes: list[tuple[int, int | None, str]] = []
    latencies: list[float] = []  # seconds from send to acknowledgement, per request
    failures = 0
    log_file = open(args.log, "w") if args.log else None  # noqa: SIM115 (closed below)
    started = time.monotonic()
    try:
        async with open_client(
            args.ingest, timeout=args.timeout, ack=args.ack, keys=args.keys
        ) as client:
            next_batch = 0
            interval = batch / args.rate if args.rate else 0.0
            paced_from = trio.current_time()  # trio's clock, not time.monotonic()
            ack_level = args.ack or "leader-default"

            def record(first_id, n, seq_first, outcome, attempts):
                results = [
                    (first_id + i, None if seq_first is None else seq_first + i, outcome)
                    for i in range(n)
                ]
                outcomes.extend(results)
                if log_file is not None:
                    for entry_id, seq, result in results:
                        line = {
                            "id": entry_id,
                            "seq": seq,
                            "outcome": result,
                            "ack": ack_level,
                            "attempts": attempts,
                        }
                        log_file.write(json.dumps(line) + "\n")
                    log_file.flush()  # a history that survives this process being killed

            # Protected from KeyboardInterrupt, which trio could otherwise raise at any
            # line (between a reply and its history line, say): Ctrl-C reaches the
            # workers as cancellation, at an await, where the handler below logs it.
            @trio.lowlevel.enable_ki_protection
            async def worker():
                nonlocal next_batch, failures
                while next_batch < len(batches):
                    index = next_batch
                    next_batch += 1
                    if interval:
                        await trio.sleep_until(paced_from + index * interval)
                    first_id, n = batches[index]
                    payloads = [payload_for(first_id + i, args.size) for i in range(n)]
                    sent_at = time.monotonic()
                    try:
                        receipt = await client.append_batch_receipt(
                            payloads, retries=args.retries, nowait=args.nowait
                        )
                    except AppendUnknown as exc:
                        record(first_id, n, None, "unknown", exc.attempts)
                        failures += n
                    except AppendRefused as exc:
                        record(first_id, n, None, "failed", exc.attempts)
                        failures += n
                    except trio.Cancelled:
                        # Interrupted (Ctrl-C, SIGINT) while in flight: the entries may
                        # or may not be committed, and the history must say so, or a
                        # checker would take them for appends nobody asked for.
                        record(first_id, n, None, "unknown", 1)
                        raise
                    else:
                        latencies.append(time.monotonic() - sent_at)
                        record(first_id, n, receipt.first_seq, "ok", receipt.attempts)

            async with trio.open_nursery() as nursery:
                for _ in range(min(args.inflight, len(batches))):
                    nursery.start_soon(worker)
    finally:
        if log_file is not None:
            log_file.close()
    elapsed = time.monotonic() - started
    ok = sum(1 for _, _, outcome in outcomes if outcome == "ok")
    rate = ok / elapsed
    print(f"{ok} of {count} entries acknowledged in {elapsed:.2f} s: {rate:,.0f} entries/s")
    percentiles = latency_percentiles(latencies)
    if percentiles:
        print(
            "commit latency per request: "
            + " ".join(f"{name} {value:.2f} ms" for name, value in percentiles.items())
        )
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(
                {
                    "count": count,
                    "acknowledged": ok,
                    "seconds": elapsed,
                    "entries_per_s": rate,
                    "ack": args.ack,
                    "latency_ms": percentiles,
                },
                f,
            )
    if failures:
        print(f"walrep load: {failures} entries not acknowledged (see --log)", file=sys.stderr)
        return 1
    return 0


def latency_percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p99 and p99.9 in milliseconds (nearest rank), or {} with no samples."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {"p50": rank(0.50), "p99": rank(0.99), "p99.9": rank(0.999)}
