"""Trained victims for a study: each missing checkpoint trained once, as its own Ray task.

The training task stores the checkpoint in its node's cache and returns the weights and the sidecar
as two objects; trials that need it are submitted once it is ready (the others run meanwhile) and
receive the weights through Ray's object store, so no node relies on another's disk. A node that
receives weights keeps a copy in its own cache for later runs.
"""

from __future__ import annotations

from gradinv import zoo
from gradinv.trial import TrialSpec


def train_task(recipe: zoo.Recipe) -> tuple[bytes, dict]:
    checkpoint, _ = zoo.ensure(recipe)
    return checkpoint.to_bytes(), checkpoint.sidecar


class Victims:
    """The checkpoints a study's trials need: training in flight, ready, or failed."""

    def __init__(self, ray, num_cpus: float, max_retries: int, specs: list[TrialSpec]):
        self.ray = ray
        recipes = {spec.recipe().key: spec.recipe() for spec in specs if spec.trained_epochs}
        train = ray.remote(train_task).options(num_cpus=num_cpus, max_retries=max_retries, num_returns=2)
        self.training = {key: train.remote(recipe) for key, recipe in recipes.items()}  # key -> (weights, sidecar)
        self.ready: dict[str, tuple] = {}  # key -> (weights ref, sidecar)
        self.errors: dict[str, str] = {}

    def poll(self, timeout: float = 0) -> None:
        """Take the trainings that have finished (waiting up to ``timeout`` for the first)."""
        waiting = {sidecar: key for key, (_, sidecar) in self.training.items()}
        if not waiting:
            return
        finished, _ = self.ray.wait(list(waiting), num_returns=1, timeout=timeout)
        if finished:
            finished, _ = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        for ref in finished:
            key = waiting[ref]
            weights, _ = self.training.pop(key)
            try:
                self.ready[key] = (weights, self.ray.get(ref))
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
        key = spec.recipe().key
        sidecar = self.ready.get(key, (None, {}))[1]
        return {"checkpoint_key": key, "model_accuracy": sidecar.get("test_accuracy")}


def victim_from_checkpoint(weights: bytes, sidecar: dict):
    """The trained model from weights sent through the object store; cached on this node too."""
    recipe = zoo.Recipe(**sidecar["recipe"])
    checkpoint = zoo.from_bytes(recipe, weights, sidecar)
    if zoo.load(recipe) is None:
        zoo.store(checkpoint)
    model = checkpoint.model()
    return lambda _: model
