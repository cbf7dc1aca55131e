"""Each family's search space in the `tune:` section (`space:`, or `families:` naming several): the
parameters it reads, as log-uniform ranges or choices, each end and choice checked to make a valid trial
of the study's setting at the tuned budget."""

from __future__ import annotations

import dataclasses

from gradinv.attacks.registry import FAMILIES
from gradinv.errors import ConfigError
from gradinv.parameters import parameters
from gradinv.trial import TrialSpec

from ..study_checks import Checker
from .settings import CHECKPOINTS, CHOICES, LOG_UNIFORM, Choice, LogUniform, budget_fields, readers, searchable


def family_spaces(check: Checker, tune: dict, base: TrialSpec, budget: int, lines: dict) -> dict:
    """Family -> its space: `families:` names several, `space:` searches the study's own attack."""
    if "families" in tune and "space" in tune:
        check.fail(("tune", "space"), "give each family's space under 'families', or one 'space'; not both")
    if "space" in tune or "families" not in tune:
        spaces = {base.attack: tune.get("space")}
        if not isinstance(spaces[base.attack], dict) or not spaces[base.attack]:
            check.fail(("tune", "space"), "name at least one parameter to search, e.g. 'tv: [1.0e-6, 1.0e-1]'")
        where = ("tune", "space")
    else:
        spaces = check.mapping(tune["families"], ("tune", "families"), tuple(tune["families"] or ()))
        for family in spaces:
            if family not in FAMILIES:
                check.fail(("tune", "families", family), f"unknown attack family; choose from {', '.join(FAMILIES)}")
        if not spaces:
            check.fail(("tune", "families"), f"name at least one family: {', '.join(FAMILIES)}")
        if ("fixed", "attack") in lines:
            check.fail(("tune", "families"), "fixed.attack also chooses the family; keep one of them")
    families = {}
    for family, space in spaces.items():
        at = where if "families" not in tune else ("tune", "families", family)
        space = {} if space is None else check.mapping(space, at, tuple(space) if isinstance(space, dict) else ())
        _check_family(check, base, family, budget, at)
        families[family] = _space(check, base, family, space, budget, lines, at)
    return families


def _check_family(check: Checker, base: TrialSpec, family: str, budget: int, where: tuple) -> None:
    """The family runs in the study's setting (threat model, victim, data) at the tuned budget."""
    try:
        dataclasses.replace(base, attack=family, **budget_fields(family, budget, base.restarts))
    except ConfigError as error:
        check.fail(where, f"{family} cannot run here: {error.field} {error.value!r}: {error.fix}")


def _space(check: Checker, base: TrialSpec, family: str, value: dict, budget: int, lines: dict, where: tuple) -> dict:
    space = {}
    for name, choices in value.items():
        at = where + (name,)
        if name not in LOG_UNIFORM and name not in CHOICES:
            allowed = ", ".join(searchable(family))
            hint = " (iterations follow from budget // restarts)" if name == "iterations" else ""
            check.fail(at, f"unknown parameter{hint}; searchable for {family}: {allowed}")
        reading = readers(name)
        if family not in reading:
            check.fail(at, f"a setting of {', '.join(reading)}, not of {family}; move it under families.{reading[0]}")
        if ("fixed", name) in lines:
            check.fail(at, "is also in 'fixed'; search it or fix it, not both")
        if ("grid", name) in lines or ("zip", name) in lines:
            check.fail(at, "is also an axis of the study; search it or tune per value of it, not both")
        if name in LOG_UNIFORM:
            space[name] = _log_range(check, choices, at)
        else:
            space[name] = _choice(check, name, choices, at, budget)
        _check_values(check, base, family, budget, name, space[name], at)
    return space


def _check_values(
    check: Checker, base: TrialSpec, family: str, budget: int, name: str, dimension, where: tuple
) -> None:
    """Each end of a range and each choice makes a valid trial of the study's setting."""
    values = (dimension.low, dimension.high) if isinstance(dimension, LogUniform) else dimension.values
    for value in values:
        fields = budget_fields(family, budget, value if name == "restarts" else base.restarts)
        try:
            dataclasses.replace(base, attack=family, **{**fields, name: value})
        except ConfigError as error:
            check.fail(where, f"{value!r} cannot run here: {error.field} {error.value!r}: {error.fix}")


def _log_range(check: Checker, value, where: tuple) -> LogUniform:
    if isinstance(value, list) and not value:
        check.fail(where, "empty range; give [low, high]")
    if not isinstance(value, list) or len(value) != 2:
        check.fail(where, f"expected a log-uniform range [low, high], got {value!r}")
    low, high = (float(check.number(v, where + (i,))) for i, v in enumerate(value))
    if low <= 0:
        check.fail(where, f"a log-uniform range needs low > 0, got {low!r}")
    if low > high:
        check.fail(where, f"low {low!r} is above high {high!r}")
    if low == high:
        check.fail(where, f"empty range [{low!r}, {high!r}]; set a single value in 'fixed' instead")
    return LogUniform(low, high)


def _choice(check: Checker, name: str, value, where: tuple, budget: int) -> Choice:
    if not isinstance(value, list) or not value:
        check.fail(where, "expected a non-empty list of choices")
    if len(set(map(repr, value))) != len(value):
        check.fail(where, "lists a choice twice")
    for i, choice in enumerate(value):
        if CHOICES[name] is None:  # any valid value, as the declaration checks it
            check.number(choice, where + (i,), integer=True)
            try:
                parameters()[name].validate(name, choice)
            except ConfigError as error:
                check.fail(where + (i,), f"{choice!r}: {error.fix}")
        elif choice not in CHOICES[name]:
            check.fail(where + (i,), f"{choice!r}: choose from {', '.join(CHOICES[name])}")
        if name == "restarts" and budget // choice < CHECKPOINTS:
            check.fail(where + (i,), f"{choice} restarts leave under {CHECKPOINTS} iterations of the budget {budget}")
    return Choice(tuple(value))
