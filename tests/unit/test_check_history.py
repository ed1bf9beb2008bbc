"""The history checker (walrep.cluster.history, `walrep check-history`) against small WAL
directories written for real with node.Writer.

Each violation test builds logs and a history that hold exactly that violation
(and says so when one fault is, by definition, two kinds: a reader that diverges
from the leader has also not converged).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from walrep import node
from walrep.cluster import cli
from walrep.cluster import history as ch
from walrep.cluster.loadgen import payload_for
from walrep.node import format as fmt

SIZE = 40


def p(entry_id: int) -> bytes:
    return payload_for(entry_id, SIZE)


def write_log(path: Path, payloads: list[bytes]) -> str:
    """A leader's log: payloads at sequences 1.. with append_batch."""
    with node.Writer(str(path), sync_mode="async") as w:
        if payloads:
            w.append_batch(payloads)
    return str(path)


def replicate(
    src: str,
    dst: Path,
    lo: int = 1,
    hi: int | None = None,
    *,
    other: dict[int, bytes] | None = None,
    timestamps: dict[int, int] | None = None,
    max_size_bytes: int = 1 << 20,
    chunk: int | None = None,
) -> str:
    """A reader's log: src's frames lo..hi byte for byte (append_replicated), except
    ``other`` (seq -> payload, same timestamp) and ``timestamps`` (seq -> timestamp)."""
    changed = set(other or ()) | set(timestamps or ())
    reader = node.WALReader(src)
    hi = reader.bounds()[1] if hi is None else hi
    with node.Writer(str(dst), sync_mode="async", max_size_bytes=max_size_bytes) as w:
        if lo > 1:
            w.start_at(lo)
        seq = lo
        while seq <= hi:
            if seq in changed:
                [(_s, ts, payload)] = list(reader.raw_entries(seq, seq))
                ts = (timestamps or {}).get(seq, ts)
                payload = (other or {}).get(seq, payload)
                w.append_replicated(seq, fmt.encode_entry(ts, payload))
                seq += 1
                continue
            stop = min([hi] + [s - 1 for s in changed if s > seq])
            if chunk:
                stop = min(stop, seq + chunk - 1)
            first, count, data = reader.read_frames(seq, stop)
            last = w.append_replicated(first, data, count=count)
            if chunk:
                w.wait_committed(last, timeout=20)
            seq += count
    return str(dst)


