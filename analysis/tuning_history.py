"""The rows `gradinv tune` writes, read back: the search's candidates and the held-out comparison.

A tuned study's rows are of three kinds. Tuning rows: a candidate's trials on the tuning images.
Held-out rows of the best candidate: the same candidate number, on the held-out images. The paper's
defaults on the held-out images: no candidate number. The held-out images are therefore those of
the study's rows without a candidate, and a candidate's own numbers come from its tuning rows only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats
from .roles import Roles


def tuned_studies(frame: pd.DataFrame) -> list[str]:
    return sorted(frame.loc[frame["candidate"].notna(), "study"].unique())


def searches(rows: pd.DataFrame, roles: Roles) -> list[tuple[dict, pd.DataFrame]]:
    """One tuned study's rows per search: one search, or one per setting of its `per:` axes (the
    settings its paper-defaults rows differ in; candidate numbers start again in each search)."""
    per = roles.varying_settings(rows[rows["candidate"].isna()])
    if not per:
        return [({}, rows)]
    grouped = rows.groupby(per, dropna=False, sort=False)
    return [(dict(zip(per, values if isinstance(values, tuple) else (values,))), group) for values, group in grouped]


def strongest(rows: pd.DataFrame, roles: Roles, seed: int = 0) -> pd.DataFrame:
    """Per search of one tuned study: the family its best candidate uses, and the held-out comparison
    (tuned, paper defaults and no-information baseline; gains over both, the paired one with its interval)."""
    table = []
    for setting, group in searches(rows, roles):
        _, tuned, defaults = split(group)
        result = comparison(tuned, defaults, seed)
        if result is not None:
            family = tuned.loc[tuned["candidate"] == result["candidate"], "attack"].iloc[0]
            table.append(
                {
                    **setting,
                    "family": family,
                    **result,
                    "gain_over_baseline": result["tuned_psnr"] - result["baseline_psnr"],
                }
            )
    return pd.DataFrame(table)


def split(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One tuned study's rows as (tuning rows, best candidate's held-out rows, paper defaults' held-out rows)."""
    defaults = rows[rows["candidate"].isna()]
    held_out = rows["images"].isin(set(defaults["images"]))
    searched = rows["candidate"].notna()
    return rows[searched & ~held_out], rows[searched & held_out], defaults


def history(tuning: pd.DataFrame, roles: Roles) -> pd.DataFrame:
    """Per candidate in the order proposed: its searched settings, trials, state, mean PSNR over the
    tuning images (as the driver scores it: an exact copy counts as PSNR_CAP) and the best so far,
    carried through pruned and failed candidates."""
    searched = roles.varying_settings(tuning)
    grouped = tuning.groupby("candidate", sort=True)
    table = grouped[searched].first() if searched else pd.DataFrame(index=grouped.size().index)
    table["trials"] = grouped.size()
    table["state"] = grouped["status"].agg(_state)
    table["iterations_run"] = grouped["iterations_run"].max()
    table["psnr"] = grouped["psnr"].agg(_capped_mean).where(table["state"] == "complete")
    table["best_so_far"] = table["psnr"].cummax().ffill()
    return table.reset_index().astype({"candidate": int})


def _state(statuses: pd.Series) -> str:
    if (statuses == "ok").all():
        return "complete"
    return "pruned" if (statuses == "pruned").any() else "failed"


def _capped_mean(values: pd.Series) -> float:
    return float(np.minimum(values.astype(float), stats.PSNR_CAP).mean())


def comparison(tuned: pd.DataFrame, defaults: pd.DataFrame, seed: int = 0) -> dict | None:
    """The best candidate against the paper's defaults on the same held-out clients: each side's mean
    PSNR, the mean paired gain and its interval; None when a side lacks finished rows."""
    pairs = stats.finished(tuned)[["images", "psnr", "baseline_psnr", "candidate"]].merge(
        stats.finished(defaults)[["images", "psnr"]], on="images", suffixes=("_tuned", "_defaults")
    )
    if pairs.empty:
        return None
    tuned_psnr = np.minimum(pairs["psnr_tuned"].astype(float), stats.PSNR_CAP)
    default_psnr = np.minimum(pairs["psnr_defaults"].astype(float), stats.PSNR_CAP)
    low, high = stats.mean_interval(tuned_psnr - default_psnr, seed)
    return {
        "candidate": int(pairs["candidate"].iloc[0]),
        "clients": len(pairs),
        "baseline_psnr": pairs["baseline_psnr"].astype(float).mean(),
        "tuned_psnr": tuned_psnr.mean(),
        "defaults_psnr": default_psnr.mean(),
        "gain": (tuned_psnr - default_psnr).mean(),
        "ci_low": low,
        "ci_high": high,
        "unpaired": len(tuned) + len(defaults) - 2 * len(pairs),
    }
