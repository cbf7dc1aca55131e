"""Deep Leakage from Gradients (Zhu et al., 2019): Euclidean matching with L-BFGS.

Images and (when unknown) soft labels are optimised jointly. The gradient reaches only the images
and the label logits: the model's parameters are constants of the cost. Everything runs on the device
of the client update; the starting points are drawn on the CPU, so every device starts alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..client.defences import attacker_update
from ..client.update import ClientUpdate, model_state
from ..parameters import DefenceSettings, OptimiserSettings, extract
from .base import AttackJob, AttackResult, TrialTimeout
from .costs import GradientCost


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
    on_checkpoint: Callable[[int, list[float]], None] | None = None,
    on_images: Callable[[int, torch.Tensor], None] | None = None,
    deadline: float | None = None,
    checkpoints: int = 8,
) -> tuple[AttackResult, torch.Tensor]:
    """Reconstruct every lane, each with its own L-BFGS, step by step side by side (the lanes do not
    interact: the same result as one after the other). At ``checkpoints`` evenly spaced iterations
    ``on_images`` receives every lane's current images and then ``on_checkpoint`` their distances (it
    may raise to stop). Returns the result and the labels it settled on ``[L, B]``."""
    start = time.perf_counter()
    params, buffers = model_state(model)
    lanes = [
        _Lane(
            model,
            params,
            buffers,
            update,
            None if labels is None else labels[lane],
            config,
            seed,
            image_shape,
            num_classes,
        )
        for lane, (update, config, seed) in enumerate(zip(updates, configs, seeds))
    ]
    iterations = max(config.iterations for config in configs)
    check_at = {max(1, round(iterations * (k + 1) / checkpoints)) for k in range(checkpoints)}
    curve = []
    for done in range(1, iterations + 1):
        for lane in lanes:
            if done <= lane.config.iterations and not lane.settled:
                lane.step()
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout("past the trial timeout")
        if on_progress is not None:
            on_progress(done)
        if done in check_at:
            costs = [lane.score() for lane in lanes]
            curve.append((done, costs))
            if on_images is not None:
                on_images(done, torch.stack([lane.x.detach() for lane in lanes]))
            if on_checkpoint is not None:
                on_checkpoint(done, costs)
    scores = [lane.score() for lane in lanes]
    result = AttackResult(
        torch.stack([lane.x.detach() for lane in lanes]),
        torch.tensor(scores, device="cpu").view(-1, 1),
        curve,
        time.perf_counter() - start,
    )
    return result, torch.stack([lane.found_labels() for lane in lanes])


class _Lane:
    """One client's reconstruction: its images (and soft labels when unknown) and its L-BFGS."""

    def __init__(self, model, params, buffers, update, labels, config, seed, image_shape, num_classes):
        device = update.tensors[0].device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.x = torch.randn(tuple(image_shape), generator=generator, device="cpu").to(device).requires_grad_(True)
        label_logits = torch.randn(image_shape[0], num_classes, generator=generator, device="cpu")
        self.label_logits = label_logits.to(device).requires_grad_(labels is None)
        self.labels, self.config = labels, config
        self.settled = False  # a step left the variables as they were: every later step would too
        predict = attacker_update(
            DefenceSettings(), update
        )  # the client's training (and aggregation); no defence mirrored
        squared_distance = GradientCost([t.unsqueeze(0) for t in update.tensors], [1.0] * len(update.tensors), "l2")
        self.distance = lambda: squared_distance(
            [t.unsqueeze(0) for t in predict(model, params, buffers, self.x, self.current_labels())]
        )[0]
        self.optimiser = torch.optim.LBFGS(
            [self.x, self.label_logits] if labels is None else [self.x],
            lr=config.lr,
            max_iter=1,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )
        # Relative to the starting distance: the same minimiser, but L-BFGS's first step and tolerances
        # no longer depend on how small an update's entries happen to be.
        with torch.no_grad():
            self.scale = 1.0 / self.distance().clamp(min=1e-30)

    def current_labels(self) -> torch.Tensor:
        return self.labels if self.labels is not None else self.label_logits.softmax(dim=-1)

    def step(self) -> None:
        def closure():
            self.optimiser.zero_grad()
            loss = self.scale * self.distance()
            loss.backward()
            return loss

        variables = self.optimiser.param_groups[0]["params"]
        before = [v.detach().clone() for v in variables]
        self.optimiser.step(closure)
        # L-BFGS stalls where its line search finds no step (a ReLU network's piecewise cost, say): the
        # direction and the history then stay as they are, so the lane is done.
        self.settled = self.optimiser.state[variables[0]]["n_iter"] > 1 and all(
            torch.equal(old, new) for old, new in zip(before, variables)
        )

    def score(self) -> float:
        with torch.no_grad():
            score = float(self.distance())
        return score if score == score else float("inf")

    def found_labels(self) -> torch.Tensor:
        return self.labels if self.labels is not None else self.label_logits.detach().argmax(dim=-1)


def run(job: AttackJob) -> AttackResult:
    """The registry's entry (gradinv.attacks.registry): DLG on each lane in turn."""
    configs = [extract(OptimiserSettings, spec) for spec in job.specs]
    known = job.labels if all(job.labels_known) else None
    result, labels = deep_leakage(
        job.model,
        job.updates,
        known,
        configs,
        job.seeds,
        job.image_shape,
        job.num_classes,
        on_progress=job.on_progress,
        on_checkpoint=job.on_checkpoint,
        on_images=job.on_images,
        deadline=job.deadline,
    )
    result.labels = labels
    return result
