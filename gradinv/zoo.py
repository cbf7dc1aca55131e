"""Trained victims: checkpoints identified by a content key, cached on each machine, trained once.

A checkpoint is an entry of this machine's cache (gradinv.cache) at its top: ``KEY.pt`` beside ``KEY.json``
(test accuracy, epochs, seed, training seconds, torch version, the recipe). A file lock per key makes
concurrent processes that miss the same checkpoint train it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.data_loader import DPDataLoader

from . import data, models
from .cache import Entry, Listed, cache_dir, lock, sidecars
from .errors import require
from .zoo_training import TrainingStep

RECIPE_VERSION = 2  # 2: lr 0.01 (0.05 diverged for ConvNet-32 on Fashion-MNIST: loss 12.7, accuracy 0.11)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a checkpoint's weights."""

    dataset: str
    model: str
    width: int | None  # None: the model's default width (the key is the same either way)
    epochs: int
    model_seed: int = 0
    train_subset: int | None = None  # the first N training images; None: all of them
    image_size: int | None = None
    batch_size: int = 128
    lr: float = 0.01  # SGD with Nesterov momentum 0.9, weight decay 5e-4, linear decay to 0
    version: int = RECIPE_VERSION
    # Defences applied to every training step's gradient (gradinv.zoo_training.TrainingStep), as (name, value)
    # pairs of the knobs gradinv.parameters.training_defences names; () plain.
    defence: tuple = ()
    norm: str = "batch"  # or "group" (gradinv.models.build_model)

    def __post_init__(self):
        spec = data.dataset_spec(self.dataset)
        require(spec.trainable, "dataset", self.dataset, "it keeps no images to train on (every image is attacked)")
        default_width = models.default_width(self.model)  # validates the name
        if self.width is None:  # one checkpoint for the default width, whether it is named or not
            object.__setattr__(self, "width", default_width)
        require(self.epochs >= 1, "epochs", self.epochs, "train for at least 1 epoch (0 is the untrained model)")
        require(self.train_subset is None or self.train_subset >= 1, "train_subset", self.train_subset, "use 1 or more")
        require(
            self.norm == "group" or "dp_clip" not in dict(self.defence),
            "norm",
            self.norm,
            "DP-SGD training needs norm: group (BatchNorm mixes the examples of a batch); compare it with "
            "plain norm: group victims",
        )
        object.__setattr__(self, "defence", tuple(sorted((str(k), v) for k, v in self.defence)))  # JSON gives lists

    @property
    def key(self) -> str:
        fields = dataclasses.asdict(self)
        for name, plain in (("defence", ()), ("norm", "batch")):  # plain recipes keep the keys they had before
            if fields[name] == plain or fields[name] == list(plain):
                del fields[name]
        if split := data.dataset_spec(self.dataset).split_version:  # a new split trains on other images
            fields["split_version"] = split
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return f"{self.model}-{self.dataset}-e{self.epochs}-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def train_command(self) -> str:
        """The `gradinv zoo train` command that builds this checkpoint: a flag per knob of the recipe."""
        knobs = {
            "dataset": self.dataset,
            "model": self.model,
            "width": self.width,
            "trained_epochs": self.epochs,
            "model_seed": self.model_seed,
            "train_subset": self.train_subset,
            "image_size": self.image_size,
            "norm": self.norm,
            **dict(self.defence),
        }
        return "gradinv zoo train " + " ".join(_flag(name, value) for name, value in knobs.items() if value is not None)

    def untrained(self) -> torch.nn.Module:
        return models.initial_model(self)


def _flag(name: str, value) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


@dataclass
class Checkpoint:
    recipe: Recipe
    state: dict[str, torch.Tensor]
    sidecar: dict

    def model(self) -> torch.nn.Module:
        model = self.recipe.untrained()
        model.load_state_dict(self.state)
        return model.eval()


def entry(recipe: Recipe, cache: str | os.PathLike | None = None) -> Entry:
    """Where this machine keeps the recipe's checkpoint: at the top of its cache."""
    rebuild = f"run '{recipe.train_command()}' (or the study) again to rebuild it"
    return Entry(cache_dir(cache), recipe.key, "checkpoint", "it", rebuild)


