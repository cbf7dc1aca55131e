"""The `report` and `export` verbs of the `gradinv` command line.

``add_parsers`` adds them to the main parser's subcommands; ``COMMANDS`` maps each verb to a function
of the parsed arguments that returns the exit code. User mistakes raise ConfigError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gradinv.errors import ConfigError
from sweep.cli.parser import path


def add_parsers(verbs) -> None:
    from analysis.stats import SUCCESS_PSNR

    report = verbs.add_parser("report", help="one self-contained HTML report of a results directory")
    report.add_argument("results", type=path, help="results directory (gradinv run --results DIR)")
    report.add_argument(
        "--out",
        type=path,
        default=Path("report.html"),
        help="file to write, outside the results directory (default report.html)",
    )
    report.add_argument(
        "--by",
        nargs="+",
        action="extend",
        metavar="FIELD",
        default=None,
        help="settings to group by (default: every setting that varies)",
    )
    report.add_argument(
        "--threshold",
        type=float,
        default=SUCCESS_PSNR,
        help=f"PSNR (dB) a successful reconstruction reaches (default {SUCCESS_PSNR:g})",
    )
    report.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    export = verbs.add_parser("export", help="reconstructions and ground truth as PNG files or a Hugging Face dataset")
    export.add_argument("results", type=path, help="results directory (gradinv run --results DIR)")
    export.add_argument("--to", type=path, required=True, help="directory to write (created if missing)")
    export.add_argument(
        "--format",
        choices=("png", "hf"),
        default="png",
        help="png: PNG files with index.csv and index.parquet (default); hf: a Hugging Face dataset (Parquet "
        "shards with Image features under data/, and a dataset card README.md)",
    )


def _report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    if not (math.isfinite(args.threshold) and args.threshold > 0):  # nan compares false: every trial would fail
        raise ConfigError("--threshold", args.threshold, "use a finite, positive PSNR in dB, e.g. 20")
    out = write_report(args.results, args.out, by=args.by, threshold=args.threshold, seed=args.seed)
    print(f"report: {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    return {"png": _export_png, "hf": _export_hf}[args.format](args)


def _export_png(args: argparse.Namespace) -> int:
    from analysis.export import export

    index = export(args.results, args.to)
    trials = index["key"].nunique() if len(index) else 0
    print(
        f"{len(index)} reconstructions and their ground truth from {trials} trials -> {args.to} "
        f"(index.csv, index.parquet)"
    )
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from analysis.export_hf import DATA_DIR, export_hf

    tally = export_hf(args.results, args.to)
    images, trials, files = sum(tally.images.values()), sum(tally.trials.values()), tally.shards
    print(
        f"{images} reconstructions and their ground truth from {trials} trials -> {args.to} "
        f"({files} Parquet file{'s' if files > 1 else ''} under {DATA_DIR}/, README.md)"
    )
    return 0


COMMANDS = {"report": _report, "export": _export}
