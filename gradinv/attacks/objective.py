"""Inverting gradients' settings and objective: :class:`IGConfig`, one lane's settings, and
:class:`LaneObjective`, the cost the attack descends (gradinv.attacks.inverting runs the optimisation).

The attack optimises ``L`` independent trials ("lanes"), each with ``R`` restarts, as one batched
computation: ``torch.func.vmap`` over the ``L * R`` runs of a per-run cost whose gradient flows only
into the images. ``L = 1`` is the ordinary single-trial attack.

Priors join the per-run objective when their weights are positive: GradInversion's (gradinv.attacks.bn_prior)
``bn_prior`` x R_feat (BatchNorm statistics) and ``group_consistency`` x R_group (the pull toward the
restarts' mean), breaching's ``feature_prior`` (gradinv.attacks.feature_prior: the classifier's input read off
the update), See-Through-Gradients' ``image_prior`` (the mean squared pixel) and Dimitrov et al.'s
``epoch_prior`` (gradinv.attacks.epoch_prior: each FedAvg epoch's own candidates, tied); TV stays, with breaching's
exponents when they are not 1. With every weight 0 and both exponents 1 the objective is the reference's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from ..client.defences import attacker_update, candidate_epochs, kept_masks
from ..client.update import ClientUpdate, model_state
from ..errors import require
from ..parameters import DefenceSettings, InvertingSettings, OptimiserSettings, declarations
from .bn_prior import BatchNormPrior, group_consistency
from .costs import BATCH_LAYERS, GradientCost, layer_weights, named_set_mask
from .epoch_prior import EpochCandidates
from .feature_prior import FeaturePrior, read_output_gradients

TV_EPS = 1e-8  # breaching's, keeping |d|^p differentiable at 0


@dataclass(frozen=True, kw_only=True)
class IGConfig(InvertingSettings, OptimiserSettings, DefenceSettings):
    """One trial's attack settings (declared in gradinv.parameters), with the client's defences the
    attacker knows and how far it mirrors them. Lanes packed together share all but the settings
    declared free across lanes (``tv`` and ``lr``)."""

    def __post_init__(self):
        super().__post_init__()
        require(
            self.group_consistency == 0 or self.restarts == 1 or self.optimizer != "lbfgs",
            "group_consistency",
            self.group_consistency,
            "L-BFGS optimises each restart alone; use adam or sgd, or 0",
        )
        require(
            self.langevin == 0 or self.optimizer != "lbfgs",
            "langevin",
            self.langevin,
            "L-BFGS searches along its own line, without noise; use adam or sgd, or 0",
        )
        require(
            self.max_iterations is None or self.max_iterations >= self.iterations,
            "max_iterations",
            self.max_iterations,
            f"use at least iterations ({self.iterations}), or leave it out",
        )

    def shared(self) -> tuple:
        """The settings that every lane of one computation must share."""
        return tuple(getattr(self, name) for name, knob in declarations(self).items() if knob.lane_shared is True)


def total_variation(x: torch.Tensor, inner: float = 1.0, outer: float = 1.0) -> torch.Tensor:
    """Total variation per run of ``x`` ``[N, ...]``. With both exponents 1, the paper's anisotropic TV: the
    mean absolute difference between horizontal neighbours plus that between vertical ones. Otherwise
    breaching's, ``mean((|dx| + eps)^inner + (|dy| + eps)^inner)^outer`` over the pixels with both
    neighbours (inner 2, outer 0.5: isotropic)."""
    runs = len(x)
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    if inner == 1 and outer == 1:
        return dx.abs().reshape(runs, -1).mean(1) + dy.abs().reshape(runs, -1).mean(1)
    eps = TV_EPS
    dx, dy = dx[..., :-1, :], dy[..., :, :-1]
    pixels = ((dx.abs() + eps) ** inner + (dy.abs() + eps) ** inner) ** outer
    return pixels.reshape(runs, -1).mean(1)


class LaneObjective:
    """The attack's cost for ``L`` lanes x ``R`` restarts, batched over runs.

    Runs are lane-major (lane 0's restarts first). Each run's client update (the inner parameter
    gradient, or the unrolled FedAvg steps) is computed by ``vmap`` over the runs; the costs are then
    batched tensor code, and one ordinary ``torch.autograd.grad`` of their sum, with the images as the
    only input, gives every run's image gradient (a run's cost depends only on its own images, so the
    sum's gradient is each run's own gradient). ``vmap`` over a single run is that run's function
    applied directly, so ``L * R = 1`` is the same computation without the batching overhead.
    ``seed`` draws the ``batch`` layer set's tensors. The candidate update goes through the defences
    the attacker mirrors (gradinv.client.defences: the clip when ``clip_aware``; with ``prune_aware`` only
    the coordinates the sent update kept are compared) before the cost; under secure aggregation it
    is the mean over the clients' groups of images (gradinv.client.defences.attacker_update). The priors
    (gradinv.attacks.bn_prior) add their weighted terms to each run's cost after the TV; the
    BatchNorm prior is also batched by ``vmap`` over the runs.
    """

    def __init__(
        self,
        model: nn.Module,
        updates: Sequence[ClientUpdate],
        labels: torch.Tensor,
        configs: Sequence[IGConfig],
        seed: int = 0,
    ):
        require(
            len({c.shared() for c in configs}) == 1,
            "lanes",
            len(configs),
            "pack only trials with equal shared settings",
        )
        config = configs[0]
        self.restarts = config.restarts
        params, buffers = model_state(model)
        targets = [self.per_run(torch.stack([u.tensors[i] for u in updates])) for i in range(len(params))]
        dtype, device = targets[0].dtype, labels.device
        weights = layer_weights(len(params), config.layer_weighting, config.layers)
        weights = torch.tensor(weights, dtype=dtype, device=device)
        if isinstance(config.layers, str) and config.layers not in ("all", "batch"):  # a set of some tensors
            weights = weights * named_set_mask(targets, config.layers)
        self.gradient_cost = GradientCost(targets, weights, config.cost)
        self.draws = torch.Generator(device).manual_seed(seed) if config.layers == "batch" else None
        epochs = candidate_epochs(config, updates[0])
        self.epochs = EpochCandidates(updates[0].clients, epochs, updates[0].images_per_client) if epochs > 1 else None
        self.epoch_weight = config.epoch_prior
        reads = config.output_gradient == "read"  # the candidate's update pulled back from the client's dL/dz
        given = read_output_gradients(model, updates, config.cost == "cosine") if reads else labels
        self.labels = self.per_run(given if self.epochs is None else self.epochs.per_epoch(given))
        self.tv_weights = self.per_run(torch.tensor([c.tv for c in configs], dtype=dtype, device=device))
        self.bn_prior = config.bn_prior
        self.batch_norm_prior = (
            None
            if config.bn_prior == 0
            else BatchNormPrior(model, params, buffers, updates, config.bn_stats, self.per_run)
        )
        self.group_weight = config.group_consistency if self.restarts > 1 else 0.0
        self.tv_exponents = (config.tv_inner_exp, config.tv_outer_exp)
        self.image_prior = config.image_prior
        self.feature_weight = config.feature_prior
        self.features = (
            None
            if config.feature_prior == 0
            else FeaturePrior(model, params, buffers, list(updates), labels, self.per_run)
        )
        compared = self.gradient_cost.compared
        predicted = attacker_update(config, updates[0])  # lanes share the client recipe and its DP batches
        kept = kept_masks(config, targets)
        self.kept = None if kept is None else [kept[i] for i in compared]  # [N, ...] per compared tensor

        def update(x, y):  # one run's update as the attacker predicts it, the compared tensors only
            full = predicted(model, params, buffers, x, y)
            return tuple(full[i] for i in compared)

        batched = vmap(update)

        def updates_per_run(x, y):
            if len(x) == 1:  # vmap over one run is the run's own function, without batching overhead
                return tuple(t.unsqueeze(0) for t in update(x[0], y[0]))
            return batched(x, y)

        self.updates_per_run = updates_per_run

    def per_run(self, per_lane: torch.Tensor) -> torch.Tensor:
        """``[L, ...]`` to ``[L * R, ...]``."""
        return per_lane.repeat_interleave(self.restarts, dim=0)

    def start(self, images: torch.Tensor) -> torch.Tensor:
        """Each run's candidates at the start, from its starting images ``[N, B, ...]``."""
        return images if self.epochs is None else self.epochs.per_epoch(images)

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """The images each run's candidates ``x`` stand for (with each epoch's own: their matched mean)."""
        return x if self.epochs is None else self.epochs.images(x, self.labels)

    def _batch_mask(self) -> torch.Tensor | None:
        """The ``batch`` set: each run compares 8 tensors of the model drawn afresh (None: no draw)."""
        if self.draws is None:
            return None
        runs, count = len(self.labels), self.gradient_cost.weights.shape[1]
        order = torch.rand(runs, count, generator=self.draws, device=self.labels.device).argsort(dim=1)
        mask = torch.zeros(runs, count, dtype=self.gradient_cost.weights.dtype, device=self.labels.device)
        return mask.scatter_(1, order[:, :BATCH_LAYERS], 1.0)

    def match(self, x: torch.Tensor) -> torch.Tensor:
        """The gradient cost alone (no TV) per run, ``[N]``."""
        candidate = self.updates_per_run(x, self.labels)
        if self.kept is not None:
            candidate = tuple(c * mask for c, mask in zip(candidate, self.kept))
        return self.gradient_cost(candidate, self._batch_mask())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image gradient of the full cost, the full cost and the gradient cost alone, per run.

        A run's cost depends only on its own images, so the gradient of the sum over runs is every
        run's own gradient; the parameters stay detached, so nothing else is differentiated.
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            match = self.match(x)
            total = match + self.tv_weights * total_variation(x, *self.tv_exponents)
            if self.batch_norm_prior is not None:
                total = total + self.bn_prior * self.batch_norm_prior(x)
            if self.features is not None:
                total = total + self.feature_weight * self.features(x)
            if self.image_prior > 0:
                total = total + self.image_prior * x.square().flatten(1).mean(1)
            if self.epochs is not None:
                total = total + self.epoch_weight * self.epochs.prior(x)
            if self.group_weight > 0:
                total = total + self.group_weight * group_consistency(x, self.restarts)
            (image_grad,) = torch.autograd.grad(total.sum(), inputs=[x])
        return image_grad, total.detach(), match.detach()


def single_run_objectives(model, updates, labels, configs, seed: int) -> list[LaneObjective]:
    """Each lane's objective for one run at a time (L-BFGS optimises run by run)."""
    return [
        LaneObjective(
            model,
            updates[lane : lane + 1],
            labels[lane : lane + 1],
            [dataclasses.replace(configs[lane], restarts=1)],
            seed,
        )
        for lane in range(len(updates))
    ]
