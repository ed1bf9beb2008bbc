"""Config files and flags: every bad config stops with an error naming the key and the file."""

from __future__ import annotations

import pytest

from walrep.cluster import config as cfg


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


# --- ack levels, ids and values that used to pass the checks and fail later ----------


@pytest.mark.parametrize(
    ("text", "replicas"), [("none", None), ("local", 0), ("replicas=1", 1), ("replicas=12", 12)]
)
def test_parse_ack_takes_the_three_levels(text, replicas):
    assert cfg.parse_ack(text) == replicas


@pytest.mark.parametrize(
    "text",
    [
        "bogus",
        "",
        "Local",
        "replicas",
        "replicas=",
        "replicas=0",
        "replicas=-1",
        "replicas=abc",
        "replicas=1.5",
        "replicas=+1",
        "replicas= 1",
        "replicas=1_0",
        "replicas=1\n",
        "replicas=\u0663",  # ARABIC-INDIC DIGIT THREE: int() takes it
        "replicas=" + "9" * 5000,
    ],
)
def test_parse_ack_refuses_anything_else_and_says_why(text):
    with pytest.raises(ValueError) as info:
        cfg.parse_ack(text)
    message = str(info.value)
    assert repr(text) in message
    assert "replicas=N" in message


@pytest.mark.parametrize("cls", [cfg.LeaderConfig, cfg.ReaderConfig])
@pytest.mark.parametrize(
    "node_id",
    ["r" * 129, "é" * 65, "two words", "tab\there", "line\nbreak", "\0nul"],
    ids=["129-bytes", "130-bytes-utf8", "space", "tab", "newline", "nul"],
)
def test_ids_must_fit_the_wire_and_a_status_line(tmp_path, cls, node_id):
    with pytest.raises(cfg.ConfigError, match="'id'"):
        cfg.load(cls, None, {"wal_dir": "w", "id": node_id})


@pytest.mark.parametrize("cls", [cfg.LeaderConfig, cfg.ReaderConfig])
def test_ids_up_to_the_wire_limit_are_fine(cls):
    for node_id in ("r" * 128, "é" * 64, "reader-1", "leader.eu_west"):
        assert cfg.load(cls, None, {"wal_dir": "w", "id": node_id}).id == node_id


def test_a_leader_id_cannot_be_empty():
    with pytest.raises(cfg.ConfigError, match="'id'"):
        cfg.load(cfg.LeaderConfig, None, {"wal_dir": "w", "id": ""})


@pytest.mark.parametrize(
    ("cls", "overrides", "key"),
    [
        (cfg.LeaderConfig, {"publish": "tcp://127.0.0.1:99999"}, "publish"),
        (cfg.LeaderConfig, {"control": "tcp://127.0.0.1:port"}, "control"),
        (cfg.LeaderConfig, {"publish_hwm": 2**31}, "publish_hwm"),
        (cfg.LeaderConfig, {"max_retained_age_s": float("nan")}, "max_retained_age_s"),
        (cfg.LeaderConfig, {"wal_dir": "a\0b"}, "wal_dir"),
        (cfg.ReaderConfig, {"id": "r", "leader_control": "tcp://h:70000"}, "leader_control"),
        (cfg.ReaderConfig, {"id": "r", "receive_hwm": 2**40}, "receive_hwm"),
        (
            cfg.ReaderConfig,
            {"id": "r", "anti_entropy_interval_s": float("nan")},
            "anti_entropy_interval_s",
        ),
    ],
)
def test_values_that_would_fail_deep_inside_are_refused_by_the_checks(cls, overrides, key):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(cls, None, {"wal_dir": "w", **overrides})
    assert repr(key) in str(info.value)
