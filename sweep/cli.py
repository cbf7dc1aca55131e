"""The `gradinv` command line. User mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from analysis import cli as analysis_cli
from gradinv.errors import ConfigError

from . import tuning

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, not a usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _add_trial_flags(parser: argparse.ArgumentParser) -> None:
    from gradinv.trial import DEFAULTS

    add = parser.add_argument
    add("--dataset", default=DEFAULTS["dataset"], help="fashion-mnist, faces, photos, mnist, cifar10, cifar100, imagenet")
    add("--data-root", default=None, help="dataset root (default $GRADINV_DATA)")
    add("--image", type=int, action="append", dest="images", metavar="INDEX", help="a client image (repeatable)")
    add("--image-size", type=int, default=None, help="resize images to this side length")
    add("--labels", default=DEFAULTS["labels"], help="known or recovered")
    add("--model", default=DEFAULTS["model"])
    add("--width", type=int, default=None)
    add("--model-seed", type=int, default=DEFAULTS["model_seed"])
    add("--trained-epochs", type=int, default=DEFAULTS["trained_epochs"], help="0: untrained; else from the zoo")
    add("--train-subset", type=int, default=None, help="trained victims: the first N training images")
    add("--cache", default=None, help="checkpoint cache (default $GRADINV_CACHE)")
    add("--fl", default=DEFAULTS["fl"], help="fedsgd or fedavg")
    add("--local-steps", type=int, default=DEFAULTS["local_steps"])
    add("--local-lr", type=float, default=DEFAULTS["local_lr"])
    add("--local-batch-size", type=int, default=DEFAULTS["local_batch_size"], help="0: all images per step")
    add("--data-order-seed", type=int, default=DEFAULTS["data_order_seed"])
    add("--batch-order", default=DEFAULTS["batch_order"], help="shuffled or sequential (the reference's fixed slices)")
    add("--attack", default=DEFAULTS["attack"], help="ig, dlg or analytic")
    add("--iterations", type=int, default=DEFAULTS["iterations"])
    add("--restarts", type=int, default=DEFAULTS["restarts"])
    add("--tv", type=float, default=DEFAULTS["tv"])
    add("--lr", type=float, default=DEFAULTS["lr"], help="Adam's step size")
    add("--cost", default=DEFAULTS["cost"], help="cosine, l2, l1, max or simlocal")
    add("--decay", default=DEFAULTS["decay"], help="step, step-eighths, cosine or none")
    add("--init", default=DEFAULTS["init"], help="randn, rand or zeros")
    switch = argparse.BooleanOptionalAction
    add("--clamp-init", action=switch, default=DEFAULTS["clamp_init"], help="project the first images into the pixel box")
    add("--layer-weighting", default=DEFAULTS["layer_weighting"], help="equal, linear or exp")
    add("--layers", default=None, metavar="I,J,.. | SET",
        help="parameter indices to match (--layers=-1,-2 for negative ones) or a named set (last5, top10, batch, ...)")
    add("--signed", action=switch, default=DEFAULTS["signed"], help="step on the gradient's sign")
    add("--boxed", action=switch, default=DEFAULTS["boxed"], help="keep pixels in the valid box")
    add("--median-filter", action=switch, default=DEFAULTS["median_filter"], help="3x3 median filter every 500 iterations")
    add("--optimizer", default=DEFAULTS["optimizer"], help="adam, sgd or lbfgs")
    add("--scoring", default=DEFAULTS["scoring"], help="loss, tv, pixelmean or pixelmedian (choosing among restarts)")
    add("--tol", type=float, default=DEFAULTS["tol"], help="stop restarting once a restart's score is at most this")
    add("--attack-seed", type=int, default=DEFAULTS["attack_seed"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradinv", description="Gradient inversion attacks on federated learning, at scale.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    attack = verbs.add_parser("attack", help="one reconstruction: images and metrics.json")
    _add_trial_flags(attack)
    attack.add_argument("--out", type=Path, required=True, help="output directory")
    attack.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    attack.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run = verbs.add_parser("run", help="run a study's trials on Ray into a Parquet results directory")
    run.add_argument("study", type=Path, help="study file (YAML)")
    run.add_argument("--results", type=Path, default=None, help="results directory (default results/STUDY_NAME)")
    run.add_argument("--address", default=None, help="a running Ray cluster (default $RAY_ADDRESS, else local)")
    run.add_argument("--data-root", default=None, help="dataset root on every node (default $GRADINV_DATA)")
    run.add_argument("--dry-run", action="store_true", help="print the axes and the trial count; run nothing")
    run.add_argument("--max-concurrent", type=int, default=None, help="tasks in flight at once")
    run.add_argument("--retry-failed", action="store_true", help="run failed trials again, replacing their rows")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--batch-rows", type=int, default=64, help="write a results file every N finished trials")
    run.add_argument("--batch-seconds", type=float, default=15.0, help="... or every S seconds")
    from .study import MAX_TRIALS

    run.add_argument("--max-trials", type=int, default=MAX_TRIALS,
                     help=f"refuse a study of more trials, counted before collapsing (default {MAX_TRIALS})")  # fmt: skip
    run.add_argument("--set-aside-bad-files", action="store_true",
                     help="move damaged or foreign *.parquet files of the results into its _quarantine/ (else refuse)")

    zoo = verbs.add_parser("zoo", help="trained victim checkpoints")
    zoo_verbs = zoo.add_subparsers(dest="zoo_verb", required=True, parser_class=_Parser)
    train = zoo_verbs.add_parser("train", help="train a checkpoint (once) into the cache")
    train.add_argument("--dataset", required=True)
    train.add_argument("--model", required=True)
    train.add_argument("--width", type=int, default=None)
    train.add_argument("--epochs", type=int, required=True)
    train.add_argument("--model-seed", type=int, default=0)
    train.add_argument("--train-subset", type=int, default=None, help="the first N training images")
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--data-root", default=None)
    train.add_argument("--cache", default=None, help="checkpoint cache (default $GRADINV_CACHE)")
    train.add_argument("--threads", type=int, default=None)
    listing = zoo_verbs.add_parser("list", help="the checkpoints in the cache")
    listing.add_argument("--cache", default=None)

    status = verbs.add_parser("status", help="counts per status and study, and the newest errors")
    status.add_argument("results", type=Path)
    tuning.add_parser(verbs)
    analysis_cli.add_parsers(verbs)
    return parser


def _trial_spec(args: argparse.Namespace):
    from gradinv.trial import TrialSpec

    return TrialSpec(
        dataset=args.dataset, images=tuple(args.images or [0]), image_size=args.image_size, labels=args.labels,
        model=args.model, width=args.width, model_seed=args.model_seed, trained_epochs=args.trained_epochs,
        train_subset=args.train_subset, fl=args.fl, local_steps=args.local_steps, local_lr=args.local_lr, local_batch_size=args.local_batch_size,
        data_order_seed=args.data_order_seed, batch_order=args.batch_order, attack=args.attack,
        iterations=args.iterations, restarts=args.restarts, tv=args.tv, lr=args.lr, cost=args.cost, decay=args.decay,
        init=args.init, clamp_init=args.clamp_init, layer_weighting=args.layer_weighting, layers=_layers(args.layers),
        signed=args.signed, boxed=args.boxed, median_filter=args.median_filter, optimizer=args.optimizer,
        scoring=args.scoring, tol=args.tol, attack_seed=args.attack_seed,
    )  # fmt: skip


def _layers(text: str | None) -> tuple[int, ...] | str | None:
    """--layers: comma-separated parameter indices, or a named set (checked by TrialSpec)."""
    if text is None or text[:1].isalpha():
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError("--layers", text, "give indices such as 0,1,-1 or a named set such as last5") from None


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads", threads, "use 1 or more")
        torch.set_num_threads(threads)


def _run_attack(args: argparse.Namespace) -> int:
    from .single import attack

    _set_threads(args.threads)
    if args.cache:
        os.environ["GRADINV_CACHE"] = args.cache
    spec = _trial_spec(args)
    outcome = attack(spec, args.out, data_root=args.data_root, device=args.device)
    if outcome.status != "ok":
        print(f"gradinv attack: failed: {outcome.error}", file=sys.stderr)
        return 1
    m = outcome.metrics
    print(f"PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.3f}  labels {m['label_accuracy']:.0%}  "
          f"{outcome.seconds:.1f} s  -> {args.out}")  # fmt: skip
    return 0


def _run_study(args: argparse.Namespace) -> int:
    import math

    from .runner import RunOptions, run_study
    from .study import load_study, read_study

    if args.max_trials < 1:
        raise ConfigError("--max-trials", args.max_trials, "use 1 or more")
    if args.dry_run:
        from .report_text import dry_run

        print(dry_run(read_study(args.study, args.max_trials), args.max_trials))
        return 0
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("--max-concurrent", args.max_concurrent, "use 1 or more")
    if args.batch_rows < 1:
        raise ConfigError("--batch-rows", args.batch_rows, "use a positive number of rows")
    if not (math.isfinite(args.batch_seconds) and args.batch_seconds > 0):  # nan would never flush by time
        raise ConfigError("--batch-seconds", args.batch_seconds, "use a finite, positive number of seconds")
    study = load_study(args.study, args.max_trials)
    options = RunOptions(args.address, args.max_concurrent, args.retry_failed, args.batch_rows, args.batch_seconds,
                         progress=not args.no_progress, set_aside_bad_files=args.set_aside_bad_files)  # fmt: skip
    results = args.results or Path("results") / study.name
    return run_study(study, results, options, data_root_arg=args.data_root)


def _zoo(args: argparse.Namespace) -> int:
    from gradinv import zoo

    if args.zoo_verb == "list":
        for entry in zoo.listing(args.cache):
            info = entry.info
            if info is None:  # skipped: one line on what to do about it
                print(f"{entry.key}  unreadable ({entry.problem}); delete {entry.key}.pt and {entry.key}.json, "
                      "and the study or 'gradinv zoo train' that needs it trains it again")  # fmt: skip
                continue
            print(f"{info['key']}  accuracy {info['test_accuracy']:.4f}  epochs {info['epochs']}  "
                  f"seed {info['seed']}  {info['training_seconds']:.0f} s")  # fmt: skip
        return 0
    _set_threads(args.threads)
    recipe = zoo.Recipe(args.dataset, args.model, args.width, args.epochs, args.model_seed, args.train_subset,
                        args.image_size)  # fmt: skip
    from tqdm import tqdm

    with tqdm(total=args.epochs, desc=recipe.key, unit="epoch") as bar:

        def epoch_done(epoch: int, loss: float, accuracy: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", accuracy=f"{accuracy:.3f}")
            bar.update(1)

        checkpoint, trained = zoo.ensure(recipe, args.cache, data_root=args.data_root, on_epoch=epoch_done)
    info = checkpoint.sidecar
    how = f"trained in {info['training_seconds']:.1f} s" if trained else "already in the cache"
    print(f"{recipe.key}: test accuracy {info['test_accuracy']:.4f}, {how} ({zoo.cache_dir(args.cache)})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .report_text import status

    print(status(args.results))
    return 0


COMMANDS = {"attack": _run_attack, "run": _run_study, "zoo": _zoo, "tune": lambda args: tuning.command(args),
            "status": _status, **analysis_cli.COMMANDS}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except ConfigError as error:
        print(f"gradinv {args.verb}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gradinv {args.verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
