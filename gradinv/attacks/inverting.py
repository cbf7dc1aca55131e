"""Inverting Gradients (Geiping et al., 2020): cosine gradient matching with TV, signed Adam.

The attack optimises ``L`` independent trials ("lanes"), each with ``R`` restarts, as one batched
computation: ``torch.func.vmap`` over the ``L * R`` runs of a per-run cost whose gradient flows only
into the images. ``L = 1`` is the ordinary single-trial attack.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import vmap

from ..errors import require
from ..fl import ClientUpdate, minibatch_schedule, model_state, parameter_update

COSTS = ("cosine", "l2")
DECAYS = ("step", "cosine", "none")
INITS = ("randn", "rand", "zeros")
LAYER_WEIGHTINGS = ("equal", "linear", "exp")


@dataclass(frozen=True)
class IGConfig:
    """One trial's attack settings. Lanes packed together share all but ``tv`` and ``lr``."""

    iterations: int = 24_000
    restarts: int = 1
    tv: float = 1e-4
    lr: float = 0.1
    cost: str = "cosine"
    decay: str = "step"  # step: x0.1 at 3/8, 5/8, 7/8 of the iterations
    init: str = "randn"
    layer_weighting: str = "equal"  # linear/exp: earlier layers weigh more
    layers: tuple[int, ...] | None = None  # parameter indices to match; None: all
    signed: bool = True  # Adam on the sign of the image gradient

    def __post_init__(self):
        require(self.iterations >= 1, "iterations", self.iterations, "use at least 1 iteration")
        require(self.restarts >= 1, "restarts", self.restarts, "use at least 1 restart")
        require(self.tv >= 0, "tv", self.tv, "use a TV weight of 0 or more")
        require(self.lr > 0, "lr", self.lr, "use a positive step size")
        require(self.cost in COSTS, "cost", self.cost, f"choose one of {', '.join(COSTS)}")
        require(self.decay in DECAYS, "decay", self.decay, f"choose one of {', '.join(DECAYS)}")
        require(self.init in INITS, "init", self.init, f"choose one of {', '.join(INITS)}")
        require(
            self.layer_weighting in LAYER_WEIGHTINGS,
            "layer_weighting", self.layer_weighting, f"choose one of {', '.join(LAYER_WEIGHTINGS)}",
        )  # fmt: skip

    def shared(self) -> tuple:
        """The settings that every lane of one computation must share."""
        return (self.iterations, self.restarts, self.cost, self.decay, self.init, self.layer_weighting,
                self.layers, self.signed)  # fmt: skip


@dataclass
class AttackResult:
    images: torch.Tensor  # [L, B, C, H, W] in normalised coordinates, the winning restart per lane
    restart_scores: torch.Tensor  # [L, R] final gradient cost without TV (inf for NaN)
    curve: list[tuple[int, list[float]]] = field(default_factory=list)  # (iteration, best cost per lane)
    seconds: float = 0.0


