"""Victims for a study: each missing zoo checkpoint trained once, as its own Ray task; each federation
trained once to the last round its trials attack, as a Ray task whose clients are Ray tasks too.

A training task stores what it trained in its node's cache and returns the weights and the sidecar;
trials that need them are submitted once they are ready (the others run meanwhile) and receive the
weights through Ray's object store, so no node relies on another's disk. A node that receives a zoo
checkpoint keeps a copy in its own cache for later runs.
"""

from __future__ import annotations

import contextlib
import functools

from gradinv import cache, federation, zoo
from gradinv.files import require_writable_directory
from gradinv.parameters import federated
from gradinv.trial import TrialSpec
from gradinv.victims import FederationRound, ZooCheckpoint

from .task_loop import finished


def train_task(recipe: zoo.Recipe) -> tuple[bytes, dict]:
    checkpoint, _ = zoo.ensure(recipe)
    return cache.to_bytes(checkpoint.state), checkpoint.sidecar


def federation_task(recipe: federation.Federation, rounds: tuple[int, ...]) -> dict[int, tuple[bytes, dict]]:
    """Train the federation to its last asked round (its clients as Ray tasks); each asked round's weights."""
    import ray

    federation.train(recipe, max(rounds), keep=rounds, run_clients=ray_clients(ray))
    kept = federation.kept_rounds(recipe, rounds)
    return {number: (cache.to_bytes(found.state), found.sidecar) for number, found in kept.items()}


def ray_clients(ray, num_cpus: float = 1):
    """Each selected client's local training as a Ray task; the states come back in client-id order."""
    task = ray.remote(federation.train_client).options(num_cpus=num_cpus)

    def run(recipe, state, round_, clients):
        shared = ray.put(state)
        return ray.get([task.remote(recipe, shared, round_, client) for client in clients])

    return run


def victim_key(spec: TrialSpec) -> str | None:
    """What a trial's victim is trained as: a zoo checkpoint's key, a federation round, None untrained."""
    if federated(spec):
        return f"{federation.Federation.of_trial(spec).key}@{spec.round}"
    return spec.recipe().key if spec.trained_epochs else None


def check_caches(specs: list[TrialSpec]) -> None:
    """Before any trial starts, in the driver: when trials need trained victims, this machine's cache is
    writable, and every checkpoint and federation round of theirs already in it loads (weights only)
    and has a sound sidecar. Raises ConfigError, one line naming the file and the fix; a damaged cache
    would otherwise fail every trial on it in the workers."""
    recipes: dict[str, zoo.Recipe] = {}
    rounds: dict[str, tuple[federation.Federation, set[int]]] = {}
    for spec in specs:
        if federated(spec):
            recipe = federation.Federation.of_trial(spec)
            rounds.setdefault(recipe.key, (recipe, set()))[1].add(spec.round)
        elif spec.trained_epochs:
            recipes.setdefault(spec.recipe().key, spec.recipe())
    if not recipes and not rounds:
        return
    require_writable_directory("GRADINV_CACHE", cache.cache_dir())  # loading takes a lock file there; training stores
    for recipe in recipes.values():
        zoo.load(recipe)
    for recipe, numbers in rounds.values():
        for number in sorted(numbers):
            federation.load_round(recipe, number)
        federation.resume_point(recipe, max(numbers))  # where training the missing rounds resumes


