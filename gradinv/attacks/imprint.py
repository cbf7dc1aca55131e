"""The malicious-server imprint attack of Fowl et al., "Robbing the Fed: Directly Obtaining Private
Data in Federated Learning with Modified Models" (ICLR 2022).

The server ships a model whose first block is an :class:`ImprintBlock`: a linear layer whose rows all
measure an image's brightness (the mean of its pixels), each minus its own threshold ``c_i``, then a
ReLU and a linear layer back to the image's shape. Its output is added to the input (a skip
connection, one of those in the authors' reference code), so the victim behind it runs unchanged on its
image shifted by a constant. Without the skip the victim sees a constant image, and a narrow ReLU
network can go dead on it and send all-zero gradients (measured: 2 of 20 width-4 ConvNets at 8x8
kept only 2 of their 7 or 8 occupied bins). Row ``i`` fires for every image brighter than ``c_i``; all
of one image's fired rows get the same gradient ``g`` (the output layer's columns are equal), so with a
mean loss over ``B`` images

    dL/dW_i = 1/B sum_{j: m(x_j) > c_i} g_j x_j,    dL/db_i = 1/B sum_{j: m(x_j) > c_i} g_j.

Subtracting consecutive rows leaves only the images whose brightness falls in ``(c_i, c_{i+1}]``; when
exactly one does, ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})`` is that image, exactly. Two or more
images in one bin come back as their ``g``-weighted mix; an image below the lowest threshold fires
no row, one above the highest fires all of them, and both are lost.

Coordinates: the block sees the model's input, i.e. normalised images, so brightness is measured
and thresholds are set in normalised coordinates, and recovered images are normalised too.

Client protocols: FedSGD (the mean-loss gradient) is exact as above; so is secure aggregation of
FedSGD clients with equal image counts (the mean is the gradient over all their images). A FedAvg
update with one local step is ``-lr`` times the gradient: the ratio is unchanged (the sign is flipped
back as :func:`gradinv.attacks.labels.last_layer` does), up to the float32 rounding of
``theta_1 - theta_0`` (see ``gain`` in :class:`ImprintBlock`). With more local steps the block's
weights and thresholds move between steps and mini-batches differ, so the read-off is only
approximate (measured, Fashion-MNIST, 64 images, 256 bins, lr 1e-4: 0.70 of the images at >= 30 dB
after one step, 0.47 after three; benchmarks/imprint_recovery.py).

Order: :func:`recover` returns the bins in brightness order, :func:`run` the strongest first; neither
is the batch's order, and the images carry no labels.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from .. import data
from ..client.update import ClientUpdate
from ..errors import require
from .base import AttackJob, AttackResult


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Each image's mean pixel value, ``[N, ...] -> [N]``: what every row of the block measures."""
    return images.flatten(1).mean(dim=1)


