"""The command line: every command's options, defaults and help stay as tests/snapshots/cli_options.json holds them
(the options are generated from the stages' options dataclasses; a change there shows here)."""

import json
from pathlib import Path

from cli_snapshot import command_options

SNAPSHOT = Path(__file__).parent / "snapshots" / "cli_options.json"


def test_every_command_keeps_its_options_defaults_and_help():
    expected, actual = json.loads(SNAPSHOT.read_text()), json.loads(json.dumps(command_options()))
    assert sorted(actual["commands"]) == sorted(expected["commands"])
    assert actual["rendered"] == expected["rendered"]
    for name, command in expected["commands"].items():
        got = actual["commands"][name]
        assert [param["name"] for param in got["params"]] == [param["name"] for param in command["params"]], name
        for want, have in zip(command["params"], got["params"], strict=True):
            assert have == want, f"{name} {want['name']}"
        assert got["rendered"] == command["rendered"], name
        assert got == command, name
