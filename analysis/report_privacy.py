"""The report's privacy–utility section: per defence and strength, how much the attack still
reconstructs, what the defence costs the victim (its test accuracy) and what it guarantees (epsilon),
a figure per dataset, and the reconstructions of the same images at each strength.

The section appears only when some finished row has a defence on. Every defence column may be
absent (files written before defences existed) or null (the knob does not apply): both read as off.
A new defence is one more entry in DEFENCES.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import figures, load, stats
from . import report_html as markup

TITLE = "Privacy vs utility under defences"
NONE = "none"
VICTIM_STATE = stats.MODEL_STATE  # what makes a victim untrained or trained (and on how much data)
VICTIM_IDENTITY = ("dataset", "model", "width", "image_size", "model_seed", *VICTIM_STATE)  # one checkpoint
EPSILONS = {"epsilon": "ε (DP-SGD)", "update_epsilon": "ε (update)"}  # outcome column -> its heading
MAX_GRID_IMAGES = 8  # images of one client shown per strength
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINE_STYLES = ("-", "--", ":", "-.")  # one per victim and setting within a defence's panel
PLAIN, OWN, UNTRAINED, UNRECORDED = "plain victim", "defended checkpoint", "untrained", "not recorded"


def _value(row: Mapping, name: str, off=None):
    """``row[name]``, or ``off`` where the column is absent or null (the knob is off or does not apply)."""
    value = row.get(name)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return off
    return value


def _g(value) -> str:
    return f"{float(value):g}"


# ---------------------------------------------------------------------------------------------
# Which defence a row ran, and how strong


@dataclass(frozen=True)
class Defence:
    """One defence: when a row has it on, its strength in words, an order of strengths (weakest
    first) and the column saying whether the attacker mirrored it in its cost (None: nothing to mirror)."""

    label: str
    on: Callable[[Mapping], bool]
    strength: Callable[[Mapping], str]
    order: Callable[[Mapping], float]
    aware: str | None = None


def _clip(row) -> float | None:
    return _value(row, "clip_update")


def _noise(row) -> float:
    return _value(row, "noise_std", 0.0)


def _keep(row) -> float:
    return _value(row, "keep_fraction", 1.0)


def _bits(row) -> int | None:
    return _value(row, "quant_bits")


def _dp_on(row) -> bool:
    return _value(row, "dp_clip") is not None or _value(row, "dp_noise", 0.0) > 0


def _pruning_strength(row) -> str:
    scope = " global" if _value(row, "prune_scope") == "global" else ""
    return f"keep {_keep(row) * 100:g}%{scope}"


def _dp_strength(row) -> str:
    clip, rate = _value(row, "dp_clip"), _value(row, "dp_sample_rate", 1.0)
    return (f"DP σ={_g(_value(row, 'dp_noise', 0.0))}" + (f" C={_g(clip)}" if clip is not None else "")
            + (f" q={_g(rate)}" if rate < 1 else ""))  # fmt: skip


DEFENCES = (
    Defence("update clip+noise", lambda r: _clip(r) is not None and _noise(r) > 0,
            lambda r: f"clip {_g(_clip(r))} · noise_std {_g(_noise(r))}", lambda r: _noise(r) / _clip(r),
            aware="clip_aware"),
    Defence("update clip", lambda r: _clip(r) is not None and _noise(r) == 0, lambda r: f"clip {_g(_clip(r))}",
            lambda r: -_clip(r), aware="clip_aware"),
    Defence("noise", lambda r: _clip(r) is None and _noise(r) > 0, lambda r: f"noise_std {_g(_noise(r))}", _noise),
    Defence("pruning", lambda r: _keep(r) < 1, _pruning_strength, lambda r: -_keep(r), aware="prune_aware"),
    Defence("quantisation", lambda r: _bits(r) is not None,
            lambda r: f"{_bits(r)} bit{'s' * (_bits(r) != 1)} {_value(r, 'quant_rounding', 'stochastic')}",
            lambda r: -_bits(r)),
    Defence("DP-SGD", _dp_on, _dp_strength, lambda r: _value(r, "dp_noise", 0.0), aware="dp_aware"),
)  # fmt: skip
# The defence knobs (with the seed of their randomness): the section groups by defence and strength, so
# none of them is part of a row's other settings
DEFENCE_COLUMNS = ("clip_update", "noise_std", "keep_fraction", "prune_scope", "quant_bits", "quant_rounding",
                   "defence_seed", "prune_aware", "clip_aware", "dp_delta", "dp_clip", "dp_noise", "dp_sample_rate",
                   "dp_aware")  # fmt: skip


def _active(row: Mapping) -> list[Defence]:
    return [defence for defence in DEFENCES if defence.on(row)]


def defence_of(row: Mapping) -> str:
    """"none", one defence's label, or the labels of a combination joined with " + "."""
    return " + ".join(defence.label for defence in _active(row)) or NONE


