"""The `tune:` section of a study file, validated once into frozen settings, and a candidate's
parameters turned into the trials that evaluate it (one per client, the budget shared by restarts).

Every mistake is a StudyError naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from gradinv.errors import ConfigError
from gradinv.parameters import DataSettings, declarations, paper_defaults, search_space
from gradinv.trial import TrialSpec

from .schema import trial_key
from .study import Study, StudyError, _Checker

TUNE_KEYS = ("objective", "budget", "space", "sampler", "pruner", "candidates", "parallel",
             "tuning_images", "held_out_images", "bootstrap")  # fmt: skip
OBJECTIVES = ("psnr", "ssim")
LOG_UNIFORM, CHOICES = search_space()  # declared with each parameter (gradinv.parameters)
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
PRUNERS = ("median", "successive-halving", "none")
CHECKPOINTS = 8  # invert_gradients reports at 8 evenly spaced iterations; pruning steps count them
FIRST_DECAY = 3 / 8  # the step schedule's first decay: no candidate is judged before it
PAPER_DEFAULTS = paper_defaults()
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
    space: dict  # parameter -> LogUniform or Choice
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


def tune_settings(study: Study) -> TuneSettings:
    """The study's tune: section, validated; every mistake is a StudyError naming file:line and field."""
    check = _Checker(Path(study.path), study.lines)
    if study.tune is None:
        raise StudyError(study.path, None, "tune", "the study has no 'tune:' section; add one (see README.md, 'The tune: section')")
    tune = check.mapping(study.tune, ("tune",), TUNE_KEYS)
    if "bootstrap" in tune:  # the interval is `gradinv report`'s (analysis.stats), with its own resamples
        check.fail(("tune", "bootstrap"), "the held-out interval is the report's BCa bootstrap; remove this key")
    base = _base_spec(check, study)
    budget = _budget(check, tune, base, study.lines)
    space = _space(check, tune.get("space"), budget, study.lines)
    sampler, seed, sampler_startup = _sampler(check, tune.get("sampler", "tpe"))
    candidates = check.number(tune.get("candidates", 16), ("tune", "candidates"), integer=True, minimum=1)
    pruner, warmup_steps, pruner_startup = _pruner(check, tune.get("pruner", "median"), candidates)
    tuning, held_out = _clients(check, tune, study)
    return TuneSettings(
        objective=_objective(check, tune.get("objective", "psnr")), budget=budget, space=space,
        sampler=sampler, seed=seed, sampler_startup=sampler_startup or max(4, candidates // 4),
        pruner=pruner, warmup_steps=warmup_steps, pruner_startup=pruner_startup, candidates=candidates,
        parallel=check.number(tune.get("parallel", 1), ("tune", "parallel"), integer=True, minimum=1),
        tuning=tuning, held_out=held_out, base=base,
    )  # fmt: skip


def _base_spec(check: _Checker, study: Study) -> TrialSpec:
    if study.axes:
        axis = next(iter(study.axes))
        where = ("zip", axis[4:]) if axis.startswith("zip:") else ("grid", axis)
        where = ("data", "dataset") if axis == "dataset" else where
        check.fail(where, "tune searches the attack of one setting; fix it (grid and zip axes into 'fixed')")
    base = study.trials[0]
    if base.attack != "ig":
        check.fail(("fixed", "attack"), f"{base.attack!r}: tune searches the 'ig' attack's settings")
    return base


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


def _space(check: _Checker, value, budget: int, lines: dict) -> dict:
    if not isinstance(value, dict) or not value:
        check.fail(("tune", "space"), "name at least one parameter to search, e.g. 'tv: [1.0e-6, 1.0e-1]'")
    space = {}
    for name, choices in value.items():
        where = ("tune", "space", name)
        if name not in LOG_UNIFORM and name not in CHOICES:
            allowed = ", ".join((*LOG_UNIFORM, *CHOICES))
            hint = " (iterations follow from budget // restarts)" if name == "iterations" else ""
            check.fail(where, f"unknown parameter{hint}; searchable: {allowed}")
        if ("fixed", name) in lines:
            check.fail(where, "is also in 'fixed'; search it or fix it, not both")
        if name in LOG_UNIFORM:
            space[name] = _log_range(check, choices, where)
        else:
            space[name] = _choice(check, name, choices, where, budget)
    return space


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
        if name == "restarts":
            check.number(choice, where + (i,), integer=True, minimum=1)
            if budget // choice < CHECKPOINTS:
                check.fail(where + (i,), f"{choice} restarts leave under {CHECKPOINTS} iterations of the budget {budget}")
        elif choice not in CHOICES[name]:
            check.fail(where + (i,), f"{choice!r}: choose from {', '.join(CHOICES[name])}")
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


def _clients(check: _Checker, tune: dict, study: Study) -> tuple[tuple, tuple]:
    """Tuning and held-out clients: counts dealt from the study's images in order, or index lists."""
    per_client = len(study.trials[0].images)
    pool = [index for spec in study.trials for index in spec.images]
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
            _check_images(check, study.trials[0], tuple(images[start : start + per_client]), ("tune", key))
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


def attack_settings(settings: TuneSettings, params: dict) -> dict:
    """Trial fields for the parameters: restarts share the fixed budget with the iterations."""
    restarts = params.get("restarts", settings.base.restarts)
    return {**params, "restarts": restarts, "iterations": settings.budget // restarts}


def trial_specs(settings: TuneSettings, params: dict, clients) -> dict[str, TrialSpec]:
    """Key -> resolved trial, one per client, in client order."""
    values = attack_settings(settings, params)
    specs = [dataclasses.replace(settings.base, images=client, **values).resolved() for client in clients]
    return {trial_key(spec): spec for spec in specs}
