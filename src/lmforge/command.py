"""The command style every stage shares: `lmforge COMMAND [CONFIG.yaml] [ARG ...] [key.path=value ...] [--flag V]`.

A stage declares each of its commands (in its `commands.py`) as a `Command`: a pydantic model that
holds every setting with its type, default and description, the keys that bare arguments fill, and
the function that runs it. Every top-level key is also a `--flag` (an alias of the key), and
`--help` lists every key with its type and default, read from the model, so a default is written
once. Values apply in order: the model's defaults, CONFIG.yaml, arguments and flags, then key=value
overrides. A bad key or value fails before any work starts, with one line that names the key.
"""
from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel

from lmforge.errors import UserError

CONFIG_HELP = ("A CONFIG.yaml (or --config FILE) is optional; any key can be set or overridden as key.path=value "
               "(e.g. train.max_steps=100); flags are aliases of keys. Order: defaults < CONFIG.yaml < arguments and "
               "flags < key.path=value.")
OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")


class CliError(UserError):
    """A user error on the command line: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its name ("eval tasks"), config model, positional keys and run function."""
    name: str
    help: str
    config: Callable[[], type[BaseModel]]  # imported when the command runs or shows its help, not before
    run: Callable[[Any], int | None]
    description: str = ""
    positionals: tuple[str, ...] = ()  # keys that bare arguments fill in order; a list-typed last key takes the rest
    aliases: dict[str, str] = field(default_factory=dict)  # extra flag -> key, e.g. {"--out": "out_dir"}
    multi: tuple[str, ...] = ()  # list keys whose flag takes several values at once (--models A B)

    @property
    def words(self) -> list[str]:
        return self.name.split()


# ---- the model as flags ---------------------------------------------------------------------------

def _unwrap_optional(ann):
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_section(ann) -> bool:
    ann = _unwrap_optional(ann)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _is_list(ann) -> bool:
    return typing.get_origin(_unwrap_optional(ann)) is list