def strength_of(row: Mapping) -> str:
    """How strong each active defence is, e.g. "noise_std 0.01", "keep 10%", "4 bits stochastic"."""
    return ", ".join(defence.strength(row) for defence in _active(row)) or NONE


def strength_order(row: Mapping) -> tuple:
    """Sorts a defence's strengths weakest first (no defence before any)."""
    return tuple(defence.order(row) for defence in _active(row))


def aware_of(row: Mapping) -> str:
    """Whether the attacker mirrored the defence in its cost: yes, no, "only <defences>" for a part of
    a combination, "–" where no active defence can be mirrored."""
    mirrorable = [defence for defence in _active(row) if defence.aware]
    if not mirrorable:
        return "–"
    mirrored = [defence.label for defence in mirrorable if _value(row, defence.aware, False)]
    if len(mirrored) == len(mirrorable):
        return "yes"
    return f"only {' + '.join(mirrored)}" if mirrored else "no"


def labelled(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The finished rows with their defence, strength, its order, whether the attacker knew it, the
    victim ("untrained", "trained 2 ep") and the other compared settings as one label."""
    done = stats.finished(runs)
    records = done.to_dict("records")
    context = [name for name in by if name not in ("dataset", *VICTIM_STATE, *DEFENCE_COLUMNS)]
    state = [name for name in VICTIM_STATE if name in done.columns]
    return done.assign(
        defence=[defence_of(row) for row in records], strength=[strength_of(row) for row in records],
        order=[strength_order(row) for row in records], aware=[aware_of(row) for row in records],
        victim=[figures.setting_label({name: row[name] for name in state}) for row in records],
        setting=[figures.setting_label({name: row.get(name) for name in context}) for row in records],
    )  # fmt: skip


def _accuracy_source(rows: pd.DataFrame) -> pd.Series:
    """Where each row's accuracy comes from. The defences act on the client's update, not on how the
    victim was trained: a defended row whose checkpoint is the one the undefended rows of the same
    victim used shows the plain victim's accuracy. Only a checkpoint of its own (another key for the
    same victim) measures the defended training's accuracy."""
    identity = [name for name in VICTIM_IDENTITY if name in rows.columns]
    victim = rows[identity].astype(object).fillna("null").astype(str).agg("|".join, axis=1)
    key = rows["checkpoint_key"] if "checkpoint_key" in rows.columns else pd.Series(None, index=rows.index)
    plain = rows["defence"] == NONE
    plain_keys = set(zip(victim[plain], key[plain]))
    plain_victims = set(victim[plain])
    trained = pd.to_numeric(rows["trained_epochs"], errors="coerce").fillna(0) > 0
    recorded = rows["model_accuracy"].notna() if "model_accuracy" in rows.columns else trained & False
    own = [not is_plain and v in plain_victims and (v, k) not in plain_keys
           for is_plain, v, k in zip(plain, victim, key)]  # fmt: skip
    return pd.Series(np.select([~trained, ~recorded, own], [UNTRAINED, UNRECORDED, OWN], PLAIN), index=rows.index)


# ---------------------------------------------------------------------------------------------
# The table


GROUP = ["dataset", "victim", "setting", "defence", "strength", "aware"]


def privacy_table(runs: pd.DataFrame, by: list[str], seed: int = 0) -> pd.DataFrame | None:
    """Per (dataset, victim, other settings, defence, strength, attacker knew): trials, mean PSNR and its
    95% interval, median gain, the victim's accuracy and where it comes from, epsilon and delta where a
    DP mechanism ran. Only contexts holding a defended row; None when no finished row has a defence on."""
    return _table(labelled(runs, by), seed)


