"""`gradinv federation train`: a simulated federation's rounds, trained once into this machine's cache,
each round's clients as Ray tasks in parallel (gradinv.federation has the algorithm)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .parser import Parser as _Parser
from gradinv.files import require_writable_directory

EXECUTION = {"data_root", "cache", "address", "in_process", "round", "threads"}


def add_parser(verbs) -> None:
    """The verb alone: its flags come from the recipe (gradinv.federation, which loads torch), so they
    are read when the verb runs and `gradinv --help` stays light."""
    federation = verbs.add_parser("federation", help="simulated federations whose rounds are victims", add_help=False)
    federation.add_argument("arguments", nargs=argparse.REMAINDER)


def _parser() -> argparse.ArgumentParser:
    from gradinv.federation import Federation
    from gradinv.parameters import parameters

    declared = parameters()
    parser = _Parser(prog="gradinv federation", description="Simulated federations whose rounds are victims.")
    federation_verbs = parser.add_subparsers(dest="federation_verb", required=True, parser_class=_Parser)
    train = federation_verbs.add_parser("train", help="train a federation's rounds (once) into the cache")
    hints = typing.get_type_hints(Federation)
    for field in dataclasses.fields(Federation):
        if field.name == "version":
            continue
        kind, flag = _plain_type(hints[field.name]), f"--{field.name.replace('_', '-')}"
        text = declared[field.name].help if field.name in declared else field.metadata["help"]
        if kind is bool:
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        elif field.default is dataclasses.MISSING:
            train.add_argument(flag, type=kind, required=True, help=text)
        else:
            shown = "" if field.default is None else f" (default {field.default})"
            train.add_argument(flag, type=kind, default=field.default, help=text + shown)
    train.add_argument("--round", type=int, default=None, help="train up to this round (default --fed-rounds)")
    train.add_argument("--data-root", default=None, help="dataset root (default $GRADINV_DATA)")
    train.add_argument("--cache", default=None, help="checkpoint cache (default $GRADINV_CACHE)")
    train.add_argument("--address", default=None, help="a running Ray cluster (default $RAY_ADDRESS, else local)")
    train.add_argument("--in-process", action="store_true", help="train the clients in this process, without Ray")
    return parser


def _plain_type(hint) -> type:
    """int for ``int | None``: the flag's type."""
    if isinstance(hint, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def command(verb_args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gradinv import federation as fed
    from gradinv import zoo

    args = _parser().parse_args(verb_args.arguments)
    values = {name: getattr(args, name) for name in vars(args) if name not in EXECUTION | {"federation_verb"}}
    recipe = fed.Federation(**values)
    up_to = recipe.fed_rounds if args.round is None else args.round
    recipe.check_round(up_to)
    require_writable_directory("--cache" if args.cache else "GRADINV_CACHE", zoo.cache_dir(args.cache))
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
            from ..victim_training import ray_clients
            from ..ray_connection import connect
            from ..runner import runtime_environment

            ray = connect(args.address, runtime_environment(args.data_root), max_retries=3)
            try:
                final = fed.train(recipe, up_to, cache=args.cache, data_root=args.data_root,
                                  run_clients=ray_clients(ray), on_round=round_done)  # fmt: skip
            finally:
                ray.shutdown()
    print(f"{recipe.key}: round {final.number}, test accuracy {final.sidecar['test_accuracy']:.4f} "
          f"({fed.federation_dir(recipe, args.cache)})")
    return 0
