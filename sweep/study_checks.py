"""The checks a study file's values pass: each mistake one :class:`StudyError` at the field's line, and
YAML values taken as their parameter's declared kind, within what its results column can hold.

`sweep/study.py` (the study's keys and axes) and `sweep/tune/` (the `tune:` section) check with these.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa

from gradinv.parameters import parameters
from gradinv.results.schema import SCHEMA

from .study_yaml import StudyError


class Checker:
    """Fails at the line of the field's path, or of its nearest parent the file has a line for."""

    def __init__(self, path: Path, lines: dict):
        self.path, self.lines = path, lines

    def fail(self, where: tuple, message: str):
        line = None
        for cut in range(len(where), -1, -1):
            line = self.lines.get(where[:cut])
            if line:
                break
        raise StudyError(self.path, line, ".".join(str(p) for p in where), message)

    def mapping(self, value, where: tuple, allowed: tuple) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(where + (key,), f"unknown key; allowed: {', '.join(allowed)}")
        return value

    def number(self, value, where: tuple, *, integer=False, minimum=None, maximum=None, positive=False):
        """A finite number; with ``maximum``, one in [minimum, maximum]."""
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            hint = "" if integer else _as_text(value)
            self.fail(where, f"expected {'a whole number' if integer else 'a number'}, got {value!r}{hint}")
        if not math.isfinite(value):
            self.fail(where, f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            self.fail(where, f"must be greater than 0, got {value!r}")
        if maximum is not None and not minimum <= value <= maximum:
            self.fail(where, f"{value!r} is out of range; use {minimum} to {maximum}")
        if minimum is not None and value < minimum:
            self.fail(where, f"must be at least {minimum}, got {value!r}")
        return value


def _as_text(value) -> str:
    """The fix for a number YAML 1.1 reads as text (1e-4: its floats need a dot, 1.0e-4)."""
    mantissa, e, exponent = value.lower().partition("e") if isinstance(value, str) else ("", "", "")
    if not e or "." in mantissa or not mantissa.lstrip("+-").isdigit() or not exponent.lstrip("+-").isdigit():
        return ""
    return f"; YAML reads it as text, write {mantissa}.0e{exponent}"


def column_range(column: str) -> tuple[int, int]:
    """The integers the results column (or its list items) can hold: writing more would overflow. A trial
    parameter's range is its declaration's, the one `gradinv attack` flags are held to too."""
    knob = parameters().get(column)
    if knob is not None:
        return knob.integer_range()
    kind = SCHEMA.field(column).type
    if pa.types.is_list(kind):
        kind = kind.value_type
    half = 1 << (kind.bit_width - 1)
    return -half, half - 1


def coerce(checker: Checker, name: str, value, where: tuple):
    """A YAML value as the parameter's declared kind (ints stay ints and fit their column, floats accept ints)."""
    knob = parameters().get(name)
    kind = knob.kind if knob else "int"  # images_per_client
    if knob is not None and knob.optional and value is None:
        return None
    if kind == "ints":
        if knob.names and isinstance(value, str):  # a named set, checked by TrialSpec
            return value
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            named = " or a named set" if knob.names else ""
            checker.fail(where, f"expected a list of whole numbers{named}, got {value!r}")
        low, high = column_range(name)
        return tuple(checker.number(v, where, integer=True, minimum=low, maximum=high) for v in value)
    if kind == "bool":
        if not isinstance(value, bool):
            checker.fail(where, f"expected true or false, got {value!r}")
        return value
    if kind == "int":
        low, high = column_range(name)
        return checker.number(value, where, integer=True, minimum=low, maximum=high)
    if kind == "float":
        return float(checker.number(value, where))
    if not isinstance(value, str):
        checker.fail(where, f"expected text, got {value!r}")
    return value