def history(path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def acked(ids, first_seq: int = 1, **extra) -> list[dict]:
    return [{"id": i, "seq": first_seq + n, "outcome": "ok", **extra} for n, i in enumerate(ids)]


def kinds(verdict) -> dict[str, int]:
    return {kind: n for kind, n in verdict.counts().items() if n}


@pytest.fixture
def cluster(tmp_path):
    """A leader with ids 0..9 at seqs 1..10 and two readers holding the same bytes."""
    leader = write_log(tmp_path / "leader", [p(i) for i in range(10)])
    nodes = {
        "leader": leader,
        "reader-1": replicate(leader, tmp_path / "reader-1"),
        "reader-2": replicate(leader, tmp_path / "reader-2"),
    }
    return nodes, history(tmp_path / "h.jsonl", acked(range(10)))


# --- a clean history -----------------------------------------------------------------------


def test_a_clean_history_passes(cluster, capsys):
    nodes, hist = cluster
    verdict = ch.check([hist], nodes)
    assert verdict.ok and kinds(verdict) == {}
    assert [(n.name, n.first, n.last, n.entries, n.gaps) for n in verdict.nodes] == [
        ("leader", 1, 10, 10, 0),
        ("reader-1", 1, 10, 10, 0),
        ("reader-2", 1, 10, 10, 0),
    ]
    [level] = verdict.levels
    assert (level.level, level.acked, level.lost) == ("local", 10, 0)
    assert "verdict: OK" in verdict.table()
    as_json = json.loads(verdict.to_json())
    assert as_json["ok"] is True and as_json["lost"] == [] and len(as_json["nodes"]) == 3

    argv = ["--history", hist] + [f"--node={n}={d}" for n, d in nodes.items()]
    assert ch.main(argv) == 0
    assert "verdict: OK" in capsys.readouterr().out


# --- lost acknowledged entries -------------------------------------------------------------


def test_an_acked_entry_no_node_holds_is_lost(tmp_path, cluster):
    nodes, _ = cluster
    # The client was told id 10 is at seq 11; every log ends at 10 (a lost tail).
    hist = history(tmp_path / "lost.jsonl", acked(range(11)))
    verdict = ch.check([hist], nodes)
    assert kinds(verdict) == {"lost": 1}
    [item] = verdict.lost
    assert (item.id, item.seq, item.ack, item.kind, item.copies) == (10, 11, "local", "missing", [])
    assert "on 0 nodes, 1 needed" in item.detail
    assert [(v.level, v.acked, v.lost) for v in verdict.levels] == [("local", 11, 1)]

    # The strict rule names the leader, which promised it for ack=local.
    [strict] = ch.lost(hist, nodes, ch.strict_rule())
    assert strict.missing_on == ["leader"] and "the leader holds 1..10" in strict.detail
    # Its disk lost, the leader is excused, but some node must still hold the entry.
    [excused] = ch.lost(hist, nodes, ch.strict_rule(leader_disk_lost=True))
    assert excused.missing_on == [] and "on 0 nodes" in excused.detail


def test_an_acked_entry_with_changed_bytes_is_lost(tmp_path):
    changed = bytearray(p(3))
    changed[-1] = ord("y")
    leader = write_log(tmp_path / "leader", [p(i) for i in range(3)] + [bytes(changed)])
    nodes = {"leader": leader, "reader-1": replicate(leader, tmp_path / "reader-1")}
    hist = history(tmp_path / "h.jsonl", acked(range(4)))
    verdict = ch.check([hist], nodes)
    assert kinds(verdict) == {"lost": 1}
    [item] = verdict.lost
    assert (item.id, item.seq, item.kind) == (3, 4, "changed")
    assert item.changed_on == ["leader", "reader-1"] and item.copies == []
    # With the size walrep load used, a truncated payload is caught too.
    short = write_log(tmp_path / "short", [p(0), p(1)[:30]])
    assert ch.lost(acked(range(2)), {"leader": short}) == []  # id and padding are right
    [cut] = ch.lost(acked(range(2)), {"leader": short}, size=SIZE)
    assert (cut.id, cut.kind) == (1, "changed")


def test_an_entry_missing_on_a_node_that_holds_its_range_is_lost(tmp_path):
    """A damaged entry in a sealed segment of a reader: a hole the digest cannot span;
    the entry-by-entry comparison finds it at its exact sequence."""
    leader = write_log(tmp_path / "leader", [p(i) for i in range(40)])
    reader = replicate(leader, tmp_path / "reader-1", max_size_bytes=500, chunk=10)
    segments = node.WALReader(reader).segments()
    assert len(segments) >= 3
    with open(segments[1].path, "r+b") as f:  # flip a padding byte of the segment's 2nd entry
        data = f.read()
        at = data.index(p(segments[1].first_seq))  # payload of seq first+1 (id = seq - 1)
        f.seek(at + SIZE - 1)
        f.write(b"z")
    hole = segments[1].first_seq + 1
    nodes = {"leader": leader, "reader-1": reader}
    verdict = ch.check(acked(range(40)), nodes)
    assert kinds(verdict) == {"lost": 1, "divergences": 1, "not_converged": 1}
    [item] = verdict.lost
    assert (item.seq, item.kind, item.missing_on, item.copies) == (
        hole,
        "missing",
        ["reader-1"],
        ["leader"],
    )
    [div] = verdict.divergences
    assert (div.seq, div.detail) == (hole, "missing on reader-1")
    reader_summary = verdict.nodes[1]
    assert reader_summary.gaps == 1 and any("crc-mismatch" in x for x in reader_summary.problems)


def test_unknown_and_failed_outcomes_are_never_lost(tmp_path, cluster):
    nodes, _ = cluster
    lines = acked(range(9)) + [
        {"id": 9, "seq": None, "outcome": "unknown"},  # it did commit, at seq 10
        {"id": 10, "seq": None, "outcome": "unknown"},  # it did not
        {"id": 11, "seq": None, "outcome": "failed"},
    ]
    verdict = ch.check([history(tmp_path / "h.jsonl", lines)], nodes)
    assert verdict.ok and kinds(verdict) == {}
    [level] = verdict.levels
    assert (level.acked, level.unknown, level.failed, level.lost) == (9, 2, 1, 0)


def test_ack_levels_from_the_history_and_their_promises(tmp_path):
    leader = write_log(tmp_path / "leader", [p(i) for i in range(6)])
    reader = replicate(leader, tmp_path / "reader-1", hi=3)  # behind: holds 1..3
    nodes = {"leader": leader, "reader-1": reader}
    lines = (
        acked([0, 1], 1, ack="none")
        + acked([2, 3], 3, ack="local")
        + acked([4, 5], 5, ack="replicas=1", client="c2", attempt=1)
        + [{"id": 6, "seq": 7, "outcome": "ok", "ack": "none"}]  # nothing promised
    )
    # As `walrep load` logs them now: no --ack means the leader's default level.
    lines[2].update(ack="leader-default", attempts=1)
    lines[3].update(ack="leader-default", attempts=2)
    hist = history(tmp_path / "h.jsonl", lines)
    verdict = ch.check([hist], nodes)
    assert kinds(verdict) == {"not_converged": 1}
    levels = {v.level: (v.acked, v.lost, v.promise) for v in verdict.levels}
    assert list(levels) == ["none", "local", "replicas=1"]
    assert levels["none"] == (3, 0, "nothing")
    assert levels["local"][:2] == (2, 0) and levels["replicas=1"][:2] == (2, 0)
    # Strict: replicas=1 also needs a reader, and reader-1 stops at 3.
    strict = ch.lost(hist, nodes, ch.strict_rule())
    assert [(x.id, x.ack, x.client) for x in strict] == [
        (4, "replicas=1", "c2"),
        (5, "replicas=1", "c2"),
    ]
    assert "on 0 of the 1 readers needed" in strict[0].detail
    # "In at least one reader": local entries 2 (seq 3) is, 3 (seq 4) is not.
    assert [x.id for x in ch.lost(hist, nodes, ch.reader_rule)] == [3, 4, 5]


# --- duplicates ----------------------------------------------------------------------------


def test_an_id_at_two_sequences_is_a_duplicate(tmp_path):
    leader = write_log(tmp_path / "leader", [p(i) for i in range(10)] + [p(3)])
    nodes = {"leader": leader, "reader-1": replicate(leader, tmp_path / "reader-1")}
    verdict = ch.check([history(tmp_path / "h.jsonl", acked(range(10)))], nodes)
    assert kinds(verdict) == {"duplicate_ids": 1}
    [dup] = verdict.duplicate_ids
    assert (dup.id, dup.seqs, dup.nodes, dup.retried, dup.tolerated) == (
        3,
        [4, 11],
        ["leader", "reader-1"],
        False,
        False,
    )


def test_a_duplicate_after_a_retry_is_flagged_and_can_be_tolerated(tmp_path):
    leader = write_log(tmp_path / "leader", [p(i) for i in range(10)] + [p(3)])
    lines = acked(range(10))
    lines[3] = {"id": 3, "seq": None, "outcome": "unknown", "attempt": 1}
    lines.append({"id": 3, "seq": 11, "outcome": "ok", "attempt": 2})
    hist = history(tmp_path / "h.jsonl", lines)
    verdict = ch.check([hist], {"leader": leader})
    assert [(d.id, d.retried, d.tolerated) for d in verdict.duplicate_ids] == [(3, True, False)]
    assert not verdict.ok
    tolerant = ch.check([hist], {"leader": leader}, tolerate_retry_duplicates=True)
    assert tolerant.ok and tolerant.duplicate_ids[0].tolerated
    # One line per id, "attempts" counting the sends of the request, marks it too.
    lines = acked(range(10))
    lines[3]["attempts"] = 2
    hist = history(tmp_path / "h2.jsonl", lines)
    [dup] = ch.check([hist], {"leader": leader}).duplicate_ids
    assert (dup.id, dup.retried) == (3, True)


def test_two_clients_may_each_write_the_same_ids(tmp_path):
    # Two `walrep load` runs both number their ids from 0.
    leader = write_log(tmp_path / "leader", [p(i) for i in range(5)] * 2)
    h1 = history(tmp_path / "h1.jsonl", acked(range(5), 1))
    h2 = history(tmp_path / "h2.jsonl", acked(range(5), 6))
    assert ch.check([h1, h2], {"leader": leader}).ok
    only_one = ch.check([h1], {"leader": leader})  # the other run's history not given
    assert kinds(only_one) == {"duplicate_ids": 5}


def test_one_seq_acked_to_two_requests(tmp_path, cluster):
    nodes, _ = cluster
    # Two clients sent id 3 and were both told seq 4: the entry is there once.
    lines = acked(range(10), client="a") + [{"id": 3, "seq": 4, "outcome": "ok", "client": "b"}]
    verdict = ch.check([history(tmp_path / "h.jsonl", lines)], nodes)
    assert kinds(verdict) == {"seq_conflicts": 1}
    [conflict] = verdict.seq_conflicts
    assert conflict.seq == 4 and sorted((a["client"], a["id"]) for a in conflict.acks) == [
        ("a", 3),
        ("b", 3),
    ]
    # One client told two ids got seq 4: one of them cannot be there either.
    lines = acked(range(10)) + [{"id": 7, "seq": 4, "outcome": "ok"}]
    verdict = ch.check([history(tmp_path / "h2.jsonl", lines)], nodes)
    assert [c.seq for c in verdict.seq_conflicts] == [4]
    assert [(x.id, x.seq, x.kind) for x in verdict.lost] == [(7, 4, "changed")]


# --- divergence and convergence ------------------------------------------------------------


def test_a_divergent_reader_is_found_at_its_exact_seq_by_bisection(tmp_path):
    n, bad = 1000, 637
    leader = write_log(tmp_path / "leader", [p(i) for i in range(n)])
    reader = replicate(leader, tmp_path / "reader-1", other={bad: p(99_999)})
    lines = acked(range(n))
    lines[bad - 1] = {"id": bad - 1, "seq": None, "outcome": "unknown"}  # so nothing acked changed
    verdict = ch.check(lines, {"leader": leader, "reader-1": reader})
    # A reader that differs from the leader has, by definition, not converged either.
    assert kinds(verdict) == {"divergences": 1, "not_converged": 1}
    [div] = verdict.divergences
    assert (div.a, div.b, div.seq, div.compared) == ("leader", "reader-1", bad, [1, n])
    assert div.detail == "payloads differ (load id 636 vs 99999)"
    [nc] = verdict.not_converged
    assert (nc.node, nc.kind) == ("reader-1", "diverged") and str(bad) in nc.detail

    digests = ch.Digests()
    assert ch.first_divergence(leader, reader, 1, n, digests) == bad
    assert digests.calls <= 2 * (n.bit_length() + 1)  # 2 nodes x (whole range + one per halving)
    assert ch.first_divergence(leader, reader, 1, bad - 1) is None
    assert ch.first_divergence(leader, reader, bad + 1, n) is None
    for k in (1, 2, 500, 999, n):  # every position, the ends included
        other = replicate(leader, tmp_path / f"other-{k}", timestamps={k: 1})
        assert ch.first_divergence(leader, other, 1, n) == k


def test_divergence_between_readers_is_compared_only_where_both_hold_entries(tmp_path):
    src = write_log(tmp_path / "src", [p(i) for i in range(100)])
    leader = replicate(src, tmp_path / "leader", lo=51)  # purged: holds 51..100
    r1 = replicate(src, tmp_path / "reader-1")
    r2 = replicate(src, tmp_path / "reader-2", timestamps={17: 5})
    r3 = replicate(src, tmp_path / "reader-3", lo=60)  # joined mid-stream
    lines = acked(range(100))
    nodes = {"leader": leader, "reader-1": r1, "reader-2": r2, "reader-3": r3}
    verdict = ch.check(lines, nodes)
    assert kinds(verdict) == {"divergences": 1}
    [div] = verdict.divergences
    assert (div.a, div.b, div.seq, div.compared) == ("reader-1", "reader-2", 17, [1, 100])
    assert div.detail.startswith("timestamps differ")


def test_a_reader_that_did_not_converge(tmp_path, cluster):
    nodes, hist = cluster
    nodes["reader-2"] = replicate(nodes["leader"], tmp_path / "behind", hi=7)
    nodes["reader-3"] = str(tmp_path / "empty")
    os.mkdir(nodes["reader-3"])
    verdict = ch.check([hist], nodes)
    assert kinds(verdict) == {"not_converged": 2}
    assert [(x.node, x.kind, x.last, x.leader_last) for x in verdict.not_converged] == [
        ("reader-2", "behind", 7, 10),
        ("reader-3", "behind", None, 10),
    ]


def test_a_reader_ahead_of_the_leader_did_not_converge(tmp_path):
    src = write_log(tmp_path / "src", [p(i) for i in range(10)])
    leader = replicate(src, tmp_path / "leader", hi=7)  # lost its tail, as a wiped disk would
    nodes = {"leader": leader, "reader-1": src}
    verdict = ch.check(acked(range(10)), nodes)
    assert kinds(verdict) == {"not_converged": 1}
    assert verdict.not_converged[0].kind == "ahead"


def test_convergence_time_from_reach_times_and_observations():
    c = ch.convergence_from_reached(10.0, {"reader-1": 10.5, "reader-2": 12.25})
    assert c.converged and c.seconds == 2.25 and c.per_node == {"reader-1": 0.5, "reader-2": 2.25}
    never = ch.convergence_from_reached(10.0, {"reader-1": 10.5, "reader-2": None})
    assert not never.converged and never.seconds is None
    observations = [
        (9.0, {"leader": 50, "reader-1": 40, "reader-2": 50}),
        (11.0, {"leader": 100, "reader-1": 60}),
        (12.5, {"reader-1": 100}),
        (13.0, {"reader-2": 100}),
    ]
    c = ch.convergence_from_observations(10.0, observations)
    assert c.target == 100 and c.per_node == {"reader-1": 2.5, "reader-2": 3.0}
    assert c.seconds == 3.0


def test_wait_converged_polls_until_readers_hold_the_leaders_head(tmp_path):
    leader = write_log(tmp_path / "leader", [p(i) for i in range(50)])
    reader = replicate(leader, tmp_path / "reader-1", hi=20)
    nodes = {"leader": leader, "reader-1": reader}
    with pytest.raises(ch.ConvergenceTimeout) as info:
        ch.wait_converged(nodes, 0.1)
    assert info.value.positions == {"leader": 50, "reader-1": 20}

    def catch_up():
        with node.Writer(reader, sync_mode="async") as w:
            first, count, data = node.WALReader(leader).read_frames(21, 50)
            w.append_replicated(first, data, count=count)

    healed = time.monotonic()
    timer = threading.Timer(0.2, catch_up)
    timer.start()
    try:
        took = ch.wait_converged(nodes, 10, since=healed, poll_s=0.01)
    finally:
        timer.join()
    assert 0.2 <= took < 10
    assert ch.wait_converged(nodes, 1) < 1

    # Same head, other bytes: never converged.
    other = replicate(leader, tmp_path / "reader-2", other={50: p(7)})
    with pytest.raises(ch.ConvergenceTimeout, match="entry 50 differs"):
        ch.wait_converged({"leader": leader, "reader-2": other}, 0.1)


# --- histories and the command line --------------------------------------------------------


def test_history_lines_are_validated_and_a_torn_last_line_is_skipped(tmp_path):
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": 0, "seq": 1, "outcome": "ok"}\n{"id": 1, "se')
    loaded = ch.load_history([str(torn)])
    assert [(r.id, r.client) for r in loaded.records] == [(0, str(torn))]
    assert "incomplete last line" in loaded.notes[0]
    for bad in (
        '{"id": 0, "seq": 1, "outcome": "maybe"}',
        '{"id": "0", "seq": 1, "outcome": "ok"}',
        '{"id": 0, "seq": null, "outcome": "ok"}',
        '{"id": 0, "seq": 1, "outcome": "ok", "ack": "replicas=0"}',
        "not json",
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(bad + "\n")
        with pytest.raises(ch.HistoryError, match="bad.jsonl:1"):
            ch.load_history([str(path)])


def test_command_line_exit_status_and_json(tmp_path, cluster, capsys):
    nodes, _ = cluster
    node_args = [f"--node={n}={d}" for n, d in nodes.items()]
    lost_hist = history(tmp_path / "lost.jsonl", acked(range(11)))
    assert ch.main(["--history", lost_hist, *node_args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["counts"]["lost"] == 1 and out["lost"][0]["seq"] == 11

    assert ch.main(["--history", lost_hist, *node_args]) == 1
    assert "verdict: VIOLATIONS (lost 1)" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    usage = [
        ["--history", str(bad), *node_args],
        ["--history", str(tmp_path / "absent.jsonl"), *node_args],
        ["--history", lost_hist, "--node", "leader=" + str(tmp_path / "absent")],
        ["--history", lost_hist, "--node", "reader-1=" + nodes["reader-1"]],
        ["--history", lost_hist, "--node", "leader"],
        ["--history", lost_hist, *node_args, "--reached", "reader-1=2"],
    ]
    for argv in usage:
        assert ch.main(argv) == 2, argv
        assert "check_history:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ch.main(node_args)  # no --history
    assert info.value.code == 2
    capsys.readouterr()

    ok_hist = history(tmp_path / "ok.jsonl", acked(range(10)))
    argv = ["--history", ok_hist, *node_args, "--healed-at", "5", "--reached", "reader-1=6.5"]
    assert ch.main([*argv, "--reached", "reader-2=5.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["convergence"]["seconds"] == 1.5


def test_walrep_check_history_and_the_script_are_the_same_command(tmp_path, cluster, capsys):
    nodes, _ = cluster
    node_args = [f"--node={n}={d}" for n, d in nodes.items()]
    lost_hist = history(tmp_path / "lost.jsonl", acked(range(11)))
    ok_hist = history(tmp_path / "ok.jsonl", acked(range(10)))
    for argv, status in [
        (["--history", ok_hist, *node_args], 0),
        (["--history", lost_hist, *node_args, "--json"], 1),
        (["--history", lost_hist, "--node", "leader=" + str(tmp_path / "absent")], 2),
    ]:
        assert ch.main(argv) == status, argv
        direct = capsys.readouterr()
        assert cli.main(["check-history", *argv]) == status, argv
        assert capsys.readouterr() == direct
    with pytest.raises(SystemExit) as info:
        cli.main(["check-history", *node_args])  # no --history: a usage error, 2
    assert info.value.code == 2
    capsys.readouterr()

    script = Path(__file__).resolve().parents[2] / "scripts" / "check_history.py"
    argv = ["--history", lost_hist, *node_args]
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    assert cli.main(["check-history", *argv]) == proc.returncode == 1
    assert capsys.readouterr().out == proc.stdout