SIDECAR_FIELDS = {
    "key": str,
    "test_accuracy": (int, float),
    "epochs": int,
    "seed": int,
    "training_seconds": (int, float),
}


def load(recipe: Recipe, cache: str | os.PathLike | None = None) -> Checkpoint | None:
    """The cached checkpoint, or None when it has not been trained on this machine."""
    found = entry(recipe, cache).load(recipe.untrained, SIDECAR_FIELDS)
    return None if found is None else Checkpoint(recipe, *found)


def store(checkpoint: Checkpoint, cache: str | os.PathLike | None = None) -> None:
    """Write a checkpoint into this machine's cache."""
    entry(checkpoint.recipe, cache).store(checkpoint.state, checkpoint.sidecar)


def ensure(
    recipe: Recipe,
    cache: str | os.PathLike | None = None,
    *,
    data_root=None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[Checkpoint, bool]:
    """The checkpoint, trained here if no process has yet; returns it and whether this call trained it."""
    with lock(cache_dir(cache), recipe.key):
        found = load(recipe, cache)
        if found is not None:
            return found, False
        checkpoint = train(recipe, data_root=data_root, on_epoch=on_epoch)
        store(checkpoint, cache)
        return checkpoint, True


def train(recipe: Recipe, *, data_root=None, on_epoch=None) -> Checkpoint:
    """Train from the seeded initialisation; deterministic for a seed on the CPU."""
    start = time.perf_counter()
    spec = data.dataset_spec(recipe.dataset)
    model = recipe.untrained().train()
    train_set = data.open_dataset(recipe.dataset, data_root, split="train", image_size=recipe.image_size)
    if recipe.train_subset is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(recipe.train_subset, len(train_set))))
    order = torch.Generator().manual_seed(recipe.model_seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, generator=order)
    step = TrainingStep(
        model, recipe.defence, recipe.lr, sample_rate=1 / len(loader), expected_batch_size=len(train_set) / len(loader)
    )
    if step.private is not None:  # DP-SGD: Poisson-sampled batches, as its accountant assumes
        loader = DPDataLoader.from_data_loader(loader, generator=order)
    steps = recipe.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(step.optimiser, lambda done: 1 - done / steps)
    for epoch in range(recipe.epochs):
        seen, loss_sum, correct = 0, 0.0, 0
        for images, labels in loader:  # under DP-SGD a Poisson batch may be empty: its step is noise alone
            logits, loss = step(data.normalise(images, spec), labels)
            schedule.step()
            seen += len(labels)
            loss_sum += loss * len(labels)
            correct += int((logits.argmax(1) == labels).sum()) if len(labels) else 0
        if on_epoch is not None:
            on_epoch(epoch + 1, loss_sum / max(seen, 1), correct / max(seen, 1))
    step.finish()
    model.eval()
    sidecar = {
        "key": recipe.key,
        "test_accuracy": test_accuracy(model, recipe, data_root),
        "epochs": recipe.epochs,
        "seed": recipe.model_seed,
        "training_seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "recipe": dataclasses.asdict(recipe),
        **step.privacy(steps),
    }
    return Checkpoint(recipe, {k: v.detach().clone() for k, v in model.state_dict().items()}, sidecar)


def test_accuracy(model: torch.nn.Module, recipe: Recipe, data_root=None) -> float:
    """The fraction of the test split classified correctly."""
    spec = data.dataset_spec(recipe.dataset)
    test_set = data.open_dataset(recipe.dataset, data_root, split="test", image_size=recipe.image_size)
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(test_set, batch_size=500):
            correct += int((model(data.normalise(images, spec)).argmax(1) == labels).sum())
    return correct / len(test_set)


def listing(cache: str | os.PathLike | None = None) -> list[Listed]:
    """The checkpoints of this machine's cache, each with its sidecar or why that cannot be read."""
    return sidecars(cache_dir(cache), SIDECAR_FIELDS)
