"""The report's privacy–utility section: per defence and strength, how much the attack still
reconstructs, what the defence costs the victim (its test accuracy) and what it guarantees (epsilon),
a figure per dataset, and the reconstructions of the same images at each strength.

The section appears only when some finished row has a defence on. The labels and the table are
analysis.privacy_table's; this module draws the figure and the image grids and writes the section.
"""

from __future__ import annotations

import html
import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import figures, load, stats
from . import report_html as markup
from .privacy_table import NONE, PLAIN, defence_rank, labelled, shown_table, summary_table

TITLE = "Privacy vs utility under defences"
MAX_GRID_IMAGES = 8  # images of one client shown per strength
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "--", ":", "-.")  # one per victim and setting within a defence's panel


# ---------------------------------------------------------------------------------------------
# The figure


def panels(table: pd.DataFrame, dataset: str) -> list[tuple[str, object, pd.DataFrame]]:
    """One dataset's panels: ("accuracy", (victim, setting), rows) per victim with a recorded accuracy,
    then ("strength", defence, rows with the undefended ones) per defence where there is none."""
    rows = table[table["dataset"] == dataset]
    scatter = [
        ("accuracy", context, part)
        for context, part in rows[rows["accuracy"].notna()].groupby(["victim", "setting"], sort=False)
    ]
    blind = rows[rows["accuracy"].isna()]
    strengths = [
        ("strength", defence, blind[blind["defence"].isin([defence, NONE])])
        for defence in blind["defence"].unique()
        if defence != NONE
    ]
    return scatter + strengths


def privacy_utility(table: pd.DataFrame, dataset: str, question: str) -> Figure:
    """Panels for one dataset: per victim with a recorded accuracy, mean PSNR (with its interval)
    against that accuracy, a marker per defence and each strength labelled; per defence where there
    is no accuracy (untrained victims), mean PSNR against the strength, weakest first."""
    shown = panels(table, dataset)[: figures.MAX_PANELS]
    figure, all_axes = figures._grid(len(shown), 3.4)
    look = _look(table.loc[table["dataset"] == dataset, "defence"].unique())
    for axes, (kind, what, part) in zip(all_axes, shown):
        if kind == "accuracy":
            _scatter_panel(axes, part, look, _context(*what))
        else:
            _strength_panel(axes, part, what, look)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    handles = [
        Line2D([], [], color=colour, marker=marker, linestyle="", label=defence)
        for defence, (colour, marker) in look.items()
    ]
    handles += [
        Line2D(
            [],
            [],
            color="#555555",
            marker="o",
            markerfacecolor="white",
            linestyle="",
            label="the attacker did not mirror the defence",
        ),
        Line2D([], [], color=figures.BASELINE_COLOUR, linestyle="--", label="no-information baseline"),
    ]
    figures._outside_legend(figure, handles)
    return figure


def _look(defences) -> dict[str, tuple[str, str]]:
    """Defence -> (colour, marker), the same in every panel; no defence in grey."""
    ordered = sorted(defences, key=defence_rank)
    colours = iter(figures.COLOURS * len(ordered))
    return {
        defence: (figures.NONE_COLOUR, "o") if defence == NONE else (next(colours), MARKERS[i % len(MARKERS)])
        for i, defence in enumerate(ordered)
    }


def _context(victim: str, setting: str) -> str:
    return victim if setting == "all" else f"{victim} · {setting}"


def _error_bars(part: pd.DataFrame) -> np.ndarray | None:
    """Distances from the mean to the interval's ends; None where no row has an interval."""
    if part["ci_low"].isna().all():
        return None
    low, high = (part["psnr"] - part["ci_low"]).fillna(0), (part["ci_high"] - part["psnr"]).fillna(0)
    return np.vstack([low.clip(lower=0), high.clip(lower=0)])


def _scatter_panel(axes, part: pd.DataFrame, look: dict, title: str) -> None:
    for (defence, aware), points in part.groupby(["defence", "aware"], sort=False):
        colour, marker = look[defence]
        axes.errorbar(
            points["accuracy"],
            points["psnr"],
            yerr=_error_bars(points),
            fmt=marker,
            color=colour,
            markerfacecolor="white" if aware == "no" else colour,
            markersize=7,
            capsize=3,
        )
        for row in points.itertuples():
            axes.annotate(
                row.strength,
                (row.accuracy, row.psnr),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7.5,
                color="#333333",
            )
    _baseline(axes, part)
    axes.margins(x=0.15)  # room for the strength labels right of the points
    wrapped = textwrap.fill(f"{title}: PSNR against the victim's accuracy", 48)  # two panels share a row
    axes.set_title(wrapped, fontsize=10, loc="left")
    axes.set_xlabel("the defended victim's test accuracy")
    axes.set_ylabel("mean PSNR (dB)")
    axes.grid(alpha=0.3)