def _table(rows: pd.DataFrame, seed: int) -> pd.DataFrame | None:
    if not (rows["defence"] != NONE).any():
        return None
    defended = rows.loc[rows["defence"] != NONE, ["dataset", "victim", "setting"]].drop_duplicates()
    rows = rows.merge(defended, on=["dataset", "victim", "setting"])  # undefended rows only beside defended ones
    rows = rows.assign(accuracy_from=_accuracy_source(rows))
    table = [_summary(key, group, seed) for key, group in rows.groupby(GROUP, sort=False, dropna=False)]
    table = pd.DataFrame(table).sort_values(["dataset", "epochs", "victim", "setting", "rank", "order", "aware"])
    return table.drop(columns=["rank", "epochs"]).reset_index(drop=True)


def _summary(key: tuple, group: pd.DataFrame, seed: int) -> dict:
    psnr = group["psnr"].astype(float)
    low, high = stats.mean_interval(psnr, seed)
    defence = key[GROUP.index("defence")]
    row = {
        **dict(zip(GROUP, key)), "rank": _defence_rank(defence), "order": group["order"].iloc[0],
        "epochs": pd.to_numeric(group["trained_epochs"], errors="coerce").max(),  # untrained victims first
        "trials": len(group), "psnr": psnr.mean(), "ci_low": low, "ci_high": high,
        "gain_median": group["psnr_gain"].astype(float).median() if "psnr_gain" in group else math.nan,
        "baseline_psnr": group["baseline_psnr"].astype(float).median() if "baseline_psnr" in group else math.nan,
        "accuracy": group["model_accuracy"].astype(float).mean() if "model_accuracy" in group else math.nan,
        "accuracy_from": ", ".join(sorted(group["accuracy_from"].unique())),
        "delta": _one_or_range(group["dp_delta"]) if "dp_delta" in group else "–",
        "accountant": ", ".join(sorted(group["accountant"].dropna().unique())) if "accountant" in group else "",
    }  # fmt: skip
    row.update({name: _one_or_range(group[name]) if name in group else "–" for name in EPSILONS})
    return row


def _defence_rank(defence: str) -> int:
    """No defence first, then the defences in DEFENCES' order, combinations after."""
    labels = [NONE, *(defence.label for defence in DEFENCES)]
    return labels.index(defence) if defence in labels else len(labels)


def _one_or_range(values: pd.Series) -> str:
    """A group's value (epsilon is one number per setting) as text; "low–high" where it varies."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    low, high = (_number(v) for v in (values.min(), values.max()))
    return low if low == high else f"{low}–{high}"


def _number(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4g}"


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the page shows it: accuracy as text ("untrained" where the victim is), the interval
    in words, and only the columns some row fills."""
    accuracy = [UNTRAINED if source == UNTRAINED else markup.cell(value, 3)
                for value, source in zip(table["accuracy"], table["accuracy_from"])]  # fmt: skip
    shown = pd.DataFrame({
        "dataset": table["dataset"], "victim": table["victim"], "setting": table["setting"],
        "defence": table["defence"], "strength": table["strength"], "attacker knew": table["aware"],
        "trials": table["trials"], "mean psnr": table["psnr"],
        "interval": markup.intervals(table["psnr"], table["ci_low"], table["ci_high"]),
        "median gain": table["gain_median"], "accuracy": accuracy, "accuracy from": table["accuracy_from"],
        **{heading: table[name] for name, heading in EPSILONS.items()}, "δ": table["delta"],
        "accountant": table["accountant"],
    })  # fmt: skip
    optional = ("setting", *EPSILONS.values(), "accountant")
    empty = [name for name in optional if shown[name].isin(["all", "–", ""]).all()]
    if all(heading in empty for heading in EPSILONS.values()):
        empty.append("δ")  # a delta says something only beside its epsilon
    if (table["aware"] == "–").all():
        empty.append("attacker knew")
    return shown.drop(columns=empty)


# ---------------------------------------------------------------------------------------------
# The figure


def panels(table: pd.DataFrame, dataset: str) -> list[tuple[str, object, pd.DataFrame]]:
    """One dataset's panels: ("accuracy", (victim, setting), rows) per victim with a recorded accuracy,
    then ("strength", defence, rows with the undefended ones) per defence where there is none."""
    rows = table[table["dataset"] == dataset]
    scatter = [("accuracy", context, part)
               for context, part in rows[rows["accuracy"].notna()].groupby(["victim", "setting"], sort=False)]
    blind = rows[rows["accuracy"].isna()]
    strengths = [("strength", defence, blind[blind["defence"].isin([defence, NONE])])
                 for defence in blind["defence"].unique() if defence != NONE]  # fmt: skip
    return scatter + strengths


