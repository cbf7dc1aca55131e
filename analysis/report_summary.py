"""The report's first section: what the results hold (trials, statuses, compute, whether settings leak),
where and when they ran, the settings every trial shares, and the trained victims' accuracy beside chance."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from gradinv.parameters import checkpoint_identity

from . import load, stats
from . import report_html as markup
from .roles import Roles

FIXED_PER_ROW = 4  # name/value pairs per row of the fixed-settings table
VICTIM_MARGIN = 0.10  # a trained victim within this of chance accuracy has not learnt


def section(
    frame: pd.DataFrame, runs: pd.DataFrame, results, by: list[str], per_setting: pd.DataFrame, roles: Roles
) -> str:
    counts = frame["status"].value_counts()
    verdicts = per_setting["verdict"].value_counts()
    items = {
        "results": str(Path(results).resolve()),
        "studies": ", ".join(sorted(frame["study"].unique())),
        "trials": len(frame),
        **{status: int(counts.get(status, 0)) for status in ("ok", "failed", "pruned")},
        "tuning rows": int(frame["candidate"].notna().sum()),
        "compute time (sum of each trial's share of its task)": markup.duration(load.compute_seconds(frame).sum()),
        "settings compared": ", ".join(by) or "none (one setting)",
    }
    if not runs.empty:
        items["settings that leak"] = (
            f"{int(verdicts.get(stats.LEAKS, 0))} of {len(per_setting)} (median PSNR gain over the no-information "
            "baseline, 95% interval above 0)"
            if per_setting["gain_median"].notna().any()
            else "– (no baseline recorded in these rows)"
        )
    rows = "".join(
        f"<tr><th class=text>{html.escape(k)}</th><td class=text>{html.escape(str(v))}</td></tr>"
        for k, v in items.items()
    )
    parts = [f"<table id=summary>{rows}</table>", _provenance(frame)]
    if not runs.empty:
        parts += [_fixed(runs, roles), _victims(runs, roles)]
    return markup.section("Summary", *parts)


def _provenance(frame: pd.DataFrame) -> str:
    started, finished = frame["started_at"].min(), frame["finished_at"].max()
    items = {
        "wall-clock span": markup.duration((finished - started).total_seconds()) if pd.notna(started) else "–",
        "first start / last finish": f"{markup.when(started)} / {markup.when(finished)}",
        "hosts": markup.tally(frame["host"]),
        "nodes": frame["node_id"].nunique(),
        "devices": markup.tally(frame["device"]),
        **{
            f"{name} version": markup.tally(frame[f"{name}_version"])
            for name in ("gradinv", "torch", "torchvision", "python")
        },
        "commits": markup.tally(frame["commit"]),
    }
    rows = "".join(
        f"<tr><th class=text>{html.escape(k)}</th><td class=text>{html.escape(str(v))}</td></tr>"
        for k, v in items.items()
    )
    return f"<details><summary>Where and when it ran</summary><table id=provenance>{rows}</table></details>"


def _fixed(runs: pd.DataFrame, roles: Roles) -> str:
    """Settings every trial shares: what a reader needs to tell a toy budget from the paper's."""
    fixed = {
        name: values[0]
        for name in roles.settings_in(runs)
        if name != "images" and len(values := runs[name].unique()) == 1 and pd.notna(values[0])
    }
    if not fixed:
        return ""
    cells = [
        f"<th class=text>{html.escape(name.replace('_', ' '))}</th>"
        f"<td class=num>{html.escape(markup.cell(value, None))}</td>"
        for name, value in fixed.items()
    ]
    rows = "".join(f"<tr>{''.join(cells[i : i + FIXED_PER_ROW])}</tr>" for i in range(0, len(cells), FIXED_PER_ROW))
    return f"<h3>Fixed in every trial</h3><table id=fixed>{rows}</table>"


def _victims(runs: pd.DataFrame, roles: Roles) -> str:
    """The trained victims' test accuracy beside chance: trained vs untrained means something only
    when the trained victim has learnt."""
    trained = runs[runs["trained_epochs"].astype("Float64") > 0]
    if trained.empty:
        return ""
    columns = [c for c in checkpoint_identity() if c in trained.columns and trained[c].notna().any()]
    table = (
        trained.groupby(columns, dropna=False, sort=True)
        .agg(checkpoints=("checkpoint_key", "nunique"), model_accuracy=("model_accuracy", "mean"))
        .reset_index()
    )
    table["chance"] = table["dataset"].map(_chance)
    table["reading"] = [
        _accuracy_reading(accuracy, chance) for accuracy, chance in zip(table["model_accuracy"], table["chance"])
    ]
    note = markup.note(
        f"Test accuracy of each trained victim beside chance (1 / classes). Within "
        f"{VICTIM_MARGIN:.0%} of chance the victim has not learnt, and trained vs untrained is not "
        "being tested."
    )
    return "<h3>Trained victims</h3>" + note + markup.table(table, "victims", 3, roles.settings)


def _chance(dataset: str) -> float:
    from gradinv.dataset_specs import DATASETS  # the class counts live with the dataset specs (no torch)

    spec = DATASETS.get(dataset)
    return 1 / spec.num_classes if spec else float("nan")


def _accuracy_reading(accuracy: float, chance: float) -> str:
    if pd.isna(accuracy):
        return "accuracy not recorded"
    return "near chance: not a trained victim" if accuracy < chance + VICTIM_MARGIN else "above chance"
