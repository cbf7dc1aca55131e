"""The attack's curve: had it settled when its budget ended? A "no leakage detected" is only as good as
the attack's budget, and rows record each trial's best gradient cost and its quality at evenly spaced
checkpoints (``curve_*``); this reads their last part."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradinv.attacks.base import SETTLED_COST_FALL, SETTLED_FROM

# The curve's last part starts at TAIL_FROM of the run. Settled: over it the median gain rose by less than
# PLATEAU_GAIN_DB and the best gradient cost fell by less than PLATEAU_COST_FALL, the share at which the
# attack's own budget (max_iterations) stops extending a trial.
TAIL_FROM = SETTLED_FROM
PLATEAU_GAIN_DB = 0.5
PLATEAU_COST_FALL = SETTLED_COST_FALL

TAIL_UNKNOWN = {"tail_gain_rise": np.nan, "tail_cost_fall": np.nan, "gain_slope": np.nan}


def trial_tails(curves: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """Per trial (indexed by key): over its curve's last part (checkpoints from TAIL_FROM of the run on),
    the rise of its gain (dB), the share by which its best gradient cost fell, and the iterations spanned.
    The gain is ``curve_gain``, or for rows written before it, ``curve_psnr`` less the trial's baseline."""
    baselines = frame.set_index("key")["baseline_psnr"].astype(float)
    rows = {}
    for row in curves.itertuples(index=False):
        iterations = _values(row.curve_iterations)
        if len(iterations) < 2:
            continue
        gains = _values(getattr(row, "curve_gain", None))
        psnrs = _values(row.curve_psnr)
        if len(gains) != len(iterations) and len(psnrs) == len(iterations):
            gains = [psnr - baselines.get(row.key, np.nan) for psnr in psnrs]
        start = tail_start(iterations)
        costs = _values(row.curve_costs)
        rows[row.key] = {
            "gain_rise": gains[-1] - gains[start] if len(gains) == len(iterations) else np.nan,
            "cost_fall": _fall(costs[start], costs[-1]) if len(costs) == len(iterations) else np.nan,
            "span": iterations[-1] - iterations[start],
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["gain_rise", "cost_fall", "span"], dtype=float)


def _values(column) -> list:
    """A list cell as a list: empty where the row has none (None, or a column older files lack)."""
    if column is None or isinstance(column, float):  # None, or pandas' NaN for a missing list
        return []
    return [np.nan if value is None else float(value) for value in column]


def _fall(before: float, after: float) -> float:
    """The share by which a best cost fell (costs are never negative; a best cost never rises)."""
    return 1 - after / before if np.isfinite(before) and before > 0 else np.nan


def tail_start(iterations: list[int]) -> int:
    """The first checkpoint of the last part of the run, never the last checkpoint itself."""
    from_here = [i for i, iteration in enumerate(iterations) if iteration >= TAIL_FROM * iterations[-1]]
    return min(from_here[0], len(iterations) - 2)


def setting_tail(tails: pd.DataFrame, keys: pd.Series) -> dict:
    """A setting's curve over its last part: the median over its trials of the gain's rise (dB) and of the
    cost's fall (a share), and the gain's slope in dB per 1,000 iterations."""
    mine = tails.reindex(keys.unique()).dropna(subset=["span"])
    if mine.empty:
        return dict(TAIL_UNKNOWN)
    rise, span = mine["gain_rise"].median(), mine["span"].median()
    return {
        "tail_gain_rise": rise,
        "tail_cost_fall": mine["cost_fall"].median(),
        "gain_slope": rise / span * 1000 if span > 0 else np.nan,
    }


def settled(tail: dict) -> bool | None:
    """Whether the attack had settled over its curve's last part: its gain no longer rising and its cost
    no longer falling (None without a curve). Either one still moving means more budget may change it."""
    rise, fall = tail["tail_gain_rise"], tail["tail_cost_fall"]
    if np.isnan(rise) and np.isnan(fall):
        return None
    moving = (not np.isnan(rise) and rise >= PLATEAU_GAIN_DB) or (not np.isnan(fall) and fall >= PLATEAU_COST_FALL)
    return not moving