class Victims:
    """The victims a study's trials need: training in flight (on the driver's task loop), ready, or failed."""

    def __init__(self, loop, num_cpus: float, max_retries: int, specs: list[TrialSpec]):
        self.ray = loop.ray
        self.loop = loop
        options = dict(num_cpus=num_cpus, max_retries=max_retries)
        self.train = self.ray.remote(train_task).options(num_returns=2, **options)
        self.train_federation = self.ray.remote(federation_task).options(**options)
        self.training: set[str] = set()
        self.ready: dict[str, tuple] = {}  # key -> (weights ref, sidecar)
        self.errors: dict[str, str] = {}
        self.rounds: dict[str, set[int]] = {}  # federation key -> the rounds its trials attack
        for spec in specs:
            if federated(spec):
                self.rounds.setdefault(federation.Federation.of_trial(spec).key, set()).add(spec.round)
        for spec in specs:
            self.need(spec)

    def need(self, spec: TrialSpec) -> None:
        """Start training the trial's victim unless it is untrained, training, ready or failed."""
        key = victim_key(spec)
        if key is None or key in self.training or key in self.ready or key in self.errors:
            return
        if federated(spec):
            self._train_federation(spec)
            return
        weights, sidecar = self.train.remote(spec.recipe())
        self.training.add(key)
        self.loop.submit(sidecar, functools.partial(self._trained, key, weights))

    def _train_federation(self, spec: TrialSpec) -> None:
        recipe = federation.Federation.of_trial(spec)
        rounds = tuple(sorted(self.rounds.setdefault(recipe.key, set()) | {spec.round}))
        keys = [f"{recipe.key}@{number}" for number in rounds if f"{recipe.key}@{number}" not in self.ready]
        self.training.update(keys)
        self.loop.submit(self.train_federation.remote(recipe, rounds), functools.partial(self._federated, keys))

    def _trained(self, key: str, weights, sidecar) -> None:
        self.training.discard(key)
        try:
            self.ready[key] = (weights, finished(self.ray, sidecar))  # Ray failing under it: MachineryFailed
        except self.ray.exceptions.RayError as error:
            self.errors[key] = f"training the victim {key} failed: {_last_line(error)}"
            with contextlib.suppress(self.ray.exceptions.RayError):  # its twin, else Ray prints it as unhandled
                self.ray.get(weights)

    def _federated(self, keys: list[str], ref) -> None:
        self.training.difference_update(keys)
        try:
            trained = finished(self.ray, ref)
        except self.ray.exceptions.RayError as error:
            self.errors.update({key: f"training the federation {key} failed: {_last_line(error)}" for key in keys})
            return
        for key in keys:
            weights, sidecar = trained[int(key.rsplit("@", 1)[1])]
            self.ready[key] = (self.ray.put(weights), sidecar)

    def state(self, spec: TrialSpec) -> str:
        """untrained, ready, training or failed."""
        key = victim_key(spec)
        if key is None:
            return "untrained"
        return "ready" if key in self.ready else "failed" if key in self.errors else "training"

    def error(self, spec: TrialSpec) -> str:
        return self.errors[victim_key(spec)]

    def payload(self, spec: TrialSpec) -> tuple:
        """The task arguments for the victim: (weights ref, sidecar) when trained, none otherwise."""
        key = victim_key(spec)
        return () if key is None else self.ready[key]

    def columns(self, spec: TrialSpec) -> dict:
        """The columns a trial's row carries about its victim."""
        key = victim_key(spec)
        if key is None:
            return {}
        sidecar = self.ready.get(key, (None, {}))[1]
        return (FederationRound if federated(spec) else ZooCheckpoint)(spec).row_columns(sidecar)


def _last_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1]


def victim_from_checkpoint(weights: bytes, sidecar: dict):
    """(victim loader, image loader) for weights sent through the object store: a zoo checkpoint (cached
    on this node too; the images are the trial's own) or a federation round (the attacked client's
    images come from the round's sidecar)."""
    if "partitions" in sidecar:
        recipe = federation.Federation(**sidecar["recipe"])
        model = federation.Round(recipe, sidecar["round"], cache.from_bytes(weights), sidecar).model()
        return (lambda _: model), (lambda spec: FederationRound(spec).client_images(sidecar=sidecar))
    recipe = zoo.Recipe(**sidecar["recipe"])
    checkpoint = zoo.Checkpoint(recipe, cache.from_bytes(weights), sidecar)
    if zoo.load(recipe) is None:
        zoo.store(checkpoint)
    model = checkpoint.model()
    return (lambda _: model), None
