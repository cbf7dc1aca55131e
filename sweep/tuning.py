"""`gradinv tune`: search for the strongest attack of a study's setting with Optuna, on Ray.

The driver alone talks to Optuna (ask/tell) and writes results. A candidate (one Optuna trial) is
evaluated as ordinary trials, one per tuning client, packed as lanes into Ray generator tasks that
stream a comparable cost at every checkpoint and then their rows. The driver reports the mean over
the candidate's clients, asks the pruner, and cancels a pruned candidate's tasks. Every trial lands
as a row of the results dataset with its candidate number. At the end the best parameters and the
paper's defaults are compared on held-out images with a paired bootstrap.

Resume: the Optuna study (a journal file in the results directory by default) is loaded again;
candidates a killed driver left running are marked failed and their parameters queued again, and a
candidate whose trial keys all have finished rows takes them instead of running again. The sampler
is seeded anew from the study's seed and the trials so far, so the search continues, not replays.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from gradinv.attacks.inverting import DECAYS, INITS, LAYER_WEIGHTINGS
from gradinv.errors import ConfigError
from gradinv.trial import TrialOutcome, TrialSpec

from .execution import Pack, PackStopped, failed_outcomes, now, outcome_row, run_pack, where_am_i
from .results import ResultsDir, trial_key
from .study import Study, StudyError, _Checker

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TUNE_KEYS = ("objective", "budget", "space", "sampler", "pruner", "candidates", "parallel",
             "tuning_images", "held_out_images", "bootstrap")  # fmt: skip
OBJECTIVES = ("psnr", "ssim")
LOG_UNIFORM = ("tv", "lr")
# Costs are limited to those comparable_scales makes comparable across candidates (for the pruner).
CHOICES = {"restarts": None, "decay": DECAYS, "cost": ("cosine", "l2"), "layer_weighting": LAYER_WEIGHTINGS, "init": INITS}
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
PRUNERS = ("median", "successive-halving", "none")
CHECKPOINTS = 8  # invert_gradients reports at 8 evenly spaced iterations; pruning steps count them
FIRST_DECAY = 3 / 8  # the step schedule's first decay: no candidate is judged before it
PAPER_DEFAULTS = {"tv": 1e-4, "lr": 0.1, "restarts": 1, "decay": "step", "cost": "cosine",
                  "layer_weighting": "equal", "init": "randn"}  # fmt: skip
JOURNAL_NAME = "_optuna.journal"  # '_': dataset readers skip it
BEST_NAME = "_best.yaml"  # '_': a non-Parquet file without it would break pandas/pyarrow readers
DATA_FIELDS = ("dataset", "images", "image_size", "labels")


# ---------------------------------------------------------------------------------------------
# The tune: section


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float


@dataclass(frozen=True)
class Choice:
    values: tuple


@dataclass(frozen=True)
class TuneSettings:
    objective: str
    budget: int  # restarts x iterations of every candidate
    space: dict  # parameter -> LogUniform or Choice
    sampler: str
    seed: int  # a fresh search's sampler seed; a resumed one derives its own (see sampler_seed)
    sampler_startup: int
    pruner: str
    # Checkpoints are reported as steps 1..8. Optuna's MedianPruner (n_warmup_steps) and
    # SuccessiveHalvingPruner (min_resource) first judge the step equal to this value, so the
    # checkpoints before it, 1 .. warmup_steps - 1, are the warm-up.
    warmup_steps: int
    pruner_startup: int
    candidates: int
    parallel: int
    tuning: tuple[tuple[int, ...], ...]  # clients (image index tuples)
    held_out: tuple[tuple[int, ...], ...]
    bootstrap: int
    base: TrialSpec  # the study's fixed settings


def tune_settings(study: Study) -> TuneSettings:
    """The study's tune: section, validated; every mistake is a StudyError naming file:line and field."""
    check = _Checker(Path(study.path), study.lines)
    if study.tune is None:
        raise StudyError(study.path, None, "tune", "the study has no 'tune:' section; add one (see README.md, 'The tune: section')")
    tune = check.mapping(study.tune, ("tune",), TUNE_KEYS)
    base = _base_spec(check, study)
    budget = _budget(check, tune, base, study.lines)
    space = _space(check, tune.get("space"), budget, study.lines)
    sampler, seed, sampler_startup = _sampler(check, tune.get("sampler", "tpe"))
    candidates = check.number(tune.get("candidates", 16), ("tune", "candidates"), integer=True, minimum=1)
    pruner, warmup_steps, pruner_startup = _pruner(check, tune.get("pruner", "median"), candidates)
    tuning, held_out = _clients(check, tune, study)
    return TuneSettings(
        objective=_objective(check, tune.get("objective", "psnr")), budget=budget, space=space,
        sampler=sampler, seed=seed, sampler_startup=sampler_startup or max(4, candidates // 4),
        pruner=pruner, warmup_steps=warmup_steps, pruner_startup=pruner_startup, candidates=candidates,
        parallel=check.number(tune.get("parallel", 1), ("tune", "parallel"), integer=True, minimum=1),
        tuning=tuning, held_out=held_out,
        bootstrap=check.number(tune.get("bootstrap", 10_000), ("tune", "bootstrap"), integer=True, minimum=100),
        base=base,
    )  # fmt: skip


def _base_spec(check: _Checker, study: Study) -> TrialSpec:
    if study.axes:
        axis = next(iter(study.axes))
        where = ("zip", axis[4:]) if axis.startswith("zip:") else ("grid", axis)
        where = ("data", "dataset") if axis == "dataset" else where
        check.fail(where, "tune searches the attack of one setting; fix it (grid and zip axes into 'fixed')")
    base = study.trials[0]
    if base.attack != "ig":
        check.fail(("fixed", "attack"), f"{base.attack!r}: tune searches the 'ig' attack's settings")
    if base.trained_epochs:
        check.fail(("fixed", "trained_epochs"), "tune attacks untrained victims for now; use 0")
    return base


def _objective(check: _Checker, value) -> str:
    if value not in OBJECTIVES:
        check.fail(("tune", "objective"), f"{value!r}: choose one of {', '.join(OBJECTIVES)} (maximised)")
    return value


def _budget(check: _Checker, tune: dict, base: TrialSpec, lines: dict) -> int:
    if "budget" not in tune:
        return base.iterations * base.restarts
    for name in ("iterations", "restarts"):
        if ("fixed", name) in lines:
            check.fail(("tune", "budget"), f"fixed.{name} also sets the budget; keep one of them")
    return check.number(tune["budget"], ("tune", "budget"), integer=True, minimum=CHECKPOINTS)


def _space(check: _Checker, value, budget: int, lines: dict) -> dict:
    if not isinstance(value, dict) or not value:
        check.fail(("tune", "space"), "name at least one parameter to search, e.g. 'tv: [1.0e-6, 1.0e-1]'")
    space = {}
    for name, choices in value.items():
        where = ("tune", "space", name)
        if name not in LOG_UNIFORM and name not in CHOICES:
            allowed = ", ".join((*LOG_UNIFORM, *CHOICES))
            hint = " (iterations follow from budget // restarts)" if name == "iterations" else ""
            check.fail(where, f"unknown parameter{hint}; searchable: {allowed}")
        if ("fixed", name) in lines:
            check.fail(where, "is also in 'fixed'; search it or fix it, not both")
        if name in LOG_UNIFORM:
            space[name] = _log_range(check, choices, where)
        else:
            space[name] = _choice(check, name, choices, where, budget)
    return space


def _log_range(check: _Checker, value, where: tuple) -> LogUniform:
    if isinstance(value, list) and not value:
        check.fail(where, "empty range; give [low, high]")
    if not isinstance(value, list) or len(value) != 2:
        check.fail(where, f"expected a log-uniform range [low, high], got {value!r}")
    low, high = (float(check.number(v, where + (i,))) for i, v in enumerate(value))
    if low <= 0:
        check.fail(where, f"a log-uniform range needs low > 0, got {low!r}")
    if low > high:
        check.fail(where, f"low {low!r} is above high {high!r}")
    if low == high:
        check.fail(where, f"empty range [{low!r}, {high!r}]; set a single value in 'fixed' instead")
    return LogUniform(low, high)


def _choice(check: _Checker, name: str, value, where: tuple, budget: int) -> Choice:
    if not isinstance(value, list) or not value:
        check.fail(where, "expected a non-empty list of choices")
    if len(set(map(repr, value))) != len(value):
        check.fail(where, "lists a choice twice")
    for i, choice in enumerate(value):
        if name == "restarts":
            check.number(choice, where + (i,), integer=True, minimum=1)
            if budget // choice < CHECKPOINTS:
                check.fail(where + (i,), f"{choice} restarts leave under {CHECKPOINTS} iterations of the budget {budget}")
        elif choice not in CHOICES[name]:
            check.fail(where + (i,), f"{choice!r}: choose from {', '.join(CHOICES[name])}")
    return Choice(tuple(value))


def _named(check: _Checker, value, where: tuple, names: tuple, keys: tuple) -> dict:
    """A component given as a name or as a mapping with a 'name' and options."""
    spec = {"name": value} if isinstance(value, str) else check.mapping(value, where, keys)
    name = spec.get("name")
    if name not in names:
        at = where + ("name",) if isinstance(value, dict) else where
        check.fail(at, f"unknown {where[-1]} {name!r}; choose one of {', '.join(names)}")
    return spec


def _sampler(check: _Checker, value) -> tuple[str, int, int | None]:
    where = ("tune", "sampler")
    spec = _named(check, value, where, SAMPLERS, ("name", "seed", "startup"))
    if spec["name"] == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            check.fail(where, "the cmaes sampler needs the 'cmaes' package; pip install cmaes, or choose tpe")
    seed = check.number(spec.get("seed", 0), where + ("seed",), integer=True, minimum=0)
    startup = spec.get("startup")
    if startup is not None:
        startup = check.number(startup, where + ("startup",), integer=True, minimum=1)
    return spec["name"], seed, startup


def _pruner(check: _Checker, value, candidates: int) -> tuple[str, int, int]:
    where = ("tune", "pruner")
    spec = _named(check, value, where, PRUNERS, ("name", "warmup", "startup"))
    warmup = float(check.number(spec.get("warmup", FIRST_DECAY), where + ("warmup",)))
    if not FIRST_DECAY <= warmup < 1:
        check.fail(where + ("warmup",), f"{warmup!r}: use a fraction from 0.375 (the first step decay) to below 1")
    if spec["name"] == "successive-halving" and "startup" in spec:
        check.fail(where + ("startup",), "successive-halving has no startup; remove it")
    startup = check.number(spec.get("startup", min(4, candidates)), where + ("startup",), integer=True, minimum=1)
    # The first checkpoint strictly after the warm-up fraction of the iterations: the first judged.
    return spec["name"], math.floor(warmup * CHECKPOINTS) + 1, startup


def _clients(check: _Checker, tune: dict, study: Study) -> tuple[tuple, tuple]:
    """Tuning and held-out clients: counts dealt from the study's images in order, or index lists."""
    per_client = len(study.trials[0].images)
    pool = [index for spec in study.trials for index in spec.images]
    tuning = _images(check, tune.get("tuning_images", len(pool) // 2), ("tune", "tuning_images"), pool)
    rest = [index for index in pool if index not in tuning]
    held_out = _images(check, tune.get("held_out_images", len(rest)), ("tune", "held_out_images"), rest)
    if set(tuning) & set(held_out):
        shared = sorted(set(tuning) & set(held_out))
        check.fail(("tune", "held_out_images"), f"shares images {shared} with tuning_images; keep them disjoint")
    clients = []
    for images, key in ((tuning, "tuning_images"), (held_out, "held_out_images")):
        if len(images) % per_client:
            check.fail(("tune", key), f"{len(images)} images do not deal into clients of {per_client}")
        for start in range(0, len(images), per_client):
            _check_images(check, study.trials[0], tuple(images[start : start + per_client]), ("tune", key))
        clients.append(tuple(tuple(images[i : i + per_client]) for i in range(0, len(images), per_client)))
    return clients[0], clients[1]


def _images(check: _Checker, value, where: tuple, available: list) -> list[int]:
    """An index list as given, or a count taken in order from the study's images not yet used."""
    if isinstance(value, list):
        if not value:
            check.fail(where, "expected a non-empty list of image indices or a count")
        for i, index in enumerate(value):
            check.number(index, where + (i,), integer=True, minimum=0)
        if len(set(value)) != len(value):
            check.fail(where, "lists an image twice")
        return list(value)
    count = check.number(value, where, integer=True, minimum=1)
    if count > len(available):
        check.fail(where, f"needs {count} images but {len(available)} of the study's are left; raise data.images")
    return available[:count]


def _check_images(check: _Checker, base: TrialSpec, images: tuple, where: tuple) -> None:
    try:
        dataclasses.replace(base, images=images)
    except ConfigError as error:
        check.fail(where, f"{error.value!r}: {error.fix}")


# ---------------------------------------------------------------------------------------------
# Candidates as trials


def suggest(trial, space: dict) -> dict:
    """The candidate's attack parameters, drawn from the search space."""
    params = {}
    for name, dimension in space.items():
        if isinstance(dimension, LogUniform):
            params[name] = trial.suggest_float(name, dimension.low, dimension.high, log=True)
        else:
            params[name] = trial.suggest_categorical(name, list(dimension.values))
    return params


def attack_settings(settings: TuneSettings, params: dict) -> dict:
    """Trial fields for the parameters: restarts share the fixed budget with the iterations."""
    restarts = params.get("restarts", settings.base.restarts)
    return {**params, "restarts": restarts, "iterations": settings.budget // restarts}


def trial_specs(settings: TuneSettings, params: dict, clients) -> dict[str, TrialSpec]:
    """Key -> resolved trial, one per client, in client order."""
    values = attack_settings(settings, params)
    specs = [dataclasses.replace(settings.base, images=client, **values).resolved() for client in clients]
    return {trial_key(spec): spec for spec in specs}


# ---------------------------------------------------------------------------------------------
# The Optuna study


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


def open_study(study: Study, settings: TuneSettings, url: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuned = optuna.create_study(
        storage=open_storage(url), study_name=study.name, direction="maximize", load_if_exists=True,
        sampler=make_sampler(settings), pruner=make_pruner(settings),
    )  # fmt: skip
    resumed_after = len(tuned.get_trials(deepcopy=False))
    if resumed_after:  # continue the search rather than replay it
        tuned.sampler = make_sampler(settings, resumed_after)
    if tuned.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError("--storage", url, f"its study {study.name!r} minimises; use another storage")
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


# ---------------------------------------------------------------------------------------------
# Inside a Ray worker: a pack streamed checkpoint by checkpoint


class CandidateStopped(PackStopped):
    pass


def comparable_scales(pack: Pack) -> list[float]:
    """Per-lane factors that make gradient costs comparable across candidates: 1 - cos as is, and
    the squared distance over twice the target's weighted squared norm (equal to 1 - cos when the
    two gradients have equal norms)."""
    if pack.specs[0].cost != "l2":
        return [1.0] * len(pack.specs)
    from gradinv import data
    from gradinv.attacks.inverting import layer_weights
    from gradinv.fl import client_update
    from gradinv.trial import build_victim

    scales = []
    model = build_victim(pack.specs[0]).eval()
    for spec in pack.specs:
        images01, labels = data.load_images(spec.dataset, spec.images, None, image_size=spec.image_size)
        update = client_update(model, data.normalise(images01, spec.data_spec), labels, spec.fl_config())
        weights = layer_weights(len(update.tensors), spec.layer_weighting, spec.layers)
        norm = sum(w * float(t.pow(2).sum()) for w, t in zip(weights, update.tensors))
        scales.append(1.0 / (2.0 * norm) if norm > 0 else 1.0)
    return scales


def stream_pack(pack: Pack):
    """Ray generator task: ("checkpoint", keys, iteration, costs, comparable costs) at every checkpoint
    of the lanes running, then ("rows", rows). The attack runs in a thread (a callback cannot yield);
    when the task is cancelled, the thread stops at its next checkpoint."""
    from .runner import current_attempt

    attempt = current_attempt()
    scales = dict(zip(pack.keys, comparable_scales(pack)))
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def on_checkpoint(keys: tuple[str, ...], iteration: int, costs: list[float]) -> None:
        if stop.is_set():
            raise CandidateStopped("cancelled by the tuning driver")
        events.put(("checkpoint", keys, iteration, costs, [c * scales[k] for k, c in zip(keys, costs)]))

    def attack() -> None:
        try:
            events.put(("rows", run_pack(pack, attempt, on_checkpoint=on_checkpoint)))
        except BaseException as error:  # noqa: BLE001 - handed to the task's thread to raise
            events.put(("error", error))

    worker = threading.Thread(target=attack, name="attack", daemon=True)
    worker.start()
    try:
        while True:
            try:
                item = events.get(timeout=0.2)  # short waits: a cancellation interrupts between them
            except queue.Empty:
                continue
            if item[0] == "error":
                raise item[1]
            yield item
            if item[0] == "rows":
                return
    finally:
        stop.set()
        worker.join()


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class Evaluation:
    """One candidate's (or comparison's) trials in flight, and what they have streamed so far."""

    number: int | None  # the Optuna trial number; None for the paper-defaults comparison
    specs: dict[str, TrialSpec]
    trial: object = None  # optuna.trial.Trial while tuning
    running: dict = field(default_factory=dict)  # generator -> Pack
    costs: dict = field(default_factory=dict)  # key -> comparable cost per checkpoint
    curves: dict = field(default_factory=dict)  # key -> [(iteration, cost)]
    rows: dict = field(default_factory=dict)  # key -> row
    reported: int = 0  # checkpoints reported to Optuna
    started: object = None
    pruned: bool = False

    def done(self) -> bool:
        return not self.running


class Driver:
    """Ray tasks in flight for several evaluations; rows written once per finished evaluation."""

    def __init__(self, ray, study: Study, results: ResultsDir, settings: TuneSettings):
        from .runner import make_packs

        self.ray, self.study, self.results, self.settings = ray, study, results, settings
        self.make_packs = make_packs
        self.device = "cuda" if study.resources.num_gpus > 0 else "cpu"
        self.task = ray.remote(stream_pack).options(
            num_returns="streaming", num_cpus=study.resources.num_cpus, num_gpus=study.resources.num_gpus,
            max_retries=study.max_retries, retry_exceptions=False,
        )  # fmt: skip
        self.known = self._finished_rows()
        self.active: list[Evaluation] = []
        self._nowhere = {k: None for k in where_am_i(self.device)}

    def _finished_rows(self) -> dict[str, dict]:
        """Key -> {status, psnr, ssim} of every ok or failed row (pruned rows are incomplete)."""
        table = self.results.read(["key", "status", "psnr", "ssim"]).to_pylist()
        return {row["key"]: row for row in table if row["status"] in ("ok", "failed")}

    def reusable(self, specs: dict) -> bool:
        return all(key in self.known for key in specs)

    def start(self, evaluation: Evaluation) -> Evaluation:
        study = dataclasses.replace(self.study, lanes=self.study.lanes or len(evaluation.specs))
        evaluation.started = now()
        for pack in self.make_packs(study, list(evaluation.specs.items()), self.device):
            pack = dataclasses.replace(pack, candidate=evaluation.number)
            evaluation.running[self.task.remote(pack)] = pack
        self.active.append(evaluation)
        return evaluation

    def poll(self, timeout: float = 1.0) -> list[tuple[Evaluation, int | None]]:
        """Take what a ready stream holds: (evaluation, checkpoints complete on all its trials, or None)."""
        generators = {gen: ev for ev in self.active for gen in ev.running}
        if not generators:
            return []
        ready, _ = self.ray.wait(list(generators), num_returns=1, timeout=timeout)
        events = []
        for gen in ready:
            evaluation = generators[gen]
            if gen in evaluation.running:  # not cancelled by an earlier event of this poll
                events.append((evaluation, self._take(evaluation, gen)))
        return events

    def _take(self, evaluation: Evaluation, gen) -> int | None:
        pack = evaluation.running[gen]
        try:
            item = self.ray.get(next(gen))
        except StopIteration:  # ended without rows: only if the stream was cut short
            evaluation.running.pop(gen)
            self._add_failed(evaluation, pack, RuntimeError("the task's stream ended without rows"))
            return None
        except self.ray.exceptions.RayError as error:  # the task failed for good (its worker died every time)
            evaluation.running.pop(gen)
            self._add_failed(evaluation, pack, error)
            return None
        if item[0] == "rows":
            evaluation.running.pop(gen)
            evaluation.rows.update({row["key"]: row for row in item[1]})
            return None
        _, keys, iteration, costs, comparable = item
        for key, cost, value in zip(keys, costs, comparable):
            curve = evaluation.curves.setdefault(key, [])
            if any(done == iteration for done, _ in curve):  # run again alone after a pack-mate raised
                continue
            curve.append((iteration, cost))
            evaluation.costs.setdefault(key, []).append(value)
        return self.complete_checkpoints(evaluation)

    def complete_checkpoints(self, evaluation: Evaluation) -> int:
        return min((len(evaluation.costs.get(key, [])) for key in evaluation.specs), default=0)

    def _add_failed(self, evaluation: Evaluation, pack: Pack, error: Exception) -> None:
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        timing = {"started_at": evaluation.started, "finished_at": now(), "task_seconds": None}
        for key, outcome in zip(pack.keys, failed_outcomes(pack, message)):
            evaluation.rows[key] = outcome_row(pack, key, outcome, self.study.max_retries + 1, timing, self._nowhere)

    def cancel(self, evaluation: Evaluation, reason: str) -> None:
        """Stop the evaluation's tasks; its unfinished trials become pruned rows."""
        timing = {"started_at": evaluation.started, "finished_at": now(), "task_seconds": None}
        for gen, pack in evaluation.running.items():
            self.ray.cancel(gen)
            for key in pack.keys:
                outcome = TrialOutcome(spec=evaluation.specs[key], status="pruned", error=reason,
                                       curve=evaluation.curves.get(key, []), lanes=len(pack.keys))  # fmt: skip
                evaluation.rows[key] = outcome_row(pack, key, outcome, 1, timing, self._nowhere)
        evaluation.running.clear()
        evaluation.pruned = True

    def abandon(self, evaluation: Evaluation) -> None:
        for gen in evaluation.running:
            self.ray.cancel(gen)
        evaluation.running.clear()
        self.active.remove(evaluation)

    def finish(self, evaluation: Evaluation) -> list[dict]:
        """Write the evaluation's rows (replacing older rows of the same keys); its rows, in order."""
        self.active.remove(evaluation)
        rows = [evaluation.rows[key] for key in evaluation.specs]
        # A pruned row never replaces a finished one from an earlier evaluation of the same trial.
        self.results.write([row for row in rows if row["status"] != "pruned" or row["key"] not in self.known])
        for row in rows:
            if row["status"] in ("ok", "failed"):
                self.known[row["key"]] = {k: row.get(k) for k in ("key", "status", "psnr", "ssim")}
        return rows

    def evaluate(self, *evaluations: Evaluation) -> list[list[dict]]:
        """Run evaluations side by side to the end (or take their rows from the results); their rows."""
        for evaluation in evaluations:
            if not self.reusable(evaluation.specs):
                self.start(evaluation)
        while any(evaluation in self.active for evaluation in evaluations):
            for evaluation, _ in self.poll():
                if evaluation.done():
                    self.finish(evaluation)
        return [[self.known.get(key) or evaluation.rows[key] for key in evaluation.specs] for evaluation in evaluations]


def objective_value(rows: list[dict], objective: str) -> float | None:
    """Mean of the objective over the candidate's clients; None when any trial failed."""
    if any(row["status"] != "ok" for row in rows):
        return None
    return sum(min(row[objective], 100.0) for row in rows) / len(rows)  # an exact copy is +inf dB


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
        specs = trial_specs(self.settings, suggest(trial, self.settings.space), self.settings.tuning)
        evaluation = Evaluation(trial.number, specs, trial)
        if self.driver.reusable(specs):  # the same parameters ran before: their rows stand
            self._tell(evaluation, [self.driver.known[key] for key in specs])
            return
        self.driver.start(evaluation)

    def _report(self, evaluation: Evaluation, checkpoint: int) -> None:
        for step in range(evaluation.reported + 1, checkpoint + 1):
            costs = [evaluation.costs[key][step - 1] for key in evaluation.specs]
            value = max(-sum(costs) / len(costs), -1e9)  # maximised, like the objective; a diverged lane is inf
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
        """Ctrl-C: write nothing half-done, requeue the candidates in flight."""
        for evaluation in list(self.driver.active):
            self.driver.abandon(evaluation)
            requeue(self.tuned, evaluation.number)


# ---------------------------------------------------------------------------------------------
# Held-out comparison


def paired_bootstrap(gains: list[float], samples: int, seed: int) -> tuple[float, float, float]:
    """Mean gain and its 95% interval from resampling the paired differences."""
    import numpy as np

    values = np.asarray(gains, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    tuned: list[float]  # PSNR per held-out client
    defaults: list[float]
    tuned_objective: float
    defaults_objective: float
    gain: float
    low: float
    high: float


def compare_on_held_out(driver: Driver, settings: TuneSettings, best) -> Comparison | None:
    tuned_rows, default_rows = driver.evaluate(
        Evaluation(best.number, trial_specs(settings, best.params, settings.held_out)),
        Evaluation(None, trial_specs(settings, PAPER_DEFAULTS, settings.held_out)),
    )
    if any(row["status"] != "ok" for row in tuned_rows + default_rows):
        return None
    tuned = [min(row["psnr"], 100.0) for row in tuned_rows]  # an exact copy is +inf dB
    defaults = [min(row["psnr"], 100.0) for row in default_rows]
    gain, low, high = paired_bootstrap([t - d for t, d in zip(tuned, defaults)], settings.bootstrap, settings.seed)
    return Comparison(
        tuned, defaults, objective_value(tuned_rows, settings.objective), objective_value(default_rows, settings.objective),
        gain, low, high,
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
        header.append(f"# held-out PSNR gain over the paper's defaults {comparison.gain:+.2f} dB "
                      f"(95% CI {comparison.low:+.2f} to {comparison.high:+.2f})")  # fmt: skip
    body = yaml.safe_dump({"fixed": fixed}, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def dashboard_hint(url: str) -> str:
    return f"optuna-dashboard {url}   (install it with: pip install -e '.[dashboard]')"


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
              f"(95% CI {comparison.low:+.2f} to {comparison.high:+.2f}, paired bootstrap)")  # fmt: skip
    fragment = best_fragment(study, settings, best, comparison)
    (results / BEST_NAME).write_text(fragment)
    print(fragment, end="")
    print(f"wrote {results / BEST_NAME}")
    print(f"dashboard: {dashboard_hint(url)}")


# ---------------------------------------------------------------------------------------------
# Entry points


def tune_study(study: Study, results_path: str | Path, *, address: str | None = None, storage: str | None = None,
               progress: bool = True, data_root_arg: str | None = None) -> int:  # fmt: skip
    """Tune the study's attack; the exit code says whether the search and comparison finished."""
    from tqdm import tqdm

    from .runner import connect, runtime_environment

    settings = tune_settings(study)
    with ResultsDir(results_path) as results:
        url = storage_url(results.path, storage)
        tuned = open_study(study, settings, url)
        requeued = requeue_interrupted(tuned)
        if requeued:
            print(f"{requeued} candidates left running by a stopped driver: failed and queued again")
        ray = connect(address, runtime_environment(data_root_arg), study.max_retries)
        bar = tqdm(total=settings.candidates, initial=min(finished_candidates(tuned), settings.candidates),
                   desc=f"tune {study.name}", unit="candidate", disable=not progress, dynamic_ncols=True)  # fmt: skip
        tuner = Tuner(Driver(ray, study, results, settings), tuned, settings, bar)
        try:
            tuner.run()
            bar.close()
            best = _best_trial(tuned)
            if best is None:
                print(f"no candidate of {study.name} finished; see `gradinv status {results.path}`")
                return EXIT_INCOMPLETE
            comparison = compare_on_held_out(tuner.driver, settings, best)
            report(study, settings, best, comparison, results.path, url)
            return EXIT_OK if comparison else EXIT_INCOMPLETE
        except KeyboardInterrupt:
            tuner.interrupt()
            bar.close()
            print("interrupted: candidates in flight are queued again; run the same command to continue")
            return EXIT_INTERRUPTED
        finally:
            ray.shutdown()


def _best_trial(tuned):
    from optuna.trial import TrialState

    complete = tuned.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def _add_arguments(parser) -> None:
    add = parser.add_argument
    add("study", type=Path, help="study file (YAML) with a 'tune:' section")
    add("--results", type=Path, default=None, help="results directory (default results/STUDY_NAME)")
    add("--address", default=None, help="a running Ray cluster (default $RAY_ADDRESS, else local)")
    add("--storage", default=None,
        help="Optuna storage: sqlite:///..., postgresql://... or a journal file (default RESULTS/_optuna.journal)")
    add("--data-root", default=None, help="dataset root on every node (default $GRADINV_DATA)")
    add("--no-progress", action="store_true", help="no progress bar")


def add_parser(verbs) -> None:
    """Add `tune` to the CLI's subcommands."""
    _add_arguments(verbs.add_parser("tune", help="search the strongest attack for a study's setting (Optuna on Ray)"))


def command(args) -> int:
    from .study import load_study

    study = load_study(args.study)
    results = args.results or Path("results") / study.name
    return tune_study(study, results, address=args.address, storage=args.storage, progress=not args.no_progress,
                      data_root_arg=args.data_root)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m sweep.tuning STUDY ...`: the tune verb on its own."""
    from .cli import _Parser

    parser = _Parser(prog="gradinv tune", description="Search the strongest attack for a study's setting.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except ConfigError as error:
        print(f"gradinv tune: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradinv tune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # run through the package module, so Ray pickles functions by reference
    from sweep.tuning import main as tuning_main

    sys.exit(tuning_main())
