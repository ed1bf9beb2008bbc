"""What `pip install walrep` puts into site-packages: one import package, `walrep`.

The wheel is built from a copy of the tracked files (so the checkout gets no build/
or egg-info) and installed into a fresh virtualenv; the imports are then tried from
a directory outside the checkout, where a stray `node/` or `cluster/` cannot help.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.timeout(240)


def _tracked_tree(dest: str) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if not os.path.exists(os.path.join(ROOT, name)):
            continue  # deleted in the working tree, not yet committed
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding only walrep, its site-packages).

    Built from the files git tracks or would track (new modules not yet added count).
    """
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs the git checkout to know the tracked files")
    base = tmp_path_factory.mktemp("packaging")
    source, wheels, venv = base / "source", base / "wheels", base / "venv"
    _tracked_tree(str(source))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = glob.glob(str(wheels / "walrep-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [*pip, "--python", python, "install", "--quiet", "--no-deps", wheel],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return python, site


def test_walrep_is_the_only_top_level_name(installed):
    _python, site = installed
    names = {n for n in os.listdir(site) if not n.endswith((".dist-info", ".pth"))}
    names.discard("__pycache__")
    assert names == {"walrep"}
    (info,) = glob.glob(os.path.join(site, "walrep-*.dist-info"))
    with open(os.path.join(info, "RECORD")) as f:
        tops = {line.split("/", 1)[0].split(",", 1)[0] for line in f if line.strip()}
    assert tops - {os.path.basename(info)} - {"..", "bin"} == {"walrep"}
    # The C fast path is a submodule of walrep.node, not a top-level _scan.
    assert glob.glob(os.path.join(site, "walrep", "node", "_scan*.so"))


def test_imports_work_as_walrep_and_not_as_node(installed, tmp_path):
    python, site = installed
    # The dependencies (msgpack, trio, pyzmq, ...) come from this test's environment;
    # PYTHONPATH runs no .pth file there, so the checkout's editable install stays off.
    deps = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=deps)
    probe = (
        "import walrep.node, walrep.cluster.cli, walrep.node.reader as r\n"
        f"assert walrep.node.__file__.startswith({site!r}), walrep.node.__file__\n"
        "assert r._scan_fast is not None\n"
        "for name in ('node', 'cluster'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'import {name} worked outside the checkout')\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    walrep = os.path.join(os.path.dirname(python), "walrep")
    shown = subprocess.run(
        [walrep, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert "usage: walrep" in shown.stdout
