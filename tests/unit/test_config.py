"""Config files and flags: every bad config stops with an error naming the key and the file."""

from __future__ import annotations

import pytest

from cluster import config as cfg


def write(tmp_path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_the_shipped_configs_load():
    leader = cfg.load(cfg.LeaderConfig, "configs/leader.toml", {})
    assert leader.publish == "tcp://127.0.0.1:7101"
    for name in ("reader-1", "reader-2"):
        reader = cfg.load(cfg.ReaderConfig, f"configs/{name}.toml", {})
        assert reader.id == name and reader.leader_control == leader.control


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, 'wal_dir = "a"\nsync_mode = "fsync"\n')
    config = cfg.load(cfg.LeaderConfig, path, {"sync_mode": "async", "ingest": None})
    assert (config.wal_dir, config.sync_mode) == ("a", "async")


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ('wal_dir = "a"\nbogus = 1\n', {}, "bogus"),
        ('wal_dir = "a"\nbuffer_entries = "many"\n', {}, "buffer_entries"),
        ('wal_dir = "a"\nbuffer_entries = true\n', {}, "buffer_entries"),
        ("", {}, "wal_dir"),
        ('wal_dir = "a"\nsync_mode = "sometimes"\n', {}, "sync_mode"),
        ('wal_dir = "a"\ndefault_ack = "replicas=0"\n', {}, "default_ack"),
        ('wal_dir = "a"\npublish = "tcp://127.0.0.1:7100"\n', {}, "publish"),
        ('wal_dir = "a"\ncontrol = "localhost:7102"\n', {}, "control"),
    ],
)
def test_bad_leader_configs_name_the_key_and_file(tmp_path, text, overrides, key):
    path = write(tmp_path, text)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(cfg.LeaderConfig, path, overrides)
    assert path in str(info.value) and repr(key) in str(info.value)


def test_a_reader_needs_an_id_and_a_valid_leader(tmp_path):
    path = write(tmp_path, 'wal_dir = "r"\n')
    with pytest.raises(cfg.ConfigError, match="'id'"):
        cfg.load(cfg.ReaderConfig, path, {})
    path = write(tmp_path, 'wal_dir = "r"\nid = "r1"\nleader_control = "tcp://127.0.0.1:7101"\n')
    with pytest.raises(cfg.ConfigError, match="same address"):
        cfg.load(cfg.ReaderConfig, path, {})


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(cfg.ConfigError, match="no such config file"):
        cfg.load(cfg.LeaderConfig, str(tmp_path / "nope.toml"), {})
    path = write(tmp_path, "wal_dir = \n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(cfg.LeaderConfig, path, {})
