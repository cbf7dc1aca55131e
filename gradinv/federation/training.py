"""FedAvg's rounds, and training a federation up to one.

Round r (from 1): the clients taking part are drawn by a generator seeded by ``(model_seed, r)``. Each
trains the global model on its own images as FedAvg's clients do: SGD at ``fed_lr`` (momentum
``fed_momentum``, its buffer fresh each round) over ``fed_epochs`` passes in mini-batches of
``fed_batch_size``, shuffled by a seed derived from ``(model_seed, r, client)``, BatchNorm in training
mode, on one thread. The server averages the clients' states (parameters and BatchNorm statistics)
weighted by their image counts, summed in client-id order. So a recipe gives bit-identical rounds on
one machine, with the clients in Ray tasks or in this process. The global test accuracy of each round
is measured on the first ``accuracy_images`` test images. A file lock per federation makes processes
that need it train it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import data, partition
from ..cache import lock
from ..errors import ConfigError
from .recipe import Federation
from .rounds import Round, federation_dir, resume_point, store_round

ClientData = tuple[int, torch.Tensor, torch.Tensor]  # (client id, its images in [0, 1], labels)
TrainedClient = tuple[int, dict[str, torch.Tensor]]  # (image count, the state after local training)
RunClients = Callable[["Federation", dict, int, Sequence[ClientData]], list[TrainedClient]]


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


def train_client(federation: Federation, state: dict, round_: int, client: ClientData) -> TrainedClient:
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


def in_process(federation: Federation, state: dict, round_: int, clients: Sequence[ClientData]) -> list[TrainedClient]:
    return [train_client(federation, state, round_, client) for client in clients]


def averaged(updates: Sequence[TrainedClient]) -> dict:
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
                store_round(current, cache)
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
    store_round(initial, cache)
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
