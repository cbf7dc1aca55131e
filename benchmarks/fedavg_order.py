"""FedAvg's realistic attacker: the attack that does not know the client's mini-batch order against the one that does.

Dimitrov et al. ("Data Leakage in Federated Averaging", TMLR 2022): a real server does not know how the
client shuffled its images into mini-batches. ``attacker_order: unknown`` unrolls the same local steps over
its candidates in index order, the same slices every epoch (one candidate per image); with ``epoch_prior``
each epoch unrolls candidates of its own, tied by Dimitrov et al.'s order-invariant epoch prior ("own per
epoch"); ``known`` (the default) unrolls the client's own order. Each client holds ``--images-per-client``
images and trains in mini-batches of 2 for 1 or 2 local epochs; each (victim, local lr, epochs) row gives
the median ``psnr_gain`` over the clients for the three attackers (one epoch has no epochs to tell apart:
there the last is the second), and how far the unknown-order attacker's prediction at the client's true
images is from the update sent (1 - cosine over all parameters; the known-order one is exactly 0 there):
how much the order matters before any attack runs. The study-like settings are the quickstart's.

    .venv/bin/python benchmarks/fedavg_order.py [--iterations 300] [--clients 2] [--local-lrs 1e-4 1e-2]
        [--epoch-prior 0.01]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from arguments import positive, positive_number  # benchmarks/ is on sys.path when a script runs

from gradinv import data
from gradinv.client.defences import attacker_update, sent_update
from gradinv.client.update import minibatch_schedule, model_state
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec, run_trials
from gradinv.trial.run import cached_victim
from gradinv.victims import victim_source

ATTACKERS = ("known", "unknown", "own per epoch")  # the last: attacker_order unknown with epoch_prior


def cost_at_truth(spec: TrialSpec) -> float:
    """1 - cos between the update the client sent and the unknown-order attacker's prediction at the
    client's own images and labels (over every parameter together)."""
    model = cached_victim(spec).eval()
    images01, labels, _ = victim_source(spec).client_images()
    images = data.normalise(images01, spec.data_spec)
    sent = sent_update(model, images, labels, spec)
    predicted = attacker_update(spec, sent)(model, *model_state(model), images, labels)
    flat = [torch.cat([t.flatten() for t in tensors]).double() for tensors in (sent.tensors, predicted)]
    return 1 - torch.nn.functional.cosine_similarity(*flat, dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--image-size", type=positive, default=None)
    parser.add_argument("--width", type=positive, default=32)
    parser.add_argument("--iterations", type=positive, default=300)
    parser.add_argument("--victims", type=int, nargs="+", default=[0, 10], help="trained_epochs of each victim")
    parser.add_argument("--train-subset", type=positive, default=1000)
    parser.add_argument("--epochs", type=positive, nargs="+", default=[1, 2], help="local epochs")
    parser.add_argument("--local-lrs", type=float, nargs="+", default=[1e-4, 1e-2])
    parser.add_argument("--batch", type=positive, default=2, help="local_batch_size")
    parser.add_argument("--images-per-client", type=positive, default=4)
    parser.add_argument("--clients", type=positive, default=2, help="client k holds the next images in order")
    parser.add_argument(
        "--order-seeds",
        type=int,
        nargs="+",
        default=[1, 4],
        help="data_order_seed of client k: the k-th (in turn); the defaults pair each client's images otherwise "
        "than the index order already in the first epoch (seed 0 pairs 4 images as the index order does)",
    )
    parser.add_argument("--epoch-prior", type=positive_number, default=0.01, help="own per epoch: epoch_prior")
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    per_client = args.images_per_client
    settings = dict(
        dataset=args.dataset,
        image_size=args.image_size,
        model="convnet",
        width=args.width,
        iterations=args.iterations,
        lr=0.3,
        decay="cosine",
        init="rand",
        tv=1e-4,
        fl="fedavg",
        local_batch_size=args.batch,
    )
    cells = {}  # (victim, local lr, epochs) -> order -> the clients' trials
    try:
        for victim in args.victims:
            trained = dict(trained_epochs=victim, train_subset=args.train_subset) if victim else {}
            for local_lr in args.local_lrs:
                for epochs in args.epochs:
                    steps = epochs * -(-per_client // args.batch)
                    base = TrialSpec(**settings, **trained, local_lr=local_lr, local_steps=steps)
                    knows = {
                        "known": dict(attacker_order="known"),
                        "unknown": dict(attacker_order="unknown"),
                        "own per epoch": dict(
                            attacker_order="unknown", epoch_prior=args.epoch_prior if epochs > 1 else 0
                        ),
                    }
                    cells[victim, local_lr, epochs] = {
                        attacker: [
                            dataclasses.replace(
                                base,
                                images=tuple(range(k * per_client, (k + 1) * per_client)),
                                data_order_seed=args.order_seeds[k % len(args.order_seeds)],
                                **knows[attacker],
                            )
                            for k in range(args.clients)
                        ]
                        for attacker in ATTACKERS
                    }
    except ConfigError as error:
        parser.error(str(error))
    seeds = ", ".join(str(args.order_seeds[k % len(args.order_seeds)]) for k in range(args.clients))
    for k, spec in enumerate(next(iter(cells.values()))["known"]):
        batches = [b.tolist() for b in minibatch_schedule(per_client, spec.fl_config())]
        print(f"client {k}: images {list(spec.images)}, its first epoch's mini-batches (positions) {batches}")
    start = time.perf_counter()
    rows = []
    for (victim, local_lr, epochs), trials in cells.items():
        gains = {
            attacker: [run_trials([spec])[0].metrics.get("psnr_gain", float("nan")) for spec in specs]  # own seeds
            for attacker, specs in trials.items()
            if attacker != "own per epoch" or epochs > 1
        }
        gains.setdefault("own per epoch", gains["unknown"])
        costs = [cost_at_truth(spec) for spec in trials["unknown"]]
        rows.append((victim, local_lr, epochs, gains, costs))
        print(f"  ... victim e{victim}, local lr {local_lr:g}, {epochs} epoch(s): {time.perf_counter() - start:.0f} s")
    print(
        f"\n{args.dataset}, convnet width {args.width}, {args.iterations} iterations (lr 0.3, cosine, init rand, "
        f"tv 1e-4), FedAvg in mini-batches of {args.batch}, {args.clients} client(s) of {per_client} images "
        f"(images 0..{args.clients * per_client - 1}), data_order_seed {seeds}, {args.threads} thread(s), "
        f"{time.perf_counter() - start:.0f} s; median psnr_gain over the clients in dB (each client's)\n"
    )
    print(
        "| victim | local lr | epochs | known order | unknown order | "
        f"own per epoch (epoch_prior {args.epoch_prior:g}) | unknown − known | 1 − cos at the truth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for victim, local_lr, epochs, gains, costs in rows:
        known, unknown, own = (statistics.median(gains[attacker]) for attacker in ATTACKERS)
        shown = {attacker: " / ".join(f"{g:+.2f}" for g in gains[attacker]) for attacker in ATTACKERS}
        name = "untrained" if victim == 0 else f"trained {victim} epochs"
        print(
            f"| {name} | {local_lr:g} | {epochs} | {known:+.2f} ({shown['known']}) | "
            f"{unknown:+.2f} ({shown['unknown']}) | {own:+.2f} ({shown['own per epoch']}) | {unknown - known:+.2f} | "
            f"{statistics.median(costs):.2e} |"
        )


if __name__ == "__main__":
    main()
