"""GradInversion's BatchNorm prior (Yin et al., "See through Gradients: Image Batch Recovery via
GradInversion", CVPR 2021) against plain inverting gradients, at the same iteration budget.

The issue's acceptance: a seeded untrained ResNet-20 as the victim, batches of 8 faces (gradinv's
bundled faces, 1 channel, resized to ``--size``), one FedSGD gradient per batch from a client that
runs BatchNorm in train mode (``client_bn train``: every forward normalises with its batch's own
statistics), labels known, one restart, the reference's other defaults. Each batch mixes both
classes: batch i holds test images 4i..4i+3 and 25+4i..25+4i+3. Compared, with the client the same:

- ``plain``: inverting gradients (cosine + TV);
- ``bn batch``: plus ``bn_prior`` x R_feat against the client batch's own BatchNorm statistics
  (GradInversion's optimistic threat model, ``bn_stats batch``);
- ``bn running``: the same weight against the model's running statistics (``bn_stats running``);
  the victim is untrained, so its running statistics are 0 and 1: a 0/1 target, not real statistics.

The weight is chosen first on a held-out batch (``--tune-batch``, not among the scored ones) from
``--weights`` by its PSNR; ``--weight`` skips that. Every number is what gradinv.trial.run_trials
scores (PSNR on [0, 1] pixels, each reconstruction matched to its truth among its label's images);
the scored batches run as lanes of one computation. The last row is the best guess an attacker makes
from the data alone (gradinv.baselines, the labels known): what any picture of a face scores.

    .venv/bin/python benchmarks/bn_prior.py    # about 10 minutes on 1 thread of a loaded 2-core CPU
    .venv/bin/python benchmarks/bn_prior.py --weight 0.01 --iterations 500 --batches 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv.trial import TrialSpec, run_trials
from gradinv.victims import Untrained

FACES_PER_CLASS = 25  # the faces test split: 25 of each class, class 1 first


def batch_images(index: int) -> tuple[int, ...]:
    """Batch ``index``: four faces of each class."""
    return tuple(range(4 * index, 4 * index + 4)) + tuple(
        range(FACES_PER_CLASS + 4 * index, FACES_PER_CLASS + 4 * index + 4)
    )


def specs(batches: list[int], args, **prior) -> list[TrialSpec]:
    return [
        TrialSpec(
            dataset="faces",
            image_size=args.size,
            model="resnet20",
            images=batch_images(b),
            client_bn="train",
            iterations=args.iterations,
            **prior,
        )
        for b in batches
    ]


def psnrs(batches: list[int], args, metric: str = "psnr", **prior) -> tuple[list[float], float]:
    """Each batch's mean PSNR (or another of run_trials' metrics), and the seconds the attack took."""
    start = time.perf_counter()
    outcomes = run_trials(specs(batches, args, **prior), victim=lambda trial: Untrained(trial).model())
    return [o.metrics[metric] if o.status == "ok" else float("nan") for o in outcomes], time.perf_counter() - start


def choose_weight(args) -> float:
    print(f"Weight on held-out batch {args.tune_batch} (bn_stats batch):\n")
    print("| bn_prior | PSNR (dB) | seconds |\n|---|---|---|")
    plain, seconds = psnrs([args.tune_batch], args)
    print(f"| 0 (plain) | {plain[0]:.2f} | {seconds:.0f} |")
    found = {}
    for weight in args.weights:
        (found[weight],), seconds = psnrs([args.tune_batch], args, bn_prior=weight, bn_stats="batch")
        print(f"| {weight:g} | {found[weight]:.2f} | {seconds:.0f} |")
    return max(found, key=found.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=positive, default=1000)
    parser.add_argument("--size", type=positive, default=16, help="image side (the faces' own: 25)")
    parser.add_argument("--batches", type=positive, default=4, help="scored batches, 0 .. N-1 (at most 6)")
    parser.add_argument("--tune-batch", type=int, default=5, help="the held-out batch the weight is chosen on")
    parser.add_argument("--weights", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--weight", type=float, help="the bn_prior weight (skips choosing it)")
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scored = list(range(args.batches))
    assert args.tune_batch not in scored and max(scored + [args.tune_batch]) < 6, "batches 0..5 hold 8 faces each"
    print(
        f"resnet20 (untrained), faces {args.size}x{args.size}, 8 per batch, FedSGD, client_bn train, labels known, "
        f"{args.iterations} iterations, 1 restart, {args.threads} thread(s)\n"
    )
    weight = args.weight if args.weight is not None else choose_weight(args)
    print(f"\nChosen bn_prior = {weight:g}. Scored batches (PSNR in dB):\n")
    rows = {
        "plain": psnrs(scored, args),
        "bn batch": psnrs(scored, args, bn_prior=weight, bn_stats="batch"),
        "bn running (0/1 target)": psnrs(scored, args, bn_prior=weight, bn_stats="running"),
    }
    print("| attack | " + " | ".join(f"batch {b}" for b in scored) + " | mean | vs plain | seconds |")
    print("|---|" + "---|" * (len(scored) + 3))
    plain_mean = statistics.mean(rows["plain"][0])
    guessed = psnrs(scored, argparse.Namespace(**{**vars(args), "iterations": 1}), metric="baseline_psnr")[0]
    for name, (values, seconds) in {**rows, "best data-only guess (no attack)": (guessed, None)}.items():
        mean = statistics.mean(values)
        cells = " | ".join(f"{v:.2f}" for v in values)
        shown = "" if seconds is None else f"{seconds:.0f}"
        print(f"| {name} | {cells} | {mean:.2f} | {mean - plain_mean:+.2f} | {shown} |")
    gain = statistics.mean(rows["bn batch"][0]) - plain_mean
    print(f"\nBar: bn batch >= plain + 1 dB: {'met' if gain >= 1 else 'NOT met'} ({gain:+.2f} dB)")


if __name__ == "__main__":
    main()
