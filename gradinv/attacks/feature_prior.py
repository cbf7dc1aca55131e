"""The feature prior of breaching's modern recipe (Geiping et al., "breaching", 2022): the classifier's input
for each image, read off the update, against the candidate's.

A classifier ``logits = W f + b`` trained on cross-entropy has, for one image, ``dL/dW = g f^T`` and
``dL/db = g``: any row ``c`` with ``g_c != 0`` gives the image's features ``f = dW_c / db_c`` exactly. With
several images, the row of an image's label is dominated by that image (its ``g_c`` is about ``p_c - 1``,
the others' ``p_c``), so ``dW_c / db_c`` reads its features approximately; images sharing a label read the
same mixture. A FedAvg update sums such rows over its local steps, and the ratio reads a weighted mean of
the features along them. The candidate's features come from the forward the client runs (``client_bn``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..client.update import ClientUpdate, batch_norm_mode
from ..errors import require

READER = ("feature_prior", "> 0", "0")  # the setting that reads the classifier, its value, and its off value


def classifier(model: nn.Module, knob: tuple[str, str, str] = READER) -> tuple[nn.Linear, int, int]:
    """The model's last linear layer with a bias, and its weight's and bias's positions among the parameters.
    ``knob``: the setting that reads it, as :data:`READER`, for the error."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    field, value, off = knob
    require(len(linears) > 0, field, value, f"the model has no linear classifier with a bias; use {field} {off}")
    last = linears[-1]
    ids = [id(p) for p in model.parameters()]
    return last, ids.index(id(last.weight)), ids.index(id(last.bias))


def read_features(weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, F]``: each image's features from its label's rows of a classifier update (weight ``[K, F]``,
    bias ``[K]``). A certain victim's label entry rounds to exactly 0 (its softmax rounds to 1), while the
    other classes' tiny entries still read the features exactly: such a label reads the row of the largest
    entry instead. Zeros where the whole bias gradient is 0."""
    largest = bias.abs().argmax().expand_as(labels)
    labels = torch.where(bias[labels] == 0, largest, labels)
    rows, entries = weight[labels], bias[labels]
    safe = torch.where(entries == 0, torch.ones_like(entries), entries)
    return torch.where((entries == 0)[:, None], torch.zeros_like(rows), rows / safe[:, None])


def read_output_gradients(model: nn.Module, updates, unit: bool) -> torch.Tensor:
    """Each update's loss gradient at the logits, ``[L, 1, K]``: its classifier bias gradient, which for
    FedSGD on one image is the client's dL/dz exactly (R-GAP's first step, Zhu and Blaschko 2021). ``unit``:
    scaled to norm 1 (for a cost blind to scale), so that a certain victim's 1e-24 stays clear of float32's
    floor in the candidate's update."""
    _, _, bias_at = classifier(model, ("output_gradient", "read", "computed"))
    read = torch.stack([u.tensors[bias_at] for u in updates])[:, None, :]
    if not unit:
        return read
    return read / read.flatten(1).norm(dim=1).clamp_min(torch.finfo(read.dtype).tiny)[:, None, None]


class FeaturePrior:
    """Per run, the squared distance of the candidate's classifier inputs to those read off the update, over
    the read features' squared norm: ``[N]`` from images ``[N, B, C, H, W]``, batched over runs by ``vmap``."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        updates: list[ClientUpdate],
        labels: torch.Tensor,
        per_run,
    ):
        layer, weight_at, bias_at = classifier(model)
        read = torch.stack(
            [read_features(u.tensors[weight_at], u.tensors[bias_at], lane) for u, lane in zip(updates, labels)]
        )
        self.targets = per_run(read)  # [N, B, F]
        self.scales = self.targets.flatten(1).square().sum(1).clamp_min(torch.finfo(read.dtype).tiny)
        client_bn = updates[0].fl.client_bn

        def features(x):  # x [B, C, H, W] -> the classifier's input [B, F]
            seen = []
            handle = layer.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
            try:
                with batch_norm_mode(model, client_bn):
                    functional_call(model, (params, buffers), (x,))
            finally:
                handle.remove()
            return seen[0].flatten(1)

        self.features = features
        self.batched = vmap(features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        candidate = self.features(x[0]).unsqueeze(0) if len(x) == 1 else self.batched(x)
        return (candidate - self.targets).flatten(1).square().sum(1) / self.scales