def brightness_thresholds(images: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins`` increasing thresholds at evenly spaced empirical quantiles (0 to 1) of the images' brightness.

    ``images``: ``[N, C, H, W]`` in the model's input (normalised) coordinates, the attacker's sample of
    the training split. The ``bins - 1`` gaps between consecutive thresholds then hold equal shares of
    the sample; images darker than the darkest or brighter than the brightest sample image are lost.
    """
    require(isinstance(bins, int) and bins >= 2, "bins", bins, "use at least 2 bins (one gap between thresholds)")
    require(
        images.dim() == 4 and len(images) >= 2,
        "images",
        tuple(images.shape),
        "pass at least 2 images shaped [N, C, H, W] to take brightness quantiles from",
    )
    values = brightness(images.double())
    levels = torch.linspace(0, 1, bins, dtype=torch.float64, device=values.device)
    return torch.quantile(values, levels).to(images.dtype)


class ImprintBlock(nn.Module):
    """Flatten -> Linear(C*H*W, bins) measuring brightness minus threshold -> ReLU -> Linear(bins, C*H*W)
    (+ the input, when ``skip``), back in the image's shape.

    ``measure``: every row is ``gain / (C*H*W)`` (the pixels' mean), the biases are ``-gain * thresholds``.
    ``spread``: every weight is ``1 / (gain * bins)``, so each image's fired rows share one gradient, and
    the added constant stays modest (the mean of its rows' excess brightness). The forward pass and the
    read-off do not depend on ``gain``, but a FedAvg update does: it is ``theta_K - theta_0`` in float32,
    so a step much smaller than a weight's own float32 spacing is lost. A small ``gain`` shrinks the
    block's weights and grows their gradients by ``1 / gain``. Measured (Fashion-MNIST, 64 images, 256
    bins, one local step at lr 1e-4; share at >= 30 dB / median PSNR): gain 1: 0 / 9 dB; 1e-3: 0.70 /
    53 dB; 1e-4: 0.72 / 90 dB; FedSGD 0.73. Too small a gain makes the block's own steps large, which
    hurts several local steps (three: 0.47 at 1e-3, 0.20 at 1e-4), hence 1e-3.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], thresholds: torch.Tensor, skip: bool = True, gain: float = 1e-3
    ):
        super().__init__()
        thresholds = torch.as_tensor(thresholds).detach().flatten()
        require(
            len(image_shape) == 3 and all(int(s) >= 1 for s in image_shape),
            "image_shape",
            tuple(image_shape),
            "give one image's shape as (channels, height, width)",
        )
        require(len(thresholds) >= 2, "bins", len(thresholds), "use at least 2 thresholds (one gap between them)")
        require(
            bool((thresholds[1:] >= thresholds[:-1]).all()),
            "thresholds",
            thresholds.tolist()[:8],
            "sort the thresholds in increasing order (brightness_thresholds does)",
        )
        require(gain > 0, "gain", gain, "use a positive gain")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.skip = skip
        size, bins = self.image_shape[0] * self.image_shape[1] * self.image_shape[2], len(thresholds)
        self.measure = nn.Linear(size, bins)
        self.spread = nn.Linear(bins, size)
        with torch.no_grad():
            self.measure.weight.fill_(gain / size)
            self.measure.bias.copy_(-gain * thresholds.to(self.measure.bias.dtype))
            self.spread.weight.fill_(1.0 / (gain * bins))
            self.spread.bias.zero_()

    @property
    def bins(self) -> int:
        return self.measure.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        out = self.spread(torch.relu(self.measure(flat)))
        return (flat + out if self.skip else out).view(-1, *self.image_shape)


def imprinted(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    thresholds: torch.Tensor,
    skip: bool = True,
    gain: float = 1e-3,
) -> nn.Sequential:
    """The malicious model the server ships: the imprint block, then ``model`` unchanged.

    The block's parameters come first, so they are the update's first two tensors (weight, bias).
    """
    block = ImprintBlock(image_shape, thresholds, skip, gain)
    reference = next(model.parameters(), None)
    if reference is not None:
        block = block.to(device=reference.device, dtype=reference.dtype)
    return nn.Sequential(block, model).train(model.training)


def shipped_model(victim: nn.Module, trial, data_root=None) -> nn.Sequential:
    """The registry's hook (gradinv.attacks.registry): the trial's victim behind an imprint block whose
    bins sit at brightness quantiles of the first ``imprint_sample`` training images, the attacker's
    declared prior. (Those may include a federation client's own images: only their brightness counts.)"""
    side = trial.side
    thresholds = _training_thresholds(
        trial.dataset, side, trial.imprint_sample, trial.imprint_bins, str(data.data_root(data_root))
    )
    channels = trial.data_spec.channels
    return imprinted(victim, (channels, side, side), thresholds)


@functools.lru_cache(maxsize=8)
def _training_thresholds(dataset: str, side: int, sample: int, bins: int, root: str) -> torch.Tensor:
    """The bins of the first ``sample`` training images (the trial checked there are that many)."""
    images01, _ = data.load_images(dataset, tuple(range(sample)), root, split="train", image_size=side)
    return brightness_thresholds(data.normalise(images01, data.dataset_spec(dataset)), bins)


