"""Where a trial's victim model comes from: the seeded untrained model, or a model-zoo checkpoint.

One interface, :func:`victim_source`: ``.model()`` builds the victim, ``.recipe`` is the zoo recipe
(None when untrained), and ``.row_columns(sidecar)`` the result columns the source adds. A new source
(say, a model after rounds of simulated federated training) is one more class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import models, zoo
from . import parameters
from .parameters import DefenceSettings, trained_victim


def recipe_of(spec: Any) -> zoo.Recipe:
    """The zoo recipe of the spec's victim (one checkpoint for the default width, named or not); with
    ``defended_training``, trained under the trial's defences."""
    return zoo.Recipe(spec.dataset, spec.model, spec.width or models.default_width(spec.model), spec.trained_epochs,
                      spec.model_seed, spec.train_subset, spec.image_size, norm=spec.norm,
                      defence=training_defence(spec))  # fmt: skip


def training_defence(spec: Any) -> tuple:
    """The (name, value) pairs of the trial's defences that its victim's training applies: the ones
    that are on (not at their defaults) among zoo.TRAINING_DEFENCE; () for plain training."""
    if not spec.defended_training:
        return ()
    resolved, plain = spec.resolved(), parameters.defaults(DefenceSettings)
    return tuple(sorted((name, getattr(resolved, name)) for name in zoo.TRAINING_DEFENCE
                        if getattr(resolved, name) != plain[name]))  # fmt: skip


@dataclass(frozen=True)
class Untrained:
    """The model as initialised from ``model_seed``: what the paper calls an untrained network."""

    spec: Any
    recipe = None

    def model(self) -> torch.nn.Module:
        spec, info = self.spec, self.spec.data_spec
        return models.build_model(spec.model, channels=info.channels, num_classes=info.num_classes,
                                  image_size=spec.side, width=spec.width, seed=spec.model_seed, norm=spec.norm)  # fmt: skip

    def row_columns(self, sidecar: dict | None = None) -> dict:
        return {}


@dataclass(frozen=True)
class ZooCheckpoint:
    """A checkpoint trained by :mod:`gradinv.zoo` (trained on this machine first when missing)."""

    spec: Any

    @property
    def recipe(self) -> zoo.Recipe:
        return recipe_of(self.spec)

    def model(self) -> torch.nn.Module:
        checkpoint, _ = zoo.ensure(self.recipe)
        return checkpoint.model()

    def row_columns(self, sidecar: dict | None = None) -> dict:
        sidecar = sidecar or {}
        return {"checkpoint_key": self.recipe.key, "model_accuracy": sidecar.get("test_accuracy"),
                "training_epsilon": sidecar.get("training_epsilon")}  # fmt: skip


def victim_source(spec: Any) -> Untrained | ZooCheckpoint:
    return ZooCheckpoint(spec) if trained_victim(spec) else Untrained(spec)
