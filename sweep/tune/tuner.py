"""`gradinv tune`'s search: Optuna's ask/tell around the candidate driver, then the held-out comparison.

The driver alone talks to Optuna and writes results. A candidate (one Optuna trial) is evaluated as
ordinary trials, one per tuning client (sweep/tune/driver.py); the driver reports the objective
(PSNR or SSIM against the true images: gradinv is a research tool with ground truth) of each client's
best images so far, averaged over the candidate's clients, at every checkpoint, asks the pruner, and
cancels a pruned candidate's tasks. The gradient cost, which tracks the final PSNR loosely, stays a
column of the rows (curve_costs). Every trial lands as a row of the results dataset with its candidate number. At
the end the best parameters and the paper's defaults are compared on held-out images
(sweep/tune/report.py). A killed driver's candidates are queued again (sweep/tune/search.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from gradinv import memory
from gradinv.results.remote import open_store

from ..preflight import check_before_start
from ..ray_connection import connect
from ..runner import runtime_environment
from ..stopping import exit_code
from ..study import Study
from ..task_loop import MachineryFailed
from .driver import Driver, Evaluation
from .report import (
    BEST_NAME,
    Outcome,
    checkpoint_value,
    compare_on_held_out,
    objective_value,
    print_strongest,
    report,
    write_best,
)
from .search import (
    best_trial,
    check_storage,
    dashboard_hint,
    finished_candidates,
    mark_sampled,
    open_study,
    requeue,
    requeue_interrupted,
    storage_url,
    suggest,
)
from .section import tune_searches
from .settings import CHECKPOINTS, TuneSettings, trial_specs

EXIT_OK, EXIT_INCOMPLETE = 0, 1


class Tuner:
    """Optuna's ask/tell around the driver: candidates started, reported, pruned and told."""

    def __init__(self, driver: Driver, tuned, settings: TuneSettings, bar):
        self.driver, self.tuned, self.settings, self.bar = driver, tuned, settings, bar

    def run(self) -> None:
        while finished_candidates(self.tuned) < self.settings.candidates or self.driver.active:
            while self._room():
                self._ask()
            for evaluation, checkpoint in self.driver.poll():
                if checkpoint and not evaluation.pruned:
                    self._report(evaluation, checkpoint)
                if evaluation.done() and evaluation in self.driver.active:
                    self._tell(evaluation, self.driver.finish(evaluation))

    def _room(self) -> bool:
        busy = len(self.driver.active)
        return busy < self.settings.parallel and finished_candidates(self.tuned) + busy < self.settings.candidates

    def _ask(self) -> None:
        trial = self.tuned.ask()
        params = suggest(trial, self.settings.families)
        mark_sampled(trial)
        specs = trial_specs(self.settings, params, self.settings.tuning)
        evaluation = Evaluation(trial.number, specs, trial)
        if self.driver.reusable(specs):  # the same parameters ran before: their rows stand
            self._tell(evaluation, [self.driver.known[key] for key in specs])
            return
        self.driver.start(evaluation)

    def _report(self, evaluation: Evaluation, checkpoint: int) -> None:
        for step in range(evaluation.reported + 1, checkpoint + 1):
            value = checkpoint_value(
                [evaluation.quality[key][step - 1] for key in evaluation.specs], self.settings.objective
            )
            evaluation.trial.report(value, step)
            evaluation.reported = step
            if step < CHECKPOINTS and evaluation.trial.should_prune() and not self._leading(value, step):
                reason = f"pruned by the {self.settings.pruner} pruner at checkpoint {step} of {CHECKPOINTS}"
                self.driver.cancel(evaluation, reason)
                return

    def _leading(self, value: float, step: int) -> bool:
        """Whether no finished candidate did better at this checkpoint: the best always runs to the end."""
        from optuna.trial import TrialState

        finished = self.tuned.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        others = [t.intermediate_values.get(step) for t in finished]
        return all(other is None or value >= other for other in others)

    def _tell(self, evaluation: Evaluation, rows: list[dict]) -> None:
        from optuna.trial import TrialState

        if evaluation.pruned:
            self.tuned.tell(evaluation.number, state=TrialState.PRUNED)
        else:
            value = objective_value(rows, self.settings.objective)
            if value is None:  # a diverged or lost trial: the candidate failed
                self.tuned.tell(evaluation.number, state=TrialState.FAIL)
            else:
                self.tuned.tell(evaluation.number, value)
        self.bar.update(1)

    def interrupt(self) -> None:
        """Ctrl-C, SIGTERM or Ray failing: write nothing half-done, requeue the candidates in flight."""
        for evaluation in list(self.driver.active):
            self.driver.abandon(evaluation)
            requeue(self.tuned, evaluation.number)


