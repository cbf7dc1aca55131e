"""What a federated client sends: a FedSGD gradient or a FedAvg weight update, after its defences.

The pipeline: the victim's weights -> local training (:class:`FLConfig`) -> defences -> the update.
One pure function, :func:`parameter_update`, computes the update from images and labels. The client
calls it on its real data; the attacker calls the same function on its guesses inside
``torch.func.grad`` and so unrolls the client's local training differentiably, with the gradient
flowing only into the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from .parameters import BATCH_ORDERS, FL_MODES, ClientSettings  # noqa: F401  (declared with the knobs)

FLConfig = ClientSettings  # how the client computes its update (gradinv.parameters); the attacker knows all of it
Defence = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]  # an update in, the update sent out


@dataclass(frozen=True)
class ClientUpdate:
    """A client's message: tensors in the model's parameter order, and how they were made."""

    tensors: tuple[torch.Tensor, ...]
    fl: FLConfig
    num_images: int
    defences: tuple[Defence, ...] = ()  # applied after local training, in order; the attacker knows them


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
    if fl.fl == "fedsgd" or batch >= num_images:
        return [None] * (fl.local_steps if fl.fl == "fedavg" else 1)
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

    if fl.fl == "fedsgd":
        return tuple(grad(loss)(params, images, labels).values())
    current = params
    for indices in schedule:
        x, y = (images, labels) if indices is None else (images[indices], labels[indices])
        step = grad(loss)(current, x, y)
        current = {name: value - fl.local_lr * step[name] for name, value in current.items()}
    return tuple(current[name] - params[name] for name in params)


def local_training(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fl: FLConfig) -> tuple[torch.Tensor, ...]:
    """The client's training on its normalised ``images``: the gradient (FedSGD) or theta_K - theta_0 (FedAvg)."""
    params, buffers = model_state(model)
    schedule = minibatch_schedule(len(images), fl)
    with torch.no_grad():
        tensors = parameter_update(model, params, buffers, images, labels, fl, schedule)
    return tuple(t.detach() for t in tensors)


def client_update(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fl: FLConfig, defences: tuple[Defence, ...] = ()
) -> ClientUpdate:
    """What the client sends: the victim's weights -> local training -> each defence in turn -> the update."""
    tensors = local_training(model, images, labels, fl)
    for defence in defences:
        tensors = defence(tensors)
    return ClientUpdate(tensors, fl, len(images), tuple(defences))
