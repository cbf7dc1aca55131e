"""Deep Leakage from Gradients (Zhu et al., 2019): Euclidean matching with L-BFGS.

Images and (when unknown) soft labels are optimised jointly. The gradient reaches only the images
and the label logits: the model's parameters are constants of the cost. Everything runs on the device
of the client update; the starting points are drawn on the CPU, so every device starts alike.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import nn

from ..defences import attacker_update
from ..fl import ClientUpdate, model_state
from ..parameters import DefenceSettings, OptimiserSettings, extract
from .costs import GradientCost
from .inverting import AttackResult, TrialTimeout


def deep_leakage(
    model: nn.Module,
    updates: Sequence[ClientUpdate],
    labels: torch.Tensor | None,
    configs: Sequence[OptimiserSettings],  # DLG reads iterations and lr alone
    seeds: Sequence[int],
    image_shape: Sequence[int],
    num_classes: int,
    *,
    on_progress: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> tuple[AttackResult, torch.Tensor]:
    """Reconstruct each lane in turn; returns the result and the labels it settled on ``[L, B]``."""
    params, buffers = model_state(model)
    start = time.perf_counter()
    images, scores, found_labels, curve = [], [], [], []
    for lane, (update, config, seed) in enumerate(zip(updates, configs, seeds)):
        lane_labels = None if labels is None else labels[lane]
        x, y, score = _one_lane(
            model, params, buffers, update, lane_labels, config, seed, image_shape, num_classes, deadline
        )
        images.append(x)
        scores.append(score)
        found_labels.append(y)
        if on_progress is not None:
            on_progress(config.iterations * (lane + 1) // len(updates))
    result = AttackResult(
        torch.stack(images), torch.tensor(scores, device="cpu").view(-1, 1), curve, time.perf_counter() - start
    )
    return result, torch.stack(found_labels)


def _one_lane(model, params, buffers, update, labels, config, seed, image_shape, num_classes, deadline):
    device = update.tensors[0].device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tuple(image_shape), generator=generator, device="cpu").to(device).requires_grad_(True)
    label_logits = torch.randn(image_shape[0], num_classes, generator=generator, device="cpu")
    label_logits = label_logits.to(device).requires_grad_(labels is None)
    predict = attacker_update(DefenceSettings(), update)  # the client's training (and aggregation); no defence mirrored
    squared_distance = GradientCost([t.unsqueeze(0) for t in update.tensors], [1.0] * len(update.tensors), "l2")
    optimiser = torch.optim.LBFGS([x, label_logits] if labels is None else [x], lr=config.lr, max_iter=1,
                                  line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)  # fmt: skip

    def current_labels():
        return labels if labels is not None else label_logits.softmax(dim=-1)

    def distance():
        update_guess = predict(model, params, buffers, x, current_labels())
        return squared_distance([t.unsqueeze(0) for t in update_guess])[0]

    # Relative to the starting distance: the same minimiser, but L-BFGS's first step and tolerances
    # no longer depend on how small an update's entries happen to be.
    with torch.no_grad():
        scale = 1.0 / distance().clamp(min=1e-30)

    def closure():
        optimiser.zero_grad()
        loss = scale * distance()
        loss.backward()
        return loss

    for _ in range(config.iterations):
        optimiser.step(closure)
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout("past the trial timeout")
    with torch.no_grad():
        score = float(distance())
        found = labels if labels is not None else label_logits.argmax(dim=-1)
    return x.detach(), found, score if score == score else float("inf")


def run(job) -> AttackResult:
    """The registry's entry (gradinv.attacks.registry): DLG on each lane in turn."""
    configs = [extract(OptimiserSettings, spec) for spec in job.specs]
    known = job.labels if all(job.labels_known) else None
    result, labels = deep_leakage(job.model, job.updates, known, configs, job.seeds, job.image_shape, job.num_classes,
                                  on_progress=job.on_progress, deadline=job.deadline)  # fmt: skip
    result.labels = labels
    return result
