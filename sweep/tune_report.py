"""The end of `gradinv tune`: the best candidate and the paper's defaults on the held-out clients,
the mean paired PSNR gain with the same interval `gradinv report` shows (analysis.stats), and a
`fixed:` block to paste into a `run` study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from analysis import stats

from .study import Study
from .tune_driver import Driver, Evaluation
from .tune_search import dashboard_hint
from .tune_section import DATA_FIELDS, PAPER_DEFAULTS, TuneSettings, attack_settings, trial_specs

BEST_NAME = "_best.yaml"  # '_': a non-Parquet file without it would break pandas/pyarrow readers
TOO_SMALL = "n too small for an interval"


def objective_value(rows: list[dict], objective: str) -> float | None:
    """Mean of the objective over the candidate's clients; None when any trial failed."""
    if any(row["status"] != "ok" for row in rows):
        return None
    return sum(min(row[objective], stats.PSNR_CAP) for row in rows) / len(rows)  # an exact copy is +inf dB


@dataclass(frozen=True)
class Comparison:
    tuned: list[float]  # PSNR per held-out client
    defaults: list[float]
    tuned_objective: float
    defaults_objective: float
    gain: float
    low: float  # nan below stats.MIN_BOOTSTRAP clients
    high: float

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
    return Comparison(
        tuned, defaults, objective_value(tuned_rows, settings.objective), objective_value(default_rows, settings.objective),
        sum(gains) / len(gains), low, high,
    )  # fmt: skip


def best_fragment(study: Study, settings: TuneSettings, best, comparison: Comparison | None) -> str:
    """A `fixed:` block to paste into a `run` study: the fixed settings with the tuned attack."""
    import yaml

    spec = next(iter(trial_specs(settings, best.params, settings.tuning).values()))
    fixed = {"model": spec.model, **{k: v for k, v in spec.non_default().items() if k not in DATA_FIELDS}}
    fixed.update(attack_settings(settings, best.params))
    header = [f"# strongest attack found by `gradinv tune` for {study.name}: candidate {best.number},",
              f"# tuning {settings.objective} {best.value:.4g} (mean over {len(settings.tuning)} clients)"]  # fmt: skip
    if comparison:
        header.append(f"# held-out PSNR gain over the paper's defaults {comparison.gain:+.2f} dB ({comparison.interval()})")
    body = yaml.safe_dump({"fixed": fixed}, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def report(study: Study, settings: TuneSettings, best, comparison: Comparison | None, results: Path, url: str) -> None:
    params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.params.items())
    print(f"best candidate {best.number}: tuning {settings.objective} {best.value:.4g}  ({params})")
    if comparison is None:
        print("held-out comparison: some held-out trials failed; see `gradinv status`")
    else:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(f"held-out ({len(settings.held_out)} clients, budget {settings.budget}): "
              f"tuned {mean(comparison.tuned):.2f} dB, "
              f"paper defaults {mean(comparison.defaults):.2f} dB, gain {comparison.gain:+.2f} dB "
              f"({comparison.interval()})")  # fmt: skip
    fragment = best_fragment(study, settings, best, comparison)
    (results / BEST_NAME).write_text(fragment)
    print(fragment, end="")
    print(f"wrote {results / BEST_NAME}")
    print(f"dashboard: {dashboard_hint(url)}")
