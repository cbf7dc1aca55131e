"""Optimiser steps of the inverting attack: a step maps every run's images to the next ones, by the image gradient
turned into a direction (:class:`Direction`: signed, soft-signed or plain, with Langevin noise)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SGD_LR, SGD_MOMENTUM = 0.01, 0.9  # the reference's SGD: a fixed step with Nesterov momentum
LBFGS_LR = 1.0  # the reference's L-BFGS: torch's defaults

# The attack's cost (gradinv.attacks.objective.LaneObjective): images -> (image gradient, full cost,
# gradient cost alone), per run.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# An optimiser step: (images, 0-based iteration, step-size factor, progress through the round in [0, 1)) ->
# (new images, gradient cost per run at the images it started from).
Step = Callable[[torch.Tensor, int, float, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Direction:
    """How an image gradient becomes the direction an optimiser steps on.

    ``langevin`` > 0 first adds standard normal noise (``noise()``, one draw per step) times it and the
    step size (``step_sizes`` x the schedule's factor), as See-Through-Gradients (Yin et al. 2021) does;
    then ``signed`` takes signs, or with ``soft`` breaching's soft signs, ``tanh(g s) / s`` with ``s``
    falling linearly from 1 to 0 over the round: near-signs first, the plain gradient at the end."""

    signed: bool
    soft: bool = False
    langevin: float = 0.0
    step_sizes: torch.Tensor | float = 1.0  # per run, broadcast against the images
    noise: Callable[[], torch.Tensor] | None = None

    def __call__(self, image_grad: torch.Tensor, factor: float, progress: float) -> torch.Tensor:
        if self.langevin > 0:
            image_grad = image_grad + (self.langevin * factor) * self.step_sizes * self.noise()
        if not self.signed:
            return image_grad
        if self.soft:
            scale = 1.0 - progress  # progress < 1: scale > 0
            return (image_grad * scale).tanh() / scale
        return image_grad.sign()


def adam(objective: Objective, step_sizes: torch.Tensor, direct: Direction) -> Step:
    """Adam with torch's defaults, per pixel, so every run keeps its own moments."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    moments: list[torch.Tensor] = []

    def step(x, iteration, factor, progress):
        image_grad, _, match = objective(x)
        direction = direct(image_grad, factor, progress)
        if not moments:
            moments.extend((torch.zeros_like(x), torch.zeros_like(x)))
        m, v = moments
        m.mul_(beta1).add_(direction, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(direction, direction, value=1 - beta2)
        m_hat = m / (1 - beta1 ** (iteration + 1))
        v_hat = v / (1 - beta2 ** (iteration + 1))
        return x - (factor * step_sizes) * m_hat / (v_hat.sqrt() + eps), match

    return step


def sgd(objective: Objective, direct: Direction) -> Step:
    """torch's SGD as the reference sets it up: step 0.01, Nesterov momentum 0.9, per pixel."""
    buffers: list[torch.Tensor] = []

    def step(x, iteration, factor, progress):
        image_grad, _, match = objective(x)
        direction = direct(image_grad, factor, progress)
        if buffers:
            buffers[0].mul_(SGD_MOMENTUM).add_(direction)
        else:
            buffers.append(direction.clone())
        return x - (SGD_LR * factor) * direction.add(buffers[0], alpha=SGD_MOMENTUM), match

    return step


def lbfgs(per_lane: Sequence[Objective], restarts: int, direct: Direction) -> Step:
    """torch's L-BFGS with its defaults (as in the reference), one optimiser per run, run by run:
    its line of search couples every number it optimises, so runs cannot share one. ``per_lane`` holds
    each lane's objective for a single run."""
    leaves: list[torch.Tensor] = []
    optimisers: list[torch.optim.LBFGS] = []

    def step(x, iteration, factor, progress):
        if not leaves:
            leaves.extend(image.detach().clone().requires_grad_(True) for image in x)
            optimisers.extend(torch.optim.LBFGS([leaf], lr=LBFGS_LR) for leaf in leaves)
        matches = []
        for run, (leaf, optimiser) in enumerate(zip(leaves, optimisers)):
            with torch.no_grad():
                leaf.copy_(x[run])  # the box and the filter act between steps
            objective, first = per_lane[run // restarts], []

            def closure(leaf=leaf, objective=objective, first=first):
                image_grad, total, match = objective(leaf.unsqueeze(0))
                leaf.grad = direct(image_grad, factor, progress)[0]
                first.append(match)
                return total[0]

            optimiser.param_groups[0]["lr"] = LBFGS_LR * factor
            optimiser.step(closure)
            matches.append(first[0])
        return torch.stack([leaf.detach() for leaf in leaves]), torch.cat(matches)

    return step
