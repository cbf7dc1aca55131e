"""DP-SGD for the client's local training (Opacus), and the attacker's differentiable, noise-free twin.

Each DP-SGD step takes every example's own gradient, clips it to L2 norm ``clip``, sums, adds Gaussian
noise of std ``noise_multiplier * clip`` and divides by the expected batch size (images x sample
rate). Opacus computes the per-example gradients (``GradSampleModule``), clips and noises them
(``DPOptimizer``) and samples the batches (``UniformWithReplacementSampler``, Poisson sampling).

BatchNorm: Opacus refuses layers with buffers, because in training mode BatchNorm mixes the examples
of a batch. Our victims run in eval mode, where BatchNorm is a fixed per-channel affine map of each
example alone; :func:`private_copy` replaces it by exactly that map (no buffers), and Opacus'
functorch mode differentiates every layer per example (``vmap(grad)`` of the layer).

The attacker's :func:`clipped_update` is the same computation in ``torch.func`` without the noise,
with ``vmap(grad)`` per example, so that it unrolls inside ``torch.func.grad`` w.r.t. the images.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import require
from ..parameters import ClientSettings
from .accounting import accounting_steps
from .local_sgd import local_sgd

Batches = list[torch.Tensor]  # the image indices of each DP-SGD step, as the client realised them
NORM_EPSILON = 1e-6  # Opacus' clip factor: min(1, clip / (norm + 1e-6))


class EvalBatchNorm(nn.Module):
    """A BatchNorm layer's eval-mode function: its running statistics held as constants, not buffers."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        require(
            norm.track_running_stats,
            "model",
            type(norm).__name__,
            "DP-SGD needs BatchNorm layers that keep running statistics",
        )
        self.weight, self.bias = norm.weight, norm.bias  # the same names, so the update keeps the model's order
        self.mean, self.var, self.eps = norm.running_mean.detach(), norm.running_var.detach(), norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, training=False, eps=self.eps)


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that computes what it computes in eval mode, ready for Opacus' hooks.

    BatchNorm layers become :class:`EvalBatchNorm`; parameter names and order stay. Opacus records
    activations only of modules in training mode, so the layers that hold parameters are switched to
    it (with BatchNorm replaced that changes nothing they compute); the rest stay in eval mode.
    """
    duplicate = copy.deepcopy(model).eval()
    _replace_batch_norms(duplicate)
    for module in duplicate.modules():
        module.training = next(module.parameters(recurse=False), None) is not None
    return duplicate


def _replace_batch_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, EvalBatchNorm(child))
        else:
            _replace_batch_norms(child)


def make_private(
    model: nn.Module,
    optimiser: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    *,
    clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise_seed: int,
) -> tuple[GradSampleModule, DPOptimizer]:
    """Opacus' per-example gradients over :func:`private_copy` of ``model``, and ``optimiser`` (built on
    the copy's parameters) wrapped to clip and noise them; feed both to :func:`dp_training_step`.

    The copy's parameters carry the model's names: ``model.load_state_dict(module.to_standard_module()
    .state_dict(), strict=False)`` takes the trained weights back (BatchNorm statistics unchanged).
    """
    check_dp(clip, noise_multiplier)
    private = private_copy(model)
    module = GradSampleModule(private, loss_reduction="sum", force_functorch=True)  # each example's own gradient
    reference = next(private.parameters())
    noise = torch.Generator(device=reference.device).manual_seed(noise_seed)
    wrapped = DPOptimizer(
        optimiser(list(private.parameters())),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise,
    )
    return module, wrapped


def noisy_gradient(
    module: GradSampleModule, optimiser: DPOptimizer, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Leave the noisy clipped mean gradient of this batch in each parameter's ``.grad``; returns the logits."""
    optimiser.zero_grad(set_to_none=True)
    if len(images) == 0:  # a Poisson batch may be empty: no examples, the step is noise alone
        for parameter in optimiser.params:
            parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
        logits = images.new_zeros((0,))
    else:
        logits = module(images)
        with warnings.catch_warnings():  # Opacus' hooks fire on the first layer, whose input needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            F.cross_entropy(logits, labels, reduction="sum").backward()
    optimiser.pre_step()
    return logits.detach()


