"""`gradinv federation train`: a simulated federation's rounds, trained once into this machine's cache,
each round's clients as Ray tasks in parallel (gradinv.federation has the algorithm)."""

from __future__ import annotations

import argparse

from gradinv.errors import ConfigError
from gradinv.files import require_writable_directory

from .parser import Parser as _Parser
from .parser import add_knob_flags, knob_values


def add_parser(verbs) -> None:
    """The verb alone: its flags come from the recipe (gradinv.federation, which loads torch), so they
    are read when the verb runs and `gradinv --help` stays light."""
    federation = verbs.add_parser("federation", help="simulated federations whose rounds are victims", add_help=False)
    federation.add_argument("arguments", nargs=argparse.REMAINDER)


def _parser() -> argparse.ArgumentParser:
    from gradinv.federation import Federation
    from gradinv.parameters import declarations, defaults

    parser = _Parser(prog="gradinv federation", description="Simulated federations whose rounds are victims.")
    federation_verbs = parser.add_subparsers(dest="federation_verb", required=True, parser_class=_Parser)
    train = federation_verbs.add_parser("train", help="train a federation's rounds (once) into the cache")
    add_knob_flags(train, declarations(Federation), defaults(Federation))
    train.add_argument(
        "--up-to-round",
        type=int,
        default=None,
        metavar="ROUND",
        help="train rounds 1 to ROUND (default --fed-rounds); a trial's round attacks after it",
    )
    train.add_argument("--data-root", default=None, help="dataset root (default $GRADINV_DATA)")
    train.add_argument("--cache", default=None, help="checkpoint cache (default $GRADINV_CACHE)")
    train.add_argument("--address", default=None, help="a running Ray cluster (default $RAY_ADDRESS, else local)")
    train.add_argument("--in-process", action="store_true", help="train the clients in this process, without Ray")
    return parser


def command(verb_args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradinv import federation as fed
    from gradinv.cache import cache_dir
    from gradinv.parameters import declarations, defaults

    args = _parser().parse_args(verb_args.arguments)
    recipe = fed.Federation(**knob_values(args, declarations(fed.Federation), defaults(fed.Federation)))
    up_to = recipe.fed_rounds if args.up_to_round is None else args.up_to_round
    try:
        recipe.check_round(up_to)
    except ConfigError as error:  # named by the flag that set it
        raise ConfigError("--up-to-round", error.value, error.fix) from None
    require_writable_directory("--cache" if args.cache else "GRADINV_CACHE", cache_dir(args.cache))
    if not args.in_process:
        from ..ray_connection import require_reachable

        require_reachable(args.address)  # before a round is written
    with tqdm(total=up_to, desc=recipe.key, unit="round", dynamic_ncols=True) as bar:

        def round_done(current: fed.Round, trained: bool) -> None:
            if not trained:  # the round training starts from: the ETA counts only the rounds trained now
                bar.initial = current.number
            bar.n = current.number
            bar.set_postfix(accuracy=f"{current.sidecar['test_accuracy']:.3f}")
            bar.refresh()

        if args.in_process:
            final = fed.train(recipe, up_to, cache=args.cache, data_root=args.data_root, on_round=round_done)
        else:
            from ..ray_connection import connect
            from ..runner import runtime_environment
            from ..victim_training import ray_clients

            ray = connect(args.address, runtime_environment(args.data_root), max_retries=3)
            try:
                final = fed.train(
                    recipe,
                    up_to,
                    cache=args.cache,
                    data_root=args.data_root,
                    run_clients=ray_clients(ray),
                    on_round=round_done,
                )
            finally:
                ray.shutdown()
    print(
        f"{recipe.key}: round {final.number}, test accuracy {final.sidecar['test_accuracy']:.4f} "
        f"({fed.federation_dir(recipe, args.cache)})"
    )
    return 0
