"""Trained victims for a study: each missing checkpoint trained once, as its own Ray task.

The training task stores the checkpoint in its node's cache and returns the weights and the sidecar
as two objects; trials that need it are submitted once it is ready (the others run meanwhile) and
receive the weights through Ray's object store, so no node relies on another's disk. A node that
receives weights keeps a copy in its own cache for later runs.
"""

from __future__ import annotations

import functools

from gradinv import zoo
from gradinv.trial import TrialSpec
from gradinv.victims import ZooCheckpoint


def train_task(recipe: zoo.Recipe) -> tuple[bytes, dict]:
    checkpoint, _ = zoo.ensure(recipe)
    return checkpoint.to_bytes(), checkpoint.sidecar


class Victims:
    """The checkpoints a study's trials need: training in flight (on the driver's task loop), ready, or failed."""

    def __init__(self, loop, num_cpus: float, max_retries: int, specs: list[TrialSpec]):
        self.ray = loop.ray
        self.loop = loop
        self.train = self.ray.remote(train_task).options(num_cpus=num_cpus, max_retries=max_retries, num_returns=2)
        self.training: set[str] = set()
        self.ready: dict[str, tuple] = {}  # key -> (weights ref, sidecar)
        self.errors: dict[str, str] = {}
        for spec in specs:
            self.need(spec)

    def need(self, spec: TrialSpec) -> None:
        """Start training the trial's checkpoint unless it is untrained, training, ready or failed."""
        if spec.trained_epochs == 0:
            return
        recipe = spec.recipe()
        if recipe.key in self.training or recipe.key in self.ready or recipe.key in self.errors:
            return
        weights, sidecar = self.train.remote(recipe)
        self.training.add(recipe.key)
        self.loop.submit(sidecar, functools.partial(self._trained, recipe.key, weights))

    def _trained(self, key: str, weights, sidecar) -> None:
        self.training.discard(key)
        try:
            self.ready[key] = (weights, self.ray.get(sidecar))
        except self.ray.exceptions.RayError as error:
            self.errors[key] = f"training the victim {key} failed: {str(error).strip().splitlines()[-1]}"

    def state(self, spec: TrialSpec) -> str:
        """untrained, ready, training or failed."""
        if spec.trained_epochs == 0:
            return "untrained"
        key = spec.recipe().key
        return "ready" if key in self.ready else "failed" if key in self.errors else "training"

    def error(self, spec: TrialSpec) -> str:
        return self.errors[spec.recipe().key]

    def payload(self, spec: TrialSpec) -> tuple:
        """The task arguments for the victim: (weights ref, sidecar) when trained, none otherwise."""
        return self.ready[spec.recipe().key] if spec.trained_epochs else ()

    def columns(self, spec: TrialSpec) -> dict:
        """The columns a trial's row carries about its victim."""
        if spec.trained_epochs == 0:
            return {}
        return ZooCheckpoint(spec).row_columns(self.ready.get(spec.recipe().key, (None, {}))[1])


def victim_from_checkpoint(weights: bytes, sidecar: dict):
    """The trained model from weights sent through the object store; cached on this node too."""
    recipe = zoo.Recipe(**sidecar["recipe"])
    checkpoint = zoo.from_bytes(recipe, weights, sidecar)
    if zoo.load(recipe) is None:
        zoo.store(checkpoint)
    model = checkpoint.model()
    return lambda _: model
