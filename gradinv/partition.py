"""How a simulated federation splits a training set among its clients.

`iid_partition` deals a seeded shuffle into near-equal parts. `dirichlet_partition` gives each
client a label-skewed share: for every class, the fractions going to each client are drawn from
Dirichlet(alpha), so small alpha concentrates a class on few clients and large alpha spreads it
evenly. It follows the semantics of Flower Datasets' `DirichletPartitioner` (the whole partition is
redrawn until every client holds `min_partition_size` items; optional self-balancing closes a client
to further classes once it holds more than the average share). We do not depend on Flower Datasets
because it needs Hugging Face `datasets>=4`, which raises our pyarrow floor from 15 to 21.

Pure numpy and deterministic from the seed; each client's indices are returned in ascending order,
since the order of local training is the training code's to choose.
"""

import math
import numbers

import numpy as np

from gradinv.errors import ConfigError, require


def iid_partition(num_items: int, clients: int, seed: int) -> list[np.ndarray]:
    """Indices 0..num_items-1, shuffled by `seed` and split into `clients` parts whose sizes differ
    by at most one."""
    _check_clients(clients, num_items)
    order = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_partition(
    labels: np.ndarray,
    clients: int,
    alpha: float,
    seed: int,
    *,
    min_partition_size: int = 10,
    self_balancing: bool = False,
    max_tries: int = 10,
) -> list[np.ndarray]:
    """Indices into `labels`, one ascending array per client, label-skewed by Dirichlet(alpha).

    The whole partition is drawn up to `max_tries` times until every client holds at least
    `min_partition_size` items; otherwise ConfigError names `min_partition_size`.
    """
    labels = _check_labels(labels)
    _check_clients(clients, len(labels))
    _check_alpha(alpha)
    _check_min_partition_size(min_partition_size, clients, len(labels))
    require(
        isinstance(max_tries, numbers.Integral) and max_tries >= 1,
        "max_tries",
        max_tries,
        "give a whole number of draws, at least 1",
    )
    rng = np.random.default_rng(seed)
    best_smallest = -1
    for _ in range(max_tries):
        parts = _draw_partition(labels, clients, float(alpha), self_balancing, rng)
        smallest = min(len(part) for part in parts)
        if smallest >= min_partition_size:
            return [np.sort(part) for part in parts]
        best_smallest = max(best_smallest, smallest)
    raise ConfigError(
        "min_partition_size",
        min_partition_size,
        f"in {max_tries} draws the smallest client never held more than {best_smallest} items; "
        "lower min_partition_size, raise alpha, or use fewer clients",
    )


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many of the items at `indices` carry each label 0..num_classes-1."""
    chosen = _check_labels(labels)[np.asarray(indices, dtype=np.int64)]
    require(
        chosen.size == 0 or (chosen.min() >= 0 and chosen.max() < num_classes),
        "num_classes",
        num_classes,
        "give a count above every label (labels run from 0)",
    )
    return np.bincount(chosen, minlength=num_classes).tolist()


def _draw_partition(
    labels: np.ndarray, clients: int, alpha: float, self_balancing: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw: each class's shuffled indices cut among the clients at Dirichlet fractions."""
    fair_share = len(labels) / clients
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    sizes = np.zeros(clients, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fractions = rng.dirichlet(np.full(clients, alpha))
        if self_balancing:
            fractions = _close_full_clients(fractions, sizes > fair_share)
        cuts = (np.cumsum(fractions) * len(members)).astype(np.int64)[:-1]
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
            sizes[client] += len(piece)
    return [np.concatenate(pieces) for pieces in parts]


def _close_full_clients(fractions: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Fractions with full clients set to 0, renormalised over the open ones. Some client is always
    open (not all can hold more than the average); if the open ones drew fractions that underflowed
    to 0 (tiny alpha), they share the class equally rather than dividing by zero."""
    open_fractions = np.where(full, 0.0, fractions)
    total = open_fractions.sum()
    if total > 0:
        return open_fractions / total
    return (~full) / (~full).sum()


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    require(
        labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer),
        "labels",
        f"array of shape {labels.shape} and dtype {labels.dtype}",
        "give a 1-D array of integer class labels, one per item",
    )
    return labels


def _check_clients(clients: int, num_items: int) -> None:
    require(
        _is_whole(clients) and 1 <= clients <= num_items,
        "clients",
        clients,
        f"give a whole number from 1 to the number of items ({num_items})",
    )


def _check_alpha(alpha: float) -> None:
    require(
        isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0,
        "alpha",
        alpha,
        "give a finite number above 0 (0.1: strongly skewed labels, 100: nearly IID)",
    )


def _check_min_partition_size(min_partition_size: int, clients: int, num_items: int) -> None:
    require(
        _is_whole(min_partition_size) and 0 <= min_partition_size and clients * min_partition_size <= num_items,
        "min_partition_size",
        min_partition_size,
        f"give a whole number from 0 to items/clients ({num_items // clients})",
    )


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
