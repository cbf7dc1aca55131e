"""The `tune:` section of a study file, validated once into frozen settings, and a candidate's
parameters turned into the trials that evaluate it (one per client, the budget shared by restarts).

Every mistake is a StudyError naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from gradinv.attacks.registry import FAMILIES, settings_parts
from gradinv.errors import ConfigError
from gradinv.parameters import PARTS, DataSettings, declarations, paper_defaults, parameters, search_space
from gradinv.results.schema import trial_key
from gradinv.trial import TrialSpec

from ..study import Study, StudyError, _Checker

TUNE_KEYS = (
    "objective",
    "budget",
    "space",
    "families",
    "per",
    "sampler",
    "pruner",
    "candidates",
    "parallel",
    "tuning_images",
    "held_out_images",
    "bootstrap",
)
OBJECTIVES = ("psnr", "ssim")
LOG_UNIFORM, CHOICES = search_space()  # declared with each parameter (gradinv.parameters)
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
PRUNERS = ("median", "successive-halving", "none")
CHECKPOINTS = 8  # invert_gradients reports at 8 evenly spaced iterations; pruning steps count them
FIRST_DECAY = 3 / 8  # the step schedule's first decay: no candidate is judged before it
# the yardstick: the family whose declared defaults are the paper's attack, as published
PAPER_DEFAULTS = {"attack": next(f.name for f in FAMILIES.values() if f.paper_defaults), **paper_defaults()}
DATA_FIELDS = tuple(declarations(DataSettings))


# ---------------------------------------------------------------------------------------------
# The tune: section


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclass(frozen=True)
class Choice:
    values: tuple


@dataclass(frozen=True)
class TuneSettings:
    objective: str
    budget: int  # restarts x iterations of every candidate
    families: dict  # family -> its space (parameter -> LogUniform or Choice), in the order given
    sampler: str
    seed: int  # a fresh search's sampler seed; a resumed one derives its own (see sampler_seed)
    sampler_startup: int
    pruner: str
    # Checkpoints are reported as steps 1..8. Optuna's MedianPruner (n_warmup_steps) and
    # SuccessiveHalvingPruner (min_resource) first judge the step equal to this value, so the
    # checkpoints before it, 1 .. warmup_steps - 1, are the warm-up.
    warmup_steps: int
    pruner_startup: int
    candidates: int
    parallel: int
    tuning: tuple[tuple[int, ...], ...]  # clients (image index tuples)
    held_out: tuple[tuple[int, ...], ...]
    base: TrialSpec  # the study's fixed settings
    setting: dict  # the `per:` axes' values this search tunes for ({} without per)
    name: str  # the Optuna study's name: the study's, with the setting in brackets

    def describe(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in self.setting.items()) or "the study's setting"


def tune_searches(study: Study) -> list[TuneSettings]:
    """The study's tune: section, validated: one search, or one per value of the `per:` axes. Every
    mistake is a StudyError naming file:line and field."""
    check = _Checker(Path(study.path), study.lines)
    if study.tune is None:
        raise StudyError(
            study.path,
            None,
            "tune",
            "the study has no 'tune:' section; add one (see docs/tuning.md, 'The tune: section')",
        )
    tune = check.mapping(study.tune, ("tune",), TUNE_KEYS)
    if "bootstrap" in tune:  # the interval is `gradinv report`'s (analysis.stats), with its own resamples
        check.fail(("tune", "bootstrap"), "the held-out interval is the report's BCa bootstrap; remove this key")
    per = _per(check, tune.get("per", []), study)
    groups: dict[tuple, list[TrialSpec]] = {}
    for trial in study.trials:
        groups.setdefault(tuple(getattr(trial, name) for name in per), []).append(trial)
    return [_search(check, tune, study, trials, dict(zip(per, values))) for values, trials in groups.items()]


def _per(check: _Checker, value, study: Study) -> list[str]:
    """The axes tuned separately, value by value; every other axis is refused (a search has one setting)."""
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        check.fail(("tune", "per"), f"expected a list of the study's axes, got {value!r}")
    axes = {axis.removeprefix("zip:"): axis for axis in study.axes}
    for i, name in enumerate(value):
        if name not in axes:
            check.fail(
                ("tune", "per", i),
                f"{name!r} is not an axis of the study; add it to 'grid' or 'zip', "
                f"or choose from {', '.join(axes) or 'none'}",
            )
    for field, axis in axes.items():
        if field not in value:
            where = ("zip", field) if axis.startswith("zip:") else ("grid", field)
            where = ("data", "dataset") if axis == "dataset" else where
            check.fail(
                where,
                "tune searches the attack of one setting; fix this axis (into 'fixed'), "
                f"or tune per value of it with 'per: [{field}]' in 'tune:'",
            )
    return list(value)


def _search(check: _Checker, tune: dict, study: Study, trials: list[TrialSpec], setting: dict) -> TuneSettings:
    # The fixed settings the study's own attack does not read, as given: another family may (imprint_sample).
    dropped = trials[0].not_applicable()
    base = dataclasses.replace(trials[0], **{k: v for k, v in study.fixed.items() if k in dropped})
    budget = _budget(check, tune, base, study.lines)
    families = _families(check, tune, base, budget, study.lines)
    sampler, seed, sampler_startup = _sampler(check, tune.get("sampler", "tpe"))
    candidates = check.number(tune.get("candidates", 16), ("tune", "candidates"), integer=True, minimum=1)
    pruner, warmup_steps, pruner_startup = _pruner(check, tune.get("pruner", "median"), candidates)
    tuning, held_out = _clients(check, tune, trials)
    name = study.name + (" [" + ", ".join(f"{k}={v}" for k, v in setting.items()) + "]" if setting else "")
    return TuneSettings(
        objective=_objective(check, tune.get("objective", "psnr")),
        budget=budget,
        families=families,
        sampler=sampler,
        seed=seed,
        sampler_startup=sampler_startup or max(4, candidates // 4),
        pruner=pruner,
        warmup_steps=warmup_steps,
        pruner_startup=pruner_startup,
        candidates=candidates,
        parallel=check.number(tune.get("parallel", 1), ("tune", "parallel"), integer=True, minimum=1),
        tuning=tuning,
        held_out=held_out,
        base=base,
        setting=setting,
        name=name,
    )


def _objective(check: _Checker, value) -> str:
    if value not in OBJECTIVES:
        check.fail(("tune", "objective"), f"{value!r}: choose one of {', '.join(OBJECTIVES)} (maximised)")
    return value


def _budget(check: _Checker, tune: dict, base: TrialSpec, lines: dict) -> int:
    if "budget" not in tune:
        return base.iterations * base.restarts
    for name in ("iterations", "restarts"):
        if ("fixed", name) in lines:
            check.fail(("tune", "budget"), f"fixed.{name} also sets the budget; keep one of them")
    return check.number(tune["budget"], ("tune", "budget"), integer=True, minimum=CHECKPOINTS)


def _families(check: _Checker, tune: dict, base: TrialSpec, budget: int, lines: dict) -> dict:
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


def _check_family(check: _Checker, base: TrialSpec, family: str, budget: int, where: tuple) -> None:
    """The family runs in the study's setting (threat model, victim, data) at the tuned budget."""
    try:
        dataclasses.replace(base, attack=family, **budget_fields(family, budget, base.restarts))
    except ConfigError as error:
        check.fail(where, f"{family} cannot run here: {error.field} {error.value!r}: {error.fix}")


