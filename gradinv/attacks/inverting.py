"""Inverting Gradients (Geiping et al., 2020): gradient matching with TV, the reference's attack.

The defaults are the reference implementation's (``inversefed``) attack knob for knob: cosine cost over
all parameter tensors, Adam on the sign of the image gradient, its step-decay milestones, an
unclamped random-normal start, the box projection after every step and the restart of least gradient
cost. Each of the reference's other choices is a named setting of :class:`IGConfig`.

The attack optimises ``L`` independent trials ("lanes"), each with ``R`` restarts, as one batched
computation: ``torch.func.vmap`` over the ``L * R`` runs of a per-run cost whose gradient flows only
into the images. ``L = 1`` is the ordinary single-trial attack.

GradInversion's priors (gradinv.attacks.bn_prior) join the per-run objective when their weights are
positive: ``bn_prior`` x R_feat (BatchNorm statistics) and ``group_consistency`` x R_group (the pull
toward the restarts' mean); TV stays. With both weights 0 the objective is the reference's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from ..client.defences import attacker_update, kept_masks
from ..client.update import ClientUpdate, model_state
from ..errors import require
from ..parameters import DefenceSettings, InvertingSettings, OptimiserSettings, declarations, extract
from . import steps
from .base import AttackJob, AttackResult, TrialTimeout
from .bn_prior import BatchNormPrior, group_consistency
from .costs import BATCH_LAYERS, GradientCost, layer_weights, named_set_mask

MEDIAN_FILTER_EVERY = 500  # iterations between the reference's 3x3 median filters


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

    def shared(self) -> tuple:
        """The settings that every lane of one computation must share."""
        return tuple(getattr(self, name) for name, knob in declarations(self).items() if knob.lane_shared is True)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (the paper's anisotropic TV), per run.

    ``x`` is ``[N, ...]``: one value per run ``x[r]``.
    """
    runs = len(x)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().reshape(runs, -1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().reshape(runs, -1).mean(1)
    return dx + dy


def median_filter(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 median of every image plane of ``[..., H, W]``, edges reflected."""
    planes = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (1, 1, 1, 1), mode="reflect")
    windows = planes.unfold(2, 3, 1).unfold(3, 3, 1)
    return windows.reshape(*windows.shape[:4], 9).median(dim=-1).values.reshape(x.shape)


def step_milestones(iterations: int, decay: str) -> tuple[float, ...]:
    """The iterations from which the step size is divided by 10 once more.

    ``step`` is the reference's ``MultiStepLR`` schedule (floor divisions by 2.667, 1.6 and 1.142, close
    to 3/8, 5/8 and 7/8); ``step-eighths`` falls at exactly 3/8, 5/8 and 7/8 of the iterations.
    """
    if decay == "step":
        return (iterations // 2.667, iterations // 1.6, iterations // 1.142)
    if decay == "step-eighths":
        return tuple(iterations * m for m in (3 / 8, 5 / 8, 7 / 8))
    return ()


def step_size_factor(iteration: int, iterations: int, decay: str) -> float:
    """The step size of 0-based ``iteration`` relative to the optimiser's own."""
    if decay in ("step", "step-eighths"):
        return 0.1 ** sum(iteration >= m for m in step_milestones(iterations, decay))
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * iteration / iterations))
    return 1.0


