"""The Optuna side of `gradinv tune`: storage, sampler, pruner, candidates drawn from the search space,
and a stopped driver's candidates queued again.

Resume: the Optuna study (a journal file in the results directory by default) is loaded again;
candidates a killed driver left running are marked failed and their parameters queued again. The
sampler is seeded anew from the study's seed and the trials so far, so the search continues, not replays.
"""

from __future__ import annotations

from pathlib import Path

from gradinv.errors import ConfigError

from .tune_section import LogUniform, TuneSettings

JOURNAL_NAME = "_optuna.journal"  # '_': dataset readers skip it


def suggest(trial, families: dict) -> dict:
    """The candidate's attack parameters, drawn from the search space: with several families, the
    family first ("attack"), then its own settings named "family.setting" (a conditional space)."""
    if len(families) == 1:
        return _suggest(trial, next(iter(families.values())), "")
    family = trial.suggest_categorical("attack", list(families))
    return {"attack": family, **_suggest(trial, families[family], f"{family}.")}


def _suggest(trial, space: dict, prefix: str) -> dict:
    params = {}
    for name, dimension in space.items():
        if isinstance(dimension, LogUniform):
            params[prefix + name] = trial.suggest_float(prefix + name, dimension.low, dimension.high, log=True)
        else:
            params[prefix + name] = trial.suggest_categorical(prefix + name, list(dimension.values))
    return params



def storage_url(results: Path, storage: str | None) -> str:
    return storage or str(results / JOURNAL_NAME)


def open_storage(url: str):
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        return RDBStorage(url)
    return JournalStorage(JournalFileBackend(url))


def sampler_seed(seed: int, trials_so_far: int) -> int:
    """The seed of a search's sampler: the study's seed when it starts, and one derived from the seed
    and the trials already in storage when it resumes. A sampler keeps its random state in memory,
    so a resumed search seeded as at its start would ask again for the candidates it began with."""
    if trials_so_far == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence((seed, trials_so_far)).generate_state(1)[0])


def make_sampler(settings: TuneSettings, trials_so_far: int = 0):
    import optuna

    seed = sampler_seed(settings.seed, trials_so_far)
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.sampler_startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=settings.sampler_startup),
        # QMC's position in its sequence lives in the storage, so it continues by itself; its seed (the
        # scrambling) stays the study's, so that the points remain one low-discrepancy sequence.
        # Categorical choices come from its independent sampler, which would replay.
        "qmc": lambda: optuna.samplers.QMCSampler(seed=settings.seed, scramble=True, warn_independent_sampling=False,
                                                  independent_sampler=optuna.samplers.RandomSampler(seed=seed)),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.sampler_startup),
    }
    return samplers[settings.sampler]()


def make_pruner(settings: TuneSettings):
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup, n_warmup_steps=settings.warmup_steps)
    if settings.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.warmup_steps, reduction_factor=2)
    return optuna.pruners.NopPruner()


def open_study(settings: TuneSettings, url: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuned = optuna.create_study(
        storage=open_storage(url), study_name=settings.name, direction="maximize", load_if_exists=True,
        sampler=make_sampler(settings), pruner=make_pruner(settings),
    )  # fmt: skip
    resumed_after = len(tuned.get_trials(deepcopy=False))
    if resumed_after:  # continue the search rather than replay it
        tuned.sampler = make_sampler(settings, resumed_after)
    if tuned.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError("--storage", url, f"its study {settings.name!r} minimises; use another storage")
    return tuned


def requeue(tuned, number: int) -> None:
    """A candidate cut off by the driver's end: failed, its parameters queued again exactly once."""
    import optuna

    frozen = tuned.get_trials(deepcopy=False)[number]
    already = any(t.user_attrs.get("requeued_from") == number for t in tuned.get_trials(deepcopy=False))
    if not already:
        tuned.enqueue_trial(frozen.params, user_attrs={"requeued_from": number})
    optuna.trial.Trial(tuned, frozen._trial_id).set_user_attr("interrupted", True)
    tuned.tell(number, state=optuna.trial.TrialState.FAIL)


def requeue_interrupted(tuned) -> int:
    import optuna

    running = tuned.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for frozen in running:
        requeue(tuned, frozen.number)
    return len(running)


def finished_candidates(tuned) -> int:
    """Complete, pruned and failed candidates, less those failed only because a driver stopped."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(t.state in done and not t.user_attrs.get("interrupted") for t in tuned.get_trials(deepcopy=False))


def best_trial(tuned):
    """The complete candidate with the highest objective; None when none completed."""
    from optuna.trial import TrialState

    complete = tuned.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def dashboard_hint(url: str) -> str:
    return f"optuna-dashboard {url}   (install it with: pip install -e '.[dashboard]')"