def _strength_panel(axes, part: pd.DataFrame, defence: str, look: dict) -> None:
    """One line per victim and setting (and per attacker knowledge), from no defence through each
    strength; the defence's colour and marker, a line style per context."""
    order = part.drop_duplicates("strength").sort_values(["defence", "order"], key=_none_first)["strength"].tolist()
    position = {strength: i for i, strength in enumerate(order)}
    colour, marker = look[defence]
    plain = part[part["defence"] == NONE]
    lines = list(part[part["defence"] == defence].groupby(["victim", "setting", "aware"], sort=False))
    for i, ((victim, setting, aware), line) in enumerate(lines[: figures.MAX_SERIES]):
        line = pd.concat([plain[(plain["victim"] == victim) & (plain["setting"] == setting)], line])
        line = line.assign(x=line["strength"].map(position)).sort_values("x")
        label = _context(victim, setting) + ("" if aware == "–" else f" · attacker knew: {aware}")
        axes.errorbar(
            line["x"],
            line["psnr"],
            yerr=_error_bars(line),
            marker=marker,
            color=colour,
            capsize=3,
            linestyle=LINE_STYLES[i % len(LINE_STYLES)],
            label=label,
            markerfacecolor="white" if aware == "no" else colour,
        )
    _baseline(axes, part)
    axes.set_xticks(range(len(order)), [strength.replace(", ", "\n") for strength in order], fontsize=8)
    axes.set_title(f"{defence}: PSNR against strength", fontsize=10, loc="left")
    axes.set_xlabel("strength, weakest first")
    axes.set_ylabel("mean PSNR (dB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7.5, frameon=False)


def _none_first(column: pd.Series) -> pd.Series:
    return column.map(lambda value: value != NONE) if column.name == "defence" else column


def _baseline(axes, part: pd.DataFrame) -> None:
    baseline = part["baseline_psnr"].median()
    if not np.isnan(baseline):
        axes.axhline(baseline, color=figures.BASELINE_COLOUR, linestyle="--", linewidth=1.2, zorder=1)


# ---------------------------------------------------------------------------------------------
# The reconstructions at each strength


def _grid_rows(rows: pd.DataFrame, dataset: str, defence: str) -> tuple[str, str, pd.DataFrame] | None:
    """For one defence: the victim and settings with the most strengths, the client images attacked
    under the most of them, and per strength (no defence first) the trial with the lowest key; None
    when no trial of it names its images."""
    rows = rows[rows["images"].notna()]
    own = rows[(rows["dataset"] == dataset) & (rows["defence"] == defence)]
    if own.empty:
        return None
    counts = own.groupby(["victim", "setting"])["strength"].nunique()
    victim, setting = counts[counts == counts.max()].index[0]
    candidates = rows[
        (rows["dataset"] == dataset)
        & (rows["victim"] == victim)
        & (rows["setting"] == setting)
        & rows["defence"].isin([defence, NONE])
    ]
    spread = candidates[candidates["defence"] == defence].groupby("images")["strength"].nunique()
    images = sorted(spread[spread == spread.max()].index)[0]
    chosen = candidates[candidates["images"] == images].sort_values(["key"])
    chosen = chosen.groupby(["strength", "aware"], sort=False).head(1)
    chosen = chosen.sort_values(["defence", "order", "aware"], key=_none_first)
    return _context(victim, setting), images, chosen


def reconstructions(results, rows: pd.DataFrame) -> str:
    """Per dataset and defence, one row of reconstructions per strength for the same client's images."""
    grids = [
        (dataset, defence, *grid)
        for dataset in sorted(rows["dataset"].unique())
        for defence in sorted(rows.loc[rows["dataset"] == dataset, "defence"].unique(), key=defence_rank)
        if defence != NONE and (grid := _grid_rows(rows, dataset, defence))
    ]
    pngs = load.load_images(results, [key for *_, chosen in grids for key in chosen["key"]])
    blocks = []
    for dataset, defence, context, images, chosen in grids:
        indices = str(images).split(",")[:MAX_GRID_IMAGES]
        truth = pngs.get(chosen["key"].iloc[0], ([], []))[0]
        lines = [
            _strip(
                "ground truth",
                [markup.captioned(png, "ground truth", f"image {index}") for png, index in zip(truth, indices)],
            )
        ]
        for row in chosen.itertuples():
            recon = pngs.get(row.key, ([], []))[1][:MAX_GRID_IMAGES]
            psnrs = list(row.psnr_per_image) if row.psnr_per_image is not None else []
            shown = [
                markup.captioned(png, "reconstruction", markup.db(psnrs[i]) if i < len(psnrs) else "–")
                for i, png in enumerate(recon)
            ]
            knew = "" if row.aware == "–" else f"<br>attacker knew: {html.escape(row.aware)}"
            lines.append(_strip(f"{html.escape(row.strength)}<br>mean {markup.db(row.psnr)}{knew}", shown))
        title = f"{dataset} · {defence} · {context}: images {images}"
        blocks.append(f"<div class=setting><h3>{html.escape(title)}</h3>{''.join(lines)}</div>")
    return "".join(blocks)


def _strip(label: str, images: list[str]) -> str:
    head = f"<figure class=image><figcaption>{label}</figcaption></figure>"
    return f"<div class=strip>{head}{''.join(images)}</div>"


# ---------------------------------------------------------------------------------------------
# The section


def section(results, runs: pd.DataFrame, by: list[str], seed: int = 0) -> str:
    """The section, or "" when no finished row has a defence on."""
    rows = labelled(runs, by)
    table = summary_table(rows, seed)
    if table is None:
        return ""
    parts = [
        markup.note(
            "Per defence and strength, within each dataset, victim and setting that has a defended row (the "
            "undefended rows beside them for reference): trials, mean PSNR with its 95% BCa interval (from "
            f"{stats.MIN_BOOTSTRAP} trials; fewer say \u201c{stats.TOO_SMALL}\u201d), the median gain over the "
            "no-information baseline, the victim's test accuracy, \u03b5 and \u03b4 where a DP mechanism ran, and "
            "whether the attacker mirrored the defence in its cost (attacker knew)."
        )
    ]
    parts += _epsilon_notes(table)
    parts.append(
        markup.note(
            "The figure plots mean PSNR against the victim's test accuracy where it is recorded "
            "(trained victims), and against the defence's strength where it is not (untrained "
            "victims): the dashed line is the no-information baseline, hollow markers an attacker "
            "that did not mirror the defence."
        )
    )
    parts.append(_accuracy_note(table))
    for dataset in sorted(table["dataset"].unique()):
        question = f"{dataset}: how much does each defence stop the attack, and what does it cost the victim?"
        if (count := len(panels(table, dataset))) > figures.MAX_PANELS:
            parts.append(
                markup.note(
                    f"{dataset}: showing {figures.MAX_PANELS} of {count} panels; group more coarsely with --by."
                )
            )
        parts.append(markup.figure(privacy_utility(table, dataset, question), question))
    parts.append(markup.table(shown_table(table), "privacy", 2))
    parts.append("<h3>Reconstructions at each strength</h3>")
    parts.append(
        markup.note(
            "Per defence: the client's images attacked under the most strengths, ground truth "
            "first, then one row per strength (no defence first; one trial each, the lowest key), "
            "each image captioned with its PSNR."
        )
    )
    parts.append(reconstructions(results, rows))
    return markup.section(TITLE, *parts)


def _epsilon_notes(table: pd.DataFrame) -> list[str]:
    notes = []
    if (table["epsilon"] != "–").any():
        notes.append(
            markup.note(
                "\u03b5 (DP-SGD) is example-level and covers this client's one update: it bounds what the update "
                "reveals about any one of the client's images. It is not the federation's guarantee, which composes "
                "over rounds and clients."
            )
        )
    if (table["update_epsilon"] != "–").any():
        notes.append(
            markup.note(
                "\u03b5 (update) is the Gaussian mechanism at noise_std / clip_update for this client's one update: "
                "it bounds what the update reveals about the client's data as a whole (its update present or "
                "absent). It is not the federation's guarantee, which composes over rounds and clients."
            )
        )
    return notes


def _accuracy_note(table: pd.DataFrame) -> str:
    costless = table["defence"] == "secure aggregation"  # averaging updates changes nothing in training
    plain = table[(table["accuracy_from"].str.contains(PLAIN)) & (table["defence"] != NONE) & ~costless]
    text = (
        "Accuracy: the victim checkpoint's test accuracy (\u201cuntrained\u201d for untrained victims). The "
        "defences act on the client's update, not on how the victim was trained, so a defended row without a "
        "defended-training checkpoint of its own reuses the plain victim's accuracy (accuracy from: "
        f"\u201c{PLAIN}\u201d) and says nothing of what the defence would cost a model trained under it. "
        "Secure aggregation costs no accuracy: the server's mean of the clients' updates is what FedAvg "
        "computes anyway."
    )
    if plain.empty:
        return markup.note(text)
    which = sorted({f"{row.defence} ({row.strength})" for row in plain.itertuples()})
    return markup.note(f"{text} Reusing it here: {'; '.join(which)}.")
