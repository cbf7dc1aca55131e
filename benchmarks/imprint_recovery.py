"""Imprint recovery (Fowl et al., "Robbing the Fed"): how many of a batch's images the malicious
imprint block hands back, by number of bins.

Batches of Fashion-MNIST test images at their native 28x28, the quickstart's ConvNet (width 32)
behind the imprint block, brightness thresholds at quantiles of training images, one client update
(FedSGD by default). Reconstructions are matched to the truth (gradinv.metrics.match_to_truth,
without labels) and scored by PSNR on [0, 1] pixels. "alone" is the share of the batch whose
brightness falls alone between two thresholds: the images the attack can recover exactly.

    .venv/bin/python benchmarks/imprint_recovery.py [--bins 128 256] [--batches 3] [--batch 64]
    .venv/bin/python benchmarks/imprint_recovery.py --fl fedavg --local-steps 1
"""

from __future__ import annotations

import argparse
import statistics

import torch
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv import data, metrics
from gradinv.attacks.imprint import brightness_thresholds, imprinted, lane_images
from gradinv.client.update import client_update
from gradinv.models import build_model
from gradinv.parameters import ClientSettings

DATASET = "fashion-mnist"


def alone_share(block, images: torch.Tensor) -> float:
    """The share of images that are the only one in their bin (between two consecutive thresholds)."""
    with torch.no_grad():
        bin_of = (block.measure(images.flatten(1)) > 0).sum(dim=1) - 1  # fires rows 0..k: bin k
    inside = (bin_of >= 0) & (bin_of < block.bins - 1)  # -1: below all thresholds, bins - 1: above all
    counts = torch.bincount(bin_of[inside], minlength=block.bins)
    return float((inside & (counts[bin_of.clamp(min=0)] == 1)).float().mean())


def attack_batch(
    batch: int,
    start: int,
    bins: int,
    thresholds_from: torch.Tensor,
    fl: ClientSettings,
    width: int,
    gain: float,
    seed: int,
):
    """(alone share, per-image PSNR) for test images ``start .. start + batch``."""
    spec = data.dataset_spec(DATASET)
    images01, labels = data.load_images(DATASET, list(range(start, start + batch)))
    images = data.normalise(images01, spec)
    victim = build_model(
        "convnet", channels=1, num_classes=spec.num_classes, image_size=spec.size, width=width, seed=seed
    )
    model = imprinted(victim, tuple(images.shape[1:]), brightness_thresholds(thresholds_from, bins), gain=gain)
    update = client_update(model, images, labels, fl)
    recon01 = data.denormalise(lane_images(model, update, tuple(images.shape)), spec).clamp(0, 1)
    matched = recon01[metrics.match_to_truth(recon01, images01)]
    return alone_share(model[0], images), metrics.psnr(matched, images01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=positive, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=positive, default=3)
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--train-sample", type=positive, default=1000, help="training images for the thresholds")
    parser.add_argument("--width", type=positive, default=32)
    parser.add_argument("--fl", default="fedsgd", choices=["fedsgd", "fedavg"])
    parser.add_argument("--local-steps", type=positive, default=1)
    parser.add_argument("--local-lr", type=float, default=1e-4)
    parser.add_argument("--gain", type=float, default=1e-3, help="the imprint block's gain (ImprintBlock)")
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    if min(args.bins) < 2:
        parser.error("--bins: use at least 2 bins")
    if args.gain <= 0:
        parser.error("--gain: use a positive gain")
    torch.set_num_threads(args.threads)
    spec = data.dataset_spec(DATASET)
    sample01, _ = data.load_images(DATASET, list(range(args.train_sample)), split="train")
    sample = data.normalise(sample01, spec)
    fedavg = dict(fl="fedavg", local_steps=args.local_steps, local_lr=args.local_lr)
    fl = ClientSettings(**fedavg) if args.fl == "fedavg" else ClientSettings()
    steps = f" ({args.local_steps} local steps, lr {args.local_lr:g})" if args.fl == "fedavg" else ""
    print(
        f"{DATASET} 28x28, convnet width {args.width}, {args.batch} images per batch, {args.fl}{steps}, "
        f"gain {args.gain:g}, thresholds from {args.train_sample} training images; PSNR in dB on [0, 1] pixels\n"
    )
    print(f"{'bins':>6}{'batch':>7}{'images':>11}{'alone':>8}{'>=30 dB':>9}{'median':>9}")
    for bins in args.bins:
        shares, medians = [], []
        for index in range(args.batches):
            start = index * args.batch
            alone, psnr = attack_batch(args.batch, start, bins, sample, fl, args.width, args.gain, seed=index)
            shares.append(float((psnr >= 30).float().mean()))
            medians.append(float(psnr.median()))
            span = f"{start}-{start + args.batch - 1}"
            print(f"{bins:>6}{index:>7}{span:>11}{alone:>8.2f}{shares[-1]:>9.2f}{medians[-1]:>9.1f}")
        print(
            f"{bins:>6}{'mean':>7}{'':>11}{'':>8}{statistics.mean(shares):>9.2f}{statistics.mean(medians):>9.1f}"
            f"   (min share {min(shares):.2f})\n"
        )


if __name__ == "__main__":
    main()
