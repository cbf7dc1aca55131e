"""Trained victims for a study: each missing checkpoint trained once, as its own Ray task.

The training task stores the checkpoint in its node's cache and returns the weights; trials receive
them through Ray's object store, so no node relies on another's disk. A node that receives weights
keeps a copy in its own cache for later runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradinv import zoo
from gradinv.trial import TrialSpec


@dataclass
class StudyCheckpoints:
    refs: dict = field(default_factory=dict)  # recipe key -> ObjectRef of (weights bytes, sidecar)
    accuracy: dict = field(default_factory=dict)  # recipe key -> test accuracy
    errors: dict = field(default_factory=dict)  # recipe key -> why training failed

    def columns(self, spec: TrialSpec) -> dict:
        """The columns a trial's row carries about its victim."""
        if spec.trained_epochs == 0:
            return {}
        key = spec.recipe().key
        return {"checkpoint_key": key, "model_accuracy": self.accuracy.get(key)}


def train_task(recipe: zoo.Recipe) -> tuple[bytes, dict]:
    checkpoint, _ = zoo.ensure(recipe)
    return checkpoint.to_bytes(), checkpoint.sidecar


def prepare(ray, num_cpus: float, max_retries: int, specs: list[TrialSpec], progress: bool = True) -> StudyCheckpoints:
    """Train (or find in the node caches) every checkpoint the trials need, before they are submitted."""
    recipes = {spec.recipe().key: spec.recipe() for spec in specs if spec.trained_epochs}
    result = StudyCheckpoints()
    if not recipes:
        return result
    if progress:
        print(f"preparing {len(recipes)} trained victims (each trained once, or found in a node's cache)")
    train = ray.remote(train_task).options(num_cpus=num_cpus, max_retries=max_retries)
    refs = {key: train.remote(recipe) for key, recipe in recipes.items()}
    for key, ref in refs.items():
        try:
            _, sidecar = ray.get(ref)
        except ray.exceptions.RayError as error:
            result.errors[key] = f"training the victim {key} failed: {str(error).strip().splitlines()[-1]}"
            continue
        result.refs[key], result.accuracy[key] = ref, sidecar["test_accuracy"]
    return result


def victim_from_checkpoint(payload: tuple[bytes, dict]):
    """The trained model from weights sent through the object store; cached on this node too."""
    weights, sidecar = payload
    recipe = zoo.Recipe(**sidecar["recipe"])
    checkpoint = zoo.from_bytes(recipe, weights, sidecar)
    if zoo.load(recipe) is None:
        zoo.store(checkpoint)
    model = checkpoint.model()
    return lambda spec: model
