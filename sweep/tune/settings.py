"""What a validated `tune:` section is: a search's settings and its dimensions, and a candidate's
parameters turned into the trials that evaluate it (one per client, the budget shared by restarts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradinv.attacks.registry import FAMILIES, settings_parts
from gradinv.parameters import PARTS, DataSettings, declarations, paper_defaults, search_space
from gradinv.results.schema import trial_key
from gradinv.trial import TrialSpec

LOG_UNIFORM, CHOICES = search_space()  # declared with each parameter (gradinv.parameters)
CHECKPOINTS = 8  # invert_gradients reports at 8 evenly spaced iterations; pruning steps count them
# the yardstick: the family whose declared defaults are the paper's attack, as published
PAPER_DEFAULTS = {"attack": next(f.name for f in FAMILIES.values() if f.paper_defaults), **paper_defaults()}
DATA_FIELDS = tuple(declarations(DataSettings))


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


def readers(name: str) -> list[str]:
    """The families whose trials read the parameter (every family, for the parts all of them share)."""
    part = next(part for part in PARTS if name in declarations(part))
    return [f.name for f in FAMILIES.values() if part not in settings_parts() or part in f.reads]


def searchable(family: str) -> list[str]:
    return [name for name in (*LOG_UNIFORM, *CHOICES) if family in readers(name)]


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
    values = {name: value for name, value in values.items() if family in readers(name)}
    restarts = values.pop("restarts", settings.base.restarts)
    return {"attack": family, **values, **budget_fields(family, settings.budget, restarts)}


def trial_specs(settings: TuneSettings, params: dict, clients) -> dict[str, TrialSpec]:
    """Key -> resolved trial, one per client, in client order."""
    values = candidate(settings, params)
    specs = [dataclasses.replace(settings.base, images=client, **values).resolved() for client in clients]
    return {trial_key(spec): spec for spec in specs}
