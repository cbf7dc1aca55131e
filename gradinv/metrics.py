"""How good a reconstruction is: PSNR, SSIM, MSE, feature MSE, label accuracy, batch matching."""

from __future__ import annotations

import math
from collections import Counter

import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.image import structural_similarity_index_measure


def mse(recon01: torch.Tensor, truth01: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of ``[B, C, H, W]`` images in [0, 1]."""
    return (recon01 - truth01).pow(2).flatten(1).mean(dim=1)


def psnr(recon01: torch.Tensor, truth01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for pixels in [0, 1] (peak 1); an exact copy is +inf."""
    return 10 * torch.log10(1.0 / mse(recon01, truth01))


def ssim(recon01: torch.Tensor, truth01: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics) with a Gaussian window no wider than the image."""
    side = min(recon01.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    return structural_similarity_index_measure(
        recon01.double(),
        truth01.double(),
        data_range=1.0,
        kernel_size=kernel,
        sigma=1.5 * kernel / 11,
        reduction="none",
    ).float()


def feature_mse(model: torch.nn.Module, recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference of the model's logits on normalised images."""
    with torch.no_grad():
        return (model(recon) - model(truth)).pow(2).mean(dim=1)


def label_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """The fraction of the batch's labels recovered, as multisets (order carries no meaning)."""
    overlap = Counter(predicted.tolist()) & Counter(truth.tolist())
    return sum(overlap.values()) / len(truth)


def match_to_truth(recon01: torch.Tensor, truth01: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The order of reconstructions that pairs each with a ground-truth image at least total MSE.

    ``labels``: when the attacker knew them, reconstruction ``b`` was optimised for ``labels[b]``, the
    label of truth ``b``; it is then paired only with a truth image of that label.
    """
    cost = (recon01.unsqueeze(1) - truth01.unsqueeze(0)).pow(2).flatten(2).mean(dim=2)
    if labels is not None:
        labels = labels.to(cost.device)
        cost = cost.masked_fill(labels.unsqueeze(1) != labels.unsqueeze(0), math.inf)
    truth_index, recon_index = linear_sum_assignment(cost.t().cpu().numpy())
    order = torch.empty(len(truth01), dtype=torch.long)
    order[torch.as_tensor(truth_index)] = torch.as_tensor(recon_index)
    return order
