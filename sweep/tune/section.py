"""The `tune:` section of a study file, validated once into frozen settings (settings.py): one search,
or one per value of the `per:` axes. Each family's search space is checked in space.py.

Every mistake is a StudyError naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec

from ..study import Study, StudyError
from ..study_checks import Checker
from .settings import CHECKPOINTS, TuneSettings
from .space import family_spaces

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
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
PRUNERS = ("median", "successive-halving", "none")
FIRST_DECAY = 3 / 8  # the step schedule's first decay: no candidate is judged before it


def tune_searches(study: Study) -> list[TuneSettings]:
    """The study's tune: section, validated: one search, or one per value of the `per:` axes. Every
    mistake is a StudyError naming file:line and field."""
    check = Checker(Path(study.path), study.lines)
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


def _per(check: Checker, value, study: Study) -> list[str]:
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


def _search(check: Checker, tune: dict, study: Study, trials: list[TrialSpec], setting: dict) -> TuneSettings:
    # The fixed settings the study's own attack does not read, as given: another family may (imprint_sample).
    dropped = trials[0].not_applicable()
    base = dataclasses.replace(trials[0], **{k: v for k, v in study.fixed.items() if k in dropped})
    budget = _budget(check, tune, base, study.lines)
    families = family_spaces(check, tune, base, budget, study.lines)
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


def _objective(check: Checker, value) -> str:
    if value not in OBJECTIVES:
        check.fail(("tune", "objective"), f"{value!r}: choose one of {', '.join(OBJECTIVES)} (maximised)")
    return value


def _budget(check: Checker, tune: dict, base: TrialSpec, lines: dict) -> int:
    if "budget" not in tune:
        return base.iterations * base.restarts
    for name in ("iterations", "restarts"):
        if ("fixed", name) in lines:
            check.fail(("tune", "budget"), f"fixed.{name} also sets the budget; keep one of them")
    return check.number(tune["budget"], ("tune", "budget"), integer=True, minimum=CHECKPOINTS)


def _named(check: Checker, value, where: tuple, names: tuple, keys: tuple) -> dict:
    """A component given as a name or as a mapping with a 'name' and options."""
    spec = {"name": value} if isinstance(value, str) else check.mapping(value, where, keys)
    name = spec.get("name")
    if name not in names:
        at = where + ("name",) if isinstance(value, dict) else where
        check.fail(at, f"unknown {where[-1]} {name!r}; choose one of {', '.join(names)}")
    return spec


def _sampler(check: Checker, value) -> tuple[str, int, int | None]:
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


def _pruner(check: Checker, value, candidates: int) -> tuple[str, int, int]:
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


def _clients(check: Checker, tune: dict, trials: list[TrialSpec]) -> tuple[tuple, tuple]:
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


def _images(check: Checker, value, where: tuple, available: list) -> list[int]:
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


def _check_images(check: Checker, base: TrialSpec, images: tuple, where: tuple) -> None:
    try:
        dataclasses.replace(base, images=images)
    except ConfigError as error:
        check.fail(where, f"{error.value!r}: {error.fix}")
