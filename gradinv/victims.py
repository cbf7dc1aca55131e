"""Where a trial's victim model and the attacked client's images come from: the seeded untrained
model, a ``weights`` file (gradinv.weights), a model-zoo checkpoint (these three attacked on test images),
or the global model after some rounds of a simulated federation (attacked on the images of one of its clients).

One interface, :func:`victim_source`: ``.model()`` builds the victim, ``.recipe`` is the zoo recipe
(None otherwise), ``.row_columns(sidecar)`` the result columns the source adds, and
``.client_images(data_root)`` the attacked images in [0, 1], their labels and the per-trial columns
that say which images they were. A new source is one more class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import data, models, parameters, weights, zoo
from .errors import require
from .image_folders import is_folder
from .parameters import federated, trained_victim


def recipe_of(spec: Any) -> zoo.Recipe:
    """The zoo recipe of the spec's victim (one checkpoint for the default width, named or not); with
    ``defended_training``, trained under the trial's defences."""
    # a checkpoint's key names its dataset, and an image folder's name is a path: no zoo file can carry it
    require(
        not is_folder(spec.dataset),
        "trained_epochs",
        spec.trained_epochs,
        "an image folder attacks untrained victims only; use 0",
    )
    return zoo.Recipe(
        spec.dataset,
        spec.model,
        spec.width or models.default_width(spec.model),
        spec.trained_epochs,
        spec.model_seed,
        spec.train_subset,
        spec.image_size,
        norm=spec.norm,
        defence=training_defence(spec),
    )


def training_defence(spec: Any) -> tuple:
    """The (name, value) pairs of the trial's defences that its victim's training applies: the ones
    that are on (not at their defaults) among the training defences (gradinv.parameters); () for plain training."""
    if not spec.defended_training:
        return ()
    # the resolved values, read without building the resolved trial (a trial checks its recipe when built)
    unused, plain = spec.not_applicable(), parameters.defaults(spec)
    return tuple(
        sorted(
            (name, getattr(spec, name))
            for name in parameters.training_defences(spec)
            if name not in unused and getattr(spec, name) != plain[name]
        )
    )


class TestImages:
    """Untrained and zoo victims are attacked on the test split's images at the trial's indices."""

    def client_images(self, data_root=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        images01, labels = data.load_images(
            self.spec.dataset, self.spec.images, data_root, image_size=self.spec.image_size
        )
        return images01, labels, {}


@dataclass(frozen=True)
class Untrained(TestImages):
    """The model as initialised from ``model_seed``: what the paper calls an untrained network."""

    spec: Any
    recipe = None

    def model(self) -> torch.nn.Module:
        return models.initial_model(self.spec)

    def row_columns(self, sidecar: dict | None = None) -> dict:
        return {}


@dataclass(frozen=True)
class WeightsFile(TestImages):
    """The trial's model holding the state_dict of its ``weights`` file (checked against the digest keyed)."""

    spec: Any
    recipe = None

    def model(self) -> torch.nn.Module:
        keyed = getattr(self.spec, "weights_sha256", None)
        return weights.load_into(models.initial_model(self.spec), self.spec.weights, keyed).eval()

    def row_columns(self, sidecar: dict | None = None) -> dict:
        return {}


@dataclass(frozen=True)
class ZooCheckpoint(TestImages):
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
        return {
            "checkpoint_key": self.recipe.key,
            "model_accuracy": sidecar.get("test_accuracy"),
            "training_epsilon": sidecar.get("training_epsilon"),
        }


@dataclass(frozen=True)
class FederationRound:
    """The global model of a simulated federation (gradinv.federation) after ``round`` rounds, trained on
    this machine first when missing; the attacked client's images are training images of its own."""

    spec: Any
    recipe = None

    @property
    def federation(self):
        from .federation import Federation

        return Federation.of_trial(self.spec)

    def model(self) -> torch.nn.Module:
        return self.kept_round().model()

    def kept_round(self):
        from . import federation

        return federation.train(self.federation, self.spec.round, keep=(self.spec.round,))

    def row_columns(self, sidecar: dict | None = None) -> dict:
        from .federation import victim_columns

        return victim_columns(self.federation, sidecar, self.spec.attacked_client) if sidecar else {}

    def client_images(self, data_root=None, sidecar: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        from .federation import attacked_images

        sidecar = sidecar or self.kept_round().sidecar
        indices = attacked_images(self.federation, sidecar, self.spec.attacked_client, self.spec.images)
        images01, labels = data.load_images(
            self.spec.dataset, indices, data_root, split="train", image_size=self.spec.image_size
        )
        return images01, labels, {"train_images": indices}


def victim_source(spec: Any) -> Untrained | WeightsFile | ZooCheckpoint | FederationRound:
    if federated(spec):
        return FederationRound(spec)
    if trained_victim(spec):
        return ZooCheckpoint(spec)
    return WeightsFile(spec) if getattr(spec, "weights", None) is not None else Untrained(spec)
