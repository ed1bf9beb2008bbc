"""A short chaos run: every fault kind at least once, under load, checked by the history checker.

Root only (network namespaces, nftables, a tmpfs for the leader); `make chaos` runs
long ones. The run is scripts/chaos.py as a child process with a fixed seed; its
report is printed when the test fails. The fault kinds and the environment checks
come from walrep.cluster.faults, as the driver's own do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from walrep.cluster import faults

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHAOS = os.path.join(ROOT, "scripts", "chaos.py")

SEED = 11
SECONDS = 60


def _netns_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, nftables and a tmpfs for the leader")
    faults.ensure_nftables()  # apt-get install nftables when missing
    problem = faults.netns_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_chaos_run_every_fault_kind(tmp_path):
    _netns_or_skip()
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            CHAOS,
            "--seconds",
            str(SECONDS),
            "--seed",
            str(SEED),
            "--net",
            "netns",
            "--netns-prefix",
            "walrep-test",
            "--round-seconds",
            "15",
            "--dir",
            str(tmp_path / "run"),
            "--summary",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=840,
        cwd=ROOT,
    )
    report = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert summary.exists(), report
    result = json.loads(summary.read_text())
    missing = [kind for kind in faults.KINDS if result["faults_by_kind"].get(kind, 0) < 1]
    assert not missing, f"fault kinds never injected: {missing}\n{report}"
    assert result["verdict"]["ok"], report
    assert not result["incidents"], report
    assert result["final_convergence_s"] is not None, report
    assert proc.returncode == 0, report
    # The namespaces are gone again.
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "walrep-test-" not in names
