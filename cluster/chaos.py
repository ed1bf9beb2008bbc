"""Chaos: a leader and two readers under continuous load while faults strike at random.

Usage:
    python scripts/chaos.py --seconds 600 --seed 1 [--dir DIR] [--keep] [--net auto]
    make chaos CHAOS_ARGS="--seconds 600 --seed 1"

Two `walrep load --log` clients (ack levels mixed: local and replicas=1, each with
--retries) write to the leader for the whole run. Faults are injected one at a
time, each held for a random while and then healed; every kind comes once in a
seeded order, then kinds are drawn at random:

    kill-leader     SIGKILL the leader, restart it
    kill-reader     SIGKILL a reader, restart it
    stall           SIGSTOP a node, SIGCONT it
    partition       cut a reader from the leader (nftables drop rules), heal
    isolate-leader  take the leader's link down (clients and readers cut off), bring it up
    loss            random packet loss on a node's link (nftables numgen), clear
    delay           delay the traffic between reader-2 and the leader (userspace proxy)
    wal-truncate    truncate a reader's WAL mid-entry while it is down, restart it
    wal-bitflip     flip a bit of a reader's WAL while it is down, restart it
    disk-full       fill the leader's WAL file system (a tmpfs), free it

After each heal the driver waits (with a deadline) until every reader holds the
leader's head as it was at the heal (the catch-up time). At the end the load is
stopped, the run waits for convergence after the last heal, stops the nodes and
checks the histories against the final logs (walrep.cluster.history, the
checker of `walrep check-history`). It prints the faults by kind and the
checker's verdict, and exits 1 on any violation (lost acknowledged entries,
duplicates, divergence, a reader that did not converge, a node that died or
refused by itself, damage a reader did not heal), 2 when it cannot run (not root
for namespaces, say).

Network (--net netns, the default when root and `ip netns` works): the leader and
each reader run in their own network namespace (``walrep-<seed>-leader``, ...),
connected by veth pairs to a bridge in ``walrep-<seed>-net``, where the load
clients run; addresses are 10.77.0.0/24, inside those namespaces only. Packet
loss and partitions are nftables rules inside the namespaces; this kernel has no
netem, so delay goes through a small TCP proxy in reader-2's namespace. --net
loopback runs everything on 127.0.0.1 with proxies in front of both readers
(partitions, connection resets and delay in the proxies); without root the
leader's disk cannot be a tmpfs, so disk-full is left out.

The fault injectors (namespaces, nftables, proxies, the tmpfs, WAL damage) are
walrep.cluster.faults; this module decides which fault comes when and reports
(scripts/chaos.py and `make chaos` run it).

Seeded: the kinds, targets, hold times and damage positions come from --seed;
the system's own timing is not reproducible, so neither are the exact outcomes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable

from walrep import node

from . import history
from .config import LeaderConfig, key_names
from .faults import (
    KINDS,
    READERS,
    CannotRun,
    LoopbackNet,
    NetnsNet,
    Tmpfs,
    ensure_nftables,
    entry_frames,
    flip_bit_in_entry,
    netns_problem,
    read_text,
    truncate_in_entry,
    wait_until,
)
from .procs import NodeProcess, walrep_command

PAYLOAD_SIZE = 100
LEADER_FS_BYTES = 8 * 1024 * 1024
LEADER_SEGMENT_BYTES = 1024 * 1024
READER_SEGMENT_BYTES = 64 * 1024
START_TIMEOUT_S = 30.0
CATCHUP_TIMEOUT_S = 60.0
FINAL_TIMEOUT_S = 120.0
MAX_RESTARTS = 5  # a node that dies by itself more often than this ends the run


_TICK = threading.Event()  # never set: wait(t) is a bounded pause between polls


def tail(path: str, lines: int = 8) -> str:
    """The last lines of a log, without a traceback's decoration (frames, carets, rules)."""
    kept = []
    for line in read_text(path).rstrip("\n").split("\n"):
        text = line.strip().lstrip("|+").strip()
        if not text or set(text) <= set("-^~") or text.startswith(("File ", "raise ", "ret = ")):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept[-lines:])