def _default_text(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    return str(value) if isinstance(value, Path) else repr(value)


def flag_keys(cmd: Command, model: type[BaseModel]) -> list[str]:
    """The keys that get a --flag: every top-level key that is not a section or a positional."""
    return [name for name, info in model.model_fields.items()
            if not _is_section(info.annotation) and name not in cmd.positionals]


def _add_flag(parser: argparse.ArgumentParser, cmd: Command, name: str, info) -> None:
    ann = _unwrap_optional(info.annotation)
    spellings = ["--" + name.replace("_", "-")] + [a for a, key in cmd.aliases.items() if key == name]
    text = (info.description + " " if info.description else "") + f"[{name}; default {_default_text(info)}]"
    kwargs: dict = {"dest": name, "default": None, "help": text.replace("%", "%%")}
    if ann is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif _is_list(ann):
        kwargs.update(nargs="+", action="extend") if name in cmd.multi else kwargs.update(action="append")
        kwargs["metavar"] = name.upper().removesuffix("S") if name.endswith("s") else name.upper()
    elif typing.get_origin(ann) is Literal:
        kwargs["choices"] = [str(a) for a in typing.get_args(ann)]
    else:
        kwargs["metavar"] = name.upper()
    parser.add_argument(*spellings, **kwargs)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help ends with the config keys, read from the model when asked for."""

    def __init__(self, *args, model: type[BaseModel] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = model

    def format_help(self) -> str:
        from lmforge.config import config_reference

        text = super().format_help()
        if self.model is not None and self.model.model_fields:
            text += "\nconfig keys (key.path  type = default  description):\n"
            text += "\n".join(config_reference(self.model)) + "\n"
        return text

    def error(self, message: str):
        raise CliError(f"{self.prog}: {message}")


def _usage_items(cmd: Command, model: type[BaseModel]) -> str:
    words = []
    for key in cmd.positionals:
        info = model.model_fields[key]
        word = key.upper() + (" ..." if _is_list(info.annotation) else "")
        words.append(word if info.is_required() else f"[{word}]")
    return " ".join(["[CONFIG.yaml]", *words, "[key.path=value ...]"])


def build_parser(cmd: Command, model: type[BaseModel]) -> argparse.ArgumentParser:
    """The command's parser: bare items (config, arguments, overrides), --config, and one flag per top-level key."""
    items = _usage_items(cmd, model)
    p = _Parser(prog=f"lmforge {cmd.name}", usage=f"%(prog)s {items} [--flag VALUE ...]",
                description=" ".join(filter(None, [cmd.description or cmd.help, CONFIG_HELP])), model=model)
    args_help = "; ".join(f"{k.upper()}: {model.model_fields[k].description or k}" for k in cmd.positionals)
    p.add_argument("items", nargs="*", metavar=items, help=args_help.replace("%", "%%") or None)
    p.add_argument("--config", metavar="FILE", help="a YAML file of keys (the same as CONFIG.yaml)")
    for name in flag_keys(cmd, model):
        _add_flag(p, cmd, name, model.model_fields[name])
    return p


# ---- argv -> config ---------------------------------------------------------------------------------

def split_items(cmd: Command, model: type[BaseModel], items: list[str],
                config: str | None) -> tuple[str | None, dict, list[str]]:
    """(config path, {positional key: value}, overrides) from the bare items of the command line."""
    overrides = [i for i in items if OVERRIDE.match(i)]
    bare = [i for i in items if not OVERRIDE.match(i)]
    configs = [i for i in bare if i.endswith((".yaml", ".yml"))] + ([config] if config is not None else [])
    if len(configs) > 1:
        raise CliError(f"give one config file, not {len(configs)}: {', '.join(configs)}")
    config = configs[0] if configs else None
    bare = [i for i in bare if i != config]
    values: dict = {}
    for key in cmd.positionals:
        if not bare:
            break
        if _is_list(model.model_fields[key].annotation) and key == cmd.positionals[-1]:
            values[key], bare = bare, []
        else:
            values[key] = bare.pop(0)
    if bare:
        if not cmd.positionals:
            raise CliError(f"{bare[0]!r} is neither a .yaml config nor a key.path=value override")
        takes = ", ".join(k.upper() for k in cmd.positionals)
        raise CliError(f"{bare[0]!r}: one argument too many ({cmd.name} takes {takes}, a .yaml config and "
                       f"key.path=value overrides)")
    return config, values, overrides


def parse(cmd: Command, argv: list[str]) -> BaseModel:
    """The validated config of `lmforge CMD ARGV`."""
    from lmforge.config import config_tree, validate

    model = cmd.config()
    args = build_parser(cmd, model).parse_intermixed_args(argv)
    path, values, overrides = split_items(cmd, model, args.items, args.config)
    flags = {k: getattr(args, k) for k in flag_keys(cmd, model) if getattr(args, k) is not None}
    tree = config_tree(path, overrides, flags={**values, **flags})
    for key in cmd.positionals:
        if model.model_fields[key].is_required() and key not in tree:
            raise CliError(f"{cmd.name} needs a {key.upper()} argument (or `{key}:` in CONFIG.yaml)")
    return validate(model, tree)


def run(cmd: Command, argv: list[str]) -> int:
    """Parse and run one command; its return value (None: 0) is the exit status."""
    return cmd.run(parse(cmd, argv)) or 0


def warn_if_on_command_line(secrets: list[str], what: str, instead: str) -> bool:
    """Print one warning line to stderr when a secret appears in this process's argv; True when it did.

    Every user of the machine can read a process's argv (`ps`), so a secret there is not one."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if not any(secret in arg for secret in secrets if secret for arg in argv):
        return False
    print(f"warning: {what} on the command line is visible to every user of this machine (ps); use {instead}",
          file=sys.stderr, flush=True)
    return True