def bin_differences(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``i`` minus row ``i + 1`` of the block's weight and bias gradients, in float64:
    ``[bins - 1, C*H*W]`` and ``[bins - 1]``, each holding only the images of bin ``(c_i, c_{i+1}]``."""
    if weight_grad.dim() != 2 or bias_grad.shape != weight_grad.shape[:1] or len(bias_grad) < 2:
        raise ValueError(
            f"expected the imprint block's weight [bins, C*H*W] and bias [bins] gradients with "
            f"bins >= 2, got {tuple(weight_grad.shape)} and {tuple(bias_grad.shape)}"
        )
    weight, bias = weight_grad.double(), bias_grad.double()
    return weight[:-1] - weight[1:], bias[:-1] - bias[1:]


# A bin is empty when its bias-gradient difference is rounding noise: float32 sums of up to B terms
# leave about B * 1.2e-7 of the largest |dL/db|. Measured relative to it (ConvNet, CPU): the weakest
# occupied bin 1.4e-4 (28x28, 64 images, 10 batches) and 1.4e-3 (8x8, 8 images, 20 seeds); empty bins exactly 0.
EMPTY_BIN_TOLERANCE = 1e-5


def recover(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every bin's image, flat ``[bins - 1, C*H*W]`` in the input's (normalised) coordinates, and a
    ``[bins - 1]`` mask of the bins that hold any image (the others are returned as zeros).

    ``weight_grad``/``bias_grad`` are loss gradients (a FedAvg update's sign flipped back). A bin's
    image is exact only when it is the only image whose brightness falls between the two thresholds;
    otherwise the bin returns a mix of its images weighted by their gradients.
    """
    weight_diff, bias_diff = bin_differences(weight_grad, bias_grad)
    valid = bias_diff.abs() > EMPTY_BIN_TOLERANCE * bias_grad.double().abs().max()
    safe = torch.where(valid, bias_diff, torch.ones_like(bias_diff))
    images = torch.where(valid[:, None], weight_diff / safe[:, None], torch.zeros_like(weight_diff))
    return images.to(weight_grad.dtype), valid


def choose_candidates(images: torch.Tensor, valid: torch.Tensor, strength: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of the bins' images: the valid ones with the largest ``strength`` first, padded with
    their mean (zeros, the dataset's mean image, when no bin holds anything)."""
    order = torch.where(valid, strength, torch.full_like(strength, -torch.inf)).argsort(descending=True)
    chosen = images[order[: min(count, int(valid.sum()))]]
    filler = chosen.mean(dim=0, keepdim=True) if len(chosen) else torch.zeros_like(images[:1])
    return torch.cat([chosen, filler.expand(count - len(chosen), -1)])


def imprint_block(model: nn.Module) -> ImprintBlock:
    block = next((m for m in model.modules() if isinstance(m, ImprintBlock)), None)
    if block is None:
        raise ValueError("the imprint attack needs the malicious model (gradinv.attacks.imprint.imprinted)")
    return block


def block_gradients(model: nn.Module, update: ClientUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """The imprint block's weight and bias entries of the update, as loss gradients."""
    block = imprint_block(model)
    params = list(model.parameters())
    weight_index = next(i for i, p in enumerate(params) if p is block.measure.weight)
    bias_index = next(i for i, p in enumerate(params) if p is block.measure.bias)
    sign = -1.0 if update.fl.fl == "fedavg" else 1.0  # FedAvg: theta_K - theta_0 points against the gradient
    return sign * update.tensors[weight_index], sign * update.tensors[bias_index]


def lane_images(model: nn.Module, update: ClientUpdate, image_shape: tuple[int, ...]) -> torch.Tensor:
    """One lane's ``[B, C, H, W]`` reconstruction (normalised coordinates)."""
    weight_grad, bias_grad = block_gradients(model, update)
    images, valid = recover(weight_grad, bias_grad)
    _, bias_diff = bin_differences(weight_grad, bias_grad)
    return choose_candidates(images, valid, bias_diff.abs(), image_shape[0]).view(*image_shape)


def run(job: AttackJob) -> AttackResult:
    """The registry's entry (gradinv.attacks.registry): every lane's images, read off its update.

    The bins come back strongest first, not in the batch's order, and carry no labels: score them by
    matching to the truth without labels.
    """
    start = time.perf_counter()
    images = torch.stack([lane_images(job.model, update, job.image_shape) for update in job.updates])
    lanes = len(job.updates)
    return AttackResult(images, torch.zeros(lanes, 1, device=images.device), [], time.perf_counter() - start)
