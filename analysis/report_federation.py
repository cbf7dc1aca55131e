"""The report's federation section: how much the attack reconstructs from a client's update to the
global model after each round of a simulated federation (gradinv.federation), beside that model's
test accuracy, per dataset, partition of the clients' data and update kind.

The section appears only when some finished row attacked a federation round. A row whose ``round`` is
null, or a file written before federations existed (no ``round`` column), is not a federation trial.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import figures, stats
from . import report_html as markup

TITLE = "Leakage vs federation round"
GROUP = ["dataset", "partition", "fl", "round"]
FL_LOOK = {"fedsgd": ("-", "o"), "fedavg": ("-.", "s")}  # line style and marker; dash-dot, not the baseline's dashes
OTHER_LOOK = (":", "^")
MAX_ROUND_TICKS = 12
WIDE_ROUNDS = 20  # past this many rounds a linear axis crowds the early ones: symlog keeps round 0 in view


# ---------------------------------------------------------------------------------------------
# The rows and the table


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]``, or nulls where a file predates the column."""
    return frame[name] if name in frame.columns else pd.Series(None, index=frame.index, dtype=object)


def partition_label(partition, alpha) -> str:
    """ "IID", "Dirichlet α=0.1" ("Dirichlet" without a recorded alpha), "not recorded" for a null."""
    if partition is None or (not isinstance(partition, str) and pd.isna(partition)):
        return "not recorded"
    if partition == "iid":
        return "IID"
    if partition == "dirichlet":
        return "Dirichlet" if pd.isna(alpha) else f"Dirichlet \u03b1={float(alpha):g}"
    return str(partition)


def _partition_order(partition, alpha) -> tuple:
    """IID first, then Dirichlet from the largest alpha (nearest IID) to the most skewed."""
    return (partition != "iid", -(0.0 if pd.isna(alpha) else float(alpha)))


def federation_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished rows that attacked a federation round, ``partition`` as its label and an order for it."""
    if "round" not in runs.columns:
        return runs.iloc[0:0]
    done = stats.finished(runs)
    done = done[done["round"].notna()]
    raw = list(zip(_column(done, "partition"), _column(done, "alpha")))
    return done.assign(
        partition=[partition_label(*pair) for pair in raw],
        partition_order=[_partition_order(*pair) for pair in raw],
        round=done["round"].astype(int),
    )


def global_accuracy(rows: pd.DataFrame) -> float:
    """The global model's test accuracy at the rows' round: every row attacking one federation carries
    the same value, so each federation counts once, however many trials attacked it."""
    accuracy = pd.to_numeric(_column(rows, "model_accuracy"), errors="coerce").astype(float)
    federation = _column(rows, "federation_key").astype(object).fillna("")
    return float(accuracy.groupby(federation).mean().mean()) if accuracy.notna().any() else math.nan


def round_table(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Per dataset, partition, update kind and round: trials, mean PSNR and its 95% interval (nan below
    stats.MIN_BOOTSTRAP trials), median gain over the baseline, the median baseline, the global accuracy."""
    table = pd.DataFrame([_summary(key, group, seed) for key, group in rows.groupby(GROUP, sort=False)])
    table = table.sort_values(["dataset", "partition_order", "fl", "round"])
    return table.drop(columns="partition_order").reset_index(drop=True)


def _summary(key: tuple, group: pd.DataFrame, seed: int) -> dict:
    psnr = group["psnr"].astype(float)
    low, high = stats.mean_interval(psnr, seed)
    return {
        **dict(zip(GROUP, key)),
        "partition_order": group["partition_order"].iloc[0],
        "trials": len(group),
        "psnr": psnr.mean(),
        "ci_low": low,
        "ci_high": high,
        "gain_median": pd.to_numeric(_column(group, "psnr_gain"), errors="coerce").median(),
        "baseline_psnr": pd.to_numeric(_column(group, "baseline_psnr"), errors="coerce").median(),
        "accuracy": global_accuracy(group),
    }


def accuracy_curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, partition and round the global accuracy, whatever update kind was attacked."""
    curves = [
        {"dataset": dataset, "partition": partition, "round": round_, "accuracy": global_accuracy(group)}
        for (dataset, partition, round_), group in rows.groupby(["dataset", "partition", "round"])
    ]
    return pd.DataFrame(curves, columns=["dataset", "partition", "round", "accuracy"])


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the page shows it: the interval in words, accuracy to three decimals."""
    return pd.DataFrame(
        {
            "dataset": table["dataset"],
            "partition": table["partition"],
            "fl": table["fl"],
            "round": table["round"],
            "trials": table["trials"],
            "mean psnr": table["psnr"],
            "interval": markup.intervals(table["psnr"], table["ci_low"], table["ci_high"]),
            "median gain": table["gain_median"],
            "global accuracy": [markup.cell(v, 3) for v in table["accuracy"]],
        }
    )