def privacy_utility(table: pd.DataFrame, dataset: str, question: str) -> Figure:
    """Panels for one dataset: per victim with a recorded accuracy, mean PSNR (with its interval)
    against that accuracy, a marker per defence and each strength labelled; per defence where there
    is no accuracy (untrained victims), mean PSNR against the strength, weakest first."""
    shown = panels(table, dataset)[:figures.MAX_PANELS]
    figure, all_axes = figures._grid(len(shown), 3.4)
    look = _look(table.loc[table["dataset"] == dataset, "defence"].unique())
    for axes, (kind, what, part) in zip(all_axes, shown):
        if kind == "accuracy":
            _scatter_panel(axes, part, look, _context(*what))
        else:
            _strength_panel(axes, part, what, look)
    figure.suptitle(question, fontsize=12, x=0.01, ha="left")
    handles = [Line2D([], [], color=colour, marker=marker, linestyle="", label=defence)
               for defence, (colour, marker) in look.items()]  # fmt: skip
    handles += [Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="",
                       label="the attacker did not mirror the defence"),
                Line2D([], [], color=figures.BASELINE_COLOUR, linestyle="--", label="no-information baseline")]
    figures._outside_legend(figure, handles)
    return figure


def _look(defences) -> dict[str, tuple[str, str]]:
    """Defence -> (colour, marker), the same in every panel; no defence in grey."""
    ordered = sorted(defences, key=_defence_rank)
    colours = iter(figures.COLOURS * len(ordered))
    return {defence: (figures.NONE_COLOUR, "o") if defence == NONE else (next(colours), MARKERS[i % len(MARKERS)])
            for i, defence in enumerate(ordered)}  # fmt: skip


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
        axes.errorbar(points["accuracy"], points["psnr"], yerr=_error_bars(points), fmt=marker, color=colour,
                      markerfacecolor="white" if aware == "no" else colour, markersize=7, capsize=3)  # fmt: skip
        for row in points.itertuples():
            axes.annotate(row.strength, (row.accuracy, row.psnr), textcoords="offset points", xytext=(5, 4),
                          fontsize=7.5, color="#333333")  # fmt: skip
    _baseline(axes, part)
    axes.margins(x=0.15)  # room for the strength labels right of the points
    axes.set_title(f"{title}: PSNR against the victim's accuracy", fontsize=10, loc="left")
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
    for i, ((victim, setting, aware), line) in enumerate(lines[:figures.MAX_SERIES]):
        line = pd.concat([plain[(plain["victim"] == victim) & (plain["setting"] == setting)], line])
        line = line.assign(x=line["strength"].map(position)).sort_values("x")
        label = _context(victim, setting) + ("" if aware == "–" else f" · attacker knew: {aware}")
        axes.errorbar(line["x"], line["psnr"], yerr=_error_bars(line), marker=marker, color=colour, capsize=3,
                      linestyle=LINE_STYLES[i % len(LINE_STYLES)], label=label,
                      markerfacecolor="white" if aware == "no" else colour)  # fmt: skip
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
    candidates = rows[(rows["dataset"] == dataset) & (rows["victim"] == victim) & (rows["setting"] == setting)
                      & rows["defence"].isin([defence, NONE])]  # fmt: skip
    spread = candidates[candidates["defence"] == defence].groupby("images")["strength"].nunique()
    images = sorted(spread[spread == spread.max()].index)[0]
    chosen = candidates[candidates["images"] == images].sort_values(["key"])
    chosen = chosen.groupby(["strength", "aware"], sort=False).head(1)
    chosen = chosen.sort_values(["defence", "order", "aware"], key=_none_first)
    return _context(victim, setting), images, chosen


