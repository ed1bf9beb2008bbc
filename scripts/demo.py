"""`make demo`: a leader and two readers from configs/, a crash, and a catch-up.

Run from the repository root. Everything it starts it stops, by pid; data goes
to demo-data/ (removed at the start of each run). Before it starts anything it
checks that every port its configs bind is free, and it checks that its readers
follow its own leader (the same log id), not another one already on those ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from walrep import node
from walrep.cluster import config as configmod
from walrep.cluster import startup
from walrep.cluster.procs import NodeProcess, wait_for, walrep_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DATA = os.path.join(ROOT, "demo-data")
INGEST = "tcp://127.0.0.1:7100"
ROLES = {
    "leader": configmod.LeaderConfig,
    "reader-1": configmod.ReaderConfig,
    "reader-2": configmod.ReaderConfig,
}
EXIT_CANNOT_RUN = 2  # a port taken, a reader following another leader: nothing to retry


class DemoError(Exception):
    """Why the demo cannot go on, in one line."""


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


def load_configs() -> dict:
    """The demo's configs by node name, checked as the nodes will check them."""
    configs = {}
    for name, cls in ROLES.items():
        try:
            configs[name] = configmod.load(cls, os.path.join("configs", f"{name}.toml"), {})
        except configmod.ConfigError as exc:
            raise DemoError(str(exc)) from None
    return configs


def check_ports(configs: dict) -> None:
    """Every port the configs bind is free: else another node (an earlier demo?) holds
    it, and the demo's readers would follow that node instead of the demo's leader."""
    for config in configs.values():
        try:
            startup.check_ports_free(config)
        except configmod.ConfigError as exc:
            raise DemoError(f"{exc}; stop whatever holds it and run the demo again") from None


def wait_running(proc: NodeProcess, condition, timeout: float, what: str):
    """wait_for, but a process that exits meanwhile ends the demo with its last words."""

    def check():
        if not proc.running():
            lines = proc.log_text().strip().splitlines() or ["(no output)"]
            raise DemoError(
                f"{proc.name} exited with status {proc.proc.returncode} while the demo waited "
                f"for {what}: {lines[-1]}"
            )
        return condition()

    return wait_for(check, timeout, what)


def log_id(proc: NodeProcess) -> str | None:
    """The log id in the node's wal.meta: a leader's own, the one a reader adopted."""
    try:
        value = node.load_meta(proc.wal_dir).get("log_id")
    except (node.WALError, OSError):
        return None
    return value if isinstance(value, str) else None


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
    try:
        configs = load_configs()
        check_ports(configs)  # before anything is created or started
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    shutil.rmtree(DATA, ignore_errors=True)
    os.makedirs(DATA)
    leader = node_process("leader", "leader")
    readers = [node_process("reader-1", "reader"), node_process("reader-2", "reader")]
    nodes = [leader, *readers]
    try:
        return run(leader, readers, configs)
    except DemoError as exc:
        print(f"demo: {exc} (logs in demo-data/)", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except TimeoutError as exc:
        print(f"demo: {exc} (logs in demo-data/)", file=sys.stderr)
        return 1
    finally:
        say("Stopping every process it started (SIGTERM by pid)")
        for proc in reversed(nodes):
            code = proc.stop()
            if code is not None:
                print(f"   {proc.name} exited with status {code}")


def run(leader: NodeProcess, readers: list[NodeProcess], configs: dict) -> int:
    nodes = [leader, *readers]
    say("Starting a leader and two readers from configs/")
    start(leader)
    wait_running(leader, lambda: "leader-started" in leader.log_text(), 30, "it to start")
    leader_log = log_id(leader)
    if leader_log is None:
        raise DemoError(f"the leader started but {leader.wal_dir} holds no log id")
    print(f"   the leader's log id is {leader_log}")
    for proc in readers:
        start(proc)
    for proc in readers:
        # An empty reader adopts the log id of whichever leader answers it.
        adopted = wait_running(proc, lambda p=proc: log_id(p), 30, "it to adopt a log")
        if adopted != leader_log:
            config = configs[proc.name]
            raise DemoError(
                f"{proc.name} follows log {adopted}, not the demo leader's {leader_log}: "
                f"another leader answers on {config.leader_control} ({config.source} key "
                "'leader_control')"
            )
    print(f"   both readers follow log {leader_log}")

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


if __name__ == "__main__":
    sys.exit(main())