# ---------------------------------------------------------------------------------------------
# The figure


def _error_bars(line: pd.DataFrame) -> np.ndarray | None:
    """Distances from the mean to the interval's ends; None where no round has an interval."""
    if line["ci_low"].isna().all():
        return None
    low, high = (line["psnr"] - line["ci_low"]).fillna(0), (line["ci_high"] - line["psnr"]).fillna(0)
    return np.vstack([low.clip(lower=0), high.clip(lower=0)])


def _round_axis(axes, rounds: list[int]) -> None:
    if max(rounds) > WIDE_ROUNDS:
        axes.set_xscale("symlog", linthresh=1)
        axes.set_xlim(-0.3, max(rounds) * 1.3)  # symlog's default limits reach far below round 0
    if len(rounds) <= MAX_ROUND_TICKS:
        axes.set_xticks(rounds, [str(r) for r in rounds])
    axes.set_xlabel("federation round (0: the untrained model)")
    axes.grid(alpha=0.3)


def round_figure(table: pd.DataFrame, accuracy: pd.DataFrame, dataset: str, question: str) -> Figure:
    """Left: mean PSNR (with its interval) against round, a colour per partition and a line style per
    update kind, the no-information baseline dashed. Right: the global test accuracy against round."""
    part, curves = table[table["dataset"] == dataset], accuracy[accuracy["dataset"] == dataset]
    colours = figures._colour_of(part["partition"].tolist())  # the table's order: IID first
    figure, (left, right) = figures._grid(2, 3.6)
    for (partition, fl), line in list(part.groupby(["partition", "fl"], sort=False))[: figures.MAX_SERIES]:
        style, marker = FL_LOOK.get(fl, OTHER_LOOK)
        left.errorbar(
            line["round"],
            line["psnr"],
            yerr=_error_bars(line),
            color=colours[partition],
            linestyle=style,
            marker=marker,
            capsize=3,
        )
    baseline = part["baseline_psnr"].median()
    if not np.isnan(baseline):
        left.axhline(baseline, color=figures.BASELINE_COLOUR, linestyle="--", linewidth=1.2, zorder=1)
    left.set_title("Attack: mean PSNR of the client's images", fontsize=10, loc="left")
    left.set_ylabel("mean PSNR (dB)")
    for partition, line in curves.groupby("partition", sort=False):
        right.plot(line["round"], line["accuracy"], color=colours.get(partition, figures.NONE_COLOUR), marker="o")
    right.set_ylim(0, 1)
    right.set_title("Utility: the global model's test accuracy", fontsize=10, loc="left")
    right.set_ylabel("test accuracy")
    rounds = sorted(part["round"].unique())
    for axes in (left, right):
        _round_axis(axes, rounds)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    figures._outside_legend(figure, _legend(colours, part["fl"].unique()), columns=4)
    return figure


def _legend(colours: dict[str, str], kinds) -> list[Line2D]:
    """A colour per partition, a line style per update kind, and the baseline: each said once."""
    handles = [Line2D([], [], color=colour, linewidth=2.5, label=partition) for partition, colour in colours.items()]
    for fl in kinds:
        style, marker = FL_LOOK.get(fl, OTHER_LOOK)
        handles.append(Line2D([], [], color="#555555", linestyle=style, marker=marker, label=fl))
    handles.append(Line2D([], [], color=figures.BASELINE_COLOUR, linestyle="--", label="no-information baseline"))
    return handles


# ---------------------------------------------------------------------------------------------
# The section


def section(runs: pd.DataFrame, by: list[str], seed: int = 0) -> str:
    """The section, or "" when no finished row attacked a federation round. ``by`` is not used: the
    section always compares partition, update kind and round within each dataset."""
    rows = federation_rows(runs)
    if rows.empty:
        return ""
    table, accuracy = round_table(rows, seed), accuracy_curves(rows)
    parts = [
        markup.note(
            "Per dataset, partition of the clients' data, update kind (fl) and round whose global model was "
            "attacked: trials (pooled over attacked clients and federations), mean PSNR with its 95% BCa "
            f"interval (from {stats.MIN_BOOTSTRAP} trials; fewer say \u201c{stats.TOO_SMALL}\u201d), the median "
            "gain over the no-information baseline, and the global model's test accuracy at that round (one value "
            "per federation, averaged where several)."
        ),
        markup.note(
            "Reading: round 0 is the untrained model. The attacked images are the attacked client's own training "
            "images, and the client trained in the rounds its rows list (client_rounds), so from its first round "
            "on the global model may already have seen them."
        ),
    ]
    for dataset in sorted(table["dataset"].unique()):
        question = f"{dataset}: does leakage change as the federation trains?"
        parts.append(markup.figure(round_figure(table, accuracy, dataset, question), question))
    parts.append(markup.table(shown_table(table), "federation", 2))
    return markup.section(TITLE, *parts)
