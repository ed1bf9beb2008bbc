"""`walrep --help` and every `walrep COMMAND --help`: nothing is left unexplained.

The parsers are walked, not a list of flags, so a flag or config key added later
without a help line fails here (config keys take theirs from cli._KEY_HELP).
"""

from __future__ import annotations

import argparse

import pytest

from walrep.cluster import cli


def commands() -> dict[str, argparse.ArgumentParser]:
    """walrep's parser as "" and each command's parser by its name."""
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def test_every_option_and_argument_of_every_command_has_a_help_line():
    found = commands()
    assert {"dump", "leader", "reader", "verify", "status", "check-history"} <= set(found)
    missing = [
        f"walrep {name} {'/'.join(action.option_strings) or action.dest}".replace("  ", " ")
        for name, command in found.items()
        for action in command._actions
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS
    ]
    assert not missing, "no help line: " + ", ".join(missing)


def test_every_command_has_a_help_line_in_walrep_help():
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    listed = {action.dest: (action.help or "").strip() for action in sub._choices_actions}
    assert set(listed) == set(commands()) - {""}
    assert all(listed.values()), [name for name, text in listed.items() if not text]


def test_status_help_says_any_nodes_control_endpoint_works(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "any node's control endpoint" in text
    assert "the leader's" in text and "a reader's" in text
