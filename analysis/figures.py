"""The report's plots: each answers one question, named in its title, with the no-information
baseline drawn, small multiples per dataset, horizontal setting labels, at most MAX_SERIES series per
axes and legends outside the data. Pure matplotlib (Agg via ``Figure``), returned as PNG bytes.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

MAX_SERIES = 8  # distinct colours a reader tells apart; more settings become more panels
MAX_PANELS = 12
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
LEAK_COLOUR, NONE_COLOUR, BASELINE_COLOUR = "#1f77b4", "#888888", "#444444"
WIDTH = 10.0  # inches at 100 dpi: the page's width
VERDICT_WIDTH = 44  # characters per line of a verdict written beside a plot
BASELINE_LABEL = "no-information baseline (gain 0)"


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Labels and panels

_WORDS = {
    "trained_epochs": lambda v: "untrained" if v == 0 else f"trained {v} ep",
    "images_per_client": lambda v: f"{v} image{'s' * (v != 1)}/client",
    "local_steps": lambda v: f"{v} local step{'s' * (v != 1)}",
    "iterations": lambda v: f"{v} iterations",
    "width": lambda v: f"width {v}",
    "dataset": str,
    "fl": str,
    "model": str,
    "attack": str,
}


def _plain(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return str(value)


def setting_label(values: dict) -> str:
    """``{"trained_epochs": 0, "fl": "fedsgd"}`` -> "untrained · fedsgd"; settings that do not apply left out."""
    parts = []
    for name, value in values.items():
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            continue
        if isinstance(value, np.integer) or (isinstance(value, (float, np.floating)) and float(value).is_integer()):
            value = int(value)
        parts.append(_WORDS[name](value) if name in _WORDS else f"{name} {_plain(value)}")
    return " · ".join(parts) or "all"


def split_panels(frame: pd.DataFrame, by: list[str], first: tuple[str, ...] = ("dataset",)) -> tuple[list, list]:
    """Settings that make panels and settings that make series: ``first`` always make panels, then
    settings move from series to panels until a panel holds at most MAX_SERIES series."""
    panels = [name for name in first if name in by]
    series = [name for name in by if name not in panels]
    while series and _count(frame, series) > MAX_SERIES:
        panels.append(series.pop(0))
    return panels, series


def _count(frame: pd.DataFrame, names: list[str]) -> int:
    return len(frame.groupby(names, dropna=False)) if names else 1


def _groups(frame: pd.DataFrame, names: list[str]):
    if not names:
        return [({}, frame)]
    return [
        (dict(zip(names, key if isinstance(key, tuple) else (key,))), part)
        for key, part in frame.groupby(names, dropna=False, sort=True)
    ]


def _colour_of(labels: list[str]) -> dict[str, str]:
    return {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(dict.fromkeys(labels))}


def _grid(count: int, panel_height: float, columns: int = 2) -> tuple[Figure, list]:
    columns = min(columns, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(WIDTH, panel_height * rows + 1.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:count]


def _baseline_line(axes, y: float, horizontal: bool) -> None:
    if np.isnan(y):
        return
    draw = axes.axhline if horizontal else axes.axvline
    draw(y, color=BASELINE_COLOUR, linestyle="--", linewidth=1.2, zorder=1)


def _outside_legend(figure: Figure, handles: list, columns: int = 3) -> None:
    figure.legend(
        handles=handles, loc="outside lower center", ncols=min(columns, len(handles)), frameon=False, fontsize=9
    )


def _row_panels(groups) -> tuple[Figure, np.ndarray]:
    """One panel per group, stacked, each as tall as its rows (one row per setting), sharing x."""
    heights = [max(len(part), 1) * 0.34 + 0.8 for _, part in groups]
    figure = Figure(figsize=(WIDTH, sum(heights) + 1.2), layout="constrained")
    return figure, figure.subplots(len(groups), 1, squeeze=False, sharex=True, height_ratios=heights).ravel()


# ---------------------------------------------------------------------------------------------
# Does each setting leak?


def gain_per_setting(table: pd.DataFrame, by: list[str], question: str) -> Figure:
    """One row per setting: median gain over the baseline with its interval, panels per dataset."""
    panels = [name for name in ("dataset",) if name in by]
    rows = [name for name in by if name not in panels]
    groups = _groups(table, panels)
    figure, all_axes = _row_panels(groups)
    for axes, (panel, part) in zip(all_axes, groups):
        part = part.reset_index(drop=True)
        y = np.arange(len(part))[::-1]
        leaks = part["verdict"] == "leakage"
        for position, row, leak in zip(y, part.itertuples(), leaks):
            colour = LEAK_COLOUR if leak else NONE_COLOUR
            if not np.isnan(row.median_low):
                axes.plot([row.median_low, row.median_high], [position, position], color=colour, linewidth=2.2)
            axes.plot(
                [row.gain_median],
                [position],
                "o",
                color=colour,
                markersize=7,
                markerfacecolor=colour if leak else "white",
            )
        axes.set_yticks(
            y, [setting_label({name: getattr(row, name) for name in rows}) for row in part.itertuples()], fontsize=9
        )
        beside = blended_transform_factory(axes.transAxes, axes.transData)  # right of the data, in words
        for position, row, leak in zip(y, part.itertuples(), leaks):
            if not leak:
                said = textwrap.fill(row.verdict, VERDICT_WIDTH)  # beside the plot: long ones in lines
                axes.text(1.01, position, said, transform=beside, va="center", fontsize=8.5, color="#555555")
        axes.set_ylim(-0.7, len(part) - 0.3)
        _baseline_line(axes, 0.0, horizontal=False)
        axes.set_title(setting_label(panel) if panel else "", fontsize=10, loc="left")
        axes.grid(axis="x", alpha=0.3)
    all_axes[-1].set_xlabel("PSNR gain over the best no-information baseline (dB): median and its 95% interval")
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    _outside_legend(
        figure,
        [
            Line2D([], [], color=LEAK_COLOUR, marker="o", linewidth=2.2, label="leakage (interval above 0)"),
            Line2D(
                [],
                [],
                color=NONE_COLOUR,
                marker="o",
                markerfacecolor="white",
                linewidth=2.2,
                label="no leakage detected",
            ),
            Line2D([], [], color=BASELINE_COLOUR, linestyle="--", label=BASELINE_LABEL),
        ],
    )
    return figure


# ---------------------------------------------------------------------------------------------
# Trained vs untrained


def paired_arms(
    table: pd.DataFrame, rows: list[str], panels: list[str], value: str, question: str, xlabel: str
) -> Figure:
    """Per compared setting, the untrained and the trained arm's mean ``value`` joined by a line."""
    groups = _groups(table, panels)
    figure, all_axes = _row_panels(groups)
    for axes, (panel, part) in zip(all_axes, groups):
        part = part.reset_index(drop=True)
        y = np.arange(len(part))[::-1]
        left, right = part[f"untrained_{value}"].astype(float), part[f"trained_{value}"].astype(float)
        axes.hlines(y, np.minimum(left, right), np.maximum(left, right), color="#bbbbbb", linewidth=2, zorder=1)
        axes.plot(left, y, "o", color=COLOURS[0], markersize=7, zorder=2)
        axes.plot(right, y, "s", color=COLOURS[1], markersize=7, zorder=2)
        labels = [setting_label({name: getattr(row, name) for name in rows}) for row in part.itertuples()]
        axes.set_yticks(y, labels, fontsize=9)
        axes.set_ylim(-0.7, len(part) - 0.3)
        if value == "gain":
            _baseline_line(axes, 0.0, horizontal=False)
        axes.set_title(setting_label(panel) if panel else "", fontsize=10, loc="left")
        axes.grid(axis="x", alpha=0.3)
    all_axes[-1].set_xlabel(xlabel)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    handles = [
        Line2D([], [], color=COLOURS[0], marker="o", linestyle="", label="untrained"),
        Line2D([], [], color=COLOURS[1], marker="s", linestyle="", label="trained"),
    ]
    if value == "gain":
        handles.append(Line2D([], [], color=BASELINE_COLOUR, linestyle="--", label=BASELINE_LABEL))
    _outside_legend(figure, handles)
    return figure