def initial_images(
    shape: Sequence[int], restarts: int, init: str, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[R, B, C, H, W]`` starting points drawn from the trial's own attack seed (on the CPU, so that
    every device starts from the same images): standard normal, uniform in [-1, 1), or zeros."""
    generator = torch.Generator().manual_seed(seed)
    full = (restarts, *shape)
    if init == "randn":
        return torch.randn(full, generator=generator, dtype=dtype, device="cpu")
    if init == "rand":
        return (torch.rand(full, generator=generator, dtype=dtype, device="cpu") - 0.5) * 2
    return torch.zeros(full, dtype=dtype, device="cpu")


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
        self.labels = self.per_run(labels)
        self.tv_weights = self.per_run(torch.tensor([c.tv for c in configs], dtype=dtype, device=device))
        self.bn_prior = config.bn_prior
        self.feature_prior = (
            None
            if config.bn_prior == 0
            else BatchNormPrior(model, params, buffers, updates, config.bn_stats, self.per_run)
        )
        self.group_weight = config.group_consistency if self.restarts > 1 else 0.0
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
            total = match + self.tv_weights * total_variation(x)
            if self.feature_prior is not None:
                total = total + self.bn_prior * self.feature_prior(x)
            if self.group_weight > 0:
                total = total + self.group_weight * group_consistency(x, self.restarts)
            (image_grad,) = torch.autograd.grad(total.sum(), inputs=[x])
        return image_grad, total.detach(), match.detach()


def _single_run_objectives(model, updates, labels, configs, seed: int) -> list[LaneObjective]:
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


def final_images(runs: torch.Tensor, scores: torch.Tensor, config: IGConfig) -> torch.Tensor:
    """Each lane's reconstruction from its restarts ``runs`` ``[L, R, ...]``, by ``config.scoring``.

    ``loss``: the restart of least gradient cost ``scores`` ``[L, R]``; ``tv``: of least total
    variation; ``pixelmean`` / ``pixelmedian``: the pixel-wise mean / (lower) median of the restarts.
    The reference runs restarts in turn and stops at the first whose score (the gradient cost for the
    pixel-wise choices) is at most ``tol``; restarts after it are dropped here, as if never run.
    """
    lanes, restarts = scores.shape
    ranking = scores
    if config.scoring == "tv":
        ranking = _finite(total_variation(runs.flatten(0, 1))).view(lanes, restarts)
    kept = torch.ones_like(ranking, dtype=torch.bool)
    if config.tol is not None:
        reached = (ranking <= config.tol).long()
        kept = reached.cumsum(dim=1) - reached == 0
    if config.scoring in ("pixelmean", "pixelmedian"):
        masked = torch.where(kept.view(lanes, restarts, *[1] * (runs.dim() - 2)), runs, math.nan)
        return masked.nanmean(dim=1) if config.scoring == "pixelmean" else masked.nanmedian(dim=1).values
    winners = torch.where(kept, ranking, math.inf).argmin(dim=1)
    return runs[torch.arange(lanes, device=runs.device), winners]


def invert_gradients(
    model: nn.Module,
    updates: Sequence[ClientUpdate],
    labels: torch.Tensor,
    configs: Sequence[IGConfig],
    seeds: Sequence[int],
    box: tuple[torch.Tensor, torch.Tensor],
    image_shape: Sequence[int],
    *,
    checkpoints: int = 8,
    on_checkpoint: Callable[[int, list[float]], None] | None = None,
    on_images: Callable[[int, torch.Tensor], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> AttackResult:
    """Reconstruct the images behind ``L`` client updates at once.

    ``labels`` is ``[L, B]`` (known or recovered), ``seeds`` one attack seed per lane, ``box`` the
    valid pixel range in normalised coordinates (``[C, 1, 1]`` each), ``image_shape`` ``(B, C, H, W)``.
    The attack runs in the updates' dtype. ``on_checkpoint(iteration, best_cost_per_lane)`` is called
    at ``checkpoints`` evenly spaced iterations (and may raise to stop); ``on_images(iteration, images)``
    at the same iterations with each lane's best restart so far, ``[L, B, C, H, W]`` (to score quality
    along the way); ``on_progress(done)`` every 1 % of the iterations.
    """
    lanes = len(updates)
    config = configs[0]
    restarts, runs = config.restarts, lanes * config.restarts
    device, dtype = labels.device, updates[0].tensors[0].dtype
    objective = LaneObjective(model, updates, labels, configs, seeds[0])
    lower, upper = (bound.to(device, dtype) for bound in box)

    x = torch.cat([initial_images(image_shape, restarts, config.init, seed, dtype) for seed in seeds]).to(device)
    if config.clamp_init:
        x = torch.maximum(torch.minimum(x, upper), lower)
    if config.optimizer == "adam":
        step_sizes = objective.per_run(torch.tensor([c.lr for c in configs], dtype=dtype, device=device))
        step = steps.adam(objective, step_sizes.view(runs, 1, 1, 1, 1), config.signed)
    elif config.optimizer == "sgd":
        step = steps.sgd(objective, config.signed)
    else:
        step = steps.lbfgs(_single_run_objectives(model, updates, labels, configs, seeds[0]), restarts, config.signed)
    check_at = {max(1, round(config.iterations * (k + 1) / checkpoints)) for k in range(checkpoints)}
    progress_every = max(1, config.iterations // 100)
    curve: list[tuple[int, list[float]]] = []
    start = time.perf_counter()
    for iteration in range(config.iterations):
        x, match = step(x, iteration, step_size_factor(iteration, config.iterations, config.decay))
        if config.boxed:
            x = torch.maximum(torch.minimum(x, upper), lower)
        done = iteration + 1
        if config.median_filter and done % MEDIAN_FILTER_EVERY == 0:
            x = median_filter(x)
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout(f"stopped at iteration {done} of {config.iterations}: past the trial timeout")
        if on_progress is not None and done % progress_every == 0:
            on_progress(done)
        if done in check_at:
            costs = _finite(match.detach()).view(lanes, restarts)
            best = costs.min(dim=1).values.tolist()
            curve.append((done, best))
            if on_images is not None:
                on_images(
                    done,
                    x.detach().view(lanes, restarts, *image_shape)[
                        torch.arange(lanes, device=device), costs.argmin(dim=1)
                    ],
                )
            if on_checkpoint is not None:
                on_checkpoint(done, best)
    with torch.no_grad():
        scores = _finite(objective.match(x)).view(lanes, restarts)
    images = final_images(x.view(lanes, restarts, *image_shape), scores, config)
    return AttackResult(images.detach(), scores.cpu(), curve, time.perf_counter() - start)


def _finite(values: torch.Tensor) -> torch.Tensor:
    """NaN costs become +inf so that a diverged restart never wins."""
    return torch.nan_to_num(values, nan=math.inf)


def run(job: AttackJob) -> AttackResult:
    """The registry's entry (gradinv.attacks.registry): inverting gradients on a pack of lanes."""
    configs = [extract(IGConfig, spec) for spec in job.specs]
    return invert_gradients(
        job.model,
        job.updates,
        job.labels,
        configs,
        job.seeds,
        job.box,
        job.image_shape,
        on_checkpoint=job.on_checkpoint,
        on_images=job.on_images,
        on_progress=job.on_progress,
        deadline=job.deadline,
    )
