"""Inverting Gradients (Geiping et al., 2020): gradient matching with TV, the reference's attack.

The defaults are the reference implementation's (``inversefed``) attack knob for knob: cosine cost over
all parameter tensors, Adam on the sign of the image gradient, its step-decay milestones, an
unclamped random-normal start, the box projection after every step and the restart of least gradient
cost. Each of the reference's other choices is a named setting of :class:`IGConfig`.

Its settings (:class:`IGConfig`) and the cost it descends, batched over lanes and restarts
(:class:`LaneObjective`), are gradinv.attacks.objective's; this module runs the optimisation: the
starting images, the step-size schedule, the box and the median filter, and the choice among restarts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..client.update import ClientUpdate
from ..parameters import extract
from ..parameters.attack import PATTERN_SIDE
from . import steps
from .base import SETTLED_COST_FALL, SETTLED_FROM, AttackJob, AttackResult, TrialTimeout
from .objective import IGConfig, LaneObjective, single_run_objectives, total_variation

MEDIAN_FILTER_EVERY = 500  # iterations between the reference's 3x3 median filters
LANGEVIN_SEED_OFFSET = 0x1A6E_5EED  # Langevin noise: a stream of the attack seed apart from its starting images


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


def warmup_factor(iteration: int, config: IGConfig) -> float:
    """The step size rises linearly over the first ``warmup`` iterations (of the first round only)."""
    return min(1.0, (iteration + 1) / config.warmup) if config.warmup else 1.0


def initial_images(
    shape: Sequence[int], restarts: int, init: str, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[R, B, C, H, W]`` starting points drawn from the trial's own attack seed (on the CPU, so that
    every device starts from the same images): standard normal, uniform in [-1, 1), a uniform tile repeated
    (``patterned``), or zeros."""
    generator = torch.Generator().manual_seed(seed)
    full = (restarts, *shape)
    if init == "randn":
        return torch.randn(full, generator=generator, dtype=dtype, device="cpu")
    if init == "rand":
        return (torch.rand(full, generator=generator, dtype=dtype, device="cpu") - 0.5) * 2
    if init == "patterned":  # breaching's patterned-4: a uniform tile repeated over the image
        tile = (torch.rand((*full[:-2], PATTERN_SIDE, PATTERN_SIDE), generator=generator, dtype=dtype) - 0.5) * 2
        height, width = shape[-2:]
        repeats = (-(-height // PATTERN_SIDE), -(-width // PATTERN_SIDE))
        return tile.repeat(*[1] * (len(full) - 2), *repeats)[..., :height, :width].contiguous()
    return torch.zeros(full, dtype=dtype, device="cpu")


def langevin_noise(
    shape: Sequence[int], restarts: int, seeds: Sequence[int], dtype: torch.dtype, device
) -> Callable[[], torch.Tensor]:
    """Draws of standard normal noise for every run, each lane's from its own attack seed (on the CPU, so that a
    lane's noise does not depend on the lanes packed with it, nor on the device)."""
    generators = [torch.Generator().manual_seed((seed + LANGEVIN_SEED_OFFSET) % 2**63) for seed in seeds]

    def draw() -> torch.Tensor:
        per_lane = [torch.randn((restarts, *shape), generator=g, dtype=dtype) for g in generators]
        return torch.cat(per_lane).to(device)

    return draw


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

    x = torch.cat([initial_images(image_shape, restarts, config.init, seed, dtype) for seed in seeds])
    x = objective.start(x).contiguous().to(device)
    candidates = x.shape[1:]
    if config.clamp_init:
        x = torch.maximum(torch.minimum(x, upper), lower)
    step_sizes = objective.per_run(torch.tensor([c.lr for c in configs], dtype=dtype, device=device))
    step_sizes = step_sizes.view(runs, 1, 1, 1, 1) if config.optimizer == "adam" else steps.SGD_LR
    direct = steps.Direction(
        config.signed,
        config.soft_signed,
        config.langevin,
        step_sizes,
        langevin_noise(candidates, restarts, seeds, dtype, device) if config.langevin > 0 else None,
    )
    if config.optimizer == "adam":
        step = steps.adam(objective, step_sizes, direct)
    elif config.optimizer == "sgd":
        step = steps.sgd(objective, direct)
    else:
        step = steps.lbfgs(single_run_objectives(model, updates, labels, configs, seeds[0]), restarts, direct)
    progress_every = max(1, config.iterations // 100)
    curve: list[tuple[int, list[float]]] = []
    budget = Budget(lanes, restarts, config.iterations, config.max_iterations or config.iterations, device)
    start = time.perf_counter()
    iteration = 0
    while budget.running():
        into_round = iteration - budget.round_start
        factor = step_size_factor(into_round, budget.round_length, config.decay) * warmup_factor(iteration, config)
        moved, match = step(x, iteration, factor, into_round / budget.round_length)
        x = budget.only_running(moved, x)
        if config.boxed:
            x = torch.maximum(torch.minimum(x, upper), lower)
        iteration = done = iteration + 1
        if config.median_filter and done % MEDIAN_FILTER_EVERY == 0:
            x = median_filter(x)
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout(f"stopped at iteration {done} of {budget.cap}: past the trial timeout")
        if on_progress is not None and done % progress_every == 0:
            on_progress(done)
        costs = _finite(match.detach()).view(lanes, restarts)
        checkpoint = budget.checkpoint(done, checkpoints)  # read before observe() may begin the next round
        x = budget.observe(done, costs.min(dim=1).values, x)
        if checkpoint:
            best = costs.min(dim=1).values.tolist()
            curve.append((done, best))
            if on_images is not None:
                on_images(
                    done,
                    objective.reconstruction(x.detach()).view(lanes, restarts, *image_shape)[
                        torch.arange(lanes, device=device), costs.argmin(dim=1)
                    ],
                )
            if on_checkpoint is not None:
                on_checkpoint(done, best)
    x = budget.kept if budget.kept is not None else x
    with torch.no_grad():
        scores = _finite(objective.match(x)).view(lanes, restarts)
        images = objective.reconstruction(x).view(lanes, restarts, *image_shape)
    images = final_images(images, scores, config)
    seconds = time.perf_counter() - start
    return AttackResult(images.detach(), scores.cpu(), curve, seconds, iterations_run=budget.stopped_at)


class Budget:
    """Which lanes still run: all of them for ``iterations``, then, round by round, those whose best
    gradient cost fell by SETTLED_COST_FALL or more over the round's last quarter, each round twice as
    long as the one before (its own step-size schedule), as long as a whole round fits in ``cap``. It
    reads only the costs, which the attacker sees, so it needs no ground truth. A lane that stops keeps
    its images while the others run on (computed, not moved). A round begins its step-size schedule
    again, which can undo progress: each lane ends with the images of its round end of least cost
    (``kept``; None when there is one round)."""

    def __init__(self, lanes: int, restarts: int, iterations: int, cap: int, device):
        self.restarts, self.cap = restarts, cap
        self.round_start, self.round_length = 0, iterations
        self.stopped_at: list[int | None] = [None] * lanes
        self.active = torch.ones(lanes, dtype=torch.bool, device=device)
        self.tail_start: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None  # per run, the images of the lane's best round end
        self.kept_cost: torch.Tensor | None = None  # [L]

    def running(self) -> bool:  # read from Python's side: no device round trip per iteration
        return None in self.stopped_at

    def checkpoint(self, done: int, per_round: int) -> bool:
        """Whether iteration ``done`` is one of the ``per_round`` evenly spaced checkpoints of its round."""
        into_round = done - self.round_start
        return into_round in {max(1, round(self.round_length * (k + 1) / per_round)) for k in range(per_round)}

    def only_running(self, moved: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        if not any(self.stopped_at):
            return moved
        runs = self.active.repeat_interleave(self.restarts).view(-1, *[1] * (moved.dim() - 1))
        return torch.where(runs, moved, before)

    def observe(self, done: int, best: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """After iteration ``done`` with each lane's best cost ``best`` ``[L]`` and the images ``x``: the
        images to go on from."""
        into_round = done - self.round_start
        if into_round == max(1, round(SETTLED_FROM * self.round_length)):
            self.tail_start = best.clone()
        if into_round != self.round_length:
            return x
        fell = 1 - best / self.tail_start
        settled = ~(fell >= SETTLED_COST_FALL)  # NaN (a cost of 0 or inf at the tail's start) settles too
        last = done + 2 * self.round_length > self.cap
        stopping = self.active & (settled | last)
        for lane in stopping.nonzero().flatten().tolist():
            self.stopped_at[lane] = done
        self.active &= ~stopping
        if self.cap > done or self.kept is not None:  # more than one round is possible
            self._keep_best(best, x)
        self.round_start, self.round_length = done, 2 * self.round_length
        return x

    def _keep_best(self, best: torch.Tensor, x: torch.Tensor) -> None:
        if self.kept is None:
            self.kept, self.kept_cost = x.clone(), best.clone()
            return
        better = best < self.kept_cost
        self.kept_cost = torch.where(better, best, self.kept_cost)
        runs = better.repeat_interleave(self.restarts).view(-1, *[1] * (x.dim() - 1))
        self.kept = torch.where(runs, x, self.kept)


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
