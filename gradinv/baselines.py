"""What an attacker reconstructs without the update: the yardstick a reconstruction score is read against.

A data-only attacker knows the dataset (a pool of its training images, never the client's and never
the attacked test split) and the labels it has, known or recovered from the update. Its best guesses
are the pool's mean image, a flat image at the pool's per-channel mean, and the mean image of each
label's class. A reconstruction leaks only by what it scores above the best of these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import data, metrics
from .errors import require
from .image_folders import is_folder, require_side


@dataclass(frozen=True)
class BaselinePool:
    """Statistics of the first ``pool_size`` training images, in [0, 1] pixels. Shared: never modify.

    An image folder's split is sorted by class (ImageFolder's order): its pool is ``pool_size`` images
    spread evenly over the split, so that every class is in it when the pool is large enough."""

    dataset: str
    side: int
    pool_size: int
    mean_image: torch.Tensor  # [C, H, W]
    channel_means: torch.Tensor  # [C]
    class_means: dict[int, torch.Tensor]  # label -> [C, H, W], for the labels the pool holds

    @classmethod
    def for_dataset(
        cls, dataset: str, image_size: int | None = None, pool_size: int = 100, data_root=None
    ) -> BaselinePool:
        """The pool for a dataset at a side length, computed once per process and then shared."""
        spec = data.dataset_spec(dataset)
        require(pool_size >= 1, "pool_size", pool_size, "use 1 or more training images")
        if is_folder(dataset):  # an image folder's own training images, as many as it holds up to pool_size
            require_side(dataset, spec.sizes, image_size)
            pool_size = min(pool_size, spec.train_images)
        return _pool(dataset, image_size or spec.size, pool_size, str(data.data_root(data_root)))

    def guesses(self, attacker_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each data-only guess for a client's batch, ``[B, C, H, W]`` per guess, one image per label."""
        labels = [int(label) for label in attacker_labels.tolist()]
        count = len(labels)
        flat = self.channel_means.view(-1, 1, 1).expand_as(self.mean_image)
        return {
            "mean_image": self.mean_image.expand(count, -1, -1, -1).clone(),
            "flat": flat.expand(count, -1, -1, -1).clone(),
            "class_mean": torch.stack([self.class_means.get(label, self.mean_image) for label in labels]),
        }


def score_baselines(guesses: dict[str, torch.Tensor], truth01: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Mean PSNR and SSIM of each guess with ``baseline_psnr``, the highest of those PSNRs; and the
    per-image PSNR of that best guess, ``[B]`` (to read each image's gain against).

    Guesses are matched to the truth at least total MSE, as the attack's reconstructions are.
    """
    scores, per_image = {}, {}
    for name, guess in guesses.items():
        guess = guess.to(truth01.device, truth01.dtype)
        guess = guess[metrics.match_to_truth(guess, truth01)]
        per_image[name] = metrics.psnr(guess, truth01)
        scores[f"baseline_psnr_{name}"] = float(per_image[name].mean())
        scores[f"baseline_ssim_{name}"] = float(metrics.ssim(guess, truth01).mean())
    best = max(guesses, key=lambda name: scores[f"baseline_psnr_{name}"])
    scores["baseline_psnr"] = scores[f"baseline_psnr_{best}"]
    return scores, per_image[best]


@functools.cache
def _pool(dataset: str, side: int, pool_size: int, root: str) -> BaselinePool:
    available = len(data.open_dataset(dataset, root, split="train", image_size=side))
    require(pool_size <= available, "pool_size", pool_size, f"use 1 to {available}, the training images of {dataset}")
    # a built-in split is in no class order: its first images; an image folder's: spread over the split
    spread = is_folder(dataset) and pool_size < available
    indices = tuple(i * available // pool_size for i in range(pool_size)) if spread else tuple(range(pool_size))
    images, labels = data.load_images(dataset, indices, root, split="train", image_size=side)
    class_means = {int(label): images[labels == label].mean(dim=0) for label in labels.unique()}
    return BaselinePool(dataset, side, pool_size, images.mean(dim=0), images.mean(dim=(0, 2, 3)), class_means)