def dp_training_step(
    module: GradSampleModule, optimiser: DPOptimizer, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """One DP-SGD step of a model made private by :func:`make_private`; returns the batch's logits."""
    logits = noisy_gradient(module, optimiser, images, labels)
    optimiser.original_optimizer.step()
    return logits


def check_dp(clip: float, noise_multiplier: float, sample_rate: float = 1.0) -> None:
    require(clip is not None and clip > 0, "dp_clip", clip, "use a positive per-example clipping norm")
    require(noise_multiplier >= 0, "dp_noise", noise_multiplier, "use a noise multiplier of 0 (off) or more")
    require(0 < sample_rate <= 1, "dp_sample_rate", sample_rate, "use a sample rate in (0, 1]; 1 uses every image")


def expected_batch_size(num_images: int, sample_rate: float) -> float:
    """The mean's denominator: images x sample rate, unrounded (Opacus' make_private would truncate it)."""
    return num_images * sample_rate


def poisson_batches(num_images: int, sample_rate: float, steps: int, generator: torch.Generator) -> Batches:
    """Each step's image indices: every image at sample rate 1, else Opacus' Poisson sampling."""
    if sample_rate == 1:
        return [torch.arange(num_images) for _ in range(steps)]
    sampler = UniformWithReplacementSampler(
        num_samples=num_images, sample_rate=sample_rate, generator=generator, steps=steps
    )
    return [torch.tensor(indices, dtype=torch.long) for indices in sampler]


def dp_local_training(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    fl: ClientSettings,
    clip: float,
    noise_multiplier: float,
    sample_rate: float,
    seed: int,
) -> tuple[tuple[torch.Tensor, ...], Batches]:
    """The client's DP-SGD training: the update (in the model's parameter order) and the realised batches.

    FedSGD: one step's noisy clipped mean gradient. FedAvg: ``local_steps`` DP-SGD steps of SGD at
    ``local_lr``, the update theta_K - theta_0. ``seed`` fixes the batches and the noise.
    """
    check_dp(clip, noise_multiplier, sample_rate)
    require(len(images) >= 1, "images_per_client", len(images), "give the client at least 1 image")
    sampling_seed, noise_seed = (int(s.generate_state(1, np.uint64)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    sampling = torch.Generator().manual_seed(sampling_seed)
    batches = poisson_batches(len(images), sample_rate, accounting_steps(fl), sampling)
    lr = fl.local_lr if fl.fl == "fedavg" else 0.0
    module, optimiser = make_private(
        model,
        lambda parameters: torch.optim.SGD(parameters, lr=lr),
        clip=clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size(len(images), sample_rate),
        noise_seed=noise_seed,
    )
    start = [parameter.detach().clone() for parameter in optimiser.params]
    if fl.fl == "fedsgd":
        noisy_gradient(module, optimiser, images[batches[0]], labels[batches[0]])
        return tuple(parameter.grad.detach().clone() for parameter in optimiser.params), batches
    for indices in batches:
        dp_training_step(module, optimiser, images[indices], labels[indices])
    return tuple(parameter.detach() - before for parameter, before in zip(optimiser.params, start)), batches


def clipped_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    fl: ClientSettings,
    clip: float,
    batches: Batches,
    sample_rate: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """The DP-SGD update without its noise, differentiable w.r.t. ``images`` (``model`` in eval mode).

    The attacker's unrolling of :func:`dp_local_training` over the client's ``batches``: per-example
    gradients by ``vmap(grad)``, each clipped to ``clip`` as Opacus clips it, summed and divided by
    the expected batch size; FedSGD returns that mean, FedAvg theta_K - theta_0 after its steps.
    """
    denominator = expected_batch_size(len(images), sample_rate)

    def example_loss(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def clipped_mean(p, indices):
        if len(indices) == 0:  # an empty Poisson batch: nothing but the noise, which the attacker lacks
            return {name: torch.zeros_like(value) for name, value in p.items()}
        grads = per_example(p, images[indices], labels[indices])
        norms = torch.stack([g.flatten(1).norm(2, dim=1) for g in grads.values()], dim=1).norm(2, dim=1)
        factor = (clip / (norms + NORM_EPSILON)).clamp(max=1.0)
        return {name: torch.einsum("i,i...", factor, g) / denominator for name, g in grads.items()}

    return local_sgd(params, clipped_mean, fl, batches)
