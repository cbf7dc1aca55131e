"""Reference defaults: the attack's mean PSNR with the reference's settings against gradinv's former ones.

The former defaults differ in two settings: the step decay fell at exactly 3/8, 5/8 and 7/8 of the
iterations (``decay: step-eighths``) and the first images were clamped into the pixel box
(``clamp_init: true``). Each image is attacked both ways from the same seed; this prints each image's
PSNR both ways, the mean of each, the mean paired difference with its standard error, and how many
images gained.

    .venv/bin/python benchmarks/reference_defaults.py [--images 24] [--iterations 300] [--width 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec, run_trials

FORMER = dict(decay="step-eighths", clamp_init=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive, default=24)
    parser.add_argument("--iterations", type=positive, default=300)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--width", type=positive, default=16)
    parser.add_argument("--lanes", type=positive, default=8, help="trials per computation")
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        base = TrialSpec(dataset=args.dataset, model="convnet", width=args.width, iterations=args.iterations)
        reference = [dataclasses.replace(base, images=(i,), attack_seed=i) for i in range(args.images)]
        former = [dataclasses.replace(spec, **FORMER) for spec in reference]
    except ConfigError as error:
        parser.error(str(error))
    start = time.perf_counter()
    scores = {}
    for name, specs in (("reference", reference), ("former", former)):
        packs = [specs[i : i + args.lanes] for i in range(0, len(specs), args.lanes)]
        scores[name] = [outcome.metrics["psnr"] for pack in packs for outcome in run_trials(pack)]
    differences = [r - f for r, f in zip(scores["reference"], scores["former"])]
    mean = statistics.mean(differences)
    stderr = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    print(
        f"{args.images} {args.dataset} images, convnet width {args.width}, {args.iterations} iterations, "
        f"{args.threads} thread(s), {time.perf_counter() - start:.0f} s; PSNR in dB\n"
    )
    print(f"{'image':>6}{'reference':>11}{'former':>9}{'diff':>8}")
    for image, (r, f, d) in enumerate(zip(scores["reference"], scores["former"], differences)):
        print(f"{image:>6}{r:>11.2f}{f:>9.2f}{d:>+8.2f}")
    print(
        f"\nmean PSNR: reference defaults {statistics.mean(scores['reference']):.2f} dB, former "
        f"{statistics.mean(scores['former']):.2f} dB; paired difference {mean:+.2f} dB (standard error "
        f"{stderr:.2f}); {sum(d > 0 for d in differences)} of {len(differences)} images higher"
    )


if __name__ == "__main__":
    main()
