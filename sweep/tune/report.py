"""The end of `gradinv tune`: the best candidate and the paper's defaults on the held-out clients,
the mean paired PSNR gain with the same interval `gradinv report` shows (analysis.stats), and a
`fixed:` block to paste into a `run` study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from analysis import stats
from gradinv.files import write_atomic

from ..study import Study
from .driver import Driver, Evaluation
from .settings import DATA_FIELDS, PAPER_DEFAULTS, TuneSettings, candidate, trial_specs

BEST_NAME = "_best.yaml"  # '_': a non-Parquet file without it would break pandas/pyarrow readers
TOO_SMALL = "n too small for an interval"


def objective_value(rows: list[dict], objective: str) -> float | None:
    """Mean of the objective over the candidate's clients; None when any trial failed."""
    if any(row["status"] != "ok" for row in rows):
        return None
    return sum(min(row[objective], stats.PSNR_CAP) for row in rows) / len(rows)  # an exact copy is +inf dB


def checkpoint_value(quality: list[tuple[float, float]], objective: str) -> float:
    """The objective of a candidate's best images so far, averaged over its clients: the pruning signal.
    A diverged lane (NaN) counts as the worst value, an exact copy as stats.PSNR_CAP."""
    values = [psnr if objective == "psnr" else ssim for psnr, ssim in quality]
    capped = [-stats.PSNR_CAP if math.isnan(v) else max(min(v, stats.PSNR_CAP), -stats.PSNR_CAP) for v in values]
    return sum(capped) / len(capped)


@dataclass(frozen=True)
class Comparison:
    tuned: list[float]  # PSNR per held-out client
    defaults: list[float]
    tuned_objective: float
    defaults_objective: float
    baseline: float  # mean PSNR of the no-information baseline on the same images (nan where none)
    gain: float
    low: float  # nan below stats.MIN_BOOTSTRAP clients
    high: float

    @property
    def tuned_mean(self) -> float:
        return sum(self.tuned) / len(self.tuned)

    @property
    def defaults_mean(self) -> float:
        return sum(self.defaults) / len(self.defaults)

    def interval(self) -> str:
        if math.isnan(self.low):
            return f"{TOO_SMALL}: {len(self.tuned)} clients, {stats.MIN_BOOTSTRAP} needed"
        return f"95% CI {self.low:+.2f} to {self.high:+.2f}, BCa bootstrap"


def compare_on_held_out(driver: Driver, settings: TuneSettings, best) -> Comparison | None:
    tuned_rows, default_rows = driver.evaluate(
        Evaluation(best.number, trial_specs(settings, best.params, settings.held_out)),
        Evaluation(None, trial_specs(settings, PAPER_DEFAULTS, settings.held_out)),
    )
    if any(row["status"] != "ok" for row in tuned_rows + default_rows):
        return None
    tuned = [min(row["psnr"], stats.PSNR_CAP) for row in tuned_rows]  # an exact copy is +inf dB
    defaults = [min(row["psnr"], stats.PSNR_CAP) for row in default_rows]
    gains = [t - d for t, d in zip(tuned, defaults)]
    low, high = stats.mean_interval(gains)  # the seed `gradinv report` uses by default: the same interval
    baselines = [row.get("baseline_psnr") for row in tuned_rows]
    baseline = math.nan if None in baselines else sum(baselines) / len(baselines)
    return Comparison(
        tuned,
        defaults,
        objective_value(tuned_rows, settings.objective),
        objective_value(default_rows, settings.objective),
        baseline,
        sum(gains) / len(gains),
        low,
        high,
    )


@dataclass(frozen=True)
class Outcome:
    """A finished search: its settings, its best candidate (an Optuna FrozenTrial) and the comparison."""

    settings: TuneSettings
    best: object
    comparison: Comparison | None

    @property
    def chosen(self) -> dict:
        return candidate(self.settings, self.best.params)


def best_fragment(outcome: Outcome) -> str:
    """A `fixed:` block to paste into a `run` study: the fixed settings (and the setting tuned for)
    with the tuned attack."""
    import yaml

    settings, best, comparison = outcome.settings, outcome.best, outcome.comparison
    spec = next(iter(trial_specs(settings, best.params, settings.tuning).values()))
    fixed = {"model": spec.model, **{k: v for k, v in spec.non_default().items() if k not in DATA_FIELDS}}
    fixed.update(outcome.chosen)
    header = [
        f"# strongest attack found by `gradinv tune` for {settings.name}: candidate {best.number},",
        f"# tuning {settings.objective} {best.value:.4g} (mean over {len(settings.tuning)} clients)",
    ]
    if comparison:
        header.append(
            f"# held-out PSNR gain over the paper's defaults {comparison.gain:+.2f} dB ({comparison.interval()})"
        )
    body = yaml.safe_dump({"fixed": fixed}, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def report(outcome: Outcome) -> None:
    settings, best, comparison = outcome.settings, outcome.best, outcome.comparison
    chosen = outcome.chosen
    params = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items() if k != "attack"
    )
    print(
        f"{settings.name}: best candidate {best.number}, family {chosen['attack']} "
        f"({settings.base.threat_model} server), tuning {settings.objective} {best.value:.4g}  ({params})"
    )
    if comparison is None:
        print("held-out comparison: some held-out trials failed; see `gradinv status`")
        return
    print(
        f"held-out ({len(settings.held_out)} clients, budget {settings.budget}): "
        f"tuned {comparison.tuned_mean:.2f} dB, paper defaults {comparison.defaults_mean:.2f} dB, "
        f"gain {comparison.gain:+.2f} dB ({comparison.interval()})"
    )
    if not math.isnan(comparison.baseline):
        print(
            f"no-information baseline {comparison.baseline:.2f} dB; gain over it: tuned "
            f"{comparison.tuned_mean - comparison.baseline:+.2f} dB, paper defaults "
            f"{comparison.defaults_mean - comparison.baseline:+.2f} dB"
        )


def write_best(study: Study, outcomes: list[Outcome], results: Path) -> None:
    """The fragments, one YAML document per search (yaml.safe_load_all reads them), printed and written."""
    text = "---\n".join(best_fragment(outcome) for outcome in outcomes)
    write_atomic(results / BEST_NAME, text.encode())
    print(text, end="")
    print(f"wrote {results / BEST_NAME}")


def print_strongest(outcomes: list[Outcome]) -> None:
    """The strongest attack per setting: the family each search chose and its held-out gains."""
    print("strongest attack per setting (held-out mean PSNR, dB):")
    header = f"{'setting':<28} {'family':<8} {'tuned':>7} {'defaults':>8} {'baseline':>8} {'over baseline':>13}"
    print(f"  {header}  over defaults")
    for outcome in outcomes:
        c = outcome.comparison
        if c is None:
            print(f"  {outcome.settings.describe():<28} {outcome.chosen['attack']:<8} (held-out trials failed)")
            continue
        print(
            f"  {outcome.settings.describe():<28} {outcome.chosen['attack']:<8} {c.tuned_mean:7.2f} "
            f"{c.defaults_mean:8.2f} {c.baseline:8.2f} {c.tuned_mean - c.baseline:+13.2f}  "
            f"{c.gain:+.2f} ({c.interval()})"
        )
