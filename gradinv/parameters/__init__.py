"""Every trial parameter, declared once, in the parts a trial is made of.

A part is a frozen dataclass whose fields are declared with :func:`knob`: default, kind, help text,
validation and its one-line fix, when the field applies, whether trials packed into lanes share it,
its Arrow column type, its search range for ``tune``, and what it is to the rest: a repetition (a seed),
a defence, a field of the zoo's or the federation's recipe. :class:`gradinv.trial.TrialSpec` is the
registered parts combined; the command-line flags (`attack`, `zoo train`, `federation train`), study-file
coercion, the results columns, the inapplicable fields, the lane signature, the tune space, the federation
recipe, the training defences and the report's defence and victim columns are all read from these
declarations.
Adding a knob is one :func:`knob` line in its part plus the code that uses it. The parts: client.py (the
client's images and update), attack.py (the attack families' settings), defence.py, federation.py, and the
victim here, since whether its ``defended_training`` applies reads every part's defences. What a knob is:
knobs.py.

This module is the catalogue: the registered parts (``PARTS``, in column order) and what is read across
them. The package imports neither torch nor pyarrow: commands that only read results stay light.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..model_factories import is_factory
from .attack import (
    LABEL_METHODS,
    LAYER_SET_COLUMN,
    MIN_IMPRINT_SAMPLE,
    AttackSettings,
    ImprintSettings,
    InvertingSettings,
    OptimiserSettings,
    layers_columns,
    layers_of_columns,
)
from .client import ClientSettings, DataSettings
from .conditions import federated, trained_victim
from .defence import DefenceSettings
from .federation import FederationSettings
from .knobs import (
    FEDERATION,
    KNOB,
    SEED_FIX,
    ZOO,
    Knob,
    Part,
    at_least,
    declarations,
    defaults,
    extract,
    knob,
    validate,
)

__all__ = [
    "FEDERATION",
    "LABEL_METHODS",
    "LAYER_SET_COLUMN",
    "MIN_IMPRINT_SAMPLE",
    "PARTS",
    "ZOO",
    "AttackSettings",
    "ClientSettings",
    "DataSettings",
    "DefenceSettings",
    "FederationSettings",
    "ImprintSettings",
    "InvertingSettings",
    "Knob",
    "OptimiserSettings",
    "Part",
    "VictimSettings",
    "checkpoint_identity",
    "declarations",
    "defaults",
    "defence_switches",
    "defended",
    "extract",
    "federated",
    "knob",
    "layers_columns",
    "layers_of_columns",
    "parameter_defaults",
    "parameters",
    "paper_defaults",
    "recipe_fields",
    "search_space",
    "trained_victim",
    "training_defences",
    "validate",
]

NORMS = ("batch", "group")


def _has_width(trial) -> bool:
    """A registry model with a width parameter, or the user's factory (it gets ``width`` when a trial sets one)."""
    return trial.default_width is not None or is_factory(trial.model)