# ---------------------------------------------------------------------------------------------
# Quality against iterations, and against a setting


def quality_curves(points: pd.DataFrame, panels: list[str], series: list[str], question: str) -> Figure:
    """``points``: one row per (trial, checkpoint) with ``iteration``, ``curve_psnr``, ``baseline_psnr``
    and the settings; per series the median PSNR over trials at each checkpoint."""
    groups = _groups(points, panels)[:MAX_PANELS]
    figure, all_axes = _grid(len(groups), 2.9)
    colours = _colour_of([setting_label(key) for key, _ in _groups(points, series)])
    for axes, (panel, part) in zip(all_axes, groups):
        for key, line in _groups(part, series):
            medians = line.groupby("iteration")["curve_psnr"].median()
            axes.plot(medians.index, medians.values, marker="o", markersize=3.5, color=colours[setting_label(key)])
        _baseline_line(axes, part.groupby("key")["baseline_psnr"].first().median(), horizontal=True)
        axes.set_title(setting_label(panel) if panel else "all trials", fontsize=10, loc="left")
        axes.set_xlabel("iteration")
        axes.set_ylabel("PSNR (dB)")
        axes.grid(alpha=0.3)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in colours.items()]
    handles.append(Line2D([], [], color=BASELINE_COLOUR, linestyle="--", label="no-information baseline (median)"))
    _outside_legend(figure, handles)
    return figure


