"""Lane agreement: the same trials packed into lanes and run one at a time reach the same PSNR.

Packed runs sum their per-run costs before one backward pass, so their signed steps can part ways
with the single runs through summation order; outcomes must agree in distribution, not bit for bit.
This prints each trial's PSNR both ways, the mean difference and the largest per-trial gap.

    .venv/bin/python benchmarks/lane_agreement.py [--trials 8] [--iterations 300] [--fl fedavg]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec, run_trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive, default=8)
    parser.add_argument("--iterations", type=positive, default=300)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--fl", default="fedsgd", choices=["fedsgd", "fedavg"])
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fl = dict(fl="fedavg", local_steps=3, local_lr=1e-3) if args.fl == "fedavg" else {}
    try:
        base = TrialSpec(dataset=args.dataset, model=args.model, width=args.width, iterations=args.iterations, **fl)
        specs = [dataclasses.replace(base, images=(i,), attack_seed=i) for i in range(args.trials)]
    except ConfigError as error:
        parser.error(str(error))
    packed = [outcome.metrics["psnr"] for outcome in run_trials(specs)]
    alone = [run_trials([spec])[0].metrics["psnr"] for spec in specs]
    gaps = [p - a for p, a in zip(packed, alone)]
    print(
        f"{args.trials} trials, {args.model} width {args.width}, {args.dataset}, {args.fl}, "
        f"{args.iterations} iterations; PSNR in dB\n"
    )
    print(f"{'trial':>6}{'packed':>10}{'alone':>10}{'gap':>10}")
    for trial, (p, a, gap) in enumerate(zip(packed, alone, gaps)):
        print(f"{trial:>6}{p:>10.2f}{a:>10.2f}{gap:>+10.2f}")
    print(
        f"\nmean packed {statistics.mean(packed):.2f} dB, mean alone {statistics.mean(alone):.2f} dB, "
        f"mean difference {statistics.mean(gaps):+.2f} dB, largest per-trial gap {max(map(abs, gaps)):.2f} dB"
    )


if __name__ == "__main__":
    main()
