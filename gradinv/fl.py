"""What a federated client sends: a FedSGD gradient or a FedAvg weight update.

One pure function, :func:`parameter_update`, computes the update from images and labels. The client
calls it on its real data; the attacker calls the same function on its guesses inside
``torch.func.grad`` and so unrolls the client's local training differentiably, with the gradient
flowing only into the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from .errors import require

FL_MODES = ("fedsgd", "fedavg")
BATCH_ORDERS = ("shuffled", "sequential")


@dataclass(frozen=True)
class FLConfig:
    """How the client computes its update; the attacker knows all of it."""

    mode: str = "fedsgd"
    local_steps: int = 1  # FedAvg: SGD steps on the client's images
    local_lr: float = 1e-4  # FedAvg: the paper's local learning rate
    local_batch_size: int = 0  # FedAvg: images per local step; 0 means all of them
    data_order_seed: int = 0  # FedAvg: shuffles the mini-batches of each local epoch
    batch_order: str = "shuffled"  # FedAvg mini-batches: see minibatch_schedule

    def __post_init__(self):
        require(self.mode in FL_MODES, "fl", self.mode, f"choose one of {', '.join(FL_MODES)}")
        require(self.local_steps >= 1, "local_steps", self.local_steps, "use at least 1 local step")
        require(self.local_lr > 0, "local_lr", self.local_lr, "use a positive local learning rate")
        require(self.local_batch_size >= 0, "local_batch_size", self.local_batch_size, "use 0 (all) or more")
        require(self.batch_order in BATCH_ORDERS, "batch_order", self.batch_order,
                f"choose one of {', '.join(BATCH_ORDERS)}")  # fmt: skip


@dataclass(frozen=True)
class ClientUpdate:
    """A client's message: tensors in the model's parameter order, and how they were made."""

    tensors: tuple[torch.Tensor, ...]
    fl: FLConfig
    num_images: int


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached parameters and buffers for ``functional_call``."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return params, buffers


def minibatch_schedule(num_images: int, fl: FLConfig) -> list[torch.Tensor | None]:
    """The image indices of each local step (None: all images).

    ``shuffled``: every local epoch visits the images in a new order (from ``data_order_seed``), its
    last mini-batch smaller when the batch size does not divide them. ``sequential`` (the reference):
    step ``i`` takes the fixed slice ``i mod (n // batch)``; the last ``n mod batch`` images are never used.
    """
    batch = fl.local_batch_size or num_images
    if fl.mode == "fedsgd" or batch >= num_images:
        return [None] * (fl.local_steps if fl.mode == "fedavg" else 1)
    if fl.batch_order == "sequential":
        slices = num_images // batch
        return [torch.arange(i % slices * batch, (i % slices + 1) * batch) for i in range(fl.local_steps)]
    generator = torch.Generator().manual_seed(fl.data_order_seed)
    schedule: list[torch.Tensor | None] = []
    while len(schedule) < fl.local_steps:
        order = torch.randperm(num_images, generator=generator, device="cpu")  # the generator's device
        schedule += [order[i : i + batch] for i in range(0, num_images, batch)]
    return schedule[: fl.local_steps]


def parameter_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    fl: FLConfig,
    schedule: list[torch.Tensor | None],
) -> tuple[torch.Tensor, ...]:
    """FedSGD: the loss gradient. FedAvg: theta_K - theta_0 after the local SGD steps.

    ``labels`` are class indices ``[B]`` or class probabilities ``[B, K]``.
    """

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    if fl.mode == "fedsgd":
        return tuple(grad(loss)(params, images, labels).values())
    current = params
    for indices in schedule:
        x, y = (images, labels) if indices is None else (images[indices], labels[indices])
        step = grad(loss)(current, x, y)
        current = {name: value - fl.local_lr * step[name] for name, value in current.items()}
    return tuple(current[name] - params[name] for name in params)


def client_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fl: FLConfig) -> ClientUpdate:
    """What the client sends after training on its normalised ``images``."""
    params, buffers = model_state(model)
    schedule = minibatch_schedule(len(images), fl)
    with torch.no_grad():
        tensors = parameter_update(model, params, buffers, images, labels, fl, schedule)
    return ClientUpdate(tuple(t.detach() for t in tensors), fl, len(images))
