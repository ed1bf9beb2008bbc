"""A process for test_crash.py to kill: appends durably in a loop and reports progress.

Usage: python crash_child.py WAL_DIR PROGRESS_FILE SEED MAX_SIZE_BYTES

Several threads append (single entries, batches, enveloped entries) with
sync_mode=fdatasync and wait for durability; a commit hook reports every
committed run as well (in fdatasync mode committed means synced). Each durable
entry is reported as a line ``<seq> <sha256 of payload>`` in PROGRESS_FILE,
written only after the writer said the entry is durable. The parent kills this
process with SIGKILL at random moments; it never exits on its own.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading

from walrep import node
from walrep.node.reader import decode_frames

THREADS = 3


def main() -> None:
    wal_dir, progress_path = sys.argv[1], sys.argv[2]
    seed, max_size = int(sys.argv[3]), int(sys.argv[4])
    with open(progress_path, "a", buffering=1) as progress:  # line-buffered
        run(wal_dir, progress, seed, max_size)


def run(wal_dir: str, progress, seed: int, max_size: int) -> None:
    lock = threading.Lock()

    def report(pairs) -> None:
        text = "".join(f"{seq} {hashlib.sha256(p).hexdigest()}\n" for seq, p in pairs)
        with lock:
            progress.write(text)

    writer = node.Writer(wal_dir, sync_mode="fdatasync", max_size_bytes=max_size)

    def on_commit(committed: node.CommittedRun) -> None:
        frames = decode_frames(committed.data, committed.first_seq)
        report((seq, p) for seq, _ts, p in frames)

    writer.set_commit_hook(on_commit)
    with lock:
        progress.write(f"# ready {writer.current_sequence()}\n")

    def appender(tid: int) -> None:
        try:
            append_forever(tid)
        except BaseException as exc:  # tell the parent why progress stopped
            with lock:
                progress.write(f"# error {exc!r}\n")
            os._exit(3)

    def append_forever(tid: int) -> None:
        rng = random.Random(seed * 100 + tid)
        counter = 0
        while True:
            counter += 1
            tag = f"{seed}:{tid}:{counter}:".encode()
            payload = tag + rng.randbytes(rng.randrange(0, 600))
            choice = rng.random()
            if choice < 0.5:
                seq = writer.append_raw(payload, durable=True, timeout=30)
                report([(seq, payload)])
            elif choice < 0.8:
                payloads = [payload + bytes([i]) for i in range(rng.randrange(1, 5))]
                first, _last = writer.append_batch(payloads, durable=True, timeout=30)
                report((first + i, p) for i, p in enumerate(payloads))
            else:
                seq = writer.append_raw_with_meta("db", payload, durable=True, timeout=30)
                report([(seq, node.format.encode_envelope("db", payload))])

    threads = [threading.Thread(target=appender, args=(t,), daemon=True) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
