"""Label recovery from the last layer's part of a client update; labels come back on the update's device.

One image: iDLG (Zhao et al., 2020). A batch: counts from the classifier's bias gradient
(``bias_counts``), or iLRG (Ma et al., "Instance-wise Batch Label Restoration via Gradients in
Federated Learning", ICLR 2023), which also reads the weight gradient and the model's last layer.
"""

from __future__ import annotations

import torch

from ..client.update import ClientUpdate
from ..errors import ConfigError, require
from ..parameters import LABEL_METHODS  # noqa: F401  (declared with the knob)


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


# iLRG. With a mean cross-entropy over B images (embeddings o_n, probabilities p_n, one-hot y_n):
#     dL/dW_c = 1/B sum_n (p_nc - y_nc) o_n,    dL/db_c = 1/B sum_n (p_nc - y_nc).
# The paper: dL/dW_c / dL/db_c is a weighted mean of the embeddings, for a class in the batch weighted
# mostly by its own images (p - 1 against small p), so it stands for that class's embedding o_c, and
# P_c = softmax(W o_c + b) for its images' probabilities. Then, with k_c images of class c,
#     B dL/db_c = sum_j k_j P_jc - k_c  for every class c,   sum_j k_j = B:
# K + 1 linear equations in the K counts, solved by least squares and rounded to whole counts.
# The ratio breaks down when a class's own images and the others' nearly cancel in dL/db_c (its mean
# probability times B close to its count). Our addition: alternate with re-solving the embeddings of
# the classes found present jointly, by least squares from dL/dW = 1/B sum_j k_j (P_j - e_j) o_j^T,
# which divides by nothing small. Those embeddings are identifiable when at most K - 1 classes are
# present (the residuals P_j - e_j each sum to 0, so K of them are dependent); when same-class images
# share one embedding, the true counts and embeddings are then a fixed point of the alternation.
# Untrained models are where this works: on trained ones the ratio is far off (measured in
# benchmarks/label_methods.py) and bias_counts does as well or better.

REFINE_STEPS = 20  # alternations; the counts settle within a few on untrained models


def applicable(method: str, batch: int, num_classes: int, fl: str = "fedsgd") -> str | None:
    """None when ``method``'s conditions hold for such a batch, else the reason they do not.

    Outside its conditions iLRG still runs (:func:`recover_labels_with`) but promises nothing; trials
    refuse it there (gradinv.trial).
    """
    _require_method(method)
    if method == "bias_counts":
        return None
    if fl != "fedsgd":
        return "iLRG reads one FedSGD gradient (its equations do not hold for local training steps)"
    if batch > num_classes - 1:
        return (
            f"a batch of {batch} can hold all {num_classes} classes; their embeddings are identifiable "
            f"from the weight gradient for at most {num_classes - 1}"
        )
    return None


def recover_labels_with(
    method: str, update: ClientUpdate, num_classes: int, model: torch.nn.Module | None = None
) -> torch.Tensor:
    """The batch's labels, sorted, by ``method`` (one of LABEL_METHODS); iLRG also needs ``model``."""
    _require_method(method)
    if method == "bias_counts":
        return recover_labels(update, num_classes)
    weight, bias = classifier_parameters(model, num_classes)
    return ilrg_labels(update, num_classes, weight, bias)


