"""Local WAL throughput next to raw baselines measured in the same run.

Usage: python scripts/bench_wal.py [--entries N] [--size BYTES] [--json FILE]

Rows (100-byte payloads by default):
- append_raw, one call per entry, and append_batch (1000 per call), in async and
  fdatasync mode; each waits at the end until everything is durable.
- baseline: the same prebuilt frames written with os.write, 1000 per write, plus
  one fdatasync per write in the fdatasync rows: what the disk and kernel allow
  with no WAL logic at all.
- scan: CRC-verified read of the whole log through WALReader, next to reading
  the same files' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

from walrep import node
from walrep.node import format as fmt
from walrep.node import reader

BATCH = 1000


def bench_walrep(directory: str, mode: str, payload: bytes, count: int, batched: bool) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    writer = node.Writer(directory, sync_mode=mode, buffer_entries=100_000)
    try:
        started = time.perf_counter()
        if batched:
            batch = [payload] * BATCH
            for _ in range(count // BATCH):
                writer.append_batch(batch)
        else:
            append = writer.append_raw
            for _ in range(count):
                append(payload)
        writer.wait_durable(writer.current_sequence(), timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        writer.close()
    return count / elapsed


def bench_raw(directory: str, mode: str, payload: bytes, count: int) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    frame = fmt.encode_entry(time.time_ns() // 1000, payload)
    block = frame * BATCH
    fd = os.open(os.path.join(directory, "raw.wal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, fmt.FILE_HEADER)
        started = time.perf_counter()
        for _ in range(count // BATCH):
            os.write(fd, block)
            if mode == "fdatasync":
                os.fdatasync(fd)
        os.fdatasync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return count / elapsed


def bench_scan(directory: str) -> tuple[float, float, int]:
    reader = node.WALReader(directory)
    started = time.perf_counter()
    seen = 0
    for _entry in reader.raw_entries():
        seen += 1
    scan_rate = seen / (time.perf_counter() - started)
    started = time.perf_counter()
    total = 0
    for segment in reader.segments():
        with open(segment.path, "rb") as f:
            total = zlib.adler32(f.read(), total)  # touch the bytes, cheaply
    read_rate = seen / (time.perf_counter() - started)
    return scan_rate, read_rate, seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--json", default="bench-results/bench_wal.json")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    count = args.entries // BATCH * BATCH
    payload = os.urandom(args.size)
    base = tempfile.mkdtemp(prefix="walrep-bench-", dir=args.dir)
    rows = []
    try:
        for mode in ("async", "fdatasync"):
            raw = bench_raw(os.path.join(base, "raw"), mode, payload, count)
            for batched in (False, True):
                rate = bench_walrep(os.path.join(base, "wal"), mode, payload, count, batched)
                name = f"append_batch x{BATCH}" if batched else "append_raw per entry"
                rows.append(
                    {
                        "what": name,
                        "mode": mode,
                        "entries_per_s": rate,
                        "baseline": f"os.write x{BATCH}"
                        + (" + fdatasync" if mode == "fdatasync" else ""),
                        "baseline_entries_per_s": raw,
                        "ratio": rate / raw,
                    }
                )
        scan_rate, read_rate, seen = bench_scan(os.path.join(base, "wal"))
        rows.append(
            {
                "what": f"scan (CRC-verified, {seen} entries)",
                "mode": "-",
                "entries_per_s": scan_rate,
                "baseline": "read the same files",
                "baseline_entries_per_s": read_rate,
                "ratio": scan_rate / read_rate,
            }
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"{'what':34} {'mode':10} {'entries/s':>12} {'baseline':>28} {'entries/s':>12} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['what']:34} {r['mode']:10} {r['entries_per_s']:12,.0f} "
            f"{r['baseline']:>28} {r['baseline_entries_per_s']:12,.0f} {r['ratio']:6.2f}"
        )
    if reader._scan_fast is not None:
        from walrep.node import _scan

        print(f"scan implementation: C extension node._scan (CRC-32: {_scan.CRC_IMPLEMENTATION})")
    else:
        print("scan implementation: pure Python (node._scan not built, or WALREP_PURE_PYTHON=1)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "payload_bytes": args.size,
                "entries": count,
                "cpu_count": os.cpu_count(),
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
