"""Exact recovery of the input to a fully connected layer with bias (Geiping et al., Prop. 3.1)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..client.update import ClientUpdate
from .base import AttackJob, AttackResult


def linear_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """For one image, dL/dW_i = dL/db_i * x for every row i, so x = dL/dW_i / dL/db_i.

    The row with the largest |dL/db_i| is the best conditioned.
    """
    row = int(bias_grad.abs().argmax())
    if bias_grad[row] == 0:
        raise ValueError("every bias gradient of the layer is zero (all its units inactive): nothing to recover")
    return weight_grad[row] / bias_grad[row]


def first_linear_input(model: nn.Module, update: ClientUpdate) -> torch.Tensor:
    """The flattened input of the model's first layer, if that layer is fully connected with bias."""
    first_module = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if not isinstance(first_module, nn.Linear) or first_module.bias is None:
        raise ValueError("the analytic attack needs a model whose first layer is fully connected with a bias (mlp)")
    params = list(model.parameters())
    weight_index = next(i for i, p in enumerate(params) if p is first_module.weight)
    bias_index = next(i for i, p in enumerate(params) if p is first_module.bias)
    return linear_input(update.tensors[weight_index], update.tensors[bias_index])


def run(job: AttackJob) -> AttackResult:
    """The registry's entry (gradinv.attacks.registry): every lane's image, read off its update."""
    start = time.perf_counter()
    flat = torch.stack([first_linear_input(job.model, update) for update in job.updates])
    lanes = len(job.updates)
    return AttackResult(flat.view(lanes, *job.image_shape), torch.zeros(lanes, 1), [], time.perf_counter() - start)
