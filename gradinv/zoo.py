"""Trained victims: checkpoints identified by a content key, cached on each machine, trained once.

A checkpoint is ``KEY.pt`` (a state dict, loaded with ``weights_only=True``) beside ``KEY.json``
(test accuracy, epochs, seed, training seconds, torch version, the recipe). Both are written under
temporary names and renamed, the sidecar last, so a crash leaves no half-written checkpoint. A file
lock per key makes concurrent processes that miss the same checkpoint train it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import filelock
import torch
from opacus.data_loader import DPDataLoader

from . import data, models
from .errors import ConfigError, require
from .files import write_atomic
from .zoo_training import TrainingStep

RECIPE_VERSION = 2  # 2: lr 0.01 (0.05 diverged for ConvNet-32 on Fashion-MNIST: loss 12.7, accuracy 0.11)


# The defence settings a training step applies (gradinv.zoo_training.TrainingStep): DP-SGD's clip, noise
# and delta (its batches are the recipe's, Poisson-sampled), then the update-level defences on each step's
# gradient.
TRAINING_DEFENCE = ("dp_clip", "dp_noise", "dp_delta", "clip_update", "noise_std", "keep_fraction", "prune_scope",
                    "quant_bits", "quant_rounding", "defence_seed")  # fmt: skip


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
    # Defences applied to every training step's gradient, as (name, value) pairs of
    # gradinv.parameters.DefenceSettings named in TRAINING_DEFENCE; () plain.
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
        require(self.norm == "group" or "dp_clip" not in dict(self.defence), "norm", self.norm,
                "DP-SGD training needs norm: group (BatchNorm mixes the examples of a batch); compare it with "
                "plain norm: group victims")  # fmt: skip
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
        """The `gradinv zoo train` command that builds this checkpoint."""
        flags = {"--dataset": self.dataset, "--model": self.model, "--width": self.width, "--epochs": self.epochs,
                 "--model-seed": self.model_seed, "--train-subset": self.train_subset, "--image-size": self.image_size}
        command = "gradinv zoo train " + " ".join(f"{flag} {value}" for flag, value in flags.items() if value is not None)
        if self.defence:  # no flags for them: a study with `defended_training: true` trains it
            command += "  (with the defences " + ", ".join(f"{k}={v}" for k, v in self.defence) + ": run the study)"
        return command

    def untrained(self) -> torch.nn.Module:
        spec = data.dataset_spec(self.dataset)
        return models.build_model(
            self.model, channels=spec.channels, num_classes=spec.num_classes,
            image_size=self.image_size or spec.size, width=self.width, seed=self.model_seed, norm=self.norm,
        )  # fmt: skip


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The checkpoint cache of this machine: the argument, else $GRADINV_CACHE, else ~/.cache/gradinv/zoo."""
    root = explicit or os.environ.get("GRADINV_CACHE") or Path.home() / ".cache" / "gradinv" / "zoo"
    return Path(root).expanduser()


@dataclass
class Checkpoint:
    recipe: Recipe
    state: dict[str, torch.Tensor]
    sidecar: dict

    def model(self) -> torch.nn.Module:
        model = self.recipe.untrained()
        model.load_state_dict(self.state)
        return model.eval()

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state, buffer)
        return buffer.getvalue()


def paths(recipe: Recipe, cache: Path) -> tuple[Path, Path]:
    return cache / f"{recipe.key}.pt", cache / f"{recipe.key}.json"


class Unreadable(Exception):
    """A cache file that is there but damaged or not ours; the message says what is wrong."""


SIDECAR_FIELDS = {"key": str, "test_accuracy": (int, float), "epochs": int, "seed": int,
                  "training_seconds": (int, float)}  # fmt: skip