def gain_against(table: pd.DataFrame, x: str, panels: list[str], series: list[str], question: str) -> Figure:
    """Median gain with its interval (shaded) against setting ``x``, one line per series."""
    groups = _groups(table, panels)[:MAX_PANELS]
    figure, all_axes = _grid(len(groups), 2.9)
    colours = _colour_of([setting_label(key) for key, _ in _groups(table, series)])
    for axes, (panel, part) in zip(all_axes, groups):
        for key, line in _groups(part, series):
            line = line.sort_values(x)
            xs, colour = line[x].astype(float), colours[setting_label(key)]
            axes.plot(xs, line["gain_median"].astype(float), marker="o", color=colour)
            axes.fill_between(
                xs,
                line["median_low"].astype(float),
                line["median_high"].astype(float),
                color=colour,
                alpha=0.15,
                linewidth=0,
            )
        _baseline_line(axes, 0.0, horizontal=True)
        axes.set_xticks(sorted(part[x].astype(float).unique()))
        axes.set_title(setting_label(panel) if panel else "all trials", fontsize=10, loc="left")
        axes.set_xlabel(x.replace("_", " "))
        axes.set_ylabel("PSNR gain (dB)")
        axes.grid(alpha=0.3)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in colours.items()]
    handles.append(Line2D([], [], color=BASELINE_COLOUR, linestyle="--", label=BASELINE_LABEL))
    _outside_legend(figure, handles)
    return figure


# ---------------------------------------------------------------------------------------------
# Tuning


def tuning_history(history: pd.DataFrame, baseline: float, question: str) -> Figure:
    """Each candidate's tuning PSNR in order (pruned and failed ones marked at the bottom), the best
    so far as a step line through every candidate, and the baseline."""
    figure = Figure(figsize=(WIDTH, 3.6), layout="constrained")
    axes = figure.subplots()
    complete = history[history["state"] == "complete"]
    families = list(dict.fromkeys(history["attack"])) if "attack" in history else []  # searched across families
    markers = {family: "osD^v"[i % 5] for i, family in enumerate(families)}
    for family, points in complete.groupby("attack", sort=False) if families else [(None, complete)]:
        axes.plot(points["candidate"], points["psnr"], markers.get(family, "o"), color=COLOURS[0], alpha=0.8)
    axes.step(history["candidate"], history["best_so_far"], where="post", color=COLOURS[1], linewidth=2)
    stopped = history[history["state"] != "complete"]
    bottom = axes.get_xaxis_transform()  # x in data, y in axes fraction: a rug under the data
    axes.plot(stopped["candidate"], [0.03] * len(stopped), "x", color=COLOURS[3], markersize=8, transform=bottom)
    _baseline_line(axes, baseline, horizontal=True)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("candidate (in the order proposed)")
    axes.set_ylabel("mean PSNR (dB)")
    axes.grid(alpha=0.3)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    complete_marks = [
        Line2D([], [], color=COLOURS[0], marker=markers[f], linestyle="", label=f"complete: {f}") for f in families
    ] or [Line2D([], [], color=COLOURS[0], marker="o", linestyle="", label="complete candidate")]
    _outside_legend(
        figure,
        [
            *complete_marks,
            Line2D([], [], color=COLOURS[3], marker="x", linestyle="", label="pruned or failed (no final PSNR)"),
            Line2D([], [], color=COLOURS[1], linewidth=2, label="best so far"),
            Line2D([], [], color=BASELINE_COLOUR, linestyle="--", label="no-information baseline"),
        ],
        columns=3 + len(complete_marks),
    )
    return figure
