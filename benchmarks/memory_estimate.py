"""Memory: gradinv.memory's estimate of a trial against the peak resident memory of a real one.

Each case runs in a fresh process (torch loaded, one thread, the untrained victim): its peak RSS
(``ru_maxrss``) is the measurement; the estimate is ``gradinv.memory.trial_bytes``, which counts the
worker process too. A run refuses a trial whose estimate exceeds the machine's memory and asks Ray
for it as each task's ``memory``, so the estimate must not fall below the measurement (ratio >= 1)
and should stay within about twice it.

    .venv/bin/python benchmarks/memory_estimate.py                 # the default cases
    .venv/bin/python benchmarks/memory_estimate.py --cases all     # every case
    .venv/bin/python benchmarks/memory_estimate.py --cases tiny    # the smallest run (one case)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys

from arguments import positive

BASE = {"dataset": "fashion-mnist", "model": "convnet", "width": 32, "images": [0]}
CASES = {  # name -> (trial settings over BASE, lanes in the pack)
    "tiny": ({"dataset": "faces", "width": 2, "image_size": 8}, 1),
    "quickstart": ({}, 1),  # ConvNet 32 on one 28x28 image, FedSGD
    "images4": ({"images": [0, 1, 2, 3]}, 1),
    "restarts4": ({"width": 64, "images": [0, 1, 2, 3], "restarts": 4}, 1),
    "side112": ({"image_size": 112}, 1),
    "fedavg8": ({"fl": "fedavg", "local_steps": 8}, 1),
    "fedavg2000": ({"width": 2, "image_size": 8, "fl": "fedavg", "local_steps": 2000}, 1),
    "lanes4": ({}, 4),
    "resnet20": ({"model": "resnet20", "width": 1, "images": [0, 1]}, 1),
    "dlg": ({"attack": "dlg", "images": [0, 1]}, 1),
    "imprint50k": ({"attack": "imprint", "threat_model": "malicious", "width": 8, "imprint_bins": 50_000}, 1),
}
DEFAULT = ("tiny", "quickstart", "restarts4", "fedavg8", "imprint50k")


def spec_of(settings: dict):
    from gradinv.trial import TrialSpec

    merged = {**BASE, **settings}
    return TrialSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})


def one_trial(settings: dict, lanes: int, iterations: int) -> dict:
    """In this (fresh) process: the trial's lanes as one computation; peak RSS before and after, in bytes."""
    import torch

    from gradinv.trial import run_trials
    from gradinv.victims import Untrained

    torch.set_num_threads(1)
    spec = dataclasses.replace(spec_of(settings), iterations=iterations)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    specs = [dataclasses.replace(spec, attack_seed=lane) for lane in range(lanes)]
    outcome = run_trials(specs, victim=lambda trial: Untrained(trial).model())[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before": before, "peak": peak, "status": outcome.status}


def measure(name: str, iterations: int) -> dict:
    settings, lanes = CASES[name]
    code = f"import json, memory_estimate as m; print(json.dumps(m.one_trial({settings!r}, {lanes}, {iterations})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=sys.path[0], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[*CASES, "all"],
        default=list(DEFAULT),
        metavar="CASE",
        help=f"cases to run, or all (default: {' '.join(DEFAULT)}; all: {' '.join(CASES)})",
    )
    parser.add_argument("--iterations", type=positive, default=2, help="attack iterations per trial")
    args = parser.parse_args()
    from gradinv import memory

    names = list(CASES) if "all" in args.cases else args.cases
    print("| case | lanes | estimate | measured peak RSS | ratio | trial's own: estimate | measured | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        settings, lanes = CASES[name]
        estimate = memory.trial_bytes(spec_of(settings), lanes)
        found = measure(name, args.iterations)
        own_estimate, own = estimate - memory.PROCESS, found["peak"] - found["before"]
        print(
            f"| {name} | {lanes} | {memory.human(estimate)} | {memory.human(found['peak'])} | "
            f"{estimate / found['peak']:.2f} | {memory.human(own_estimate)} | {memory.human(own)} | "
            f"{own_estimate / max(own, 1):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
