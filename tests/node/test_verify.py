"""walrep verify on WAL directories: equal, differing at a known sequence, a missing range."""

from __future__ import annotations

import json

import pytest
import trio

from walrep import node
from walrep.cluster.cli import main
from walrep.cluster.verify import DirSource, first_difference
from walrep.node import format as fmt


def copy_log(src: str, dst: str, *, change: dict[int, bytes] | None = None, upto=None) -> str:
    """A replica of src (same timestamps, same bytes), optionally changed or shorter."""
    change = change or {}
    with node.Writer(dst, max_size_bytes=4096) as w:
        for seq, ts, payload in node.WALReader(src).raw_entries():
            if upto is not None and seq > upto:
                break
            w.append_replicated(seq, fmt.encode_entry(ts, change.get(seq, payload)))
            if seq % 97 == 0:
                w.wait_durable(seq, timeout=10)  # several segments
    return dst


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("orig") / "wal")
    with node.Writer(path, max_size_bytes=4096) as w:
        for i in range(1, 2001):
            w.append_raw(b"entry-%d" % i)
    return path


def run(capsys, *args):
    code = main(["verify", *args])
    return code, capsys.readouterr()


def test_equal_logs_exit_0(original, tmp_path, capsys):
    copy = copy_log(original, str(tmp_path / "copy"))
    code, out = run(capsys, original, copy)
    assert code == 0 and "sequences 1..2000: identical" in out.out


@pytest.mark.parametrize("seq", [1, 2, 17, 1000, 1999, 2000])
def test_first_difference_is_found_exactly(original, tmp_path, capsys, seq):
    changed = copy_log(original, str(tmp_path / "changed"), change={seq: b"other", seq + 5: b"x"})
    code, out = run(capsys, original, changed, "--json")
    report = json.loads(out.out)
    assert code == 1 and report["first_difference"] == seq and report["equal"] is False


def test_bisection_asks_few_digests(original, tmp_path):
    changed = copy_log(original, str(tmp_path / "changed"), change={1234: b"other"})
    found, asked = trio.run(first_difference, DirSource(original), DirSource(changed), 1, 2000)
    assert found == 1234
    assert asked <= 2 * (1 + 16 * 3 + 16)  # chunks per level, three levels, then a leaf


def test_a_missing_range_is_a_difference(original, tmp_path, capsys):
    short = copy_log(original, str(tmp_path / "short"), upto=1500)
    code, out = run(capsys, original, short)
    assert code == 1
    assert "lacks 1501..2000" in out.out and "identical" in out.out
    code, out = run(capsys, original, short, "--to-seq", "1500")
    assert code == 0


def test_errors_exit_2(original, tmp_path, capsys):
    code, out = run(capsys, original, str(tmp_path / "nope"))
    assert code == 2 and "not a WAL directory" in out.err
    with pytest.raises(SystemExit) as info:
        main(["verify", original])
    assert info.value.code == 2
