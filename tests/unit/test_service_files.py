"""The systemd units in configs/ are valid units (checked by systemd itself when present)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(
    ("unit", "instance"),
    [
        ("walrep-leader.service", "walrep-leader.service"),
        ("walrep-reader@.service", "walrep-reader@reader-1.service"),
    ],
)
def test_units_verify(tmp_path, unit, instance):
    walrep = Path(sys.executable).with_name("walrep")
    text = (CONFIGS / unit).read_text().replace("/usr/local/bin/walrep", str(walrep))
    (tmp_path / instance).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert problems == [], problems
