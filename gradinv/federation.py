"""A simulated federation: FedAvg over clients that hold partitions of a training subset. The global
model after round r is a victim like an untrained model or a zoo checkpoint.

A :class:`Federation` recipe fixes everything that determines the rounds' weights. Its key leaves out
how many rounds to train and how often to keep one: training further extends the same federation.

Round r (from 1): the clients taking part are drawn by a generator seeded by ``(model_seed, r)``. Each
trains the global model on its own images as FedAvg's clients do: SGD at ``fed_lr`` (momentum
``fed_momentum``, its buffer fresh each round) over ``fed_epochs`` passes in mini-batches of
``fed_batch_size``, shuffled by a seed derived from ``(model_seed, r, client)``, BatchNorm in training
mode, on one thread. The server averages the clients'
states (parameters and BatchNorm statistics) weighted by their image counts, summed in client-id
order. So a recipe gives bit-identical rounds on one machine, with the clients in Ray tasks or in this
process. The global test accuracy of each round is measured on the first ``accuracy_images`` test
images.

An attacked client computes its update as every victim here does (gradinv.client.update): from the global model,
with BatchNorm as ``client_bn`` says (eval by default: the federation's averaged statistics, which the
attacker knows), and under FedAvg with the federation's local training, momentum included.

Rounds are entries of this machine's cache (gradinv.cache) beside the zoo's checkpoints, under
``CACHE/federations/KEY/``: ``round-00005.pt`` (the state dict) and ``round-00005.json`` (the global model's
test accuracy, which clients took part in each round so far, the recipe). Round 0 and every
``checkpoint_every``-th round are kept, and so is each round asked for; a killed training resumes from
the last round kept. A file lock per federation makes processes that need it train it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data, models, parameters, partition
from .cache import Entry, cache_dir, keys, lock
from .errors import ConfigError, require
from .parameters import FEDERATION, knob

FEDERATION_VERSION = 1
ClientData = tuple[int, torch.Tensor, torch.Tensor]  # (client id, its images in [0, 1], labels)
ClientUpdate = tuple[int, dict[str, torch.Tensor]]  # (image count, the state after local training)
RunClients = Callable[["Federation", dict, int, Sequence[ClientData]], list[ClientUpdate]]


@dataclass(frozen=True, kw_only=True)
class RecipeSettings:
    """The recipe's own fields, not trial parameters: :func:`recipe_class` puts them after the knobs
    gradinv.parameters declares for the FEDERATION recipe."""

    self_balancing: bool = knob(
        False, kind="bool", help="dirichlet: a client past len/clients images takes no more classes"
    )
    checkpoint_every: int = knob(
        1,
        kind="int",
        check=lambda v: v >= 1,
        fix="use 1 or more",
        help="keep every k-th round as a resume point (not in the key)",
    )
    accuracy_images: int = knob(
        1000,
        kind="int",
        check=lambda v: v >= 1,
        fix="use 1 or more",
        help="the first N test images score each round's global model",
    )
    version: int = FEDERATION_VERSION


DIRICHLET_ONLY = ("alpha", "min_partition_size")  # None under iid
NOT_KEYED = ("fed_rounds", "checkpoint_every")  # how far to train, how often to keep: training further extends it
# The fields every key has held: a field added since is keyed only off its default, so existing keys stay.
ALWAYS_KEYED = frozenset(
    {
        "dataset",
        "model",
        "width",
        "norm",
        "model_seed",
        "image_size",
        "train_subset",
        "fed_clients",
        "partition",
        "alpha",
        "min_partition_size",
        "clients_per_round",
        "fed_epochs",
        "fed_batch_size",
        "fed_lr",
        "self_balancing",
        "accuracy_images",
        "version",
    }
)


class FederationRules:
    """Everything that determines a federation's round checkpoints (and, outside the key, how far to
    train and how often to keep a round). Fields named like trial parameters mean what those mean;
    ``model_seed`` seeds the initial model, the partition, who takes part and the batches."""

    def __post_init__(self):
        dirichlet = self.partition == "dirichlet"
        for name, declared in parameters.declarations(self).items():
            if name not in DIRICHLET_ONLY or dirichlet:
                declared.validate(name, getattr(self, name))
        require(
            data.dataset_spec(self.dataset).trainable,
            "dataset",
            self.dataset,
            "it keeps no images to train on (every image is attacked)",
        )
        if self.width is None:  # the model's default width: the key is the same either way
            object.__setattr__(self, "width", models.default_width(self.model))
        if not dirichlet:  # no concentration: one key whatever the unused settings say
            for name in DIRICHLET_ONLY:
                object.__setattr__(self, name, None)
            object.__setattr__(self, "self_balancing", False)
        self._check_partition()
        if self.clients_per_round is None:
            object.__setattr__(self, "clients_per_round", self.fed_clients)  # one key for "all" and its count
        require(
            self.clients_per_round <= self.fed_clients,
            "clients_per_round",
            self.clients_per_round,
            f"use 1 to {self.fed_clients} (the federation's clients)",
        )

    def _check_partition(self) -> None:
        """What any partition of the training images needs: an image per client, and under dirichlet
        room for ``min_partition_size`` images per client (else every draw is refused)."""
        available, clients = self.training_images, self.fed_clients
        require(clients <= available, "fed_clients", clients, f"use at most {available} clients ({self._images()})")
        if self.partition == "dirichlet":
            most = available // clients
            require(
                self.min_partition_size <= most,
                "min_partition_size",
                self.min_partition_size,
                f"no partition gives each of {clients} clients that many of {self._images()}; use 0 to {most}, "
                "or fewer clients",
            )

    @property
    def training_images(self) -> int:
        """How many training images the clients share: the train_subset's, or all the dataset keeps."""
        available = data.dataset_spec(self.dataset).train_images
        return available if self.train_subset is None else min(self.train_subset, available)

    def _images(self) -> str:
        if self.train_subset is not None and self.train_subset <= self.training_images:
            return f"the train_subset's {self.train_subset} images"
        return f"the {self.training_images} training images of {self.dataset}"

    def share_size(self, client: int) -> tuple[int, int]:
        """The fewest and the most images ``client`` can hold: exact under iid (near-equal parts), and
        under dirichlet bounded by ``min_partition_size`` for it and for each other client."""
        available, clients = self.training_images, self.fed_clients
        if self.partition == "iid":
            size = available // clients + (client < available % clients)  # np.array_split's part sizes
            return size, size
        return self.min_partition_size, available - (clients - 1) * self.min_partition_size

    def check_positions(self, client: int, positions: Sequence[int]) -> None:
        """Refuses a client the federation lacks, and attacked-image positions beyond any share ``client``
        can hold (the share drawn is checked again when its partition is known: :func:`attacked_images`)."""
        require(
            0 <= client < self.fed_clients,
            "attacked_client",
            client,
            f"use 0 to {self.fed_clients - 1} (the federation's clients)",
        )
        fewest, most = self.share_size(client)
        holds = f"holds {most}" if fewest == most else f"holds at most {most}"
        for position in positions:
            require(
                position < most, "images", position, f"client {client} {holds} images; use positions 0 to {most - 1}"
            )

    @classmethod
    def of_trial(cls, trial) -> Federation:
        """The federation a trial's victim comes from."""
        own = parameters.declarations(RecipeSettings)
        return cls(**{name: getattr(trial, name) for name in parameters.declarations(cls) if name not in own})

    @property
    def key(self) -> str:
        plain = parameters.defaults(self)
        fields = {
            name: value
            for name, value in dataclasses.asdict(self).items()
            if name not in NOT_KEYED and (name in ALWAYS_KEYED or value != plain[name])
        }
        if split := data.dataset_spec(self.dataset).split_version:
            fields["split_version"] = split
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        return f"{self.model}-{self.dataset}-{self.partition}-c{self.fed_clients}-{digest}"

    def initial_model(self) -> torch.nn.Module:
        spec = data.dataset_spec(self.dataset)
        return models.build_model(
            self.model,
            channels=spec.channels,
            num_classes=spec.num_classes,
            image_size=self.image_size or spec.size,
            width=self.width,
            seed=self.model_seed,
            norm=self.norm,
        ).eval()

    def check_round(self, round_: int) -> None:
        require(
            0 <= round_ <= self.fed_rounds,
            "round",
            round_,
            f"use 0 to {self.fed_rounds} (fed_rounds), or raise fed_rounds",
        )


