"""Per-setting statistics of finished trials: summaries with honest intervals, leakage over the
no-information baseline, success rates, best-of-restarts and paired trained-vs-untrained differences.

One trial is one observation (its metric is the mean over the client's images), except in the paired
comparison, where one image attacked under both model states is one pair. Intervals are 95%: BCa
bootstrap for means of at least MIN_BOOTSTRAP values (fewer get none: "n too small"), the
distribution-free order-statistic interval for medians, Wilson for success rates.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from gradinv.errors import ConfigError

from .curves import TAIL_UNKNOWN, setting_tail, settled, trial_tails

METRICS = ("psnr", "psnr_gain", "ssim", "label_accuracy")  # the outcomes summarised per setting
SUCCESS_PSNR = 20.0  # dB: a reconstruction this close is recognisably the client's image
RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_BOOTSTRAP = 10  # fewer values give a bootstrap interval that means nothing (a handful of distinct resamples)
PSNR_CAP = 100.0  # dB: an exact copy scores +inf; counted as this, as the tuning driver does
TOO_SMALL = "n too small"
LEAKS = "leakage"
NO_LEAKAGE = "no leakage detected"
# A "no leakage" is only as good as the attack's budget: its curve says whether it had settled (curves.py).
SETTLED_WORDS = {True: "converged", False: "still improving \u2014 more budget may leak"}
CONVERGED = f"{NO_LEAKAGE}, {SETTLED_WORDS[True]}"
STILL_IMPROVING = f"{NO_LEAKAGE}, {SETTLED_WORDS[False]}"


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def _observations(values) -> np.ndarray:
    values = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").astype(float), dtype=float)
    return np.clip(values[~np.isnan(values)], -PSNR_CAP, PSNR_CAP)


def mean_interval(values, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap interval of the mean (scipy.stats.bootstrap); (nan, nan) below MIN_BOOTSTRAP values."""
    values = _observations(values)
    if values.size < MIN_BOOTSTRAP:
        return float("nan"), float("nan")
    if np.ptp(values) == 0:  # every resample has the same mean
        return float(values[0]), float(values[0])
    with warnings.catch_warnings():  # a near-degenerate sample warns; the interval is still the best we have
        warnings.simplefilter("ignore")
        result = scipy_stats.bootstrap(
            (values,),
            np.mean,
            confidence_level=CONFIDENCE,
            n_resamples=RESAMPLES,
            method="BCa",
            random_state=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def median_interval(values) -> tuple[float, float]:
    """Distribution-free interval of the median from order statistics (scipy.stats.quantile_test):
    valid for any distribution; (nan, nan) when there are too few values (under 6 at 95%)."""
    values = _observations(values)
    if values.size == 0:
        return float("nan"), float("nan")
    interval = scipy_stats.quantile_test(values, q=0, p=0.5).confidence_interval(CONFIDENCE)
    low, high = float(interval.low), float(interval.high)
    return (low, high) if np.isfinite(low) and np.isfinite(high) else (float("nan"), float("nan"))


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """Wilson score interval of a proportion: never [0, 0] for 0 of n, wide for small n."""
    if trials == 0:
        return float("nan"), float("nan")
    interval = scipy_stats.binomtest(successes, trials).proportion_ci(CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def _groups(frame: pd.DataFrame, by: list[str]):
    if not by:  # one group: the whole frame
        return [((), frame)]
    return frame.groupby(by, dropna=False, sort=True)


def _key_columns(by: list[str], key) -> dict:
    key = key if isinstance(key, tuple) else (key,)
    return dict(zip(by, key))


def summarise(frame: pd.DataFrame, by: list[str], metric: str, seed: int = 0) -> pd.DataFrame:
    """Per setting: trials, mean, interval of the mean (nan: n too small), median, std of ``metric``."""
    require_columns(frame, [*by, metric])
    rows = []
    for key, group in _groups(finished(frame), by):
        values = group[metric].astype(float)
        low, high = mean_interval(values, seed)
        rows.append(
            {
                **_key_columns(by, key),
                "trials": int(values.notna().sum()),
                "mean": values.mean(),
                "ci_low": low,
                "ci_high": high,
                "median": values.median(),
                "std": values.std(),
            }
        )
    columns = [*by, "trials", "mean", "ci_low", "ci_high", "median", "std"]
    return _keep_types(pd.DataFrame(rows, columns=columns), frame, by)


def summarise_all(frame: pd.DataFrame, by: list[str], seed: int = 0) -> dict[str, pd.DataFrame]:
    return {metric: summarise(frame, by, metric, seed) for metric in METRICS}


def leakage(frame: pd.DataFrame, by: list[str], seed: int = 0, curves: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per setting: how far PSNR rises above what a data-only attacker scores without the update.

    ``gain`` is each trial's ``psnr_gain`` (PSNR minus the best no-information baseline). A setting
    leaks when the interval of its median gain lies above 0; otherwise "no leakage detected" (with
    "n too small" when there are too few trials for an interval). Rows without a baseline (written
    before baselines were recorded) give no verdict. With ``curves`` (``load.load_curves``), a "no
    leakage" says whether the attack had settled or was still improving when its budget ended
    (``curve_tail``), with the gain's slope over the run's last part.
    """
    require_columns(frame, by)
    rows = []
    tails = trial_tails(curves, frame) if curves is not None else None
    for key, group in _groups(finished(frame), by):
        gains = group["psnr_gain"].astype(float).dropna()
        mean_low, mean_high = mean_interval(gains, seed)
        median_low, median_high = median_interval(gains)
        tail = setting_tail(tails, group["key"]) if tails is not None else TAIL_UNKNOWN
        rows.append(
            {
                **_key_columns(by, key),
                "trials": len(group),
                "baseline_psnr": group["baseline_psnr"].astype(float).mean(),
                "psnr": group["psnr"].astype(float).mean(),
                "gain_mean": gains.mean(),
                "gain_ci_low": mean_low,
                "gain_ci_high": mean_high,
                "gain_median": gains.median(),
                "median_low": median_low,
                "median_high": median_high,
                **tail,
                "verdict": with_zero_updates(verdict(gains.size, median_low, tail), group),
            }
        )
    columns = [
        *by,
        "trials",
        "baseline_psnr",
        "psnr",
        "gain_mean",
        "gain_ci_low",
        "gain_ci_high",
        "gain_median",
        "median_low",
        "median_high",
        *TAIL_UNKNOWN,
        "verdict",
    ]
    return _keep_types(pd.DataFrame(rows, columns=columns), frame, by)


def verdict(gains: int, median_low: float, tail: dict | None = None) -> str:
    if gains == 0:
        return "no baseline recorded"
    if not np.isnan(median_low) and median_low > 0:
        return LEAKS
    found = NO_LEAKAGE if not np.isnan(median_low) else f"{NO_LEAKAGE} ({TOO_SMALL})"
    at_rest = settled(tail or TAIL_UNKNOWN)
    if at_rest is None:  # no curve: an attack without one, or rows written before curves were recorded
        return found
    return f"{found}, {SETTLED_WORDS[at_rest]}"


def with_zero_updates(said: str, group: pd.DataFrame) -> str:
    """The verdict, and how many of the setting's updates were exactly zero: a client whose training moved
    no parameter (a certain victim's float32 step rounds away) sends nothing any attack could read."""
    zero = int(group["zero_update"].fillna(False).astype(bool).sum()) if "zero_update" in group else 0
    return f"{said}; {zero} of {len(group)} updates exactly zero (nothing to attack)" if zero else said


def success_rate(frame: pd.DataFrame, by: list[str], threshold: float = SUCCESS_PSNR) -> pd.DataFrame:
    """Per setting: the share of trials whose PSNR reaches ``threshold``, with its Wilson interval."""
    require_columns(frame, [*by, "psnr"])
    rows = []
    for key, group in _groups(finished(frame), by):
        hits = int((group["psnr"].astype(float) >= threshold).sum())
        low, high = wilson_interval(hits, len(group))
        rate = hits / len(group) if len(group) else float("nan")
        rows.append(
            {
                **_key_columns(by, key),
                "trials": len(group),
                "successes": hits,
                "rate": rate,
                "ci_low": low,
                "ci_high": high,
            }
        )
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


# ---------------------------------------------------------------------------------------------
# Trained vs untrained, paired per image

MODEL_STATE = ("trained_epochs", "train_subset")  # what differs between the arms of a pair


def per_image(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per attacked image of each finished trial: ``image`` (its dataset index), its PSNR and gain."""
    done = finished(frame)
    done = done[done["images"].notna() & done["psnr_per_image"].notna()]
    if done.empty:
        return done.assign(
            image=pd.Series(dtype="Int64"), image_psnr=pd.Series(dtype=float), image_gain=pd.Series(dtype=float)
        )
    images = done["images"].map(lambda text: [int(i) for i in str(text).split(",")])
    gains = [[np.nan] * len(i) if g is None else list(g) for g, i in zip(done["psnr_gain_per_image"], images)]
    exploded = done.assign(image=images, image_psnr=done["psnr_per_image"].map(list), image_gain=gains)
    exploded = exploded.explode(["image", "image_psnr", "image_gain"])
    return exploded.astype({"image": "Int64", "image_psnr": float, "image_gain": float})


def trained_pairs(frame: pd.DataFrame, pair_on: list[str]) -> pd.DataFrame:
    """Each image attacked under an untrained and a trained victim with every other setting equal:
    one row per (image, trained arm) with the trained side's settings, ``untrained_psnr``,
    ``trained_psnr`` and their gains."""
    images = per_image(frame)
    images = images[images["trained_epochs"].notna()]
    settings = images[pair_on].astype(object).fillna("null").astype(str)  # nulls match nulls
    images = images.assign(pair=settings.agg("|".join, axis=1))
    untrained = images[images["trained_epochs"] == 0][["pair", "image", "image_psnr", "image_gain"]]
    trained = images[images["trained_epochs"] > 0]
    pairs = trained.merge(untrained, on=["pair", "image"], suffixes=("_trained", "_untrained"))
    return pairs.rename(
        columns={
            "image_psnr_trained": "trained_psnr",
            "image_psnr_untrained": "untrained_psnr",
            "image_gain_trained": "trained_gain",
            "image_gain_untrained": "untrained_gain",
        }
    )


def paired_difference(pairs: pd.DataFrame, by: list[str], seed: int = 0) -> pd.DataFrame:
    """Per group: pairs, mean PSNR of each arm, their mean gains, and the mean paired difference
    (trained minus untrained) with its interval (nan below MIN_BOOTSTRAP pairs)."""
    rows = []
    for key, group in _groups(pairs, by):
        difference = group["trained_psnr"] - group["untrained_psnr"]
        low, high = mean_interval(difference, seed)
        rows.append(
            {
                **_key_columns(by, key),
                "pairs": len(group),
                "untrained_psnr": group["untrained_psnr"].mean(),
                "trained_psnr": group["trained_psnr"].mean(),
                "untrained_gain": group["untrained_gain"].mean(),
                "trained_gain": group["trained_gain"].mean(),
                "difference": difference.mean(),
                "ci_low": low,
                "ci_high": high,
                "reading": _difference_reading(low, high),
            }
        )
    columns = [
        *by,
        "pairs",
        "untrained_psnr",
        "trained_psnr",
        "untrained_gain",
        "trained_gain",
        "difference",
        "ci_low",
        "ci_high",
        "reading",
    ]
    return pd.DataFrame(rows, columns=columns)


def _difference_reading(low: float, high: float) -> str:
    if np.isnan(low):
        return f"no difference detected ({TOO_SMALL})"
    if low > 0:
        return "trained leaks more"
    if high < 0:
        return "trained leaks less"
    return "no difference detected"


def _keep_types(table: pd.DataFrame, frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Setting columns as they were (integers with nulls stay integers, not floats)."""
    return table.astype({name: frame[name].dtype for name in by})


def require_columns(frame: pd.DataFrame, names: list[str]) -> None:
    for name in names:
        if name not in frame.columns:
            raise ConfigError("--by", name, f"name a column of the results, e.g. one of {sorted(frame.columns)[:12]}")