def reconstructions(results, rows: pd.DataFrame) -> str:
    """Per dataset and defence, one row of reconstructions per strength for the same client's images."""
    grids = [(dataset, defence, *grid) for dataset in sorted(rows["dataset"].unique())
             for defence in sorted(rows.loc[rows["dataset"] == dataset, "defence"].unique(), key=_defence_rank)
             if defence != NONE and (grid := _grid_rows(rows, dataset, defence))]  # fmt: skip
    pngs = load.load_images(results, [key for *_, chosen in grids for key in chosen["key"]])
    blocks = []
    for dataset, defence, context, images, chosen in grids:
        indices = str(images).split(",")[:MAX_GRID_IMAGES]
        truth = pngs.get(chosen["key"].iloc[0], ([], []))[0]
        lines = [_strip("ground truth", [markup.captioned(png, "ground truth", f"image {index}")
                                         for png, index in zip(truth, indices)])]  # fmt: skip
        for row in chosen.itertuples():
            recon = pngs.get(row.key, ([], []))[1][:MAX_GRID_IMAGES]
            psnrs = list(row.psnr_per_image) if row.psnr_per_image is not None else []
            shown = [markup.captioned(png, "reconstruction", markup.db(psnrs[i]) if i < len(psnrs) else "–")
                     for i, png in enumerate(recon)]  # fmt: skip
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
    table = _table(rows, seed)
    if table is None:
        return ""
    parts = [markup.note(
        "Per defence and strength, within each dataset, victim and setting that has a defended row (the "
        "undefended rows beside them for reference): trials, mean PSNR with its 95% BCa interval (from "
        f"{stats.MIN_BOOTSTRAP} trials; fewer say \u201c{stats.TOO_SMALL}\u201d), the median gain over the "
        "no-information baseline, the victim's test accuracy, \u03b5 and \u03b4 where a DP mechanism ran, and "
        "whether the attacker mirrored the defence in its cost (attacker knew).")]  # fmt: skip
    parts += _epsilon_notes(table)
    parts.append(markup.note("The figure plots mean PSNR against the victim's test accuracy where it is recorded "
                             "(trained victims), and against the defence's strength where it is not (untrained "
                             "victims): the dashed line is the no-information baseline, hollow markers an attacker "
                             "that did not mirror the defence."))  # fmt: skip
    parts.append(_accuracy_note(table))
    for dataset in sorted(table["dataset"].unique()):
        question = f"{dataset}: how much does each defence stop the attack, and what does it cost the victim?"
        if (count := len(panels(table, dataset))) > figures.MAX_PANELS:
            parts.append(markup.note(f"{dataset}: showing {figures.MAX_PANELS} of {count} panels; group more "
                                     "coarsely with --by."))  # fmt: skip
        parts.append(markup.figure(privacy_utility(table, dataset, question), question))
    parts.append(markup.table(_shown(table), "privacy", 2))
    parts.append("<h3>Reconstructions at each strength</h3>")
    parts.append(markup.note("Per defence: the client's images attacked under the most strengths, ground truth "
                             "first, then one row per strength (no defence first; one trial each, the lowest key), "
                             "each image captioned with its PSNR."))  # fmt: skip
    parts.append(reconstructions(results, rows))
    return markup.section(TITLE, *parts)


def _epsilon_notes(table: pd.DataFrame) -> list[str]:
    notes = []
    if (table["epsilon"] != "–").any():
        notes.append(markup.note(
            "\u03b5 (DP-SGD) is example-level and covers this client's one update: it bounds what the update "
            "reveals about any one of the client's images. It is not the federation's guarantee, which composes "
            "over rounds and clients."))  # fmt: skip
    if (table["update_epsilon"] != "–").any():
        notes.append(markup.note(
            "\u03b5 (update) is the Gaussian mechanism at noise_std / clip_update for this client's one update: "
            "it bounds what the update reveals about the client's data as a whole (its update present or "
            "absent). It is not the federation's guarantee, which composes over rounds and clients."))  # fmt: skip
    return notes


def _accuracy_note(table: pd.DataFrame) -> str:
    plain = table[(table["accuracy_from"].str.contains(PLAIN)) & (table["defence"] != NONE)]
    text = ("Accuracy: the victim checkpoint's test accuracy (\u201cuntrained\u201d for untrained victims). The "
            "defences act on the client's update, not on how the victim was trained, so a defended row without a "
            "defended-training checkpoint of its own reuses the plain victim's accuracy (accuracy from: "
            f"\u201c{PLAIN}\u201d) and says nothing of what the defence would cost a model trained under it.")
    if plain.empty:
        return markup.note(text)
    which = sorted({f"{row.defence} ({row.strength})" for row in plain.itertuples()})
    return markup.note(f"{text} Reusing it here: {'; '.join(which)}.")