class TrialTimeout(RuntimeError):
    pass


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (the paper's anisotropic TV), per run.

    ``x`` is ``[N, ...]``: one value per run ``x[r]``.
    """
    runs = len(x)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().reshape(runs, -1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().reshape(runs, -1).mean(1)
    return dx + dy


def layer_weights(count: int, weighting: str, layers: Sequence[int] | None) -> list[float]:
    if weighting == "linear":
        weights = [1.0 - i / count for i in range(count)]
    elif weighting == "exp":
        weights = [math.exp(-4.0 * i / count) for i in range(count)]
    else:
        weights = [1.0] * count
    if layers is not None:
        chosen = set(layers)
        weights = [w if i in chosen else 0.0 for i, w in enumerate(weights)]
    return weights


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
    """How far each run's candidate update is from its target: 1 - the weighted cosine similarity
    over all layers together, or the weighted squared distance.

    ``targets`` are ``[N, ...]`` tensors (one entry per run) in parameter order and ``weights`` one
    weight per tensor; tensors of weight 0 are never compared. Calling it with the candidate tensors
    of the compared layers, in the same order, gives ``[N]``.
    """

    def __init__(self, targets: Sequence[torch.Tensor], weights: Sequence[float], cost: str):
        self.compared = [i for i, w in enumerate(weights) if w != 0.0]
        self.targets = [targets[i].reshape(len(targets[i]), -1) for i in self.compared]
        self.weights = [weights[i] for i in self.compared]
        self.cost = cost
        if cost == "cosine":  # constant: computed once, not every iteration
            self.target_norm = sum(w * torch.linalg.vecdot(t, t) for t, w in zip(self.targets, self.weights)).sqrt()

    def __call__(self, candidate: Sequence[torch.Tensor]) -> torch.Tensor:
        pairs = [(c.reshape(len(c), -1), t, w) for c, t, w in zip(candidate, self.targets, self.weights)]
        if self.cost == "l2":
            return sum(w * (c - t).pow(2).sum(1) for c, t, w in pairs)
        dot = norm_c = 0.0
        for c, t, w in pairs:
            layer_dot, layer_square = _RunDots.apply(c, t)
            dot, norm_c = dot + w * layer_dot, norm_c + w * layer_square
        return 1 - dot / (norm_c.sqrt() * self.target_norm)


def step_size_factor(iteration: int, iterations: int, decay: str) -> float:
    if decay == "step":
        return 0.1 ** sum(iteration >= iterations * m for m in (3 / 8, 5 / 8, 7 / 8))
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * iteration / iterations))
    return 1.0


def initial_images(shape: Sequence[int], restarts: int, init: str, seed: int) -> torch.Tensor:
    """``[R, B, C, H, W]`` starting points drawn from the trial's own attack seed."""
    generator = torch.Generator().manual_seed(seed)
    full = (restarts, *shape)
    if init == "randn":
        return torch.randn(full, generator=generator)
    if init == "rand":
        return torch.rand(full, generator=generator)
    return torch.zeros(full)


class LaneObjective:
    """The attack's cost for ``L`` lanes x ``R`` restarts, batched over runs.

    Runs are lane-major (lane 0's restarts first). Each run's client update (the inner parameter
    gradient, or the unrolled FedAvg steps) is computed by ``vmap`` over the runs; the costs are then
    batched tensor code, and one ordinary ``torch.autograd.grad`` of their sum, with the images as the
    only input, gives every run's image gradient (a run's cost depends only on its own images, so the
    sum's gradient is each run's own gradient). ``vmap`` over a single run is that run's function
    applied directly, so ``L * R = 1`` is the same computation without the batching overhead.
    """

    def __init__(self, model: nn.Module, updates: Sequence[ClientUpdate], labels: torch.Tensor,
                 configs: Sequence[IGConfig]):  # fmt: skip
        require(len({c.shared() for c in configs}) == 1, "lanes", len(configs), "pack only trials with equal shared settings")
        config = configs[0]
        self.restarts = config.restarts
        params, buffers = model_state(model)
        fl = updates[0].fl
        schedule = minibatch_schedule(updates[0].num_images, fl)
        targets = [self.per_run(torch.stack([u.tensors[i] for u in updates])) for i in range(len(params))]
        self.gradient_cost = GradientCost(targets, layer_weights(len(params), config.layer_weighting, config.layers),
                                          config.cost)  # fmt: skip
        self.labels = self.per_run(labels)
        self.tv_weights = self.per_run(torch.tensor([c.tv for c in configs], device=labels.device))
        compared = self.gradient_cost.compared

        def update(x, y):  # one run's client update, the compared tensors only
            full = parameter_update(model, params, buffers, x, y, fl, schedule)
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

    def match(self, x: torch.Tensor) -> torch.Tensor:
        """The gradient cost alone (no TV) per run, ``[N]``."""
        return self.gradient_cost(self.updates_per_run(x, self.labels))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The image gradient of the full cost, the full cost and the gradient cost alone, per run.

        A run's cost depends only on its own images, so the gradient of the sum over runs is every
        run's own gradient; the parameters stay detached, so nothing else is differentiated.
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            match = self.match(x)
            total = match + self.tv_weights * total_variation(x)
            (image_grad,) = torch.autograd.grad(total.sum(), inputs=[x])
        return image_grad, total.detach(), match.detach()


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
    on_progress: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> AttackResult:
    """Reconstruct the images behind ``L`` client updates at once.

    ``labels`` is ``[L, B]`` (known or recovered), ``seeds`` one attack seed per lane, ``box`` the
    valid pixel range in normalised coordinates (``[C, 1, 1]`` each), ``image_shape`` ``(B, C, H, W)``.
    ``on_checkpoint(iteration, best_cost_per_lane)`` is called at ``checkpoints`` evenly spaced
    iterations (and may raise to stop); ``on_progress(done)`` every 1 % of the iterations.
    """
    lanes = len(updates)
    config = configs[0]
    restarts, runs = config.restarts, lanes * config.restarts
    device = labels.device
    objective = LaneObjective(model, updates, labels, configs)
    step_sizes = objective.per_run(torch.tensor([c.lr for c in configs], device=device)).view(runs, 1, 1, 1, 1)
    lower, upper = (bound.to(device) for bound in box)

    x = torch.cat([initial_images(image_shape, restarts, config.init, seed) for seed in seeds]).to(device)
    x = torch.maximum(torch.minimum(x, upper), lower)
    adam_m, adam_v = torch.zeros_like(x), torch.zeros_like(x)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    check_at = {max(1, round(config.iterations * (k + 1) / checkpoints)) for k in range(checkpoints)}
    progress_every = max(1, config.iterations // 100)
    curve: list[tuple[int, list[float]]] = []
    start = time.perf_counter()
    for iteration in range(config.iterations):
        image_grad, _, match = objective(x)
        step = image_grad.sign() if config.signed else image_grad
        adam_m.mul_(beta1).add_(step, alpha=1 - beta1)
        adam_v.mul_(beta2).addcmul_(step, step, value=1 - beta2)
        m_hat = adam_m / (1 - beta1 ** (iteration + 1))
        v_hat = adam_v / (1 - beta2 ** (iteration + 1))
        factor = step_size_factor(iteration, config.iterations, config.decay)
        x = x - (factor * step_sizes) * m_hat / (v_hat.sqrt() + eps)
        x = torch.maximum(torch.minimum(x, upper), lower)
        done = iteration + 1
        if deadline is not None and time.monotonic() > deadline:
            raise TrialTimeout(f"stopped at iteration {done} of {config.iterations}: past the trial timeout")
        if on_progress is not None and done % progress_every == 0:
            on_progress(done)
        if done in check_at:
            best = _finite(match.detach()).view(lanes, restarts).min(dim=1).values.tolist()
            curve.append((done, best))
            if on_checkpoint is not None:
                on_checkpoint(done, best)
    with torch.no_grad():
        scores = _finite(objective.match(x)).view(lanes, restarts)
    winners = scores.argmin(dim=1)
    images = x.view(lanes, restarts, *image_shape)[torch.arange(lanes, device=device), winners]
    return AttackResult(images.detach(), scores.cpu(), curve, time.perf_counter() - start)


def _finite(values: torch.Tensor) -> torch.Tensor:
    """NaN costs become +inf so that a diverged restart never wins."""
    return torch.nan_to_num(values, nan=math.inf)
