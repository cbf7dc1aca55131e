"""The Optuna side of `gradinv tune`: storage, sampler, pruner, candidates drawn from the search space,
and a stopped driver's candidates queued again.

Resume: the Optuna study (a journal file in the results directory by default) is loaded again;
candidates a killed driver left running are marked failed and their parameters queued again, exactly
as drawn; a candidate killed before all its parameters were drawn never ran and is dropped. The
sampler is seeded anew from the study's seed and the trials so far, so the search continues, not replays.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradinv.errors import ConfigError

from .settings import LogUniform, TuneSettings

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


STORAGE_FIX = "give sqlite:///FILE.db, a database URL (postgresql://, mysql://) or a journal file path"


def check_storage(url: str) -> None:
    """Raises ConfigError (one line) for a storage that cannot be opened, before anything starts."""
    if "://" not in url:
        _check_writable_file(Path(url))
        return
    from sqlalchemy import create_engine, exc

    try:
        engine = create_engine(url)
    except exc.ArgumentError as error:  # an unknown scheme, or a URL SQLAlchemy cannot parse
        raise ConfigError("--storage", url, f"{_first_line(error)}; {STORAGE_FIX}") from None
    except ImportError as error:
        raise ConfigError(
            "--storage",
            url,
            f"its database driver is not installed (no module {error.name!r}); pip install it, or {STORAGE_FIX}",
        ) from None
    try:
        if engine.dialect.name == "sqlite":
            _check_writable_file(Path(engine.url.database or ""))
        else:
            with engine.connect():
                pass
    except exc.SQLAlchemyError as error:
        raise ConfigError(
            "--storage", url, f"cannot connect ({_first_line(error)}); check the server and the URL"
        ) from None
    finally:
        engine.dispose()


def _check_writable_file(path: Path) -> None:
    directory = path.parent
    if not str(path) or str(path) == ":memory:":
        raise ConfigError("--storage", str(path), f"an in-memory storage cannot be resumed; {STORAGE_FIX}")
    if not directory.is_dir():
        raise ConfigError("--storage", str(path), f"{directory} is not a directory; create it or {STORAGE_FIX}")
    if path.exists() and not path.is_file():
        raise ConfigError("--storage", str(path), f"it is not a regular file; {STORAGE_FIX}")
    target = path if path.exists() else directory
    if not os.access(target, os.W_OK):
        raise ConfigError("--storage", str(path), f"{target} is not writable; choose a writable place")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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
        "qmc": lambda: optuna.samplers.QMCSampler(
            seed=settings.seed,
            scramble=True,
            warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        ),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.sampler_startup),
    }
    return samplers[settings.sampler]()


def make_pruner(settings: TuneSettings):
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.pruner_startup, n_warmup_steps=settings.warmup_steps
        )
    if settings.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.warmup_steps, reduction_factor=2)
    return optuna.pruners.NopPruner()


def open_study(settings: TuneSettings, url: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuned = optuna.create_study(
        storage=open_storage(url),
        study_name=settings.name,
        direction="maximize",
        load_if_exists=True,
        sampler=make_sampler(settings),
        pruner=make_pruner(settings),
    )
    resumed_after = len(tuned.get_trials(deepcopy=False))
    if resumed_after:  # continue the search rather than replay it
        tuned.sampler = make_sampler(settings, resumed_after)
    if tuned.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError("--storage", url, f"its study {settings.name!r} minimises; use another storage")
    return tuned


SAMPLED = "sampled"  # user attribute: the candidate's parameters are all in storage


def mark_sampled(trial) -> None:
    """Record that the candidate's parameters are complete. Optuna stores them one at a time, so a
    driver killed while they are drawn leaves a partial set; only a marked set is queued again."""
    trial.set_user_attr(SAMPLED, True)


def sampled_params(frozen) -> dict | None:
    """The candidate's complete parameters: drawn and marked, or fixed when it was queued; else None."""
    if frozen.user_attrs.get(SAMPLED):
        return frozen.params
    return frozen.system_attrs.get("fixed_params")


def requeue(tuned, number: int) -> bool:
    """A candidate cut off by the driver's end: failed, and its parameters queued again exactly once.
    A candidate whose parameters were never all drawn never started: it is failed and not queued, and
    the search draws a new one in its place. Whether it was queued again."""
    import optuna

    frozen = tuned.get_trials(deepcopy=False)[number]
    params = sampled_params(frozen)
    already = any(t.user_attrs.get("requeued_from") == number for t in tuned.get_trials(deepcopy=False))
    if params is not None and not already:
        tuned.enqueue_trial(params, user_attrs={"requeued_from": number})
    optuna.trial.Trial(tuned, frozen._trial_id).set_user_attr("interrupted", True)
    tuned.tell(number, state=optuna.trial.TrialState.FAIL)
    return params is not None


def requeue_interrupted(tuned) -> tuple[int, int]:
    """Candidates a stopped driver left running: (queued again, discarded because never fully drawn)."""
    import optuna

    running = tuned.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    queued = sum(requeue(tuned, frozen.number) for frozen in running)
    return queued, len(running) - queued


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
