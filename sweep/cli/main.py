"""The `gradinv` command line. User mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from gradinv.errors import ConfigError
from gradinv.files import require_writable_directory
from sweep.cli import results as analysis_cli

from ..stopping import exit_code, raising_on_signals
from . import (
    federation as federation_cli,
)  # light: the tune command's arguments; its work is imported when it runs
from . import (
    tune as tuning,
)
from .parser import EXIT_USAGE, add_knob_flags, add_set_flag, add_update_flags, knob_values, path
from .parser import Parser as _Parser


def _add_trial_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per declared trial parameter (gradinv.parameters), plus where data and checkpoints live."""
    from gradinv.parameters import parameter_defaults, parameters

    parser.add_argument("--data-root", default=None, help="dataset root (default $GRADINV_DATA)")
    parser.add_argument("--cache", default=None, help="checkpoint cache (default $GRADINV_CACHE)")
    add_knob_flags(parser, parameters(), parameter_defaults())


def build_parser() -> argparse.ArgumentParser:
    from gradinv.parameters import parameter_defaults

    parser = _Parser(prog="gradinv", description="Gradient inversion attacks on federated learning, at scale.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    attack = verbs.add_parser("attack", help="one reconstruction: images and metrics.json")
    _add_trial_flags(attack)
    attack.add_argument("--out", type=path, default=None, help="output directory (required unless --replay)")
    attack.add_argument(
        "--replay",
        nargs=2,
        metavar=("RESULTS", "KEY"),
        default=None,
        help="run a results row's trial again and compare its metrics (the trial flags are ignored)",
    )
    add_update_flags(attack)
    attack.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    attack.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run = verbs.add_parser("run", help="run a study's trials on Ray into a Parquet results directory")
    run.add_argument("study", type=path, help="study file (YAML)")
    add_set_flag(run)
    run.add_argument(
        "--results",
        type=path,
        default=None,
        help="results directory, or a URI such as s3://bucket/prefix (default results/STUDY_NAME)",
    )
    run.add_argument("--address", default=None, help="a running Ray cluster (default $RAY_ADDRESS, else local)")
    run.add_argument("--data-root", default=None, help="dataset root on every node (default $GRADINV_DATA)")
    run.add_argument("--dry-run", action="store_true", help="print the axes and the trial count; run nothing")
    run.add_argument("--max-concurrent", type=int, default=None, help="tasks in flight at once")
    run.add_argument("--retry-failed", action="store_true", help="run failed trials again, replacing their rows")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--batch-rows", type=int, default=64, help="write a results file every N finished trials")
    run.add_argument("--batch-seconds", type=float, default=15.0, help="... or every S seconds")
    # The cap's default is read when the study is (sweep.study imports torch; --help does not).
    run.add_argument(
        "--max-trials",
        type=int,
        default=None,
        help="refuse a study of more trials, counted before collapsing (default one million)",
    )
    run.add_argument(
        "--set-aside-bad-files",
        action="store_true",
        help="move damaged or foreign *.parquet files of the results into its _quarantine/ (else refuse)",
    )

    zoo = verbs.add_parser("zoo", help="trained victim checkpoints")
    zoo_verbs = zoo.add_subparsers(dest="zoo_verb", required=True, parser_class=_Parser)
    train = zoo_verbs.add_parser("train", help="train a checkpoint (once) into the cache")
    add_knob_flags(train, _zoo_knobs(), parameter_defaults(), required=("trained_epochs",))
    train.add_argument("--data-root", default=None)
    train.add_argument("--cache", default=None, help="checkpoint cache (default $GRADINV_CACHE)")
    train.add_argument("--threads", type=int, default=None)
    listing = zoo_verbs.add_parser("list", help="the checkpoints in the cache")
    listing.add_argument("--cache", default=None)

    status = verbs.add_parser("status", help="counts per status and study, and the newest errors")
    status.add_argument("results", type=path, help="results directory or URI (s3://bucket/prefix)")
    tuning.add_parser(verbs)
    federation_cli.add_parser(verbs)
    analysis_cli.add_parsers(verbs)
    return parser


def _trial_spec(args: argparse.Namespace):
    from gradinv.parameters import parameter_defaults, parameters
    from gradinv.trial import TrialSpec

    return TrialSpec(**knob_values(args, parameters(), parameter_defaults()))


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads", threads, "use 1 or more")
        torch.set_num_threads(threads)


def _run_attack(args: argparse.Namespace) -> int:
    # Where it will write, checked before anything runs (the attack, or the victim it trains first).
    if args.out is not None:
        require_writable_directory("--out", args.out)
    if args.cache:
        require_writable_directory("--cache", args.cache)
        os.environ["GRADINV_CACHE"] = args.cache
    if args.replay:  # the row's own thread count and device kind, not the flags
        if args.update is not None:
            raise ConfigError("--update", str(args.update[0]), "leave it out with --replay (a row names its own trial)")
        from .replay import command

        return command(*args.replay, data_root=args.data_root, out=args.out)
    if args.update is not None:  # one capture into --out, or captures into --results
        from .attack import update_command

        _set_threads(args.threads)
        kwargs = dict(out=args.out, results=args.results, data_root=args.data_root, device=_device(args.device))
        return update_command(args.update, _trial_spec(args), **kwargs)
    if args.results is not None:
        raise ConfigError("--results", str(args.results), "use it with --update (studies: gradinv run --results)")
    if args.out is None:
        raise ConfigError("--out", None, "name the output directory (--out DIR); only --replay runs without one")
    from .attack import attack

    _set_threads(args.threads)
    device = _device(args.device)
    spec = _trial_spec(args)
    outcome = attack(spec, args.out, data_root=args.data_root, device=device)
    if outcome.status != "ok":
        print(f"gradinv attack: failed: {outcome.error}", file=sys.stderr)
        return 1
    m = outcome.metrics
    if outcome.zero_update:
        print("the client's update is exactly zero: nothing to attack; scored as the data mean")
    elif outcome.precision == "float64":
        print("float32 underflowed on this victim (every restart NaN): attacked again in float64")
    print(
        f"PSNR {m['psnr']:.2f} dB (gain {m.get('psnr_gain', math.nan):+.2f})  SSIM {m['ssim']:.3f}  "
        f"labels {m['label_accuracy']:.0%}{_privacy(spec)}  {outcome.seconds:.1f} s  -> {args.out}"
    )
    return 0


def _device(name: str) -> str:
    """--device, checked before anything runs: a kind gradinv runs on, and a GPU that is there."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:  # not a device torch knows: "banana", "cuda:x"
        raise ConfigError("--device", name, "use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise ConfigError("--device", name, "use cpu, cuda or cuda:N (gradinv runs on CPUs and CUDA GPUs)")
    if not torch.cuda.is_available():
        raise ConfigError("--device", name, "this machine has no GPU that torch can use; use cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        here = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ConfigError("--device", name, f"this machine's GPUs are {here}; use one of them")
    return name


def _privacy(spec) -> str:
    """The update's privacy, where a defence gives one: "  epsilon 3.1 (DP-SGD, delta 1e-05)"."""
    from gradinv.client.accounting import privacy_columns

    columns = privacy_columns(spec)
    shown = [
        f"{columns[name]:.3g} ({what})"
        for name, what in (("epsilon", "DP-SGD"), ("update_epsilon", "update"))
        if columns[name] is not None
    ]
    return f"  epsilon {', '.join(shown)} at delta {spec.dp_delta:g}" if shown else ""


def _run_study(args: argparse.Namespace) -> int:
    import math

    from gradinv.results.text import visible

    from ..runner import RunOptions, run_study
    from ..study import MAX_TRIALS, load_study, read_study

    args.max_trials = MAX_TRIALS if args.max_trials is None else args.max_trials
    if args.max_trials < 1:
        raise ConfigError("--max-trials", args.max_trials, "use 1 or more")
    if args.dry_run:
        from .status import dry_run

        study = read_study(args.study, args.max_trials, args.overrides)
        header, _, rest = dry_run(study, args.max_trials).partition("\n")
        given = [f"  --set {visible(text)}" for text in study.overrides]  # the study that would run
        print("\n".join([header, *given, rest]))
        return 0
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("--max-concurrent", args.max_concurrent, "use 1 or more")
    if args.batch_rows < 1:
        raise ConfigError("--batch-rows", args.batch_rows, "use a positive number of rows")
    if not (math.isfinite(args.batch_seconds) and args.batch_seconds > 0):  # nan would never flush by time
        raise ConfigError("--batch-seconds", args.batch_seconds, "use a finite, positive number of seconds")
    study = load_study(args.study, args.max_trials, args.overrides)
    options = RunOptions(
        args.address,
        args.max_concurrent,
        args.retry_failed,
        args.batch_rows,
        args.batch_seconds,
        progress=not args.no_progress,
        set_aside_bad_files=args.set_aside_bad_files,
    )
    results = args.results or Path("results") / study.name
    return run_study(study, results, options, data_root_arg=args.data_root)


def _zoo(args: argparse.Namespace) -> int:
    from gradinv import zoo
    from gradinv.cache import cache_dir
    from gradinv.results.text import visible

    if args.zoo_verb == "list":
        for entry in zoo.listing(args.cache):
            info = entry.info
            if info is None:  # skipped: one line on what to do about it
                key = visible(entry.key)  # names and problems come from files: no terminal escapes
                print(
                    f"{key}  unreadable ({visible(entry.problem)}); delete {key}.pt and {key}.json, "
                    "and the study or 'gradinv zoo train' that needs it trains it again"
                )
                continue
            print(
                f"{visible(str(info['key']))}  accuracy {info['test_accuracy']:.4f}  epochs {info['epochs']}  "
                f"seed {info['seed']}  {info['training_seconds']:.0f} s"
            )
        return 0
    _set_threads(args.threads)
    recipe = _zoo_victim(args).recipe()  # the settings' own rules, before the bar and the cache
    require_writable_directory("--cache" if args.cache else "GRADINV_CACHE", cache_dir(args.cache))
    from tqdm import tqdm

    with tqdm(total=recipe.epochs, desc=recipe.key, unit="epoch") as bar:

        def epoch_done(epoch: int, loss: float, accuracy: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", accuracy=f"{accuracy:.3f}")
            bar.update(1)

        checkpoint, trained = zoo.ensure(recipe, args.cache, data_root=args.data_root, on_epoch=epoch_done)
    info = checkpoint.sidecar
    how = f"trained in {info['training_seconds']:.1f} s" if trained else "already in the cache"
    print(f"{recipe.key}: test accuracy {info['test_accuracy']:.4f}, {how} ({cache_dir(args.cache)})")
    return 0


def _zoo_knobs() -> dict:
    """The knobs of a trained victim's recipe (gradinv.zoo): its data and model, and the defences it trains under."""
    from gradinv.parameters import ZOO, parameters

    return {name: knob for name, knob in parameters().items() if ZOO in knob.recipes}


def _zoo_victim(args: argparse.Namespace):
    """The trial of the victim the flags name, trained under the defences they turn on: its construction checks
    the settings as an attack on that victim would, and its recipe is the checkpoint a study looks up."""
    from gradinv.parameters import parameter_defaults
    from gradinv.trial import TrialSpec

    if args.trained_epochs < 1:
        raise ConfigError(
            "--trained-epochs", args.trained_epochs, "train for at least 1 epoch (0 is the untrained model)"
        )
    return TrialSpec(**knob_values(args, _zoo_knobs(), parameter_defaults()), defended_training=True)


def _status(args: argparse.Namespace) -> int:
    from .status import status

    print(status(args.results))
    return 0


COMMANDS = {
    "attack": _run_attack,
    "run": _run_study,
    "zoo": _zoo,
    "tune": tuning.command,
    "federation": federation_cli.command,
    "status": _status,
    **analysis_cli.COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    with raising_on_signals():  # from the first line: a stop while the imports load is one line too
        command = "gradinv"
        try:
            args = build_parser().parse_args(argv)
            command = f"gradinv {args.verb}"
            return COMMANDS[args.verb](args)
        except ConfigError as error:
            print(f"{command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt as stop:
            print(f"{command}: interrupted", file=sys.stderr)
            return exit_code(stop)


if __name__ == "__main__":
    sys.exit(main())
