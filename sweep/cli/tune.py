"""`gradinv tune`: search for the strongest attack of a study's setting with Optuna, on Ray.

This module is the command: its arguments and entry points, light to import (`gradinv --help` loads
neither torch nor Optuna). The work lives in layers below it:

- sweep/tune/section.py: the study's `tune:` section, validated (each family's search space in space.py);
- sweep/tune/settings.py: the settings a search runs with; a candidate's parameters as trials;
- sweep/tune/search.py: Optuna's storage, sampler, pruner and the resume of a stopped search;
- sweep/tune/driver.py: candidates evaluated as streaming Ray tasks, cancelled when pruned;
- sweep/tune/report.py: the held-out comparison with the paper's defaults and the `fixed:` fragment;
- sweep/tune/tuner.py: ask/tell around the driver, from the first candidate to the comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gradinv.errors import ConfigError

from ..stopping import EXIT_INTERRUPTED
from .parser import EXIT_USAGE, Parser, add_set_flag, path


def _add_arguments(parser) -> None:
    add = parser.add_argument
    add("study", type=Path, help="study file (YAML) with a 'tune:' section")
    add_set_flag(parser)
    add(
        "--results",
        type=path,
        default=None,
        help="results directory or URI (s3://bucket/prefix); default results/STUDY_NAME",
    )
    add("--address", default=None, help="a running Ray cluster (default $RAY_ADDRESS, else local)")
    add(
        "--storage",
        default=None,
        help="Optuna storage: sqlite:///..., postgresql://... or a journal file (default RESULTS/_optuna.journal)",
    )
    add("--data-root", default=None, help="dataset root on every node (default $GRADINV_DATA)")
    add("--no-progress", action="store_true", help="no progress bar")


def add_parser(verbs) -> None:
    """Add `tune` to the CLI's subcommands."""
    _add_arguments(verbs.add_parser("tune", help="search the strongest attack for a study's setting (Optuna on Ray)"))


def command(args) -> int:
    from ..study import load_study
    from ..tune.tuner import tune_study

    study = load_study(args.study, overrides=args.overrides)
    results = args.results or Path("results") / study.name
    return tune_study(
        study,
        results,
        address=args.address,
        storage=args.storage,
        progress=not args.no_progress,
        data_root_arg=args.data_root,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m sweep.cli.tune STUDY ...`: the tune verb on its own."""
    parser = Parser(prog="gradinv tune", description="Search the strongest attack for a study's setting.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except ConfigError as error:
        print(f"gradinv tune: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradinv tune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # the Ray tasks live in sweep.tune.driver: nothing here is pickled
    sys.exit(main())
