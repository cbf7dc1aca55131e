"""Time to leak: one-core seconds until the median gain over the images first clears +8 dB, for the
quickstart's untrained and trained Fashion-MNIST victims, the quickstart's recipe before the stronger
recipes (1,000 iterations of lr 0.3, cosine decay, uniform starts) against its recipe now for the
victim's FedSGD setting (studies/quickstart.yaml: `fixed`, and the budget its `zip` gives the setting),
measured in one run.

Each victim and recipe attacks the images as lanes of one computation (FedSGD, one image per client,
labels known, one restart), like `make demo`; at every checkpoint of the attack's curve the clock is
read and each image's gain over the best data-only guess (gradinv.baselines) computed; the time to leak
is the clock at the first checkpoint whose median gain is at least the bar. "never" means the bar was
not cleared within the recipe's budget (the last median is shown).

    .venv/bin/python benchmarks/time_to_leak.py             # about 15 minutes on 1 thread
    .venv/bin/python benchmarks/time_to_leak.py --images 3 --victims 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv.trial import TrialSpec, run_trials

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.yaml"
BEFORE = {  # the quickstart's recipe before issue 27, at the budget where its trained victim leaked
    "model": "convnet",
    "width": 32,
    "iterations": 1000,
    "restarts": 1,
    "tv": 1e-4,
    "lr": 0.3,
    "decay": "cosine",
    "init": "rand",
    "train_subset": 1000,
}


def recipe_now(trained_epochs: int) -> dict:
    """The quickstart's recipe for the victim's FedSGD setting of one image per client: its `fixed` section and
    what its `zip` sets there (the budget)."""
    study = yaml.safe_load(QUICKSTART.read_text())
    zipped = study.get("zip", {})
    setting = {"trained_epochs": trained_epochs, "fl": "fedsgd", "images_per_client": 1}
    at = next(i for i in range(len(zipped["fl"])) if all(zipped[k][i] == v for k, v in setting.items()))
    chosen = {k: values[at] for k, values in zipped.items() if k not in (*setting, "local_steps")}
    return {**study["fixed"], **chosen}


def time_to_leak(recipe: dict, trained_epochs: int, args) -> tuple[float | None, float, int, float]:
    """(seconds until the median gain first reaches the bar or None, the last median gain, the iterations
    run, the seconds in all)."""
    specs = [
        TrialSpec(dataset="fashion-mnist", images=(i,), trained_epochs=trained_epochs, **recipe)
        for i in range(args.images)
    ]
    clock: list[tuple[float, list[float]]] = []
    start = time.perf_counter()
    outcomes = run_trials(
        specs, on_checkpoint=lambda _, __, quality: clock.append((time.perf_counter() - start, [q[0] for q in quality]))
    )
    total = time.perf_counter() - start
    guesses = [o.metrics["psnr"] - o.metrics["psnr_gain"] for o in outcomes]  # each image's best data-only guess
    medians = [(seconds, statistics.median(p - g for p, g in zip(psnrs, guesses))) for seconds, psnrs in clock]
    leaked = next((seconds for seconds, median in medians if median >= args.bar), None)
    iterations = max(o.curve[-1][0] for o in outcomes if o.curve)
    return leaked, medians[-1][1], iterations, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive, default=6, help="test images 0 .. N-1, one per client")
    parser.add_argument("--victims", type=int, nargs="+", default=[0, 10], help="trained epochs (0: untrained)")
    parser.add_argument("--bar", type=float, default=8.0, help="the median gain that counts as leaking (dB)")
    parser.add_argument("--before-iterations", type=positive, default=BEFORE["iterations"])
    parser.add_argument("--at-most", type=positive, help="cap every recipe's iterations (a quick look, not the bar)")
    parser.add_argument("--width", type=positive, help="the ConvNet's width (default: the recipes')")
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = {
        epochs: {"before": {**BEFORE, "iterations": args.before_iterations}, "now": recipe_now(epochs)}
        for epochs in args.victims
    }
    for epochs, pair in recipes.items():
        for name, recipe in pair.items():
            if args.at_most:
                recipe["iterations"] = min(recipe["iterations"], args.at_most)
                recipe.pop("max_iterations", None)
            if args.width:
                recipe["width"] = args.width
            print(f"trained {epochs} epochs, {name}: " + ", ".join(f"{k} {v}" for k, v in recipe.items()))
    setting = f"Fashion-MNIST, FedSGD, {args.images} images, {args.threads} thread(s)"
    print(f"\n{setting}, bar: median gain >= {args.bar:g} dB\n")
    print("| victim | recipe | time to leak (s) | iterations run | last median gain | seconds in all | now / before |")
    print("|---|---|---|---|---|---|---|")
    for epochs in args.victims:
        victim = "untrained" if epochs == 0 else f"trained {epochs} epochs"
        found = {name: time_to_leak(recipe, epochs, args) for name, recipe in recipes[epochs].items()}
        for name, (leaked, last, iterations, total) in found.items():
            shown = "never" if leaked is None else f"{leaked:.0f}"
            before, now = found["before"][0], found["now"][0]
            ratio = f"{now / before:.2f}" if name == "now" and before and now else ""
            print(f"| {victim} | {name} | {shown} | {iterations} | {last:+.2f} | {total:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
