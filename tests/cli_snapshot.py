"""Every command's options as the command line declares them (names, defaults, help, types): what tests/test_cli.py
holds against tests/snapshots/cli_options.json, so that moving how options are declared changes none of them.

    python tests/cli_snapshot.py > tests/snapshots/cli_options.json   # after a deliberate change to an option
"""

import json

import typer.main
from typer.testing import CliRunner


def command_options() -> dict:
    from kdcache.cli import app

    group = typer.main.get_command(app)
    commands = {}
    for name in sorted(group.commands):
        command = group.commands[name]
        commands[name] = {
            "help": command.help,
            "epilog": command.epilog,
            "params": [_param(param) for param in command.params],
            "rendered": _rendered(app, name),
        }
    return {"help": group.help, "rendered": _rendered(app, None), "commands": commands}


def _rendered(app, name: str | None) -> list[str]:
    """`kdcache [NAME] --help` as a user reads it (click wraps at 80 columns at most)."""
    result = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "80"})
    return result.output.splitlines()


def _param(param) -> dict:
    default = param.default
    if callable(default):
        default = f"<callable {default.__name__}>"
    return {
        "name": param.name,
        "kind": type(param).__name__,
        "opts": list(param.opts),
        "secondary_opts": list(param.secondary_opts),
        "type": str(param.type_descriptor.annotation),
        "required": param.required,
        "default": default if isinstance(default, (str, int, float, bool, type(None), list, tuple)) else repr(default),
        "multiple": param.multiple,
        "nargs": param.nargs,
        "help": getattr(param, "help", None),
        "metavar": param.metavar,
        "is_flag": getattr(param, "is_flag", None),
        "hidden": getattr(param, "hidden", None),
        "show_default": getattr(param, "show_default", None),
    }


if __name__ == "__main__":
    print(json.dumps(command_options(), indent=1))
