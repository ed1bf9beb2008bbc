"""walrep on this machine, each figure next to a baseline measured in the same run.

Usage: python scripts/bench.py [--quick] [--json FILE] [--only SECTIONS] [--dir DIR]

Prints one table and writes bench-results/bench.json (bench-quick.json with
--quick). Every process it starts is started by this script (or by cluster.procs
/ scripts/bench_baselines.py on its behalf), remembered by its pid and stopped by
that pid in a finally block.

Sections (100-byte entries unless the row says otherwise):
  1 local WAL: append_raw per entry and append_batch x1000, async and fdatasync,
    next to os.write of the same prebuilt frames (+ one fdatasync per 1000);
    CRC-verified scan of a 1 M entry log next to reading its bytes; the time
    node.Writer(dir) takes to open that log (10 segments) next to reading them.
  2 replicated throughput: `walrep load` into a leader + 2 readers, fdatasync
    everywhere, timed until both readers hold every entry; next to raw pyzmq
    PUB/SUB of the same batches (1 publisher, 2 subscriber processes) and Redis
    master + replica (AOF, appendfsync everysec) with pipelined XADD, timed until
    the replica's XLEN has them all.
  3 commit latency at a steady 10 k entries/s per ack level, next to the same
    load on the same path built bare (scripts/bench_pipeline.py: one blocking
    pyzmq loop per process, os.write + fdatasync, no trio, no protocol), run
    right after each walrep run; the notes add one os.write + fdatasync of the
    same request on this disk.
  4 catch-up of a reader 1 M entries behind while the leader takes 50 k entries/s.
  5 cost: throughput and peak RSS (VmHWM) per process as readers go 1, 2, 4 and
    entries 100 B, 1 KiB, 64 KiB.
  6 CURVE on vs off (only once `walrep leader` has --key).

--quick runs the same rows with fewer entries and shorter runs (~1-2 minutes);
the full run takes 5-10 minutes. --only local,replicated,... runs some sections.

The machine may be shared: before each section the script waits (up to a minute)
for other processes to go quiet, and reports how much CPU they used meanwhile;
figures from a busy machine are low and noisy. A run that fails (a node that
crashes, a load that is not acknowledged) is reported in its row, and the logs
of its nodes are kept in bench-results/failed-runs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib

import bench_baselines as baselines
import bench_wal
from bench_pipeline import Pipeline

from walrep import node
from walrep.cluster.loadgen import latency_percentiles
from walrep.cluster.procs import LocalCluster, wait_for, walrep_command
from walrep.node import format as fmt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SEGMENT_NAME = re.compile(r"^arc-(\d{20})\.wal$")

FULL = {
    "wal_entries": 500_000,
    "wal_repeats": 3,
    "scan_entries": 1_000_000,
    "scan_segments": 10,
    "open_repeats": 5,
    "repl_entries": 1_000_000,
    "repl_batch": 1000,
    "repl_inflight": 16,
    "repl_repeats": 3,
    "redis_repeats": 2,
    # (connections, pipeline depth): the brief's -P 100 with redis-benchmark's 50
    # connections, and walrep load's shape (16 in flight x 1000); the best is kept.
    "redis_shapes": [(50, 100), (16, 1000)],
    "latency_seconds": 8.0,
    "latency_repeats": 3,
    "latency_rate": 10_000,
    "catchup_behind": 1_000_000,
    "catchup_live_rate": 50_000,
    "catchup_deadline_s": 120.0,
    "cost_readers": [1, 2, 4],
    "cost_entries": {100: 300_000, 1024: 100_000, 65536: 3000},
    "cost_repeats": 2,
    "curve_entries": 1_000_000,
    "curve_repeats": 2,
    "settle_max_s": 60.0,
}
QUICK = dict(
    FULL,
    wal_entries=200_000,
    wal_repeats=1,
    open_repeats=3,
    repl_entries=300_000,
    repl_repeats=1,
    redis_shapes=[(16, 1000)],
    latency_seconds=3.0,
    latency_repeats=1,
    catchup_deadline_s=60.0,
    redis_repeats=1,
    cost_repeats=1,
    curve_entries=300_000,
    curve_repeats=1,
    settle_max_s=15.0,
    catchup_behind=300_000,
    cost_entries={100: 100_000, 1024: 30_000, 65536: 1000},
)
COST_BATCH = {100: 1000, 1024: 100, 65536: 4}  # about 100 KB per request
WARM_UP_REQUEST_BYTES = 100_000


# --- small helpers ---------------------------------------------------------------------


def human_rate(value: float | None, unit: str = "/s") -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M{unit}"
    if value >= 1e4:
        return f"{value / 1e3:.0f} k{unit}"
    if value >= 1e3:
        return f"{value / 1e3:.2f} k{unit}"
    return f"{value:.0f}{unit}"


def human_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def human_kib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


def row(section, what, figure, text, baseline="-", base_figure=None, base_text="-", **extra):
    ratio = None
    if figure is not None and base_figure:
        ratio = figure / base_figure
    return {
        "section": section,
        "what": what,
        "figure": figure,
        "figure_text": text,
        "baseline": baseline,
        "baseline_figure": base_figure,
        "baseline_text": base_text,
        "ratio": ratio,
        "notes": extra.pop("notes", ""),
        **extra,
    }


def machine() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    git = {}
    for key, cmd in (
        ("head", ["git", "rev-parse", "--short", "HEAD"]),
        ("dirty", ["git", "status", "--porcelain", "--", "node", "cluster"]),
    ):
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10)
            git[key] = out.stdout
        except (OSError, subprocess.SubprocessError):
            git[key] = "?"
    git["head"] = git.get("head", "?").strip()
    git["dirty"] = [line[3:] for line in git.get("dirty", "").splitlines() if line.strip()]
    from walrep.node import reader as node_reader

    return {
        "nproc": os.cpu_count(),
        "cpus_usable": affinity,
        "model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "scan_c_extension": node_reader._scan_fast is not None,
        "git": git,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


class CpuMeter:
    """How much CPU went to processes outside this benchmark while it ran.

    The machine's busy time (/proc/stat) minus this process's and its reaped
    children's (os.times): every process the benchmark starts is its child and is
    reaped before a section ends. Kernel work done on the benchmark's behalf (disk
    flushes, loopback) counts as foreign, so a few percent is normal; much more
    means something else was running and the figures are pessimistic.
    """

    def __init__(self):
        self.start = self.sample()

    @staticmethod
    def sample() -> tuple[float, float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6)) / tick
        steal = fields[7] / tick if len(fields) > 7 else 0.0
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, own, steal

    def report(self) -> dict:
        now = self.sample()
        elapsed = now[0] - self.start[0]
        cpus = os.cpu_count() or 1
        foreign = max(0.0, (now[1] - self.start[1]) - (now[2] - self.start[2]))
        return {
            "seconds": elapsed,
            "own_cpu_s": now[2] - self.start[2],
            "foreign_cpu_s": foreign,
            "foreign_share": foreign / (elapsed * cpus) if elapsed > 0 else 0.0,
            "steal_cpu_s": now[3] - self.start[3],
        }


class WakeStalls:
    """A thread that sleeps 2 ms at a time and counts the wake-ups that came over 2 ms
    late: moments when no vCPU ran it. On a VM these include time the host did not run
    the vCPU at all, which the guest's steal counter may not show."""

    PERIOD_S = 0.002
    LATE_S = 0.002

    def __init__(self):
        self.stalls: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wake-stalls", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            time.sleep(self.PERIOD_S)
            late = time.perf_counter() - began - self.PERIOD_S
            if late > self.LATE_S:
                self.stalls.append(late)

    def __enter__(self) -> WakeStalls:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {
            "count": len(self.stalls),
            "longest_ms": max(self.stalls, default=0.0) * 1000,
            "total_ms": sum(self.stalls) * 1000,
        }


