"""`make demo`: a leader and two readers from configs/, a crash, and a catch-up.

Run from the repository root. Everything it starts it stops, by pid; data goes
to demo-data/ (removed at the start of each run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import node  # noqa: E402
from cluster.procs import NodeProcess, wait_for, walrep_command  # noqa: E402

DATA = os.path.join(ROOT, "demo-data")
INGEST = "tcp://127.0.0.1:7100"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def walrep(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        walrep_command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if result.returncode != 0:
        raise SystemExit(f"walrep {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout.strip()


def node_process(name: str, role: str) -> NodeProcess:
    config = os.path.join("configs", f"{name}.toml")
    return NodeProcess(
        name,
        [role, "--config", config],
        os.path.join(DATA, name),
        os.path.join(DATA, f"{name}.log"),
    )


def start(proc: NodeProcess) -> None:
    proc.start()
    print(f"   started {proc.name} (pid {proc.pid}), log in demo-data/{proc.name}.log")


def show(nodes: list[NodeProcess]) -> None:
    head = nodes[0].last_seq()
    print(f"   {'node':10} {'last seq':>9} {'digest of 1..' + str(head):>36}  matches leader")
    leader_digest = node.WALReader(nodes[0].wal_dir).digest(1, head) if head else "-"
    for proc in nodes:
        last = proc.last_seq()
        try:
            digest = node.WALReader(proc.wal_dir).digest(1, head) if head else "-"
        except node.RangeNotAvailable:
            digest = "(does not hold the whole range)"
        same = "yes" if digest == leader_digest else "NO"
        print(f"   {proc.name:10} {last:>9} {digest:>36}  {same}")


def main() -> int:
    os.chdir(ROOT)
    shutil.rmtree(DATA, ignore_errors=True)
    os.makedirs(DATA)
    leader = node_process("leader", "leader")
    readers = [node_process("reader-1", "reader"), node_process("reader-2", "reader")]
    nodes = [leader, *readers]
    try:
        say("Starting a leader and two readers from configs/")
        for proc in nodes:
            start(proc)

        wait_for(lambda: "leader-started" in leader.log_text(), 30, "the leader to start")
        say("Appending one entry with `walrep append`")
        record = '{"measurement": "cpu", "host": "demo", "value": 0.5}'
        seq = walrep("append", "--ingest", INGEST, record)
        print(f"   walrep append --ingest {INGEST} '{record}' -> sequence {seq}")

        say("Writing 20,000 entries with `walrep load`")
        print("   " + walrep("load", "--ingest", INGEST, "--count", "20000"))
        wait_for(
            lambda: all(r.last_seq() == leader.last_seq() for r in readers),
            60,
            "both readers to hold everything",
        )
        show(nodes)

        say("Killing reader-2 with SIGKILL, then writing 30,000 more entries")
        readers[1].kill()
        print(f"   reader-2 (pid {readers[1].pid}) killed")
        print("   " + walrep("load", "--ingest", INGEST, "--count", "30000"))
        show(nodes)

        say("Restarting reader-2: it hand-shakes, sees the gap and fetches it from the leader")
        started = time.monotonic()
        start(readers[1])
        wait_for(lambda: readers[1].last_seq() == leader.last_seq(), 60, "reader-2 to catch up")
        print(f"   reader-2 caught up in {time.monotonic() - started:.2f} s")
        show(nodes)

        say("The logs are byte-identical; `walrep dump` shows the last entry of each")
        for proc in nodes:
            last = proc.last_seq()
            line = walrep("dump", proc.wal_dir, "--from-seq", str(last), "--json")
            print(f"   {proc.name:10} {line[:110]}")
        ok = len({node.WALReader(p.wal_dir).digest(1, leader.last_seq()) for p in nodes}) == 1
        say("Result: " + ("all three logs match" if ok else "LOGS DIFFER"))
        return 0 if ok else 1
    finally:
        say("Stopping every process it started (SIGTERM by pid)")
        for proc in reversed(nodes):
            code = proc.stop()
            if code is not None:
                print(f"   {proc.name} exited with status {code}")


if __name__ == "__main__":
    sys.exit(main())