def _space(check: _Checker, base: TrialSpec, family: str, value: dict, budget: int, lines: dict, where: tuple) -> dict:
    space = {}
    for name, choices in value.items():
        at = where + (name,)
        if name not in LOG_UNIFORM and name not in CHOICES:
            allowed = ", ".join(searchable(family))
            hint = " (iterations follow from budget // restarts)" if name == "iterations" else ""
            check.fail(at, f"unknown parameter{hint}; searchable for {family}: {allowed}")
        readers = _readers(name)
        if family not in readers:
            check.fail(at, f"a setting of {', '.join(readers)}, not of {family}; move it under families.{readers[0]}")
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
    check: _Checker, base: TrialSpec, family: str, budget: int, name: str, dimension, where: tuple
) -> None:
    """Each end of a range and each choice makes a valid trial of the study's setting."""
    values = (dimension.low, dimension.high) if isinstance(dimension, LogUniform) else dimension.values
    for value in values:
        fields = budget_fields(family, budget, value if name == "restarts" else base.restarts)
        try:
            dataclasses.replace(base, attack=family, **{**fields, name: value})
        except ConfigError as error:
            check.fail(where, f"{value!r} cannot run here: {error.field} {error.value!r}: {error.fix}")


def _readers(name: str) -> list[str]:
    """The families whose trials read the parameter (every family, for the parts all of them share)."""
    part = next(part for part in PARTS if name in declarations(part))
    return [f.name for f in FAMILIES.values() if part not in settings_parts() or part in f.reads]


def searchable(family: str) -> list[str]:
    return [name for name in (*LOG_UNIFORM, *CHOICES) if family in _readers(name)]


def _log_range(check: _Checker, value, where: tuple) -> LogUniform:
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


def _choice(check: _Checker, name: str, value, where: tuple, budget: int) -> Choice:
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


def _named(check: _Checker, value, where: tuple, names: tuple, keys: tuple) -> dict:
    """A component given as a name or as a mapping with a 'name' and options."""
    spec = {"name": value} if isinstance(value, str) else check.mapping(value, where, keys)
    name = spec.get("name")
    if name not in names:
        at = where + ("name",) if isinstance(value, dict) else where
        check.fail(at, f"unknown {where[-1]} {name!r}; choose one of {', '.join(names)}")
    return spec


