"""Where a trial's victim comes from: the facts about a trial that the conditions (``applies``) of
several parts read, and the library's callers too."""

from __future__ import annotations


def trained_victim(trial) -> bool:
    """Whether the victim is a checkpoint from the model zoo rather than the seeded untrained model."""
    return trial.trained_epochs > 0


def federated(trial) -> bool:
    """Whether the victim is the global model of a simulated federation after ``round`` rounds."""
    return trial.round is not None


def local_fedavg(trial) -> bool:
    """FedAvg with the local training set here (a federation's clients train by its recipe instead)."""
    return trial.fl == "fedavg" and not federated(trial)


def order_matters(trial) -> bool:
    """FedAvg whose mini-batches are shuffled subsets of the client's images: only there can the attacker
    miss their order (full batches hold every image; sequential ones take the images in index order)."""
    count = len(trial.images) // trial.aggregated_clients
    return local_fedavg(trial) and trial.batch_order == "shuffled" and 0 < trial.local_batch_size < count


def epochs_spanned(images: int, batch_size: int, steps: int) -> int:
    """The local epochs that ``steps`` mini-batches of ``batch_size`` over ``images`` span (the last maybe in part)."""
    per_epoch = -(-images // batch_size)
    return -(-steps // per_epoch)


def epochs_in_unknown_order(trial) -> int:
    """The local epochs the attacker unrolls over mini-batches whose order it does not know
    (``attacker_order: unknown``); 0 where it knows the order or there is none to miss."""
    if not (order_matters(trial) and trial.attacker_order == "unknown"):
        return 0
    count = len(trial.images) // trial.aggregated_clients
    return epochs_spanned(count, trial.local_batch_size, trial.attacker_local_steps or trial.local_steps)