def recipe_class(parts: Sequence[type]) -> type:
    """The federation recipe: the knobs of ``parts`` declared for the FEDERATION recipe, and RecipeSettings."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in (*parameters.recipe_fields(FEDERATION, parts), *dataclasses.fields(RecipeSettings))
    ]
    cls = dataclasses.make_dataclass("Federation", fields, bases=(FederationRules,), frozen=True, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = FederationRules.__doc__
    return cls


Federation = recipe_class(parameters.PARTS)


# ------------------------------------------------------------------------------------------------
# Who holds what, who takes part, and what one client computes


def partitions(federation: Federation, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's indices into the training subset (seeded by ``model_seed``)."""
    try:
        if federation.partition == "iid":
            parts = partition.iid_partition(len(labels), federation.fed_clients, federation.model_seed)
        else:
            parts = partition.dirichlet_partition(
                labels,
                federation.fed_clients,
                federation.alpha,
                federation.model_seed,
                min_partition_size=federation.min_partition_size,
                self_balancing=federation.self_balancing,
            )
    except ConfigError as error:  # the partitioner's "clients" is the trial's fed_clients
        raise ConfigError("fed_clients" if error.field == "clients" else error.field, error.value, error.fix) from None
    empty = [client for client, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(
            "fed_clients",
            federation.fed_clients,
            f"client {empty[0]} holds no images; use fewer clients or a larger min_partition_size",
        )
    return parts


def selected_clients(federation: Federation, round_: int) -> list[int]:
    """The clients that train in round ``round_`` (from 1), in id order."""
    generator = np.random.default_rng([federation.model_seed, round_])
    return sorted(generator.choice(federation.fed_clients, federation.clients_per_round, replace=False).tolist())


def order_seed(federation: Federation, round_: int, client: int) -> int:
    """Seeds the client's mini-batch order in round ``round_``."""
    return int(np.random.SeedSequence([federation.model_seed, round_, client]).generate_state(1)[0])


def minibatches(num_images: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled mini-batches; a last batch of one image joins the one before (BatchNorm in
    training mode needs two)."""
    batches = list(torch.randperm(num_images, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@contextlib.contextmanager
def one_thread():
    """Clients compute on one thread, so their sums are the same in any process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def client_update(federation: Federation, state: dict, round_: int, client: ClientData) -> ClientUpdate:
    """One client's local training from the global ``state``: its image count and its new state."""
    client_id, images, labels = client
    model = federation.initial_model()
    model.load_state_dict(state)
    model.train()
    for norm in model.modules():  # statistics of this round's weights, not a slow average over past rounds
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative mean over the local steps
    inputs = data.normalise(images, data.dataset_spec(federation.dataset))
    optimiser = torch.optim.SGD(model.parameters(), lr=federation.fed_lr, momentum=federation.fed_momentum)
    generator = torch.Generator().manual_seed(order_seed(federation, round_, client_id))
    with one_thread():
        for _ in range(federation.fed_epochs):
            for batch in minibatches(len(labels), federation.fed_batch_size, generator):
                optimiser.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
                optimiser.step()
    return len(labels), {name: value.detach().clone() for name, value in model.state_dict().items()}


def in_process(federation: Federation, state: dict, round_: int, clients: Sequence[ClientData]) -> list[ClientUpdate]:
    return [client_update(federation, state, round_, client) for client in clients]


def averaged(updates: Sequence[ClientUpdate]) -> dict:
    """The server's FedAvg step: the clients' states (parameters and BatchNorm statistics) averaged with
    weights proportional to their image counts, summed in the given (client-id) order. Counters (an
    integer buffer such as BatchNorm's batches seen) take the largest value."""
    total = sum(count for count, _ in updates)
    first = updates[0][1]
    new = {}
    for name, value in first.items():
        if not value.is_floating_point():
            new[name] = torch.stack([state[name] for _, state in updates]).max(dim=0).values
            continue
        new[name] = torch.zeros_like(value)
        for count, state in updates:
            new[name] += (count / total) * state[name]
    return new


# ------------------------------------------------------------------------------------------------
# Rounds on disk


@dataclass
class Round:
    """The global model after ``number`` rounds, and its sidecar."""

    federation: Federation
    number: int
    state: dict[str, torch.Tensor]
    sidecar: dict

    def model(self) -> torch.nn.Module:
        model = self.federation.initial_model()
        model.load_state_dict(self.state)
        return model.eval()

    def participation(self, client: int) -> list[int]:
        """The rounds (up to this one) in which ``client`` trained."""
        return participation(self.sidecar, client)


def participation(sidecar: dict, client: int) -> list[int]:
    """The rounds, up to the sidecar's, in which ``client`` trained."""
    return [int(r) for r, chosen in sidecar["participants"].items() if client in chosen]


def attacked_images(federation: Federation, sidecar: dict, client: int, positions: Sequence[int]) -> list[int]:
    """Training-subset indices of the attacked client's images: its own partition in an order drawn
    from ``(model_seed, 0, client)`` (round 0 trains no client, so no training draw shares the seed),
    at ``positions`` (the trial's ``images``, checked by :meth:`Federation.check_positions`)."""
    own = np.asarray(sidecar["partitions"][client])
    order = np.random.default_rng([federation.model_seed, 0, client]).permutation(own)
    for position in positions:
        require(
            position < len(order),
            "images",
            position,
            f"client {client} holds {len(order)} images; use positions 0 to {len(order) - 1}",
        )
    return [int(order[position]) for position in positions]


def victim_columns(federation: Federation, sidecar: dict, client: int) -> dict:
    """The columns a row attacking ``client`` of this round's global model carries."""
    return {
        "federation_key": federation.key,
        "model_accuracy": sidecar["test_accuracy"],
        "client_label_histogram": sidecar["label_histograms"][client],
        "client_rounds": participation(sidecar, client),
    }


def federation_dir(federation: Federation, cache: str | os.PathLike | None = None) -> Path:
    """Where this machine keeps the federation's rounds: beside the zoo's checkpoints."""
    return cache_dir(cache) / "federations" / federation.key


def round_entry(federation: Federation, number: int, cache: str | os.PathLike | None = None) -> Entry:
    """Where this machine keeps round ``number``: ``round-00005.pt`` and ``.json`` in the federation's folder."""
    name = f"round-{number:05d}"
    return Entry(federation_dir(federation, cache), name, "federation", f"round {number}", "run again to retrain it")


ROUND_FIELDS = {
    "key": str,
    "round": int,
    "test_accuracy": (int, float),
    "participants": dict,
    "partitions": list,
    "label_histograms": list,
    "training_seconds": (int, float),
}  # what readers of a round's sidecar use


def _sidecar_problem(federation: Federation, number: int, info: dict) -> str | None:
    """What is wrong with a round's sidecar that has ROUND_FIELDS: another round's, or not one partition
    of image indices and one label histogram per client."""
    clients = federation.fed_clients
    if info["round"] != number:
        return f"holds round {info['round']}"
    for name in ("partitions", "label_histograms"):
        found = info[name]
        if len(found) != clients or not all(isinstance(part, list) for part in found):
            return f"holds {len(found)} {name} for {clients} clients"
    if not all(isinstance(index, int) for part in info["partitions"] for index in part):
        return "holds partitions that are not image indices"
    return None


def load_round(federation: Federation, number: int, cache: str | os.PathLike | None = None) -> Round | None:
    """Round ``number`` as kept on this machine, or None when it was not kept."""
    problem = functools.partial(_sidecar_problem, federation, number)
    found = round_entry(federation, number, cache).load(federation.initial_model, ROUND_FIELDS, problem)
    return None if found is None else Round(federation, number, *found)


def kept_rounds(
    federation: Federation, rounds: Sequence[int], cache: str | os.PathLike | None = None
) -> dict[int, Round]:
    """The rounds asked for, as kept on this machine (train them first)."""
    found = {number: load_round(federation, number, cache) for number in rounds}
    missing = [number for number, kept in found.items() if kept is None]
    require(not missing, "round", missing[:1] and missing[0], "train the federation to it first")
    return found


def resume_point(federation: Federation, up_to: int, cache: str | os.PathLike | None = None) -> Round | None:
    """The last round up to ``up_to`` kept on this machine, where training resumes; None when none is."""
    kept = [int(key.split("-")[1]) for key in keys(federation_dir(federation, cache), "round-*")]
    earlier = [number for number in kept if number <= up_to]
    return load_round(federation, max(earlier), cache) if earlier else None


def _store(kept: Round, cache: str | os.PathLike | None) -> None:
    round_entry(kept.federation, kept.number, cache).store(kept.state, kept.sidecar)


# ------------------------------------------------------------------------------------------------
# Training


def training_data(federation: Federation, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training subset's images in [0, 1] and labels."""
    train_set = data.open_dataset(federation.dataset, data_root, split="train", image_size=federation.image_size)
    pairs = [train_set[i] for i in range(min(federation.train_subset or len(train_set), len(train_set)))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([int(label) for _, label in pairs])


def train(
    federation: Federation,
    up_to: int,
    *,
    cache: str | os.PathLike | None = None,
    data_root=None,
    keep: Sequence[int] = (),
    run_clients: RunClients = in_process,
    on_round: Callable[[Round, bool], None] | None = None,
) -> Round:
    """The global model after ``up_to`` rounds, training the rounds this machine has not kept.

    ``on_round(round, trained)`` hears of every round from the last one kept (trained False) onwards.
    """
    federation.check_round(up_to)
    with lock(federation_dir(federation, cache), "train"):
        current = resume_point(federation, up_to, cache)
        if current is None or current.number < up_to:
            images, labels = training_data(federation, data_root)
            parts = partitions(federation, labels.numpy())
            current = current or _initial(federation, parts, labels, data_root, cache)
        if on_round is not None:
            on_round(current, False)
        while current.number < up_to:
            current = _next_round(federation, current, images, labels, parts, run_clients, data_root)
            if current.number % federation.checkpoint_every == 0 or current.number in keep or current.number == up_to:
                _store(current, cache)
            if on_round is not None:
                on_round(current, True)
        return current


def _initial(federation: Federation, parts, labels, data_root, cache) -> Round:
    model = federation.initial_model()
    num_classes = data.dataset_spec(federation.dataset).num_classes
    histograms = [partition.label_histogram(labels.numpy(), part, num_classes) for part in parts]
    sidecar = {
        "key": federation.key,
        "round": 0,
        "test_accuracy": _accuracy(federation, model, data_root),
        "participants": {},
        "partitions": [p.tolist() for p in parts],
        "label_histograms": histograms,
        "training_seconds": 0.0,
        "torch": torch.__version__,
        "recipe": dataclasses.asdict(federation),
    }
    initial = Round(federation, 0, {k: v.detach().clone() for k, v in model.state_dict().items()}, sidecar)
    _store(initial, cache)
    return initial


def _next_round(federation, current: Round, images, labels, parts, run_clients: RunClients, data_root) -> Round:
    start = time.perf_counter()
    number = current.number + 1
    chosen = selected_clients(federation, number)
    clients = [(client, images[parts[client]], labels[parts[client]]) for client in chosen]
    state = averaged(run_clients(federation, current.state, number, clients))
    model = federation.initial_model()
    model.load_state_dict(state)
    sidecar = {
        **current.sidecar,
        "round": number,
        "test_accuracy": _accuracy(federation, model, data_root),
        "participants": {**current.sidecar["participants"], str(number): chosen},
        "training_seconds": current.sidecar["training_seconds"] + time.perf_counter() - start,
    }
    return Round(federation, number, state, sidecar)


def _accuracy(federation: Federation, model: torch.nn.Module, data_root) -> float:
    """The global model's accuracy on the first ``accuracy_images`` test images."""
    images, labels = _test_split(federation.dataset, federation.image_size, federation.accuracy_images, data_root)
    with torch.no_grad():
        correct = sum(
            int((model(batch).argmax(1) == truth).sum()) for batch, truth in zip(images.split(1000), labels.split(1000))
        )
    return correct / len(labels)


@functools.lru_cache(maxsize=2)
def _test_split(dataset: str, image_size: int | None, count: int, data_root) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` test images, normalised once per process (every round is scored on them)."""
    test_set = data.open_dataset(dataset, data_root, split="test", image_size=image_size)
    pairs = [test_set[i] for i in range(min(count, len(test_set)))]
    images = torch.stack([image for image, _ in pairs])
    return data.normalise(images, data.dataset_spec(dataset)), torch.tensor([int(label) for _, label in pairs])