def read_sidecar(path: Path, fields: dict[str, type | tuple] = SIDECAR_FIELDS) -> dict:
    """A sidecar's JSON, with the ``fields`` every reader relies on (name -> type)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise Unreadable(f"{path.name}: {type(error).__name__}") from None
    found = info if isinstance(info, dict) else {}
    bad = [name for name, kind in fields.items() if not isinstance(found.get(name), kind)]
    if bad:
        raise Unreadable(f"{path.name} lacks {', '.join(bad)}")
    return info


def read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved by :func:`store`, with exactly the tensors and shapes of ``expected``."""
    if not zipfile.is_zipfile(path):  # missing, empty, truncated or not a torch archive
        raise Unreadable(f"{path.name} is not a complete torch archive")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # holds more than tensors: weights_only refuses it
        raise Unreadable(f"{path.name} holds more than tensors") from None
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):  # torch's damaged-archive errors; anything else is a bug
            raise
        raise Unreadable(f"{path.name} is damaged") from None
    if not isinstance(state, dict) or _shapes(state) != _shapes(expected):
        raise Unreadable(f"{path.name} does not hold this recipe's model")
    return state


def _shapes(state: dict) -> dict:
    return {name: tuple(value.shape) if isinstance(value, torch.Tensor) else None for name, value in state.items()}


def load(recipe: Recipe, cache: str | os.PathLike | None = None) -> Checkpoint | None:
    """The cached checkpoint, or None when it has not been trained on this machine."""
    weights, sidecar = paths(recipe, cache_dir(cache))
    if not sidecar.exists():
        return None
    expected = recipe.untrained().state_dict()
    try:
        info = read_sidecar(sidecar)
        state = read_weights(weights, expected)
    except Unreadable as problem:
        raise ConfigError(
            "checkpoint", str(weights),
            f"it is unreadable ({problem}); delete {weights.name} and {sidecar.name} and run "
            f"'{recipe.train_command()}' (or the study) again to rebuild it",
        ) from None  # fmt: skip
    return Checkpoint(recipe, state, info)


def store(checkpoint: Checkpoint, cache: str | os.PathLike | None = None) -> None:
    """Write a checkpoint into this machine's cache (weights first, then the sidecar that marks it done)."""
    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    weights, sidecar = paths(checkpoint.recipe, root)
    write_atomic(weights, checkpoint.to_bytes())
    write_atomic(sidecar, json.dumps(checkpoint.sidecar, indent=2).encode())


def from_bytes(recipe: Recipe, payload: bytes, sidecar: dict) -> Checkpoint:
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    return Checkpoint(recipe, state, sidecar)


def ensure(
    recipe: Recipe,
    cache: str | os.PathLike | None = None,
    *,
    data_root=None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[Checkpoint, bool]:
    """The checkpoint, trained here if no process has yet; returns it and whether this call trained it."""
    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(root / f"{recipe.key}.lock")):
        found = load(recipe, root)
        if found is not None:
            return found, False
        checkpoint = train(recipe, data_root=data_root, on_epoch=on_epoch)
        store(checkpoint, root)
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
    step = TrainingStep(model, recipe, sample_rate=1 / len(loader), expected_batch_size=len(train_set) / len(loader))
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
        "key": recipe.key, "test_accuracy": test_accuracy(model, recipe, data_root), "epochs": recipe.epochs,
        "seed": recipe.model_seed, "training_seconds": time.perf_counter() - start, "torch": torch.__version__,
        "recipe": dataclasses.asdict(recipe), **step.privacy(steps),
    }  # fmt: skip
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


@dataclass(frozen=True)
class Listed:
    """One checkpoint of a cache: its sidecar, or why the sidecar cannot be read."""

    key: str
    info: dict | None
    problem: str = ""


def listing(cache: str | os.PathLike | None = None) -> list[Listed]:
    root = cache_dir(cache)
    return [_listed(path) for path in sorted(root.glob("*.json"))] if root.is_dir() else []


def _listed(sidecar: Path) -> Listed:
    try:
        return Listed(sidecar.stem, read_sidecar(sidecar))
    except Unreadable as problem:
        return Listed(sidecar.stem, None, str(problem))
