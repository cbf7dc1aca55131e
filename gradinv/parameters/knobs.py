"""What a knob is: its declaration (:class:`Knob`), the dataclass field that carries it (:func:`knob`), the
:class:`Part` that checks its knobs when built, reading a part's or a trial's declarations, and the checks
several parts share.

This module imports neither torch nor pyarrow: commands that only read results stay light.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import require

KNOB = "gradinv.knob"  # the field-metadata key of a declaration
KINDS = ("int", "float", "str", "bool", "ints")
ARROW = {"int": "int32", "float": "float64", "str": "string", "bool": "bool", "ints": "list<int32>"}
INTEGER_BITS = {"int32": 32, "int64": 64, "list<int32>": 32}  # the integer columns (or list items) a knob may declare
Rule = tuple[Callable[[Any], bool], str]  # a value passes when the predicate holds; else the fix is shown

ZOO, FEDERATION = "zoo", "federation"  # the victim recipes (gradinv.zoo, gradinv.federation) a knob may determine


@dataclass(frozen=True)
class Knob:
    """One parameter's declaration (the field's metadata)."""

    kind: str
    help: str
    choices: tuple | None  # allowed values
    rules: tuple[Rule, ...]
    # On the trial's fields and two facts the trial looks up above this module (gradinv.trial): its
    # ``family`` (gradinv.attacks.base.Family) and its model's ``default_width``. None: always.
    applies: Callable[[Any], bool] | None
    lane_shared: bool | Callable[[Any], Any]  # True: lanes share the value; a callable: they share its result
    arrow: str
    search: str | tuple | None  # "log": a log-uniform range; "choices": the choices; a tuple: those choices
    optional: bool  # None is a value (the default's meaning is in the help)
    names: tuple = ()  # kind "ints" only: a name that may stand in for the list
    repeat_flag: str | None = None  # on the command line: a singular flag given once per item
    repetition: bool = False  # tells repetitions of one setting apart (which images, which seed): compared across
    defence: bool = False  # what the client does to its update: the privacy section groups by defence, not by it
    recipes: tuple[str, ...] = ()  # the victim recipes (ZOO, FEDERATION) whose weights it determines

    def allowed(self) -> tuple | None:
        return self.choices

    def integer_range(self) -> tuple[int, int]:
        """The integers the knob's results column (or its list items) holds: more would overflow on writing."""
        half = 1 << (INTEGER_BITS[self.arrow] - 1)
        return -half, half - 1

    def validate(self, name: str, value) -> None:
        """Raises ConfigError (one line naming the field, the value and the fix) unless ``value`` fits."""
        if value is None and self.optional:
            return
        if self.names and isinstance(value, str):  # a name standing in for the list
            require(value in self.names, name, value, f"give a list of indices or one of {', '.join(self.names)}")
            return
        for holds, fix in self.rules:
            require(holds(value), name, _shown(value), fix)
        self._check_representable(name, value)
        allowed = self.allowed()
        if allowed is not None:
            require(value in allowed, name, value, f"choose one of {', '.join(map(str, allowed))}")

    def _check_representable(self, name: str, value) -> None:
        """Every float finite and every integer within its results column, whatever the knob's own rules
        allow: one rule for study files and flags alike (the rules' messages, more specific, come first)."""
        if self.kind == "float":
            require(math.isfinite(value), name, value, "use a finite number")
        elif self.kind in ("int", "ints") and not isinstance(value, str):
            low, high = self.integer_range()
            for item in value if self.kind == "ints" else (value,):
                bound = f"at most {high}" if item > high else f"at least {low}"
                require(low <= item <= high, name, _shown(value), f"use {bound}, what its {self.arrow} column holds")


def knob(
    default,
    *,
    kind: str,
    help: str,
    choices: tuple | None = None,
    check: Callable[[Any], bool] | None = None,
    fix: str = "",
    rules: Sequence[Rule] = (),
    applies: Callable[[Any], bool] | None = None,
    lane_shared: bool | Callable[[Any], Any] = True,
    arrow: str | None = None,
    search: str | tuple | None = None,
    names: tuple = (),
    repeat_flag: str | None = None,
    repetition: bool = False,
    defence: bool = False,
    recipes: tuple[str, ...] = (),
):
    """A declared trial parameter: a dataclass field whose metadata is its :class:`Knob`."""
    assert kind in KINDS, kind
    declared = Knob(
        kind=kind,
        help=help,
        choices=choices,
        rules=(*rules, *([(check, fix)] if check else [])),
        applies=applies,
        lane_shared=lane_shared,
        arrow=arrow or ARROW[kind],
        search=search,
        optional=default is None,
        names=names,
        repeat_flag=repeat_flag,
        repetition=repetition,
        defence=defence,
        recipes=recipes,
    )
    return dataclasses.field(default=default, metadata={KNOB: declared})


class Part:
    """Base of the parts: a part validates its own declared fields when built."""

    def __post_init__(self):
        validate(self)


def declarations(cls_or_spec) -> dict[str, Knob]:
    """Name -> declaration of every declared field of a part, a spec class or an instance, in order."""
    return {f.name: f.metadata[KNOB] for f in dataclasses.fields(cls_or_spec) if KNOB in f.metadata}


def defaults(cls_or_spec) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls_or_spec) if KNOB in f.metadata}


def validate(instance) -> None:
    for name, declared in declarations(instance).items():
        declared.validate(name, getattr(instance, name))


def extract(part: type, source):
    """The ``part`` built from the same-named fields of ``source`` (a trial, or a larger part)."""
    return part(**{name: getattr(source, name) for name in declarations(part)})


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


# The checks several parts' knobs share (a knob's ``check``, shown with its ``fix`` when it fails).
def positive(value) -> bool:
    return value > 0


def is_momentum(value) -> bool:
    return 0 <= value < 1


MOMENTUM_FIX = "use a momentum from 0 (plain SGD) to below 1"
SEED_FIX = "use a seed of 0 or more (the federation and DP-SGD draw from numpy seed sequences, which take no sign)"


def at_least(low) -> Callable[[Any], bool]:
    return lambda value: value >= low