@dataclasses.dataclass
class Proc(NodeProcess):
    """A walrep node started behind a command prefix (``ip netns exec NS``)."""

    prefix: list[str] = dataclasses.field(default_factory=list)
    started_marker: str = ""
    expected_down: bool = False
    stalled: bool = False

    def start(self) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        self.proc = subprocess.Popen(
            [*self.prefix, *walrep_command(*self.args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        return self

    def resume(self) -> None:
        if self.stalled and self.running():
            os.kill(self.pid, signal.SIGCONT)
        self.stalled = False


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    kind: str
    target: str
    detail: str = ""
    at_s: float = 0.0  # seconds into the run
    held_s: float = 0.0
    catchup_s: float | None = None  # heal -> every reader at the leader's head at the heal
    note: str = ""


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.base = args.dir or tempfile.mkdtemp(prefix=f"walrep-chaos-{args.seed}-")
        os.makedirs(self.base, exist_ok=True)
        self.faults: list[Fault] = []
        self.incidents: list[str] = []
        self.loads: list[subprocess.Popen | None] = [None] * args.clients
        self.rounds = [0] * args.clients
        self.histories: list[str] = []
        self.net = None
        self.leader_fs: Tmpfs | None = None
        self.last_heal: float | None = None
        self.started = time.monotonic()
        self.kinds = [k for k in KINDS if k not in args.skip]
        self.restarts: Counter[str] = Counter()
        self.load_stopped = False
        self.aborted: str | None = None

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        choice = self.args.net
        if choice in ("auto", "netns"):
            ensure_nftables()
            problem = netns_problem()
            if problem is not None:
                if choice == "netns":
                    raise CannotRun(problem)
                self.say(f"network namespaces unavailable ({problem}); using loopback proxies")
                choice = "loopback"
            else:
                choice = "netns"
        prefix = self.args.netns_prefix or f"walrep-{self.args.seed}"
        net_class = NetnsNet if choice == "netns" else LoopbackNet
        self.net = net_class(prefix, self.base, self.args.seed)
        self.say(f"run directory {self.base}, network {choice}")
        self.net.setup()
        leader_wal = os.path.join(self.base, "leader")
        if os.geteuid() == 0:
            self.leader_fs = Tmpfs(os.path.join(self.base, "leader-fs"), LEADER_FS_BYTES)
            self.leader_fs.mount()
            leader_wal = os.path.join(self.leader_fs.path, "wal")
        elif "disk-full" in self.kinds:
            self.kinds.remove("disk-full")
            self.say("not root: no tmpfs for the leader, disk-full left out")
        net = self.net
        self.leader = Proc(
            "leader",
            [
                "leader",
                "--wal-dir",
                leader_wal,
                "--ingest",
                net.leader_bind("ingest"),
                "--publish",
                net.leader_bind("publish"),
                "--control",
                net.leader_bind("control"),
                "--max-segment-bytes",
                str(LEADER_SEGMENT_BYTES),
                # The namespaces are private to this run: no keys needed off loopback.
                *(["--insecure"] if "insecure" in key_names(LeaderConfig) else []),
            ],
            leader_wal,
            os.path.join(self.base, "leader.log"),
            prefix=net.node_prefix("leader"),
            started_marker="leader-started",
        )
        self.readers = {
            name: Proc(
                name,
                [
                    "reader",
                    "--wal-dir",
                    os.path.join(self.base, name),
                    "--id",
                    name,
                    "--leader-publish",
                    net.reader_endpoint(name, "publish"),
                    "--leader-control",
                    net.reader_endpoint(name, "control"),
                    "--max-segment-bytes",
                    str(READER_SEGMENT_BYTES),
                ],
                os.path.join(self.base, name),
                os.path.join(self.base, f"{name}.log"),
                prefix=net.node_prefix(name),
                started_marker="reader-started",
            )
            for name in READERS
        }
        self.start_node(self.leader)
        for reader in self.readers.values():
            self.start_node(reader)
        for index in range(self.args.clients):
            self.start_load(index)

    def nodes(self) -> list[Proc]:
        return [self.leader, *self.readers.values()]

    def paths(self) -> dict[str, str]:
        return {p.name: p.wal_dir for p in self.nodes()}

    def start_node(self, proc: Proc, *extra: str) -> None:
        before = read_text(proc.log_path).count(proc.started_marker)
        if extra:
            proc.args = [*proc.args, *extra]
        proc.start()
        proc.expected_down = False
        try:
            wait_until(
                lambda: (
                    read_text(proc.log_path).count(proc.started_marker) > before
                    or not proc.running()
                ),
                START_TIMEOUT_S,
                f"{proc.name} to start",
            )
        except TimeoutError as exc:
            self.incident(f"{proc.name}: {exc}")
        if extra:
            proc.args = proc.args[: -len(extra)]

    def start_load(self, index: int) -> None:
        """The next round of load client `index`: its ack level turns with each round."""
        levels = self.args.acks.split(",")
        round_number = self.rounds[index]
        self.rounds[index] += 1
        level = levels[(index + round_number) % len(levels)]
        history = os.path.join(self.base, f"history-c{index}-r{round_number}-{level}.jsonl")
        self.histories.append(history)
        count = max(self.args.batch, int(self.args.rate * self.args.round_seconds))
        cmd = [
            *self.net.client_prefix(),
            *walrep_command(
                "load",
                "--ingest",
                self.net.client_ingest(),
                "--count",
                str(count),
                "--size",
                str(PAYLOAD_SIZE),
                "--batch",
                str(self.args.batch),
                "--rate",
                str(self.args.rate),
                "--inflight",
                "8",
                "--ack",
                level,
                "--timeout",
                str(self.args.client_timeout),
                "--retries",
                str(self.args.retries),
                "--log",
                history,
            ),
        ]
        log = open(os.path.join(self.base, f"load-{index}.log"), "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        proc.index = index  # type: ignore[attr-defined]
        self.loads[index] = proc

    def incident(self, text: str) -> None:
        self.incidents.append(text)
        self.say(f"INCIDENT: {text}")

    # --- watching ----------------------------------------------------------------------

    def check_processes(self) -> None:
        """A node or client that died by itself is an incident; it is started again."""
        for proc in self.nodes():
            if proc.expected_down or proc.running():
                continue
            code = proc.proc.returncode if proc.proc is not None else None
            self.incident(
                f"{proc.name} exited by itself with status {code}; last log lines:\n"
                + tail(proc.log_path)
            )
            self.restarts[proc.name] += 1
            if self.restarts[proc.name] > MAX_RESTARTS:
                proc.expected_down = True  # given up on: the run ends
                self.aborted = f"{proc.name} died {MAX_RESTARTS} times by itself"
                continue
            extra = ()
            if proc.name != "leader" and "too-old" in tail(proc.log_path, 3):
                extra = ("--resync",)  # what an operator does; still an incident
            self.start_node(proc, *extra)
        for index, load in enumerate(self.loads):
            if load is None or load.poll() is None:
                continue
            self.loads[index] = None
            # 0: all acknowledged; 1: some unknown or refused, which faults cause.
            if load.returncode not in (0, 1) and not self.load_stopped:
                self.incident(f"load client {index} exited with {load.returncode}")
            if not self.load_stopped and not self.time_up():
                self.start_load(index)
        for proxy in self.net.proxies.values():
            if not proxy.running():
                self.incident(f"{proxy.name} exited with {proxy.proc.returncode}")
                proxy.start()

    def pause(self, seconds: float) -> None:
        """Fault timing: wait this long, watching the processes meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            self.check_processes()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            _TICK.wait(min(0.1, remaining))

    def observe(self) -> dict[str, int | None] | None:
        try:
            return history.observe(self.paths())
        except (OSError, node.WALError):
            return None  # a segment rotated or was purged while we read

    def catch_up(self, fault: Fault, healed: float) -> None:
        """Wait until every reader holds the leader's head as it was at the heal."""
        positions = wait_until(self.observe, 10, "a readable leader log")
        target = positions["leader"] or 0
        deadline = healed + CATCHUP_TIMEOUT_S
        while True:
            self.check_processes()
            positions = self.observe()
            if positions is not None and all((positions[r] or 0) >= target for r in self.readers):
                fault.catchup_s = time.monotonic() - healed
                return
            if time.monotonic() > deadline:
                self.incident(
                    f"after {fault.kind} ({fault.target}) healed, the readers did not reach the "
                    f"leader's head {target} within {CATCHUP_TIMEOUT_S:.0f} s: {positions}"
                )
                return
            _TICK.wait(0.05)

    # --- faults ------------------------------------------------------------------------

    def schedule(self):
        first = list(self.kinds)
        self.rng.shuffle(first)
        yield from first
        while True:
            yield self.rng.choice(self.kinds)

    def time_up(self) -> bool:
        return time.monotonic() >= self.started + self.args.seconds

    def run(self) -> None:
        """Faults until time is up, every kind came once and the last load round ended."""
        hard_end = self.started + max(self.args.seconds * 3, self.args.seconds + 300)
        seen: set[str] = set()
        for kind in self.schedule():
            self.check_processes()
            loading = any(load is not None for load in self.loads)
            if self.time_up() and seen >= set(self.kinds) and not loading:
                break
            if time.monotonic() >= hard_end:
                self.incident("hard time limit reached: load or faults still pending")
                break
            if self.aborted:
                self.incident(f"run aborted: {self.aborted}")
                break
            self.pause(self.rng.uniform(0.5, 2.0))
            fault = Fault(kind, "", at_s=time.monotonic() - self.started)
            hold = self.rng.uniform(1.0, self.args.max_hold)
            getattr(self, "fault_" + kind.replace("-", "_"))(fault, hold)
            self.last_heal = time.monotonic()
            fault.held_s = self.last_heal - self.started - fault.at_s
            self.catch_up(fault, self.last_heal)
            self.faults.append(fault)
            seen.add(kind)
            took = "-" if fault.catchup_s is None else f"{fault.catchup_s:.2f} s"
            self.say(f"{kind} {fault.target}: {fault.detail}; healed, caught up in {took}")

    def _held(self, inject: Callable[[], None], heal: Callable[[], None], hold: float) -> None:
        inject()
        try:
            self.pause(hold)
        finally:
            heal()

    def fault_kill_leader(self, fault: Fault, hold: float) -> None:
        fault.target = "leader"
        down = hold / 2
        fault.detail = f"SIGKILL, restarted after {down:.1f} s"
        self.leader.expected_down = True
        self.leader.kill()
        self.pause(down)
        self.start_node(self.leader)

    def fault_kill_reader(self, fault: Fault, hold: float) -> None:
        reader = self.readers[self.rng.choice(READERS)]
        fault.target = reader.name
        fault.detail = f"SIGKILL, restarted after {hold:.1f} s"
        reader.expected_down = True
        reader.kill()
        self.pause(hold)
        self.start_node(reader)

    def fault_stall(self, fault: Fault, hold: float) -> None:
        proc = self.rng.choice(self.nodes())
        fault.target = proc.name
        fault.detail = f"SIGSTOP for {hold:.1f} s, then SIGCONT"

        def stop() -> None:
            os.kill(proc.pid, signal.SIGSTOP)
            proc.stalled = True

        self._held(stop, proc.resume, hold)

    def fault_partition(self, fault: Fault, hold: float) -> None:
        reader = self.rng.choice(READERS)
        fault.target = reader
        fault.detail = f"{hold:.1f} s: "

        def cut() -> None:
            fault.detail += self.net.partition(reader)

        self._held(cut, lambda: self.net.heal_partition(reader), hold)

    def fault_isolate_leader(self, fault: Fault, hold: float) -> None:
        fault.target = "leader"
        fault.detail = f"{hold:.1f} s: "

        def cut() -> None:
            fault.detail += self.net.isolate_leader()

        self._held(cut, self.net.heal_isolate_leader, hold)

    def fault_loss(self, fault: Fault, hold: float) -> None:
        name = self.rng.choice(["leader", *READERS])
        percent = self.net.loss_percent(self.rng)
        hold = hold * 2
        fault.target = name
        fault.detail = f"{hold:.1f} s: "

        def lose() -> None:
            fault.detail += self.net.loss(name, percent)

        self._held(lose, lambda: self.net.heal_loss(name), hold)

    def fault_delay(self, fault: Fault, hold: float) -> None:
        reader = self.rng.choice(self.net.delay_targets())
        seconds = round(self.rng.uniform(0.02, 0.3), 3)
        hold = hold * 2
        fault.target = reader
        fault.detail = f"{hold:.1f} s: "

        def slow() -> None:
            fault.detail += self.net.delay(reader, seconds)

        self._held(slow, lambda: self.net.heal_delay(reader), hold)

    def fault_disk_full(self, fault: Fault, hold: float) -> None:
        fault.target = "leader"
        errors_before = read_text(self.leader.log_path).count("WAL write failed")

        def fill() -> None:
            written = self.leader_fs.fill()
            fault.detail = f"{hold:.1f} s: the leader's tmpfs filled ({written} bytes)"

        self._held(fill, self.leader_fs.free, hold)
        failed = read_text(self.leader.log_path).count("WAL write failed") - errors_before
        fault.detail += f"; the leader's writer saw {failed} failed writes"

    def fault_wal_truncate(self, fault: Fault, hold: float) -> None:
        self._damage(fault, hold, "truncate")

    def fault_wal_bitflip(self, fault: Fault, hold: float) -> None:
        self._damage(fault, hold, "bitflip")

    def _damage(self, fault: Fault, hold: float, how: str) -> None:
        """Damage a reader's WAL while it is down, in entries the leader still holds."""
        reader = self.readers[self.rng.choice(READERS)]
        fault.target = reader.name
        want_sealed = self.rng.random() < 0.5
        pick_segment, pick_entry, pick_byte = (
            self.rng.random(),
            self.rng.random(),
            self.rng.random(),
        )
        pick_bit = self.rng.randrange(8)
        reader.expected_down = True
        reader.kill()
        heals_before = read_text(reader.log_path).count("self-healed")
        segments = node.WALReader(reader.wal_dir).segments()
        # Only entries in the leader's active segment: it is never purged, so the reader
        # can fetch them again after the cut. (Older ones may be purged meanwhile: the
        # reader then refuses with too-old, which ends below as a --resync.)
        leader_segments = node.WALReader(self.leader.wal_dir).segments()
        leader_first = leader_segments[-1].first_seq if leader_segments else 1
        candidates = []
        for i, segment in enumerate(segments):
            if i + 1 < len(segments) and segments[i + 1].first_seq <= leader_first:
                continue  # wholly below the leader's active segment
            offsets = entry_frames(segment.path)
            usable = [
                (off, frame)
                for j, (off, frame) in enumerate(offsets)
                if segment.first_seq + j >= leader_first
            ]
            if usable:
                candidates.append((i == len(segments) - 1, segment, offsets, usable))
        sealed = [c for c in candidates if not c[0]]
        newest = [c for c in candidates if c[0]]
        pool = sealed if (want_sealed and sealed) or not newest else newest
        if not pool:
            fault.detail = "no entries to damage"
            self.pause(hold)
            self.start_node(reader)
            return
        is_newest, segment, offsets, usable = pool[int(pick_segment * len(pool))]
        offset, frame = usable[int(pick_entry * len(usable))]
        seq = segment.first_seq + offsets.index((offset, frame))
        where = "newest" if is_newest else "sealed"
        if how == "truncate":
            cut = truncate_in_entry(segment.path, offset, frame, pick_byte)
            fault.detail = f"{where} segment {segment.name} truncated at byte {cut} (seq {seq})"
        else:
            at = flip_bit_in_entry(segment.path, offset, frame, pick_byte, pick_bit)
            fault.detail = (
                f"{where} segment {segment.name}: bit {pick_bit} of byte {at} (seq {seq})"
            )
        self.pause(hold)
        self.start_node(reader)
        if read_text(reader.log_path).count("self-healed") <= heals_before:
            self.incident(f"{reader.name} did not report healing its damaged log: {fault.detail}")
            return
        fault.note = "self-healed"

        def refetched_or_exited() -> bool:
            if not reader.running():
                return True
            positions = self.observe()
            return positions is not None and (positions[reader.name] or 0) >= seq

        try:
            wait_until(refetched_or_exited, CATCHUP_TIMEOUT_S, f"{reader.name} to refetch {seq}")
        except TimeoutError as exc:
            self.incident(str(exc))
            return
        if not reader.running() and "too-old" in tail(reader.log_path, 3):
            # The cut reached entries the leader purged meanwhile: the reader cannot
            # refetch them and says so (exit 2); an operator resyncs it.
            fault.note = "self-healed, but the leader had purged the cut entries: resynced"
            reader.expected_down = True
            self.start_node(reader, "--resync")

    # --- the end ---------------------------------------------------------------------

    def stop_load(self) -> None:
        self.load_stopped = True
        for load in self.loads:
            if load is not None and load.poll() is None:
                os.kill(load.pid, signal.SIGINT)
        for load in self.loads:
            if load is None:
                continue
            try:
                load.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(load.pid, signal.SIGKILL)
                load.wait(timeout=10)

    def finish(self) -> dict:
        self.net.heal_all()
        for proc in self.nodes():
            proc.resume()
        self.check_processes()
        self.stop_load()
        healed = self.last_heal or time.monotonic()
        reached: dict[str, float | None] = dict.fromkeys(self.readers)
        deadline = time.monotonic() + FINAL_TIMEOUT_S
        while True:
            self.check_processes()
            positions = self.observe()
            if positions is not None:
                for name in self.readers:
                    if reached[name] is None and positions[name] == positions["leader"]:
                        reached[name] = time.monotonic()
                if all(reached.values()):
                    break
            if time.monotonic() > deadline:
                break
            _TICK.wait(0.02)
        converged_s = None
        try:  # the same last entry everywhere, byte for byte
            history.wait_converged(self.paths(), 10.0, since=healed)
            if all(reached.values()):
                converged_s = max(reached.values()) - healed
        except history.ConvergenceTimeout as exc:
            self.say(f"final convergence: {exc}")
        for proc in reversed(self.nodes()):
            proc.resume()
            proc.expected_down = True
            code = proc.stop()
            if code not in (0, None):
                self.incident(f"{proc.name} stopped with status {code}: {tail(proc.log_path)}")
        convergence = history.convergence_from_reached(healed, reached)
        verdict = history.check(
            [h for h in self.histories if os.path.exists(h)],
            self.paths(),
            leader="leader",
            rule=chaos_rule,
            size=PAYLOAD_SIZE,
            tolerate_retry_duplicates=not self.args.strict_duplicates,
            convergence=convergence,
        )
        return self.report(verdict, converged_s)

    def report(self, verdict: history.Verdict, converged_s: float | None) -> dict:
        by_kind = Counter(f.kind for f in self.faults)
        lines = [
            "",
            f"chaos run: seed {self.args.seed}, {self.args.seconds} s, net {self.net.kind}",
        ]
        rows = []
        for kind in KINDS:
            faults = [f for f in self.faults if f.kind == kind]
            if not faults and kind not in self.kinds:
                rows.append([kind, "skipped", "-", "-", "-"])
                continue
            catchups = [f.catchup_s for f in faults if f.catchup_s is not None]
            rows.append(
                [
                    kind,
                    str(len(faults)),
                    f"{sum(f.held_s for f in faults):.1f}",
                    f"{max(catchups):.2f}" if catchups else "-",
                    ", ".join(sorted({f.target for f in faults})) or "-",
                ]
            )
        lines += history.text_table(
            ["fault", "injected", "held s", "worst catch-up s", "targets"], rows
        )
        catchups = [f.catchup_s for f in self.faults if f.catchup_s is not None]
        worst = max(catchups, default=None)
        lines.append("")
        lines.append(f"faults injected: {len(self.faults)}")
        lines.append(
            "worst catch-up after a heal: "
            + ("-" if worst is None else f"{worst:.2f} s")
            + "; final convergence after the last heal: "
            + ("never" if converged_s is None else f"{converged_s:.2f} s")
        )
        leader = next((n for n in verdict.nodes if n.name == "leader"), None)
        written = leader.last if leader is not None else None
        lines.append(f"entries written (the leader's last sequence): {written}")
        clients = self.client_table()
        per_level: dict[str, Counter] = {}
        for c in clients:
            totals = per_level.setdefault(c["ack"], Counter())
            totals["rounds"] += 1
            for key in ("entries", "ok", "unknown", "failed", "retried"):
                totals[key] += c[key]
        lines.append("")
        lines += history.text_table(
            [
                "load",
                "rounds",
                "entries sent",
                "acknowledged",
                "unknown",
                "failed",
                "entries retried",
            ],
            [
                [
                    f"ack {level}",
                    t["rounds"],
                    t["entries"],
                    t["ok"],
                    t["unknown"],
                    t["failed"],
                    t["retried"],
                ]
                for level, t in per_level.items()
            ],
        )

        lines.append("")
        lines.append(verdict.table())
        if self.incidents:
            lines.append("")
            lines.append(f"incidents: {len(self.incidents)}")
            lines += ["  " + text.replace("\n", "\n    ") for text in self.incidents]
        ok = verdict.ok and not self.incidents and converged_s is not None
        ok = ok and not (set(self.kinds) - set(by_kind))
        lines.append("")
        kept = not ok or self.args.keep or self.args.dir
        where = f"run directory {self.base}" if kept else "run directory removed; --keep keeps it"
        lines.append(f"chaos verdict: {'OK' if ok else 'VIOLATIONS'} ({where})")
        print("\n".join(lines), flush=True)
        return {
            "ok": ok,
            "seed": self.args.seed,
            "seconds": self.args.seconds,
            "net": self.net.kind,
            "faults_by_kind": dict(by_kind),
            "faults": [dataclasses.asdict(f) for f in self.faults],
            "incidents": self.incidents,
            "worst_catchup_s": worst,
            "final_convergence_s": converged_s,
            "entries_written": written,
            "clients": clients,
            "verdict": verdict.to_dict(),
            "dir": self.base,
        }

    def client_table(self) -> list[dict]:
        """Per history: entries logged, their outcomes, and how many took retries."""
        out = []
        for path in self.histories:
            row = {"history": os.path.basename(path), "ack": "-", "entries": 0, "retried": 0}
            row.update(dict.fromkeys(history.OUTCOMES, 0))
            for line in read_text(path).splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                row["ack"] = record.get("ack", "-")
                row["entries"] += 1
                row[record.get("outcome", "failed")] += 1
                row["retried"] += (record.get("attempts") or 1) > 1
            out.append(row)
        return out

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            if self.net is not None:
                self.net.heal_all()
        for proc in getattr(self, "readers", {}).values():
            proc.resume()
            proc.stop()
        if hasattr(self, "leader"):
            self.leader.resume()
            self.leader.stop()
        self.stop_load()
        if self.net is not None:
            self.net.teardown()
        if self.leader_fs is not None and self.leader_fs.mounted:
            keep = os.path.join(self.base, "leader")
            if self.args.keep and not os.path.exists(keep):
                shutil.copytree(os.path.join(self.leader_fs.path, "wal"), keep)
            self.leader_fs.unmount()


def chaos_rule(level: str) -> history.Promise:
    """local: on a node, same bytes on every node covering its seq; replicas=N: on N readers."""
    replicas = history.level_replicas(level)
    if replicas is None:
        return history.NOTHING
    return history.Promise(min_nodes=1, min_readers=replicas, holders_agree=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chaos.py", description="Fault injection against a leader and two readers."
    )
    p.add_argument("--seconds", type=float, default=120.0, help="how long to inject faults")
    p.add_argument(
        "--seed", type=int, default=1, help="seeds kinds, targets, hold times, damage (1)"
    )
    p.add_argument("--dir", default=None, help="run directory (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the run directory on success")
    p.add_argument(
        "--net",
        choices=("auto", "netns", "loopback"),
        default="auto",
        help="a namespace per node (root), 127.0.0.1 with proxies, or auto: netns if it works",
    )
    p.add_argument("--netns-prefix", default=None, help="namespace names (walrep-SEED)")
    p.add_argument(
        "--acks", default="local,replicas=1", help="ack levels, taken in turn by each round"
    )
    p.add_argument("--clients", type=int, default=2, help="load clients running at once")
    p.add_argument(
        "--round-seconds", type=float, default=20.0, help="length of one load round at --rate"
    )
    p.add_argument("--rate", type=float, default=1000.0, help="entries/s per load client")
    p.add_argument("--batch", type=int, default=20, help="entries per request")
    p.add_argument("--retries", type=int, default=5, help="walrep load --retries")
    p.add_argument("--client-timeout", type=float, default=2.0, help="walrep load --timeout")
    p.add_argument("--max-hold", type=float, default=4.0, help="longest fault, seconds")
    p.add_argument("--skip", action="append", default=[], choices=KINDS, help="leave a kind out")
    p.add_argument(
        "--strict-duplicates",
        action="store_true",
        help="fail on duplicates left by retries (a retry to a restarted leader appends again)",
    )
    p.add_argument("--summary", default=None, metavar="FILE", help="write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="only the final report")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: the finally below stops every process it
    # started and removes the namespaces and the mount.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chaos = Chaos(args)
    result = None
    try:
        chaos.setup()
        chaos.run()
        result = chaos.finish()
    except CannotRun as exc:
        print(f"chaos: cannot run: {exc}", file=sys.stderr)
        return 2
    finally:
        chaos.teardown()
        if result is not None and result["ok"] and not args.keep and not args.dir:
            shutil.rmtree(chaos.base, ignore_errors=True)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
