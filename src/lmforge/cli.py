"""The command line, dispatch only: find the command a stage registered and run it.

Each stage declares its commands in its own `commands.py` (see lmforge.command); heavy libraries are
imported only when a command runs, so `lmforge --help` and the data commands start fast.
"""
from __future__ import annotations

import os
import sys

from lmforge import doctor, quickstart
from lmforge.align import commands as align_commands
from lmforge.command import CliError, Command, run
from lmforge.data import commands as data_commands
from lmforge.errors import UserError
from lmforge.eval import commands as eval_commands
from lmforge.infer import commands as infer_commands
from lmforge.model import commands as model_commands
from lmforge.plan import commands as plan_commands
from lmforge.serve import commands as serve_commands
from lmforge.tokens import commands as tokens_commands
from lmforge.train import commands as train_commands

STAGES = (quickstart, tokens_commands, train_commands, align_commands, infer_commands, model_commands, serve_commands,
          eval_commands, data_commands, plan_commands, doctor)
# What the CLI reports in one line with exit status 2: bad user input (UserError, under which ConfigError,
# CliError and every stage's own input errors sit), and a path that is missing, in the way, of the wrong
# kind or not readable (these OSErrors name the path; on the command line it is almost always one the user
# gave, such as an out_dir that is a file).
# Anything else is a bug: it is not caught, so Python prints its traceback and exits with status 1.
# LMFORGE_TRACEBACK=1 shows the traceback of a one-line error as well.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
USAGE = "usage: lmforge [--version] COMMAND [CONFIG.yaml] [ARG ...] [key.path=value ...] [--flag VALUE ...]"


def commands() -> list[Command]:
    """Every registered command, in the order `lmforge --help` lists them (`info` last)."""
    found = [c for stage in STAGES for c in stage.COMMANDS]
    return sorted(found, key=lambda c: c.name == "info")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def _listing(cmds: list[Command], prefix: list[str]) -> str:
    """The help of `lmforge PREFIX`: usage and one line per command under the prefix."""
    width = max(len(c.name) for c in cmds) + 2
    lines = [USAGE, "", "Train, fine-tune, align, evaluate and serve language models.", "",
             f"commands{' (' + ' '.join(prefix) + ')' if prefix else ''}:"]
    lines += [f"  {c.name:<{width}}{c.help}" for c in cmds if c.words[:len(prefix)] == prefix]
    lines += ["", "`lmforge COMMAND --help` lists the command's arguments, flags and every config key with its type "
                  "and default."]
    return "\n".join(lines)


def _find(cmds: list[Command], argv: list[str]) -> Command:
    """The command whose words start argv; CliError naming what exists under the nearest group otherwise."""
    for cmd in sorted(cmds, key=lambda c: -len(c.words)):
        if argv[:len(cmd.words)] == cmd.words:
            return cmd
    group = [c for c in cmds if c.words[0] == argv[0] and len(c.words) > 1]
    if group:
        subs = ", ".join(c.words[1] for c in group)
        got = f" {argv[1]!r}" if len(argv) > 1 and not argv[1].startswith("-") else ""
        raise CliError(f"lmforge {argv[0]}: unknown subcommand{got}; choose one of {subs}")
    raise CliError(f"unknown command {argv[0]!r}; run `lmforge --help` for the list")


def main(argv: list[str] | None = None) -> int:
    """Run `lmforge ARGV`; the exit status: 0 done, 2 a user error (one line), 130 interrupted.

    An internal error propagates with its traceback (status 1), so a bug is never mistaken for bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmds = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(_listing(cmds, []))
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"lmforge {_version()}")
        return 0
    if len(argv) > 1 and argv[1] in ("-h", "--help") and not any(c.words == argv[:1] for c in cmds):
        print(_listing(cmds, argv[:1]))  # the help of a group: `lmforge eval --help`
        return 0
    try:
        cmd = _find(cmds, argv)
        return run(cmd, argv[len(cmd.words):])
    except USER_ERRORS as e:
        if os.environ.get("LMFORGE_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