def settle(max_wait: float, threshold: float = 0.15) -> dict:
    """Wait (at most max_wait s) until other processes use under `threshold` of the machine.

    The machine may be shared; figures taken while something else runs are low and
    noisy. This only waits, it never stops anything; what it saw goes in the JSON.
    """
    began = time.monotonic()
    waited = False
    while True:
        meter = CpuMeter()
        time.sleep(1.0)
        c = meter.report()
        if c["foreign_share"] < threshold or time.monotonic() - began > max_wait:
            if waited:
                print(
                    f"          settled after {time.monotonic() - began:.0f} s: others now use "
                    f"{c['foreign_share']:.0%}",
                    flush=True,
                )
            return {"waited_s": time.monotonic() - began, "foreign_share": c["foreign_share"]}
        if not waited:
            print(
                f"          other processes use {c['foreign_share']:.0%} of the machine: waiting "
                f"up to {max_wait:.0f} s for them to finish",
                flush=True,
            )
        waited = True


def describe_cpu(c: dict) -> str:
    return (
        f"{c['seconds']:.0f} s, this benchmark {c['own_cpu_s']:.0f} CPU-s, everything else "
        f"{c['foreign_cpu_s']:.1f} CPU-s ({c['foreign_share']:.0%} of the machine), "
        f"steal {c['steal_cpu_s']:.1f} s"
    )


# --- walrep processes --------------------------------------------------------------------


def fast_last_seq(wal_dir: str, entry_bytes: int) -> int:
    """The last sequence a node has written, from the newest segment's name and size.

    Exact when every entry has the same size (as in these runs) and costs two system
    calls, so polling it does not steal CPU from the nodes being measured (WALReader
    .bounds() CRC-scans the newest segment, up to 64 MiB, on every call). Results are
    checked with WALReader once the timing is over.
    """
    for _ in range(5):
        try:
            names = os.listdir(wal_dir)
        except FileNotFoundError:
            return 0
        firsts = [int(m.group(1)) for name in names if (m := SEGMENT_NAME.match(name))]
        if not firsts:
            return 0
        first = max(firsts)
        try:
            size = os.path.getsize(os.path.join(wal_dir, f"arc-{first:020d}.wal"))
        except FileNotFoundError:
            continue  # rotated or purged between the two calls
        return first + max(0, size - fmt.FILE_HEADER_BYTES) // entry_bytes - 1
    return 0


def wait_seq(
    dirs: list[str],
    entry_bytes: int,
    target: int,
    timeout: float,
    what: str,
    cluster: LocalCluster | None = None,
) -> float:
    """Poll until every dir holds `target`; return the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while True:
        if all(fast_last_seq(d, entry_bytes) >= target for d in dirs):
            return time.monotonic()
        dead = dead_nodes(cluster) if cluster is not None else ""
        if dead:
            raise RuntimeError(f"a node died while waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            held = [fast_last_seq(d, entry_bytes) for d in dirs]
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}: {held} < {target}")
        time.sleep(0.005)


def start_cluster(cluster: LocalCluster) -> LocalCluster:
    """Start it and wait for the leader and every reader's hand-shake (caller stops it)."""
    cluster.start()
    wait_for(lambda: "leader-started" in cluster.leader.log_text(), 30, "the leader to start")
    for reader in cluster.reader_nodes:
        wait_for(lambda r=reader: " handshake " in r.log_text(), 30, f"{reader.name}'s handshake")
    return cluster


LOG_DIR: list[str] = []  # where logs of failed runs are kept (set by main)


def save_logs(cluster: LocalCluster, tag: str) -> str | None:
    """Copy a failed run's node and load logs next to the JSON; return where."""
    if not LOG_DIR:
        return None
    where = os.path.join(LOG_DIR[0], tag)
    os.makedirs(where, exist_ok=True)
    for name in os.listdir(cluster.base):
        if name.endswith((".log", ".out")):
            shutil.copy(os.path.join(cluster.base, name), where)
    return where


def dead_nodes(cluster: LocalCluster) -> str:
    """Nodes that exited with an error (a node this script stopped exits 0), with the
    last line of their log: the exception, for a crash."""
    out = []
    for n in cluster.nodes():
        if n.proc is not None and n.proc.poll() not in (None, 0):
            lines = [line.strip(" |+-") for line in n.log_text().splitlines()]
            lines = [line for line in lines if line]
            errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
            last = (errors or lines or [""])[-1]
            out.append(f"{n.name} exited ({n.proc.returncode}): {last}")
    return "; ".join(out)


