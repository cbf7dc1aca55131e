"""Batch label recovery, method against method: the bias-gradient counts and iLRG (Ma et al., "Instance-wise
Batch Label Restoration via Gradients in Federated Learning", ICLR 2023), on untrained and trained victims.

Fashion-MNIST test images at their native 28x28, consecutive batches (batch i holds images i*B .. i*B+B-1),
one FedSGD gradient each, a ConvNet as the victim: its seeded initialisation ("untrained") and the same
network trained a few epochs on a subset of the training split through gradinv.zoo ("trained", cached).
Label accuracy is gradinv.metrics.label_accuracy: the share of the batch's label multiset recovered.
A batch outside a method's conditions (gradinv.attacks.labels.applicable) counts as not applicable; the
method is run on it anyway and that accuracy is shown apart. "ilrg, paper only" is iLRG without our
least-squares refinement of the class embeddings (an ablation, not a method one can choose).

    .venv/bin/python benchmarks/label_methods.py   # 1-2 minutes on 1 thread, most of it training once
    .venv/bin/python benchmarks/label_methods.py --batches 20 --sizes 4 8 32 --epochs 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv import data, metrics, zoo
from gradinv.attacks.labels import LABEL_METHODS, applicable, classifier_parameters, ilrg_labels, recover_labels_with
from gradinv.client.update import client_update
from gradinv.parameters import ClientSettings

DATASET = "fashion-mnist"
PAPER_ONLY = "ilrg, paper only"


def recover(method: str, update, num_classes: int, model: torch.nn.Module) -> torch.Tensor:
    if method == PAPER_ONLY:
        return ilrg_labels(update, num_classes, *classifier_parameters(model, num_classes), refine_steps=0)
    return recover_labels_with(method, update, num_classes, model)


def score_batches(model: torch.nn.Module, size: int, batches: int) -> dict[str, dict[str, list[float]]]:
    """Per method, the accuracies of the batches inside and outside its conditions."""
    spec = data.dataset_spec(DATASET)
    scores = {method: {"inside": [], "outside": []} for method in (*LABEL_METHODS, PAPER_ONLY)}
    for index in range(batches):
        images01, labels = data.load_images(DATASET, list(range(index * size, (index + 1) * size)))
        update = client_update(model, data.normalise(images01, spec), labels, ClientSettings())
        for method, kept in scores.items():
            condition_of = "ilrg" if method == PAPER_ONLY else method
            where = "inside" if applicable(condition_of, size, spec.num_classes) is None else "outside"
            kept[where].append(metrics.label_accuracy(recover(method, update, spec.num_classes, model), labels))
    return scores


def cell(values: list[float]) -> str:
    """Mean accuracy, the worst batch, and how many batches came back exactly."""
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} (min {min(values):.3f}, exact {sum(v == 1 for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive, default=12, help="batches per victim and batch size")
    parser.add_argument("--sizes", type=positive, nargs="+", default=[8, 32], help="images per batch")
    parser.add_argument("--width", type=positive, default=16, help="the ConvNet's width")
    parser.add_argument("--epochs", type=positive, default=3, help="the trained victim's epochs")
    parser.add_argument("--train-subset", type=positive, default=6000, help="the trained victim's training images")
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = zoo.Recipe(DATASET, "convnet", args.width, epochs=args.epochs, train_subset=args.train_subset)
    start = time.perf_counter()
    checkpoint, trained_now = zoo.ensure(recipe)
    victims = {"untrained": recipe.untrained(), "trained": checkpoint.model()}
    accuracy, source = checkpoint.sidecar["test_accuracy"], "trained now" if trained_now else "from the cache"
    print(
        f"{DATASET} 28x28, convnet width {args.width}, FedSGD, {args.batches} batches per row; trained: "
        f"{args.epochs} epochs on {args.train_subset} images, test accuracy {accuracy:.3f} "
        f"({source}, {time.perf_counter() - start:.0f} s)\n"
    )
    print("| victim | batch | method | mean accuracy (applicable) | not applicable | accuracy when run anyway |")
    print("|---|---|---|---|---|---|")
    for victim, model in victims.items():
        for size in args.sizes:
            for method, kept in score_batches(model, size, args.batches).items():
                print(
                    f"| {victim} | {size} | {method} | {cell(kept['inside'])} | {len(kept['outside'])} | "
                    f"{cell(kept['outside'])} |"
                )
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