def classifier_parameters(model: torch.nn.Module | None, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's last fully connected classifier: its weight [K, m] and bias [K]."""
    require(model is not None, "model", model, "iLRG needs the victim model (its last layer's weights)")
    params = [p.detach() for p in model.parameters()]
    for index in range(len(params) - 2, -1, -1):
        weight, bias = params[index], params[index + 1]
        if weight.dim() == 2 and weight.shape[0] == num_classes and bias.shape == (num_classes,):
            return weight, bias
    raise ConfigError("model", type(model).__name__, "iLRG needs a fully connected classifier with a bias")


def ilrg_labels(
    update: ClientUpdate, num_classes: int, weight: torch.Tensor, bias: torch.Tensor, refine_steps: int = REFINE_STEPS
) -> torch.Tensor:
    """iLRG's labels (sorted) from a FedSGD update; ``refine_steps=0``: the paper's estimate alone."""
    require(update.fl.fl == "fedsgd", "fl", update.fl.fl, "iLRG reads a FedSGD gradient; use bias_counts for FedAvg")
    grad_weight, grad_bias = last_layer(update, num_classes)
    require(grad_bias is not None, "model", "a classifier without bias", "iLRG divides by the bias gradient")
    grad_weight, grad_bias = grad_weight.double().cpu(), grad_bias.double().cpu()
    weight, bias = weight.double().cpu(), bias.double().cpu()
    probabilities = softmax_of(ratio_embeddings(grad_weight, grad_bias), weight, bias)
    counts = solve_counts(probabilities, grad_bias, update.num_images)
    for _ in range(refine_steps):
        present = counts > 0.5
        if not 0 < int(present.sum()) < num_classes:  # nothing found, or every class: not identifiable
            break
        embeddings = present_embeddings(grad_weight, probabilities, counts, present, update.num_images)
        probabilities = probabilities.clone()
        probabilities[present] = softmax_of(embeddings, weight, bias)
        previous, counts = counts, solve_counts(probabilities, grad_bias, update.num_images)
        if torch.allclose(counts, previous, rtol=0, atol=1e-9):
            break
    whole = round_to_total(counts, update.num_images).to(update.tensors[0].device)
    return torch.repeat_interleave(torch.arange(num_classes, device=whole.device), whole)


def ratio_embeddings(grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """The paper's class embeddings dL/dW_c / dL/db_c (zero for a row whose dL/db_c is exactly 0)."""
    zero = (grad_bias == 0).unsqueeze(1)
    return torch.where(zero, 0.0, grad_weight / torch.where(zero, 1.0, grad_bias.unsqueeze(1)))


def softmax_of(embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each embedding row's class probabilities under the classifier."""
    return torch.softmax(embeddings @ weight.T + bias, dim=1)


def present_embeddings(
    grad_weight: torch.Tensor, probabilities: torch.Tensor, counts: torch.Tensor, present: torch.Tensor, batch: int
) -> torch.Tensor:
    """The present classes' embeddings o_j solving ``B dL/dW = sum_j k_j (P_j - e_j) o_j^T`` by least squares."""
    residuals = counts[present, None] * (probabilities[present] - torch.eye(len(counts)).to(probabilities)[present])
    return batch * torch.linalg.lstsq(residuals.T, grad_weight, driver="gelsd").solution


def solve_counts(probabilities: torch.Tensor, grad_bias: torch.Tensor, batch: int) -> torch.Tensor:
    """The least-squares counts (>= 0) of ``B dL/db = (P^T - I) k`` and ``sum k = B``."""
    num_classes = len(grad_bias)
    ones = torch.ones(1, num_classes).to(probabilities)
    system = torch.cat([ones, probabilities.T - torch.eye(num_classes).to(probabilities)])
    target = torch.cat([grad_bias.new_tensor([float(batch)]), batch * grad_bias]).unsqueeze(1)
    return torch.linalg.lstsq(system, target, driver="gelsd").solution.squeeze(1).clamp(min=0)


def round_to_total(estimate: torch.Tensor, total: int) -> torch.Tensor:
    """Whole counts near ``estimate`` (>= 0) that sum to ``total``: round each, then move the units
    whose rounding erred most."""
    counts = estimate.round()
    while counts.sum() > total:
        counts[torch.where(counts > 0, estimate - counts, torch.full_like(estimate, float("inf"))).argmin()] -= 1
    while counts.sum() < total:
        counts[(estimate - counts).argmax()] += 1
    return counts.long()


def _require_method(method: str) -> None:
    require(method in LABEL_METHODS, "label_method", method, f"choose one of {', '.join(LABEL_METHODS)}")