def tune_study(
    study: Study,
    results_path: str | Path,
    *,
    address: str | None = None,
    storage: str | None = None,
    progress: bool = True,
    data_root_arg: str | None = None,
) -> int:
    """Tune the study's attack (per setting, with `per:`); the exit code says whether every search and
    comparison finished."""
    searches = tune_searches(study)
    if storage is not None:
        check_storage(storage)
    fits = check_before_start(study, address)
    with open_store(results_path) as results:
        url = storage_url(results.local_home, storage)  # remote results: Optuna's storage stays on this disk
        ray = connect(address, runtime_environment(data_root_arg, study.trials or ()), study.max_retries)
        if address or os.environ.get("RAY_ADDRESS"):
            fits(memory.largest_node_memory(ray), "the cluster's largest node")
        driver = Driver(ray, study, results)
        outcomes = []
        try:
            for settings in searches:
                outcomes.append(_search(driver, settings, url, progress))
        except KeyboardInterrupt as stop:
            print("interrupted: candidates in flight are queued again; run the same command to continue")
            return exit_code(stop)
        except MachineryFailed as failure:
            print(
                f"gradinv tune: Ray failed under the search ({failure.what}): candidates in flight are queued "
                f"again and their trials have no row; run the same command to continue",
                file=sys.stderr,
            )
            return EXIT_INCOMPLETE
        finally:
            ray.shutdown()
        finished = [outcome for outcome in outcomes if outcome is not None]
        if finished:
            write_best(study, finished, results.local_home)
            if results.filesystem is not None:  # remote results: the fragment beside them too
                results.location.write_whole(BEST_NAME, (results.local_home / BEST_NAME).read_bytes())
        if len(searches) > 1:
            print_strongest(finished)
        print(f"dashboard: {dashboard_hint(url)}")
        complete = len(finished) == len(searches) and all(outcome.comparison for outcome in finished)
        return EXIT_OK if complete else EXIT_INCOMPLETE


def _search(driver: Driver, settings: TuneSettings, url: str, progress: bool) -> Outcome | None:
    """One search to its end and its held-out comparison; None when no candidate finished."""
    tuned = open_study(settings, url)
    requeued, dropped = requeue_interrupted(tuned)
    if requeued:
        print(f"{requeued} candidates left running by a stopped driver: failed and queued again")
    if dropped:
        print(f"{dropped} candidates stopped before all their parameters were drawn: dropped, new ones drawn instead")
    bar = tqdm(
        total=settings.candidates,
        initial=min(finished_candidates(tuned), settings.candidates),
        desc=f"tune {settings.name}",
        unit="candidate",
        disable=not progress,
        dynamic_ncols=True,
    )
    tuner = Tuner(driver, tuned, settings, bar)
    try:
        tuner.run()
    except (KeyboardInterrupt, MachineryFailed):
        tuner.interrupt()
        raise
    finally:
        bar.close()
    best = best_trial(tuned)
    if best is None:
        print(f"no candidate of {settings.name} finished; see `gradinv status {driver.results.path}`")
        return None
    outcome = Outcome(settings, best, compare_on_held_out(driver, settings, best))
    report(outcome)
    return outcome
