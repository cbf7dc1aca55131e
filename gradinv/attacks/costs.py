"""The gradient-matching cost of the inverting-gradients attack, and the layers it compares.

:class:`GradientCost` scores each run's candidate update against its target by the reference's costs;
``layer_weights``, ``named_set_mask`` and the ``batch`` set's size choose and weigh the compared tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from ..errors import require

BATCH_LAYERS = 8  # the `batch` layer set: tensors drawn afresh at every evaluation
COSINE_EPS = 1e-10  # simlocal: torch's cosine_similarity with the reference's eps


def layer_indices(count: int, layers: Sequence[int]) -> list[int]:
    """Explicit parameter indices as positions 0..count-1 (negative ones count from the end)."""
    require(
        all(-count <= i < count for i in layers),
        "layers",
        list(layers),
        f"use indices from {-count} to {count - 1}: the model has {count} parameter tensors",
    )
    positions = [i % count for i in layers]
    require(len(set(positions)) == len(positions), "layers", list(layers), "list each parameter tensor once")
    return positions


def layer_weights(count: int, weighting: str, layers: Sequence[int] | str) -> list[float]:
    """One weight per parameter tensor; tensors outside explicit ``layers`` weigh 0 (a named set is chosen
    by ``named_set_mask``, or at each evaluation for ``batch``)."""
    if weighting == "linear":
        weights = [1.0 - i / count for i in range(count)]
    elif weighting == "exp":  # the reference's softmax over count..1, divided by its first entry
        weights = [math.exp(-i) for i in range(count)]
    else:
        weights = [1.0] * count
    if not isinstance(layers, str):
        chosen = set(layer_indices(count, layers))
        weights = [w if i in chosen else 0.0 for i, w in enumerate(weights)]
    return weights


def named_set_mask(targets: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``[N, tensors]``: 1 where run ``n`` compares the tensor in the set ``name`` (first/last/top K), from
    ``[N, ...]`` targets."""
    count, runs = len(targets), len(targets[0])
    mask = torch.zeros(runs, count, dtype=targets[0].dtype, device=targets[0].device)
    kind, size = re.fullmatch(r"([a-z]+)(\d+)", name).groups()
    size = int(size)
    if kind == "top":
        norms = torch.stack([t.reshape(runs, -1).norm(dim=1) for t in targets], dim=1)
        return mask.scatter_(1, norms.topk(min(size, count), dim=1).indices, 1.0)
    chosen = range(count)[-size:] if kind == "last" else range(count)[:size]
    mask[:, list(chosen)] = 1.0
    return mask


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a[i], b[i]>`` per row. On a CPU, long rows go through BLAS ``dot`` one row at a time: it
    reads each row once, where a batched multiply-and-sum first writes a product as large as its
    inputs (3x slower at 8 x 590k)."""
    if a.device.type != "cpu" or a.shape[1] < 2**14:
        return torch.linalg.vecdot(a, b)
    return torch.stack([torch.dot(row_a, row_b) for row_a, row_b in zip(a, b)])


class _RunDots(torch.autograd.Function):
    """Per run, ``<c, t>`` and ``<c, c>`` of ``[N, K]`` tensors, with a one-pass backward.

    Composing these from ``mul``, ``pow`` and ``sum`` writes several parameter-sized temporaries per
    layer in each direction; with lanes those are ``L`` times the model, no longer fit in cache, and
    cost as much as the convolutions. ``t`` is a constant target.
    """

    @staticmethod
    def forward(c, t):
        return _row_dots(c, t), _row_dots(c, c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_dot, grad_square):
        c, t = ctx.saved_tensors
        grad = c * (2 * grad_square).unsqueeze(1)
        return grad.addcmul_(t, grad_dot.unsqueeze(1)), None


class GradientCost:
    """How far each run's candidate update is from its target, by the reference's costs (weights w):

    - ``cosine``: 1 - the w-weighted cosine similarity of all compared tensors together;
    - ``l2`` / ``l1``: sum of w x the squared / absolute differences;
    - ``max``: sum of w x each tensor's largest absolute difference;
    - ``simlocal``: sum over compared tensors of 1 - w x their own cosine similarity.

    ``targets`` are ``[N, ...]`` tensors (one entry per run) in parameter order; ``weights`` one weight
    per tensor, or ``[N, tensors]`` for each run. A weight of 0 leaves a tensor out; one that no run
    compares is never computed. Calling it with the candidate tensors of the compared tensors, in the
    same order, gives ``[N]``; ``mask`` (``[N, compared]``, 0 or 1) leaves tensors out of one evaluation.
    """

    def __init__(self, targets: Sequence[torch.Tensor], weights, cost: str):
        weights = torch.as_tensor(weights, dtype=targets[0].dtype, device=targets[0].device).reshape(-1, len(targets))
        self.compared = weights.ne(0).any(dim=0).nonzero().flatten().tolist()
        self.targets = [targets[i].reshape(len(targets[i]), -1) for i in self.compared]
        self.weights = weights[:, self.compared]
        self.cost = cost
        if cost == "cosine":
            scale = _exact_scale(self.targets)
            self.targets = [t / scale for t in self.targets]
        if cost in ("cosine", "simlocal"):  # constant: computed once, not every iteration
            self.target_squares = torch.stack([torch.linalg.vecdot(t, t) for t in self.targets], dim=1)
            self.target_norm = (self.weights * self.target_squares).sum(1).sqrt()

    def __call__(self, candidate: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.weights if mask is None else self.weights * mask
        columns = weights.unbind(1)
        flat = [c.reshape(len(c), -1) for c in candidate]
        if self.cost in ("l2", "l1", "max"):
            distance = {
                "l2": lambda d: d.pow(2).sum(1),
                "l1": lambda d: d.abs().sum(1),
                "max": lambda d: d.abs().amax(1),
            }[self.cost]
            return sum(w * distance(c - t) for c, t, w in zip(flat, self.targets, columns))
        if self.cost == "cosine":
            scale = _exact_scale(flat)
            flat = [c / scale for c in flat]
        dots = [_RunDots.apply(c, t) for c, t in zip(flat, self.targets)]
        if self.cost == "simlocal":
            target_norms = self.target_squares.sqrt().clamp_min(COSINE_EPS).unbind(1)
            return sum(
                w.ne(0) * (1 - w * dot / (square.sqrt().clamp_min(COSINE_EPS) * norm))
                for (dot, square), w, norm in zip(dots, columns, target_norms)
            )
        dot = sum(w * layer_dot for (layer_dot, _), w in zip(dots, columns))
        norm_c = sum(w * layer_square for (_, layer_square), w in zip(dots, columns))
        target_norm = self.target_norm if mask is None else (weights * self.target_squares).sum(1).sqrt()
        return 1 - dot / (norm_c.sqrt() * target_norm)


def _exact_scale(flat: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per run (``[N, 1]``), the power of two just above its largest magnitude over all ``flat`` tensors.

    A confident victim's update can be around 1e-22, whose squares underflow float32 and turn the
    cosine into 0/0. The cosine ignores either side's scale, and dividing by a power of two is exact,
    so rescaling changes no bit of an ordinary trial's cost and keeps a tiny one finite.
    """
    largest = torch.stack([f.detach().abs().amax(1) for f in flat], dim=1).amax(1)
    _, exponent = torch.frexp(largest)  # largest = m * 2**exponent, 0.5 <= m < 1 (0 for 0: no change)
    return torch.ldexp(torch.ones_like(largest), exponent).unsqueeze(1)