def run_load(cluster: LocalCluster, count: int, *extra: str, timeout: float = 900) -> dict:
    """`walrep load` against the cluster; fails at once if a node dies meanwhile."""
    summary = os.path.join(cluster.base, f"summary-{time.monotonic_ns()}.json")
    out_path = os.path.join(cluster.base, f"load-{time.monotonic_ns()}.out")
    cmd = walrep_command(
        "load", "--ingest", cluster.ingest, "--count", str(count), "--summary", summary, *extra
    )
    with open(out_path, "wb") as out:
        load = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while load.poll() is None:
            dead = dead_nodes(cluster)
            if dead:
                raise RuntimeError(f"a node died during walrep load: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"walrep load took more than {timeout:.0f} s")
            time.sleep(0.01)
    finally:
        baselines.stop_pid(load)
    if load.returncode != 0:
        with open(out_path, errors="replace") as f:
            text = f.read()
        dead = dead_nodes(cluster)
        raise RuntimeError(
            f"walrep load failed ({load.returncode}): {text.strip()}"
            + (f" [{dead}]" if dead else "")
        )
    with open(summary) as f:
        return json.load(f)


def gap_count(proc) -> int:
    return proc.log_text().count(" gap from=")


def peak_rss(cluster: LocalCluster) -> dict[str, int | None]:
    return {n.name: baselines.rss_hwm_kib(n.pid) for n in cluster.nodes() if n.running()}


def reset_peak_rss(cluster: LocalCluster) -> None:
    """Start each node's peak RSS (VmHWM) afresh, so that it is the measured run's.

    Linux resets VmHWM to the current RSS when "5" is written to clear_refs. Where
    that fails, the peak stays the one since the process started.
    """
    for process in cluster.nodes():
        try:
            with open(f"/proc/{process.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def replicated_run(
    cluster: LocalCluster,
    count: int,
    size: int,
    batch: int,
    inflight: int,
    ack: str,
    client_args: tuple[str, ...] = (),
) -> dict:
    """Load `count` entries and time it until every reader holds them all."""
    entry_bytes = fmt.ENTRY_HEADER_BYTES + size
    dirs = [r.wal_dir for r in cluster.reader_nodes]
    head = fast_last_seq(cluster.leader.wal_dir, entry_bytes)
    target = head + count
    reset_peak_rss(cluster)
    began = time.monotonic()
    summary = run_load(
        cluster,
        count,
        *("--size", str(size), "--batch", str(batch), "--inflight", str(inflight)),
        *("--ack", ack),
        *client_args,
        timeout=60 + count * size / 5e5,  # a healthy node moves far more than 500 kB/s
    )
    exited = time.monotonic()
    converged = wait_seq(dirs, entry_bytes, target, 120, "the readers to hold everything", cluster)
    # From the load client's own start (its interpreter start-up is not walrep's cost)
    # to the moment the last reader held the last entry.
    seconds = summary["seconds"] + (converged - exited)
    held = {n.name: n.last_seq() for n in cluster.nodes()}  # CRC-verified, after timing
    if any(seq != target for seq in held.values()):
        raise RuntimeError(f"expected every node at {target}, found {held}")
    return {
        "entries": count,
        "size": size,
        "batch": batch,
        "inflight": inflight,
        "ack": ack,
        "readers": len(dirs),
        "acked_per_s": summary["entries_per_s"],
        "seconds": seconds,
        "wall_seconds_with_client_startup": converged - began,
        "replicated_per_s": count / seconds,
        "peak_rss_kib": peak_rss(cluster),
        "reader_gaps": sum(gap_count(r) for r in cluster.reader_nodes),
    }


def warm_up(cluster: LocalCluster, size: int = 100, client_args: tuple[str, ...] = ()) -> None:
    # Requests of about 100 KB, as the measured runs send: 100 entries of 64 KiB made
    # 6.5 MB requests, and the leader's peak RSS was then the warm-up's (190 MiB,
    # against 57 MiB in the run itself).
    batch = max(1, min(100, WARM_UP_REQUEST_BYTES // size))
    run_load(
        cluster, 1000, "--size", str(size), "--batch", str(batch), "--ack", "local", *client_args
    )
    head = fast_last_seq(cluster.leader.wal_dir, fmt.ENTRY_HEADER_BYTES + size)
    wait_seq(
        [r.wal_dir for r in cluster.reader_nodes],
        fmt.ENTRY_HEADER_BYTES + size,
        head,
        60,
        "the warm-up to reach the readers",
    )


# --- 1: local WAL ------------------------------------------------------------------------


def section_local(cfg: dict, base: str) -> tuple[list[dict], dict]:
    s = "1 local WAL"
    rows: list[dict] = []
    payload = os.urandom(100)
    count = cfg["wal_entries"] // bench_wal.BATCH * bench_wal.BATCH
    raw_results: dict = {}
    for mode in ("async", "fdatasync"):
        raws = [
            bench_wal.bench_raw(os.path.join(base, "raw"), mode, payload, count)
            for _ in range(cfg["wal_repeats"])
        ]
        raw = statistics.median(raws)
        base_name = f"os.write x{bench_wal.BATCH} frames" + (
            " + fdatasync" if mode == "fdatasync" else ""
        )
        for batched in (False, True):
            rates = [
                bench_wal.bench_walrep(os.path.join(base, "wal"), mode, payload, count, batched)
                for _ in range(cfg["wal_repeats"])
            ]
            rate = statistics.median(rates)
            what = (
                f"append_batch x{bench_wal.BATCH}, {mode}"
                if batched
                else f"append_raw per entry, {mode}"
            )
            key = f"{'batched' if batched else 'per_entry'}_{mode}"
            raw_results[key] = {"rates": rates, "raw_rates": raws}
            rows.append(
                row(
                    s,
                    what,
                    rate,
                    human_rate(rate),
                    base_name,
                    raw,
                    human_rate(raw),
                    key=key,
                    notes=f"{count:,} entries, median of {len(rates)}",
                )
            )
    shutil.rmtree(os.path.join(base, "raw"), ignore_errors=True)
    shutil.rmtree(os.path.join(base, "wal"), ignore_errors=True)

    # A 1 M entry log in `scan_segments` segments: scanned, then opened by a Writer.
    log_dir = os.path.join(base, "log-1m")
    n = cfg["scan_entries"]
    per_segment = n // cfg["scan_segments"]
    frame_bytes = fmt.ENTRY_HEADER_BYTES + len(payload)
    with node.Writer(
        log_dir,
        sync_mode="async",
        max_size_bytes=fmt.FILE_HEADER_BYTES + per_segment * frame_bytes,
        buffer_entries=100_000,
    ) as writer:
        batch = [payload] * bench_wal.BATCH
        for _ in range(n // bench_wal.BATCH):
            # One group per batch, so segments rotate at exactly per_segment entries.
            writer.wait_committed(writer.append_batch(batch)[1], timeout=60)
        writer.wait_durable(writer.current_sequence(), timeout=120)
    segments = node.WALReader(log_dir).segments()
    scans = [bench_wal.bench_scan(log_dir) for _ in range(max(1, cfg["wal_repeats"]))]
    scan_rate = statistics.median(s_[0] for s_ in scans)
    read_rate = statistics.median(s_[1] for s_ in scans)
    seen = scans[0][2]
    raw_results["scan"] = {"scans": scans, "segments": len(segments)}
    rows.append(
        row(
            s,
            f"scan, CRC-verified, {seen:,} entries",
            scan_rate,
            human_rate(scan_rate, " entries/s"),
            "read the same files' bytes",
            read_rate,
            human_rate(read_rate, " entries/s"),
            key="scan",
            notes=f"{len(segments)} segments, C extension: "
            + ("yes" if machine_info["scan_c_extension"] else "no"),
        )
    )

    opens, reads, newest_reads = [], [], []
    for _ in range(cfg["open_repeats"]):
        started = time.perf_counter()
        with open(segments[-1].path, "rb") as f:
            zlib.adler32(f.read())
        newest_reads.append(time.perf_counter() - started)
        started = time.perf_counter()
        writer = node.Writer(log_dir, sync_mode="fdatasync")
        opens.append(time.perf_counter() - started)
        writer.close()
        started = time.perf_counter()
        total = 0
        for segment in segments:
            with open(segment.path, "rb") as f:
                total = zlib.adler32(f.read(), total)
        reads.append(time.perf_counter() - started)
    open_ms = statistics.median(opens) * 1000
    read_ms = statistics.median(reads) * 1000
    newest_ms = statistics.median(newest_reads) * 1000
    raw_results["open"] = {"open_s": opens, "read_s": reads, "read_newest_s": newest_reads}
    rows.append(
        row(
            s,
            f"Writer open, {len(segments)} segments ({n:,} entries)",
            open_ms,
            human_ms(open_ms),
            f"read all {len(segments)} files' bytes",
            read_ms,
            human_ms(read_ms),
            key="open",
            notes=f"median of {len(opens)} (ratio < 1 is faster); reading only the newest "
            f"segment, which the Writer scans: {human_ms(newest_ms)}",
        )
    )
    shutil.rmtree(log_dir, ignore_errors=True)
    return rows, raw_results


def fsync_latency(cfg: dict, base: str, entries: int = 10, size: int = 100) -> dict:
    """os.write of one request's frames + fdatasync, paced like the latency runs (one
    per request at latency_rate entries/s, for latency_seconds): the disk's floor.

    Paced over the same time on purpose: this disk's fdatasync stalls for 7-18 ms
    about every 5 s (ext4's journal commit), which a burst of back-to-back samples
    would mostly miss, while every latency run meets it.
    """
    path = os.path.join(base, "fsync-probe.wal")
    block = fmt.encode_entry(time.time_ns() // 1000, os.urandom(size)) * entries
    interval = entries / cfg["latency_rate"]
    count = int(cfg["latency_seconds"] / interval)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        os.write(fd, fmt.FILE_HEADER)
        os.fdatasync(fd)
        began = time.monotonic()
        for i in range(count):
            started = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            samples.append(time.perf_counter() - started)
            time.sleep(max(0.0, began + (i + 1) * interval - time.monotonic()))
    finally:
        os.close(fd)
        os.unlink(path)
    return latency_percentiles(samples)


# --- 2: replicated throughput --------------------------------------------------------------


def section_replicated(cfg: dict, base: str) -> tuple[list[dict], dict]:
    s = "2 replicated"
    count, batch, inflight = cfg["repl_entries"], cfg["repl_batch"], cfg["repl_inflight"]
    results: dict = {"walrep": {}, "zmq": None, "redis": None}
    zmq_result = baselines.run_zmq_pubsub(count, batch, 100, subscribers=2)
    results["zmq"] = zmq_result
    redis_best = None
    redis_note = ""
    server, bench = baselines.redis_available()
    if server is None or bench is None:
        redis_note = "redis-server/redis-benchmark missing (make bench-deps): row skipped"
        print(f"  Redis is missing: {redis_note}", flush=True)
        results["redis"] = {"skipped": redis_note}
    else:
        runs = []
        for i in range(cfg["redis_repeats"]):
            for clients, pipeline in cfg["redis_shapes"]:
                directory = os.path.join(base, f"redis-{clients}-{pipeline}-{i}")
                runs.append(
                    baselines.run_redis_replicated(directory, count, 100, pipeline, clients)
                )
                shutil.rmtree(directory, ignore_errors=True)
        results["redis"] = {"runs": runs}
        redis_best = max(runs, key=lambda r: r["entries_per_s"])
        shapes = ", ".join(
            f"-c {r['clients']} -P {r['pipeline']}: {human_rate(r['entries_per_s'])}" for r in runs
        )
        redis_note = f"{redis_best['version'].split(' sha')[0]}; best of {shapes}"
    rows = []
    for ack in ("local", "replicas=1"):
        runs, failures = [], []
        for i in range(cfg["repl_repeats"]):
            cluster = LocalCluster(os.path.join(base, f"repl-{ack}-{i}"), readers=2)
            try:
                start_cluster(cluster)
                warm_up(cluster)
                runs.append(replicated_run(cluster, count, 100, batch, inflight, ack))
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                first_line = str(exc).strip().splitlines()[0]
                kept = save_logs(cluster, f"replicated-{ack}-{i + 1}")
                print(f"  walrep ack {ack} run {i + 1}: {first_line} (logs: {kept})", flush=True)
                failures.append(f"{type(exc).__name__}: {' / '.join(str(exc).splitlines())}")
            finally:
                cluster.stop()
            shutil.rmtree(cluster.base, ignore_errors=True)
        results["walrep"][ack] = {"runs": runs, "failures": failures}
        if not runs:
            rows.append(
                row(
                    s,
                    f"walrep, ack {ack}",
                    None,
                    "failed",
                    key=f"walrep_{ack}_vs_redis",
                    notes=f"every run failed: {failures[0]}",
                )
            )
            continue
        best = max(runs, key=lambda r: r["replicated_per_s"])
        rate = best["replicated_per_s"]
        rss = best["peak_rss_kib"]
        note = (
            f"best of {len(runs)}: "
            + ", ".join(human_rate(r["replicated_per_s"]) for r in runs)
            + (f" ({len(failures)} failed: {failures[0]})" if failures else "")
            + f"; acked {human_rate(best['acked_per_s'])}; reader gaps fetched "
            f"{best['reader_gaps']}; peak RSS leader {human_kib(rss.get('leader'))}, "
            f"readers {human_kib(max((v or 0) for k, v in rss.items() if k != 'leader'))}"
        )
        rows.append(
            row(
                s,
                f"walrep, ack {ack}, until both readers hold all",
                rate,
                human_rate(rate),
                "raw pyzmq PUB/SUB, 1 pub + 2 sub procs",
                zmq_result["entries_per_s"],
                human_rate(zmq_result["entries_per_s"]),
                key=f"walrep_{ack}_vs_zmq",
                notes=f"{count:,} x 100 B, --batch {batch} --inflight {inflight}; " + note,
            )
        )
        if redis_best is not None:
            rows.append(
                row(
                    s,
                    f"walrep, ack {ack} (same run as above)",
                    rate,
                    human_rate(rate),
                    "Redis master+replica, pipelined XADD",
                    redis_best["entries_per_s"],
                    human_rate(redis_best["entries_per_s"]),
                    key=f"walrep_{ack}_vs_redis",
                    failed_runs=len(failures),
                    notes="until XLEN on the replica = N; AOF everysec; " + redis_note,
                )
            )
        else:
            rows.append(
                row(
                    s,
                    f"walrep, ack {ack} vs Redis",
                    None,
                    "-",
                    "Redis: skipped",
                    None,
                    "-",
                    key=f"walrep_{ack}_vs_redis",
                    notes=redis_note,
                )
            )
    return rows, results


# --- 3: commit latency ---------------------------------------------------------------------


def section_latency(cfg: dict, base: str) -> tuple[list[dict], dict]:
    s = "3 latency"
    rate, seconds = cfg["latency_rate"], cfg["latency_seconds"]
    floors = {batch: fsync_latency(cfg, base, entries=batch) for batch in (10, 100)}
    results: dict = {"fdatasync_floor_ms": floors[10], "runs": {}, "bare_path_runs": {}}
    rows = []
    # Requests of 10 entries are what the target is judged on; requests of 100 at the
    # same entry rate show what fewer, larger requests buy.
    # The last shape is the same load sent by the trio client (cluster.client), which
    # applications embed: walrep load is a leaner loop, and this shows what it saves.
    shapes = (
        ("local", 10, "load"),
        ("replicas=1", 10, "load"),
        ("replicas=2", 10, "load"),
        ("replicas=1", 100, "load"),
        ("replicas=1", 10, "trio client"),
    )
    for ack, batch, driver in shapes:
        load = ("--rate", str(rate), "--batch", str(batch), "--inflight", "64", "--ack", ack)
        runs, pipeline_runs = [], []
        tag = f"{ack}-{batch}-{driver.replace(' ', '-')}"
        for i in range(cfg["latency_repeats"]):
            cluster = LocalCluster(os.path.join(base, f"lat-{tag}-{i}"), readers=2)
            try:
                start_cluster(cluster)
                warm_up(cluster)
                with WakeStalls() as stalls:
                    if driver == "load":
                        summary = run_load(cluster, int(rate * seconds), *load)
                    else:
                        summary = trio_client_latency(cluster, rate, seconds, batch, ack)
                runs.append(
                    {
                        "summary": summary,
                        "peak_rss_kib": peak_rss(cluster),
                        "wake_stalls": stalls.report(),
                    }
                )
            finally:
                cluster.stop()
            shutil.rmtree(cluster.base, ignore_errors=True)
            if driver == "load":
                # The same load on the bare path, right after, so that both meet the
                # same hour of this machine.
                pipeline = Pipeline(os.path.join(base, f"pipe-{tag}-{i}"))
                try:
                    warm_up_pipeline(pipeline)
                    # The same sleeper as walrep's run: it costs the machine a little
                    # CPU, and both sides should pay it.
                    with WakeStalls() as stalls:
                        bare_summary = run_load(pipeline, int(rate * seconds), *load)
                    bare_summary["wake_stalls"] = stalls.report()
                    pipeline_runs.append(bare_summary)
                finally:
                    pipeline.stop()
                shutil.rmtree(pipeline.base, ignore_errors=True)
        load_shape = ack if batch == 10 else f"{ack}, requests of {batch}"
        shape = load_shape if driver == "load" else f"{load_shape}, {driver}"
        results["runs"][shape] = runs
        if pipeline_runs:
            results["bare_path_runs"][load_shape] = pipeline_runs
        # The trio client's baseline is the bare path under walrep load's requests.
        bare_runs = results["bare_path_runs"][load_shape]
        # The median run by p99 (not the best: noise shows up in latency as in life).
        summary = median_by_p99([r["summary"] for r in runs])
        lat = summary["latency_ms"]
        bare = median_by_p99(bare_runs)["latency_ms"]
        p99s = ", ".join(f"{r['summary']['latency_ms']['p99']:.1f}" for r in runs)
        bare_p99s = ", ".join(f"{r['latency_ms']['p99']:.1f}" for r in bare_runs)
        stalls_text = ", ".join(
            f"{r['wake_stalls']['count']} (longest {r['wake_stalls']['longest_ms']:.0f} ms)"
            for r in runs
        )
        bare_stalls_text = ", ".join(str(r["wake_stalls"]["count"]) for r in bare_runs)
        floor = floors[batch]
        rows.append(
            row(
                s,
                f"commit latency, ack {ack}, {rate / 1000:.0f} k entries/s"
                + ("" if batch == 10 else f", requests of {batch}")
                + ("" if driver == "load" else f", {driver}"),
                lat["p99"],
                f"{lat['p50']:.2f}/{lat['p99']:.2f}/{lat['p99.9']:.2f} ms",
                "the same path on bare pyzmq, walrep load",
                bare["p99"],
                f"{bare['p50']:.2f}/{bare['p99']:.2f}/{bare['p99.9']:.2f} ms",
                key=f"latency_{ack}"
                + ("" if batch == 10 else f"_batch{batch}")
                + ("" if driver == "load" else "_trio_client"),
                notes=f"p50/p99/p99.9, median of {len(runs)} runs by p99 (p99s: {p99s} ms; "
                f"bare path's: {bare_p99s} ms; ratio on p99); {seconds:.0f} s each, "
                f"requests of {batch}, 64 in flight; achieved "
                f"{human_rate(summary['entries_per_s'])}; write {batch} frames + fdatasync, "
                f"paced alike: {floor['p50']:.2f}/{floor['p99']:.2f}/{floor['p99.9']:.2f} ms; "
                f"a 2 ms sleeper woke over 2 ms late {stalls_text} times per run "
                f"(during the bare path's: {bare_stalls_text})",
                latency_ms=lat,
                baseline_latency_ms=bare,
                fdatasync_floor_ms=floor,
                wake_stalls=[r["wake_stalls"] for r in runs],
                baseline_wake_stalls=[r["wake_stalls"] for r in bare_runs],
            )
        )
    return rows, results


def median_by_p99(summaries: list[dict]) -> dict:
    ordered = sorted(summaries, key=lambda summary: summary["latency_ms"]["p99"])
    return ordered[(len(ordered) - 1) // 2]


def warm_up_pipeline(pipeline: Pipeline) -> None:
    """As warm_up: connections made and pages touched before the measured run."""
    run_load(pipeline, 1000, "--batch", "100", "--ack", "local")


def trio_client_latency(cluster: LocalCluster, rate: float, seconds: float, batch: int, ack: str):
    """walrep load's paced run, sent by the trio client (scripts/bench_trio_client.py)."""
    summary = os.path.join(cluster.base, f"trio-client-{time.monotonic_ns()}.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_trio_client.py")
    subprocess.run(
        [sys.executable, script, "--ingest", cluster.ingest, "--rate", str(rate)]
        + ["--seconds", str(seconds), "--batch", str(batch), "--ack", ack, "--summary", summary],
        check=True,
        timeout=seconds * 10 + 60,
    )
    with open(summary) as f:
        return json.load(f)


# --- 4: catch-up ---------------------------------------------------------------------------


def section_catch_up(cfg: dict, base: str) -> tuple[list[dict], dict]:
    s = "4 catch-up"
    behind, live_rate = cfg["catchup_behind"], cfg["catchup_live_rate"]
    entry_bytes = fmt.ENTRY_HEADER_BYTES + 100
    cluster = LocalCluster(os.path.join(base, "catchup"), readers=2)
    live = None
    try:
        start_cluster(cluster)
        warm_up(cluster)
        live_reader, late = cluster.reader_nodes
        late.stop()
        run_load(cluster, behind, "--batch", "1000", "--inflight", "16", "--ack", "local")
        head = fast_last_seq(cluster.leader.wal_dir, entry_bytes)
        wait_seq([live_reader.wal_dir], entry_bytes, head, 300, "the live reader")
        # The live load: paced, and long enough to outlast the catch-up's deadline.
        limit = cfg["catchup_deadline_s"]
        live_seconds = int(limit) + 60
        live_cmd = walrep_command(
            *("load", "--ingest", cluster.ingest, "--count", str(live_rate * live_seconds)),
            *("--rate", str(live_rate), "--batch", "100", "--inflight", "16", "--ack", "local"),
        )
        live_log = open(os.path.join(cluster.base, "live-load.log"), "wb")  # noqa: SIM115
        live = subprocess.Popen(live_cmd, stdout=live_log, stderr=subprocess.STDOUT)
        live_log.close()
        ramp = head + live_rate // 2  # wait until the live stream is flowing
        wait_seq([cluster.leader.wal_dir], entry_bytes, ramp, 30, "the live load to start")
        time.sleep(0.5)
        start_seq = fast_last_seq(late.wal_dir, entry_bytes)
        leader_at_start = fast_last_seq(cluster.leader.wal_dir, entry_bytes)
        began = time.monotonic()
        late.start()
        first_progress = None
        window = live_rate // 10  # "caught up": within 100 ms of live traffic
        deadline = began + limit
        unfinished = None  # why the reader did not catch up, if it did not
        while True:
            now = time.monotonic()
            lead = fast_last_seq(cluster.leader.wal_dir, entry_bytes)
            mine = fast_last_seq(late.wal_dir, entry_bytes)
            if first_progress is None and mine > start_seq:
                first_progress = (now, mine)
            if mine >= lead - window:
                break
            if now > deadline:
                unfinished = f"not caught up after {limit:.0f} s: at {mine:,}, leader at {lead:,}"
                break
            if live.poll() is not None:
                unfinished = (
                    f"the live load ended early ({live.returncode}): at {mine:,} of {lead:,}"
                )
                break
            if not late.running():
                unfinished = f"the reader exited ({late.proc.returncode}) at {mine:,} of {lead:,}"
                break
            time.sleep(0.005)
        caught = time.monotonic()
        applied = mine - start_seq
        rate = applied / (caught - began)
        live_measured = (lead - leader_at_start) / (caught - began)
        from_first = None
        if first_progress is not None and caught > first_progress[0]:
            from_first = (mine - first_progress[1]) / (caught - first_progress[0])
        result = {
            "behind_at_start": leader_at_start - start_seq,
            "applied": applied,
            "seconds_from_process_start": caught - began,
            "entries_per_s": rate,
            "entries_per_s_from_first_entry": from_first,
            "first_entry_after_s": None if first_progress is None else first_progress[0] - began,
            "live_target_per_s": live_rate,
            "live_measured_per_s": live_measured,
            "peak_rss_kib": peak_rss(cluster),
            "late_reader": late.name,
            "late_reader_gaps": gap_count(late),
            "unfinished": unfinished,
            "logs": save_logs(cluster, "catch-up") if unfinished else None,
        }
    finally:
        if live is not None:
            baselines.stop_pid(live)
        cluster.stop()
    # The ratio is taken against the live rate asked for, or the one the leader took if
    # higher: a leader that fell behind the asked-for rate must not flatter the ratio.
    live_baseline = max(live_measured, live_rate)
    rows = [
        row(
            s,
            f"reader {result['behind_at_start']:,} behind, live load on",
            rate,
            human_rate(rate),
            f"live rate: {live_rate / 1000:.0f} k/s asked (leader took "
            f"{human_rate(live_measured)})",
            live_baseline,
            human_rate(live_baseline),
            key="catch_up",
            notes=(f"FAILED TO CATCH UP: {unfinished}; rate so far. " if unfinished else "")
            + f"ratio to the rate the leader took: {rate / max(live_measured, 1):.2f}; "
            f"{result['seconds_from_process_start']:.2f} s from the reader's process start "
            + ("until it broke off" if unfinished else "to within 100 ms of the head")
            + f"; from its first entry: {human_rate(from_first)} "
            f"(first after {result['first_entry_after_s'] or 0:.2f} s); peak RSS of the late "
            f"reader {human_kib(result['peak_rss_kib'].get(result['late_reader']))}, leader "
            f"{human_kib(result['peak_rss_kib'].get('leader'))}",
            unfinished=unfinished,
        )
    ]
    return rows, result


# --- 5: cost -------------------------------------------------------------------------------


def section_cost(cfg: dict, base: str) -> tuple[list[dict], dict]:
    s = "5 cost"
    results = []
    rows = []
    one_reader: dict[int, float] = {}
    for size, count in cfg["cost_entries"].items():
        for readers in cfg["cost_readers"]:
            runs, failures = [], []
            for i in range(cfg["cost_repeats"]):
                cluster = LocalCluster(
                    os.path.join(base, f"cost-{size}-{readers}-{i}"), readers=readers
                )
                try:
                    start_cluster(cluster)
                    warm_up(cluster, size=size)
                    runs.append(
                        replicated_run(cluster, count, size, COST_BATCH[size], 16, "replicas=1")
                    )
                except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                    failures.append(f"{type(exc).__name__}: {' / '.join(str(exc).splitlines())}")
                    kept = save_logs(cluster, f"cost-{size}-{readers}-{i + 1}")
                    print(f"  cost {size} B x {readers}: {failures[-1][:200]} (logs: {kept})")
                finally:
                    cluster.stop()
                shutil.rmtree(cluster.base, ignore_errors=True)
            results.extend(runs)
            label = {100: "100 B", 1024: "1 KiB", 65536: "64 KiB"}.get(size, f"{size} B")
            what = f"{readers} reader{'s' if readers > 1 else ''}, {label} entries"
            if not runs:
                rows.append(row(s, what, None, "failed", notes=failures[0]))
                continue
            r = max(runs, key=lambda x: x["replicated_per_s"])
            rate = r["replicated_per_s"]
            rates = ", ".join(human_rate(x["replicated_per_s"]) for x in runs)
            if readers == 1:
                one_reader[size] = rate
            rss = r["peak_rss_kib"]
            reader_rss = [v for k, v in rss.items() if k != "leader" and v is not None]
            rows.append(
                row(
                    s,
                    what,
                    rate,
                    f"{human_rate(rate)} {rate * size / 1e6:.1f} MB/s",
                    f"1 reader, {label}",
                    one_reader.get(size),
                    human_rate(one_reader.get(size)),
                    key=f"cost_{size}_{readers}",
                    notes=f"{count:,} entries, --batch {COST_BATCH[size]}, ack replicas=1, "
                    f"best of {len(runs)} ({rates})"
                    + (f", {len(failures)} failed ({failures[0]})" if failures else "")
                    + "; "
                    f"peak RSS leader {human_kib(rss.get('leader'))}, readers "
                    f"{'/'.join(human_kib(v) for v in reader_rss)}; gaps {r['reader_gaps']}",
                )
            )
    return rows, {"runs": results}


# --- 6: CURVE ------------------------------------------------------------------------------


def keygen(prefix: str) -> tuple[str, str]:
    out = subprocess.run(walrep_command("keygen", prefix), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"walrep keygen failed: {out.stdout}{out.stderr}")
    return prefix + ".key", prefix + ".pub"


def curve_cluster(base: str, readers: int) -> tuple[LocalCluster, tuple[str, ...]]:
    """A cluster with CURVE everywhere: its own key per node and for the client."""
    keys = os.path.join(base, "keys")
    for sub in ("readers", "clients"):
        os.makedirs(os.path.join(keys, sub), exist_ok=True)
    leader_key, leader_pub = keygen(os.path.join(keys, "leader"))
    client_key, _ = keygen(os.path.join(keys, "clients", "bench"))
    cluster = LocalCluster(
        os.path.join(base, "cluster"),
        readers=readers,
        leader_extra=["--key", leader_key]
        + ["--allow-readers", os.path.join(keys, "readers")]
        + ["--allow-clients", os.path.join(keys, "clients")],
    )
    nodes = []
    for i in range(1, readers + 1):
        key, _ = keygen(os.path.join(keys, "readers", f"reader-{i}"))
        nodes.append(cluster.make_reader(f"reader-{i}", "--key", key, "--leader-key", leader_pub))
    cluster.reader_nodes = nodes
    return cluster, ("--key", client_key, "--leader-key", leader_pub)


def section_curve(cfg: dict, base: str) -> tuple[list[dict], dict]:
    s = "6 CURVE"
    out = subprocess.run(
        walrep_command("leader", "--help"), capture_output=True, text=True, timeout=60
    )
    if "--key" not in out.stdout:
        note = "`walrep leader --help` has no --key flag"
        row_ = row(s, "throughput with CURVE on vs off", None, "not available yet", notes=note)
        return [row_], {"leader_has_key_flag": False}
    count, batch, inflight = cfg["curve_entries"], cfg["repl_batch"], cfg["repl_inflight"]
    results: dict = {"leader_has_key_flag": True, "off": [], "on": []}
    for i in range(cfg["curve_repeats"]):
        for mode in ("off", "on"):
            where = os.path.join(base, f"curve-{mode}-{i}")
            if mode == "on":
                cluster, client = curve_cluster(where, 2)
            else:
                cluster, client = LocalCluster(os.path.join(where, "cluster"), readers=2), ()
            try:
                start_cluster(cluster)
                if mode == "on" and "unencrypted" in cluster.leader.log_text():
                    raise RuntimeError("the leader says it runs unencrypted despite --key")
                warm_up(cluster, client_args=client)
                results[mode].append(
                    replicated_run(cluster, count, 100, batch, inflight, "replicas=1", client)
                )
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                failure = f"{type(exc).__name__}: {' / '.join(str(exc).splitlines())}"
                results.setdefault("failures", []).append(f"CURVE {mode}: {failure}")
                kept = save_logs(cluster, f"curve-{mode}-{i + 1}")
                print(f"  CURVE {mode} run {i + 1}: {failure[:200]} (logs: {kept})", flush=True)
            finally:
                cluster.stop()
            shutil.rmtree(where, ignore_errors=True)
    if not results["on"] or not results["off"]:
        note = "; ".join(results.get("failures", []))
        return [row(s, "walrep, ack replicas=1, CURVE on vs off", None, "failed", notes=note)], (
            results
        )
    on = max(r["replicated_per_s"] for r in results["on"])
    off = max(r["replicated_per_s"] for r in results["off"])
    rows = [
        row(
            s,
            "walrep, ack replicas=1, CURVE on (every socket)",
            on,
            human_rate(on),
            "the same with CURVE off",
            off,
            human_rate(off),
            key="curve",
            notes=f"{count:,} x 100 B, 2 readers, --batch {batch} --inflight {inflight}; best of "
            f"{cfg['curve_repeats']}, on/off interleaved; on: "
            + ", ".join(human_rate(r["replicated_per_s"]) for r in results["on"])
            + "; off: "
            + ", ".join(human_rate(r["replicated_per_s"]) for r in results["off"])
            + "".join(f"; {f}" for f in results.get("failures", [])),
        )
    ]
    return rows, results


SECTIONS = {
    "local": section_local,
    "replicated": section_replicated,
    "latency": section_latency,
    "catchup": section_catch_up,
    "cost": section_cost,
    "curve": section_curve,
}


# --- targets and output --------------------------------------------------------------------


def find(rows: list[dict], key: str) -> dict | None:
    return next((r for r in rows if r.get("key") == key), None)


def targets(rows: list[dict]) -> list[dict]:
    out = []

    def add(name: str, r: dict | None, value, threshold, ok_if, shown: str):
        if r is None or value is None:
            out.append({"target": name, "status": "n/a", "value": None, "shown": "not measured"})
            return
        failed_run = r.get("unfinished")  # a run that broke off cannot pass
        out.append(
            {
                "target": name,
                "status": "PASS" if ok_if(value, threshold) and not failed_run else "FAIL",
                "value": value,
                "threshold": threshold,
                "shown": shown
                + (f" (but the run failed: {failed_run})" if failed_run else "")
                + (
                    f" ({r['failed_runs']} other run(s) failed: see the row)"
                    if r.get("failed_runs")
                    else ""
                ),
            }
        )

    r = find(rows, "walrep_replicas=1_vs_redis")
    add(
        "replicated throughput, replicas=1 >= 1.0x Redis replicated XADD",
        r,
        r and r["ratio"],
        1.0,
        lambda v, t: v >= t,
        r and f"{r['figure_text']} vs {r['baseline_text']} = {r['ratio'] or 0:.3f}x",
    )
    for mode in ("async", "fdatasync"):
        r = find(rows, f"batched_{mode}")
        add(
            f"local batched append ({mode}) >= 0.5x raw write",
            r,
            r and r["ratio"],
            0.5,
            lambda v, t: v >= t,
            r and f"{r['figure_text']} vs {r['baseline_text']} = {r['ratio']:.3f}x",
        )
    r = find(rows, "latency_replicas=1")
    add(
        "commit latency p99 <= 5 ms at 10 k/s, replicas=1",
        r,
        r and r["figure"],
        5.0,
        lambda v, t: v <= t,
        r and f"p99 {r['figure']:.2f} ms (the same path on bare pyzmq: {r['baseline_text']})",
    )
    r = find(rows, "catch_up")
    add(
        "catch-up >= 5x the live rate",
        r,
        r and r["ratio"],
        5.0,
        lambda v, t: v >= t,
        r and f"{r['figure_text']} vs {r['baseline_text']} = {r['ratio']:.3f}x",
    )
    r = find(rows, "scan")
    add(
        "scan >= 2 M entries/s",
        r,
        r and r["figure"],
        2e6,
        lambda v, t: v >= t,
        r and r["figure_text"],
    )
    return out


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'section':13} {'what':50} {'figure':>22}   {'baseline (same run)':42} "
        f"{'figure':>22} {'ratio':>6}  notes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(
            f"{r['section']:13} {r['what']:50} {r['figure_text']:>22}   {r['baseline']:42} "
            f"{r['baseline_text']:>22} {ratio:>6}  {r['notes']}"
        )


machine_info: dict = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (~1-2 minutes)")
    parser.add_argument(
        "--json",
        default=None,
        help="default bench-results/bench.json (bench-quick.json with --quick)",
    )
    parser.add_argument(
        "--only", default=None, help=f"comma-separated sections: {','.join(SECTIONS)}"
    )
    parser.add_argument("--dir", default=None, help="where to put data (default: a temp dir)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.json is None:
        args.json = "bench-results/bench-quick.json" if args.quick else "bench-results/bench.json"
    chosen = list(SECTIONS) if args.only is None else args.only.split(",")
    for name in chosen:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r} (known: {', '.join(SECTIONS)})")

    # SIGTERM unwinds like Ctrl-C, so every finally block stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine_info.update(machine())
    load_start = os.getloadavg()
    started = time.monotonic()
    print(
        f"machine: nproc {machine_info['nproc']} (usable {machine_info['cpus_usable']}), "
        f"{machine_info['model']}, kernel {machine_info['kernel']}, "
        f"Python {machine_info['python']}, load average at start "
        + " ".join(f"{x:.2f}" for x in load_start),
        flush=True,
    )
    print(
        f"walrep {machine_info['git'].get('head')}"
        + (
            f" with uncommitted changes in {', '.join(machine_info['git']['dirty'])}"
            if machine_info["git"].get("dirty")
            else ""
        )
        + f"; mode {'quick' if args.quick else 'full'}",
        flush=True,
    )
    rows: list[dict] = []
    raw: dict = {}
    timings: dict = {}
    cpu: dict = {}
    settled: dict = {}
    whole = CpuMeter()
    LOG_DIR.append(os.path.join(os.path.dirname(os.path.abspath(args.json)), "failed-runs"))
    shutil.rmtree(LOG_DIR[0], ignore_errors=True)  # only this run's failures
    base = tempfile.mkdtemp(prefix="walrep-bench-", dir=args.dir)
    try:
        for name in chosen:
            print(f"[{time.monotonic() - started:6.1f} s] {name} ...", flush=True)
            settled[name] = settle(cfg["settle_max_s"])
            t = time.monotonic()
            meter = CpuMeter()
            try:
                section_rows, section_raw = SECTIONS[name](cfg, base)
            except Exception as exc:  # one broken section must not hide the others
                traceback.print_exc()
                section_rows = [
                    row(name, "error", None, "error", notes=f"{type(exc).__name__}: {exc}")
                ]
                section_raw = {"error": f"{type(exc).__name__}: {exc}"}
            rows.extend(section_rows)
            raw[name] = section_raw
            timings[name] = time.monotonic() - t
            cpu[name] = meter.report()
            print(f"          {name}: {describe_cpu(cpu[name])}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_end = os.getloadavg()
    cpu["whole run"] = whole.report()
    elapsed = time.monotonic() - started
    print()
    print_table(rows)
    print()
    results = targets(rows)
    print("targets:")
    for t in results:
        print(f"  {t['status']:4}  {t['target']}: {t['shown']}")
    print()
    print("load average at end " + " ".join(f"{x:.2f}" for x in load_end))
    print(f"CPU during the run: {describe_cpu(cpu['whole run'])}")
    for name in chosen:
        c = cpu.get(name, {})
        if c.get("foreign_share", 0) > 0.10 and c.get("seconds", 0) > 5:
            print(
                f"  note: other processes used {c['foreign_share']:.0%} of the machine "
                f"during section {name}: its figures are pessimistic"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": machine_info,
                "load_average": {"start": load_start, "end": load_end},
                "mode": "quick" if args.quick else "full",
                "config": {k: v for k, v in cfg.items() if k != "cost_entries"}
                | {"cost_entries": {str(k): v for k, v in cfg["cost_entries"].items()}},
                "seconds": elapsed,
                "section_seconds": timings,
                "cpu": cpu,
                "settle": settled,
                "rows": rows,
                "targets": results,
                "raw": raw,
            },
            f,
            indent=2,
            default=str,
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
