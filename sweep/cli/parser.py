"""The command line's argument parser (a usage error is one line and exit code 2, not a usage dump), the
flags of declared knobs (every verb's: `attack`, `zoo train`, `federation train`), and the checks of its
path flags that run before any work: a path is never empty, and a directory to write is one that can be."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradinv.errors import ConfigError

if TYPE_CHECKING:
    from gradinv.parameters import Knob


EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def path(text: str) -> Path | str:
    """A path flag's value (``type=path``): an empty one is refused, where Path('') would be the current
    directory. A URI (s3://bucket/prefix) stays text: Path would fold its '//'."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not valid; name a path (an empty one is not the current directory: write . for that)"
        )
    return text if "://" in text else Path(text)


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``, repeatable, for a verb that reads a study (sweep.study.read_study applies them)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the study as if its file said so: KEY a dotted path (fixed.iterations, grid.width), VALUE "
        "YAML (500, [16,32], fedavg); repeatable, later wins",
    )


def add_update_flags(attack: argparse.ArgumentParser) -> None:
    """`gradinv attack`'s captured updates (docs/captured-updates.md), and the results they become rows of."""
    attack.add_argument(
        "--update",
        type=path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="attack captured updates (gradinv.capture.save_update): a file, or with --results several files or "
        "directories of *.pt; the trial flags give the model's architecture, the dataset and the attack",
    )
    attack.add_argument(
        "--results",
        type=path,
        default=None,
        help="with --update: one row per capture in this results directory or URI (s3://bucket/prefix), "
        "keyed by the file's sha256 and the settings; captures already there are skipped",
    )


def add_knob_flags(
    parser: argparse.ArgumentParser,
    knobs: Mapping[str, Knob],
    defaults: Mapping[str, Any],
    required: Collection[str] = (),
) -> None:
    """A flag per declared knob (gradinv.parameters): ``--name`` (or its singular repeated flag), of the
    knob's kind, with its help, allowed values and default; the ``required`` ones have no default."""
    from gradinv.parameters_page import listed_values

    for name, knob in knobs.items():
        allowed = listed_values(name, knob)
        text = knob.help + (f" ({', '.join(map(str, allowed))})" if allowed else "")
        default = "" if name in required else _default_text(defaults[name])
        if knob.repeat_flag:
            parser.add_argument(
                f"--{knob.repeat_flag.replace('_', '-')}",
                dest=name,
                type=int,
                action="append",
                metavar="INDEX",
                help=f"{text}; one per flag, repeatable{default}".replace("%", "%%"),
            )
            continue
        kind = {
            "int": {"type": int},
            "float": {"type": float},
            "str": {},
            "bool": {"action": argparse.BooleanOptionalAction},
            "ints": {"metavar": "I,J,.." + (" | NAME" if knob.names else "")},
        }[knob.kind]
        given = {"required": True} if name in required else {"default": None if knob.kind == "ints" else defaults[name]}
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, **given, **kind, help=f"{text}{default}".replace("%", "%%")
        )


def knob_values(args: argparse.Namespace, knobs: Mapping[str, Knob], defaults: Mapping[str, Any]) -> dict:
    """The knobs' values from the parsed flags: a list flag read as integers, or as a name standing in for them."""
    values = {}
    for name, knob in knobs.items():
        value = getattr(args, name)
        if knob.kind == "ints":
            flag = f"--{(knob.repeat_flag or name).replace('_', '-')}"
            value = defaults[name] if value is None else _int_list(value, flag, knob.names)
        values[name] = value
    return values


def _default_text(value) -> str:
    if value is None:  # the help says what None means
        return ""
    return f" (default {','.join(map(str, value)) if isinstance(value, tuple) else value})"


def _int_list(value: str | list[int], flag: str, names: tuple) -> tuple[int, ...] | str:
    """A list flag: repeated values, comma-separated integers, or a name (checked by the knob)."""
    if isinstance(value, list):
        return tuple(value)
    if names and value[:1].isalpha():
        return value
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        example = " or a named set such as " + names[-2] if names else ""
        raise ConfigError(flag, value, f"give integers such as 0,1,-1{example}") from None
