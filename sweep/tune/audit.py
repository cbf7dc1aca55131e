"""Did the pruner stop candidates that would have won? Every pruned candidate of a finished search is
run to the end here (in this process; nothing is written to the results) and its final objective set
beside the median of the candidates that completed: a pruned candidate that ends above it was a
false prune. benchmarks/false_prunes.py reports the rate.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from gradinv.trial import run_trials

from ..study import Study
from .report import objective_value
from .search import open_study, storage_url
from .section import tune_searches
from .settings import trial_specs


def rerun_pruned(study: Study, results: str | Path, storage: str | None = None) -> list[dict]:
    """One record per pruned candidate: its search, number, the checkpoint it was stopped at, its final
    objective run to completion, the completed candidates' median, and whether it would have beaten it."""
    from optuna.trial import TrialState

    records = []
    for settings in tune_searches(study):
        tuned = open_study(settings, storage_url(Path(results), storage))
        completed = [t.value for t in tuned.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        median = statistics.median(completed) if completed else float("nan")
        for trial in tuned.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
            specs = list(trial_specs(settings, trial.params, settings.tuning).values())
            outcomes = run_trials(specs)
            rows = [{"status": o.status, settings.objective: o.metrics.get(settings.objective)} for o in outcomes]
            final = objective_value(rows, settings.objective)
            records.append(
                {
                    "search": settings.name,
                    "candidate": trial.number,
                    "pruned_at": max(trial.intermediate_values),
                    "iterations": [o.curve[-1][0] if o.curve else None for o in outcomes],
                    "final": final,
                    "median_completed": median,
                    "false_prune": final is not None and final > median,
                }
            )
    return records
