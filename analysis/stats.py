"""Per-setting statistics of finished trials: summaries with bootstrap intervals, success rates,
best-of-restarts. One trial is one observation (its metric is the mean over the client's images).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradinv.errors import ConfigError

from .load import METRICS

SUCCESS_PSNR = 20.0  # dB: a reconstruction this close is recognisably the client's image
RESAMPLES = 2000
CONFIDENCE = 0.95
_MAX_DRAWS = 10_000_000  # bootstrap indices held at once; larger groups are resampled in chunks


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def bootstrap_ci(values, seed: int = 0, resamples: int = RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean; NaNs dropped, (nan, nan) when nothing is left."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS // values.size)
    means = np.concatenate([
        values[rng.integers(0, values.size, size=(min(chunk, resamples - start), values.size))].mean(axis=1)
        for start in range(0, resamples, chunk)
    ])  # fmt: skip
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _groups(frame: pd.DataFrame, by: list[str]):
    if not by:  # one group: the whole frame
        return [((), frame)]
    return frame.groupby(by, dropna=False, sort=True)


def _key_columns(by: list[str], key) -> dict:
    key = key if isinstance(key, tuple) else (key,)
    return dict(zip(by, key))


def summarise(frame: pd.DataFrame, by: list[str], metric: str, seed: int = 0) -> pd.DataFrame:
    """Per setting: trials, mean, bootstrap interval of the mean, median, std of ``metric``."""
    require_columns(frame, [*by, metric])
    rows = []
    for key, group in _groups(finished(frame), by):
        values = group[metric].astype(float)
        low, high = bootstrap_ci(values, seed)
        rows.append({
            **_key_columns(by, key), "trials": int(values.notna().sum()), "mean": values.mean(),
            "ci_low": low, "ci_high": high, "median": values.median(), "std": values.std(),
        })  # fmt: skip
    columns = [*by, "trials", "mean", "ci_low", "ci_high", "median", "std"]
    return _keep_types(pd.DataFrame(rows, columns=columns), frame, by)


def summarise_all(frame: pd.DataFrame, by: list[str], seed: int = 0) -> dict[str, pd.DataFrame]:
    return {metric: summarise(frame, by, metric, seed) for metric in METRICS}


def success_rate(frame: pd.DataFrame, by: list[str], threshold: float = SUCCESS_PSNR, seed: int = 0) -> pd.DataFrame:
    """Per setting: the share of trials whose PSNR reaches ``threshold``, with a bootstrap interval."""
    require_columns(frame, [*by, "psnr"])
    rows = []
    for key, group in _groups(finished(frame), by):
        hits = (group["psnr"].astype(float) >= threshold).to_numpy(dtype=float)
        low, high = bootstrap_ci(hits, seed)
        rows.append({**_key_columns(by, key), "trials": hits.size, "successes": int(hits.sum()),
                     "rate": hits.mean() if hits.size else float("nan"), "ci_low": low, "ci_high": high})  # fmt: skip
    columns = [*by, "trials", "successes", "rate", "ci_low", "ci_high"]
    return _keep_types(pd.DataFrame(rows, columns=columns), frame, by)


def best_of_restarts(frame: pd.DataFrame, by: list[str], seed: int = 0) -> pd.DataFrame | None:
    """The attack run with several seeds on the same client's images, scored by its best run.

    Within a trial the winner among restarts is picked by gradient cost (what an attacker can see);
    across trials that differ only in the attack seed this view keeps the highest PSNR, the upper
    bound an oracle choice would reach. None when every client was attacked only once.
    """
    done = finished(frame)
    runs = [*by, *[c for c in ("study", "images") if c not in by and c in done.columns]]
    runs += [c for c in done.columns if c.endswith("_seed") and c != "attack_seed" and c not in runs]
    grouped = done.groupby(runs, dropna=False)["psnr"]
    if done.empty or grouped.size().max() < 2:
        return None
    best = grouped.max().reset_index().rename(columns={"psnr": "best_psnr"})
    table = summarise(best.assign(status="ok"), by, "best_psnr", seed)
    return table.rename(columns={"trials": "clients"})


def _keep_types(table: pd.DataFrame, frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Setting columns as they were (integers with nulls stay integers, not floats)."""
    return table.astype({name: frame[name].dtype for name in by})


def require_columns(frame: pd.DataFrame, names: list[str]) -> None:
    for name in names:
        if name not in frame.columns:
            raise ConfigError("--by", name, f"name a column of the results, e.g. one of {sorted(frame.columns)[:12]}")
