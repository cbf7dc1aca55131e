"""Label recovery from the last layer's part of a client update; labels come back on the update's device."""

from __future__ import annotations

import torch

from ..fl import ClientUpdate


def last_layer(update: ClientUpdate, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier's weight and (if present) bias entries of the update, as loss gradients.

    A FedAvg update points against the gradient, so its sign is flipped back.
    """
    sign = -1.0 if update.fl.fl == "fedavg" else 1.0
    tensors = list(update.tensors)
    for index in range(len(tensors) - 1, -1, -1):
        if tensors[index].dim() == 2 and tensors[index].shape[0] == num_classes:
            after = tensors[index + 1] if index + 1 < len(tensors) else None
            bias = after if after is not None and after.shape == (num_classes,) else None
            return sign * tensors[index], None if bias is None else sign * bias
    raise ValueError("the update has no fully connected classifier layer to read labels from")


def idlg_label(update: ClientUpdate, num_classes: int) -> int:
    """iDLG (Zhao et al.): for one image, only the true class's row of dL/dW sums below zero."""
    weight, bias = last_layer(update, num_classes)
    signal = bias if bias is not None else weight.sum(dim=1)
    return int(signal.argmin())


def batch_labels(update: ClientUpdate, num_classes: int) -> torch.Tensor:
    """Labels of a batch with repeats, from the classifier's bias (or row-sum) gradient.

    With a mean cross-entropy, dL/db_c = mean_p_c - count_c / B. Classes with a positive entry are
    absent; their mean gives the typical mean_p, from which each negative entry's count follows.
    The counts are then rounded so that they sum to B (largest remainders first).
    """
    weight, bias = last_layer(update, num_classes)
    signal = (bias if bias is not None else weight.sum(dim=1)).double()
    batch = update.num_images
    present = signal < 0
    absent = signal[~present]
    typical_p = absent.mean() if len(absent) else signal.new_tensor(1.0 / num_classes)
    if bias is None:  # row sums carry an unknown feature scale: use ranks only
        typical_p = signal.new_tensor(0.0)
    estimate = (typical_p - signal).clamp(min=0) * batch
    estimate[~present] = 0
    counts = torch.where(present, estimate.floor().clamp(min=1), torch.zeros_like(estimate))
    while counts.sum() > batch:  # more distinct negatives than images: drop the weakest
        weakest = torch.where(counts > 0, estimate - counts + signal.abs(), torch.full_like(estimate, 1e9)).argmin()
        counts[weakest] -= 1
    remainder = estimate - counts
    while counts.sum() < batch:
        best = int(remainder.argmax()) if present.any() else int(signal.argmin())
        counts[best] += 1
        remainder[best] -= 1
    return torch.repeat_interleave(torch.arange(num_classes, device=counts.device), counts.long())


def recover_labels(update: ClientUpdate, num_classes: int) -> torch.Tensor:
    if update.num_images == 1:
        return torch.tensor([idlg_label(update, num_classes)], device=update.tensors[0].device)
    return batch_labels(update, num_classes)