def _sampler(check: _Checker, value) -> tuple[str, int, int | None]:
    where = ("tune", "sampler")
    spec = _named(check, value, where, SAMPLERS, ("name", "seed", "startup"))
    if spec["name"] == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            check.fail(where, "the cmaes sampler needs the 'cmaes' package; pip install cmaes, or choose tpe")
    seed = check.number(spec.get("seed", 0), where + ("seed",), integer=True, minimum=0)
    startup = spec.get("startup")
    if startup is not None:
        startup = check.number(startup, where + ("startup",), integer=True, minimum=1)
    return spec["name"], seed, startup


def _pruner(check: _Checker, value, candidates: int) -> tuple[str, int, int]:
    where = ("tune", "pruner")
    spec = _named(check, value, where, PRUNERS, ("name", "warmup", "startup"))
    warmup = float(check.number(spec.get("warmup", FIRST_DECAY), where + ("warmup",)))
    if not FIRST_DECAY <= warmup < 1:
        check.fail(where + ("warmup",), f"{warmup!r}: use a fraction from 0.375 (the first step decay) to below 1")
    if spec["name"] == "successive-halving" and "startup" in spec:
        check.fail(where + ("startup",), "successive-halving has no startup; remove it")
    startup = check.number(spec.get("startup", min(4, candidates)), where + ("startup",), integer=True, minimum=1)
    # The first checkpoint strictly after the warm-up fraction of the iterations: the first judged.
    return spec["name"], math.floor(warmup * CHECKPOINTS) + 1, startup


def _clients(check: _Checker, tune: dict, trials: list[TrialSpec]) -> tuple[tuple, tuple]:
    """Tuning and held-out clients: counts dealt from the search's images in order, or index lists."""
    per_client = len(trials[0].images)
    pool = [index for spec in trials for index in spec.images]
    tuning = _images(check, tune.get("tuning_images", len(pool) // 2), ("tune", "tuning_images"), pool)
    rest = [index for index in pool if index not in tuning]
    held_out = _images(check, tune.get("held_out_images", len(rest)), ("tune", "held_out_images"), rest)
    if set(tuning) & set(held_out):
        shared = sorted(set(tuning) & set(held_out))
        check.fail(("tune", "held_out_images"), f"shares images {shared} with tuning_images; keep them disjoint")
    clients = []
    for images, key in ((tuning, "tuning_images"), (held_out, "held_out_images")):
        if len(images) % per_client:
            check.fail(("tune", key), f"{len(images)} images do not deal into clients of {per_client}")
        for start in range(0, len(images), per_client):
            _check_images(check, trials[0], tuple(images[start : start + per_client]), ("tune", key))
        clients.append(tuple(tuple(images[i : i + per_client]) for i in range(0, len(images), per_client)))
    return clients[0], clients[1]


def _images(check: _Checker, value, where: tuple, available: list) -> list[int]:
    """An index list as given, or a count taken in order from the study's images not yet used."""
    if isinstance(value, list):
        if not value:
            check.fail(where, "expected a non-empty list of image indices or a count")
        for i, index in enumerate(value):
            check.number(index, where + (i,), integer=True, minimum=0)
        if len(set(value)) != len(value):
            check.fail(where, "lists an image twice")
        return list(value)
    count = check.number(value, where, integer=True, minimum=1)
    if count > len(available):
        check.fail(where, f"needs {count} images but {len(available)} of the study's are left; raise data.images")
    return available[:count]


def _check_images(check: _Checker, base: TrialSpec, images: tuple, where: tuple) -> None:
    try:
        dataclasses.replace(base, images=images)
    except ConfigError as error:
        check.fail(where, f"{error.value!r}: {error.fix}")


# ---------------------------------------------------------------------------------------------
# Candidates as trials


def budget_fields(family: str, budget: int, restarts: int) -> dict:
    """How a family spends the budget, as it declares: restarts x iterations, iterations alone, or nothing."""
    spent = FAMILIES[family].budget
    if "restarts" in spent:
        return {"restarts": restarts, "iterations": budget // restarts}
    return {"iterations": budget} if "iterations" in spent else {}


def candidate(settings: TuneSettings, params: dict) -> dict:
    """Trial fields for a candidate's (or the paper defaults') parameters: the family, its settings and
    its share of the fixed budget. Optuna names a setting "family.name" when several families are searched."""
    family = params.get("attack", settings.base.attack if len(settings.families) == 1 else None)
    values = {name.split(".", 1)[-1]: value for name, value in params.items() if name != "attack"}
    values = {name: value for name, value in values.items() if family in _readers(name)}
    restarts = values.pop("restarts", settings.base.restarts)
    return {"attack": family, **values, **budget_fields(family, settings.budget, restarts)}


def trial_specs(settings: TuneSettings, params: dict, clients) -> dict[str, TrialSpec]:
    """Key -> resolved trial, one per client, in client order."""
    values = candidate(settings, params)
    specs = [dataclasses.replace(settings.base, images=client, **values).resolved() for client in clients]
    return {trial_key(spec): spec for spec in specs}
