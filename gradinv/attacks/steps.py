"""Optimiser steps of the inverting attack: a step maps every run's images to the next ones, by the image gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

SGD_LR, SGD_MOMENTUM = 0.01, 0.9  # the reference's SGD: a fixed step with Nesterov momentum
LBFGS_LR = 1.0  # the reference's L-BFGS: torch's defaults

# The attack's cost (gradinv.attacks.objective.LaneObjective): images -> (image gradient, full cost,
# gradient cost alone), per run.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# An optimiser step: (images, 0-based iteration, step-size factor) -> (new images, gradient cost per run
# at the images it started from).
Step = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


def adam(objective: Objective, step_sizes: torch.Tensor, signed: bool) -> Step:
    """Adam with torch's defaults, per pixel, so every run keeps its own moments."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    moments: list[torch.Tensor] = []

    def step(x, iteration, factor):
        image_grad, _, match = objective(x)
        direction = image_grad.sign() if signed else image_grad
        if not moments:
            moments.extend((torch.zeros_like(x), torch.zeros_like(x)))
        m, v = moments
        m.mul_(beta1).add_(direction, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(direction, direction, value=1 - beta2)
        m_hat = m / (1 - beta1 ** (iteration + 1))
        v_hat = v / (1 - beta2 ** (iteration + 1))
        return x - (factor * step_sizes) * m_hat / (v_hat.sqrt() + eps), match

    return step


def sgd(objective: Objective, signed: bool) -> Step:
    """torch's SGD as the reference sets it up: step 0.01, Nesterov momentum 0.9, per pixel."""
    buffers: list[torch.Tensor] = []

    def step(x, iteration, factor):
        image_grad, _, match = objective(x)
        direction = image_grad.sign() if signed else image_grad
        if buffers:
            buffers[0].mul_(SGD_MOMENTUM).add_(direction)
        else:
            buffers.append(direction.clone())
        return x - (SGD_LR * factor) * direction.add(buffers[0], alpha=SGD_MOMENTUM), match

    return step


def lbfgs(per_lane: Sequence[Objective], restarts: int, signed: bool) -> Step:
    """torch's L-BFGS with its defaults (as in the reference), one optimiser per run, run by run:
    its line of search couples every number it optimises, so runs cannot share one. ``per_lane`` holds
    each lane's objective for a single run."""
    leaves: list[torch.Tensor] = []
    optimisers: list[torch.optim.LBFGS] = []

    def step(x, iteration, factor):
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
                leaf.grad = image_grad[0].sign() if signed else image_grad[0]
                first.append(match)
                return total[0]

            optimiser.param_groups[0]["lr"] = LBFGS_LR * factor
            optimiser.step(closure)
            matches.append(first[0])
        return torch.stack([leaf.detach() for leaf in leaves]), torch.cat(matches)

    return step