@dataclass(frozen=True, kw_only=True)
class VictimSettings(Part):
    """The model the client trains: seeded and untrained, loaded from a ``weights`` file, or a checkpoint of
    the model zoo."""

    model: str = knob(
        "convnet",
        kind="str",
        recipes=(ZOO, FEDERATION),
        help="convnet-paper (the paper's ConvNet), convnet, lenet-zhu, resnet20, resnet18, mlp, ... (gradinv.models); "
        "or your own function as package.module:function (docs/your-own.md)",
    )
    width: int | None = knob(
        None,
        kind="int",
        recipes=(ZOO, FEDERATION),
        help="the model's width (default: the model's own)",
        check=at_least(1),
        fix="use a whole number of at least 1",
        applies=_has_width,
    )
    norm: str = knob(
        "batch",
        kind="str",
        recipes=(ZOO, FEDERATION),
        choices=NORMS,
        help="BatchNorm, or GroupNorm (Opacus' replacement, which DP-SGD training needs)",
    )
    model_seed: int = knob(
        0,
        kind="int",
        recipes=(ZOO, FEDERATION),
        repetition=True,
        help="seeds the untrained weights (and a checkpoint's training)",
        arrow="int64",
        check=at_least(0),
        fix=SEED_FIX,
        applies=lambda t: t.weights is None,
    )
    trained_epochs: int = knob(
        0,
        kind="int",
        recipes=(ZOO,),
        help="0: the seeded untrained model; else a checkpoint from the zoo",
        check=at_least(0),
        fix="use 0 (untrained) or more",
    )
    weights: str | None = knob(
        None,
        kind="str",
        help="a state_dict file (torch.save) the victim starts from instead of its seeded weights; keyed by content",
    )
    train_subset: int | None = knob(
        None,
        kind="int",
        recipes=(ZOO, FEDERATION),
        check=at_least(1),
        fix="use 1 or more",
        help="trained and federation victims: the first N training images (default all)",
        applies=lambda t: trained_victim(t) or federated(t),
    )
    defended_training: bool = knob(
        False,
        kind="bool",
        defence=True,
        applies=lambda t: trained_victim(t) and defended(t),
        help="trained victims: train under the trial's defences (each step's gradient)",
    )


def defended(trial) -> bool:
    """Whether the client applies a defence (DP-SGD, or one on its update) that a victim can train under: one
    of :func:`defence_switches` is off its default."""
    return any(getattr(trial, name) != default for name, default in defence_switches(tuple(PARTS)))


@functools.cache
def defence_switches(parts: tuple[type, ...]) -> tuple[tuple[str, Any], ...]:
    """(name, default) of the defences a training step can apply that apply on their own: each turns one
    on (the others, such as dp_noise or prune_scope, refine one that is on)."""
    return tuple(
        (name, defaults(part)[name])
        for part in parts
        for name in training_defences(part)
        if declarations(part)[name].applies is None
    )


def training_defences(cls_or_spec) -> list[str]:
    """The defences a victim's training applies under ``defended_training`` (its zoo recipe's ``defence``)."""
    return [
        name for name, declared in declarations(cls_or_spec).items() if declared.defence and ZOO in declared.recipes
    ]


# The parts. Field order is column order; defaults never change (trial keys leave defaults out).
PARTS: list[type] = [
    DataSettings,
    VictimSettings,
    ClientSettings,
    AttackSettings,
    OptimiserSettings,
    InvertingSettings,
    ImprintSettings,
    DefenceSettings,
    FederationSettings,
]


def parameters() -> dict[str, Knob]:
    """Every declared trial parameter, in column order."""
    return {name: declared for part in PARTS for name, declared in declarations(part).items()}


def parameter_defaults() -> dict:
    return {name: value for part in PARTS for name, value in defaults(part).items()}


def recipe_fields(recipe: str, parts: Sequence[type] | None = None) -> list[dataclasses.Field]:
    """The declared fields of ``parts`` (default: every part) that determine a victim ``recipe``'s weights."""
    return [
        f
        for part in (PARTS if parts is None else parts)
        for f in dataclasses.fields(part)
        if KNOB in f.metadata and recipe in f.metadata[KNOB].recipes
    ]


def checkpoint_identity() -> list[str]:
    """The parameters that name a trained victim's checkpoint: its zoo recipe, the defences it trained under aside."""
    return [name for name, declared in parameters().items() if ZOO in declared.recipes and not declared.defence]


def search_space() -> tuple[tuple[str, ...], dict[str, tuple | None]]:
    """What ``tune`` may search: the log-uniform names, and name -> choices (None: any count of 1 or more)."""
    declared = parameters()
    log_uniform = tuple(name for name, d in declared.items() if d.search == "log")
    choices = {
        name: (d.allowed() if d.search == "choices" else d.search)
        for name, d in declared.items()
        if d.search not in (None, "log")
    }
    return log_uniform, choices


def paper_defaults() -> dict:
    """The declared defaults (the paper's settings) of every searchable parameter."""
    log_uniform, choices = search_space()
    every = parameter_defaults()
    return {name: every[name] for name in (*log_uniform, *choices)}
