"""`gradinv run`: a study's trials as Ray tasks, their rows in the results directory, exactly once.

The driver alone writes results. It keeps a bounded number of tasks in flight, journals each
finished row at once (gradinv/results/journal.py) and writes rows in batches (by count or time). On Ctrl-C or
SIGTERM it writes what has finished before it exits; killed outright, it leaves the journal, which
the next run folds in. A full or read-only disk stops it with one line; so does Ray failing under it
(a raylet killed, a node lost), and the trials Ray did not finish get no row. Re-running the same
command skips every key that already has a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gradinv import memory, model_factories
from gradinv.provenance import commit
from gradinv.results.remote import open_store
from gradinv.results.schema import to_table, trial_key
from gradinv.results.store import ResultsDir
from gradinv.trial import TrialSpec

from .preflight import NodeFit, check_before_start
from .ray_connection import connect
from .study import Study
from .task_loop import (
    MachineryFailed,
    NodeWatch,
    TaskLoop,
    collect,
    device_of,
    failed_rows,
    make_packs,
    pack_task,
)
from .victim_training import Victims, victim_from_checkpoint
from .worker import Pack, current_attempt, run_pack

EXIT_OK, EXIT_INCOMPLETE, EXIT_WRITE_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 1, 130, 143


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None
    max_concurrent: int | None = None  # tasks in flight; None: twice what the cluster can run at once
    retry_failed: bool = False
    flush_rows: int = 64
    flush_seconds: float = 15.0
    progress: bool = True
    autoscale_wait: float = 300.0  # a named cluster: seconds to wait for a node that fits one trial
    set_aside_bad_files: bool = False  # else a damaged or foreign file in the results stops the run


def pending_trials(study: Study, statuses: dict[str, str], retry_failed: bool) -> list[tuple[str, TrialSpec]]:
    """Trials without a row, plus failed ones when asked to retry them."""
    todo = []
    for spec in study.trials:
        key = trial_key(spec)
        status = statuses.get(key)
        if status is None or (retry_failed and status == "failed"):
            todo.append((key, spec))
    return todo


def runtime_environment(data_root_arg: str | None, trials=()) -> dict:
    """What remote workers need from the driver's environment (not its disk): settings, and the user's code
    that ``model: package.module:function`` trials import (Ray's ``py_modules``: a top-level package's
    directory or a single-file module, uploaded by the driver; gradinv.model_factories.shipped)."""
    env = {"GRADINV_COMMIT": commit()}
    root = data_root_arg or os.environ.get("GRADINV_DATA")
    if root:
        env["GRADINV_DATA"] = str(Path(root).expanduser().resolve())
    # GRADINV_CACHE stays each node's own: a node's workers inherit it from its `ray start`.
    if os.environ.get("GRADINV_FAULTS"):
        env["GRADINV_FAULTS"] = os.environ["GRADINV_FAULTS"]
    names = sorted({spec.model for spec in trials if model_factories.is_factory(spec.model)})
    modules = sorted({path for path in map(model_factories.shipped, names) if path})
    return {"env_vars": env, **({"py_modules": modules} if modules else {})}


def remote_pack(pack: Pack, weights: bytes | None = None, sidecar: dict | None = None) -> list[dict]:
    """A pack on a Ray worker; a trained victim (zoo checkpoint or federation round) arrives as its weights
    (from the object store) and sidecar."""
    attempt = current_attempt()
    victim = images = None
    if weights is not None:
        victim, images = victim_from_checkpoint(weights, sidecar)
    return run_pack(pack, attempt, victim=victim, images=images)


class RowsNotWritten(Exception):
    """Writing results failed (a full, read-only or forbidden disk): the driver stops launching work."""

    def __init__(self, error: OSError, kept: int, unsaved: int):
        super().__init__(str(error))
        self.error, self.kept, self.unsaved = error, kept, unsaved


class _Batcher:
    """Finished rows: journalled on arrival (synced to disk), written as one file per batch (by
    count or age) and on every exit path; a batch file written, its journal is deleted."""

    def __init__(self, results: ResultsDir, rows: int, seconds: float):
        self.results, self.limit_rows, self.limit_seconds = results, rows, seconds
        self.journal = results.journal()
        self.rows: list[dict] = []
        self.journalled = 0  # how many of ``rows`` the journal holds
        self.since = time.monotonic()
        self.written = 0

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        try:
            self.journal.append(to_table(rows))
        except OSError as error:
            raise RowsNotWritten(error, self.journalled, len(self.rows) - self.journalled) from error
        self.journalled = len(self.rows)
        if len(self.rows) >= self.limit_rows or time.monotonic() - self.since >= self.limit_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            try:
                self.results.write(self.rows)
            except OSError as error:
                raise RowsNotWritten(error, self.journalled, len(self.rows) - self.journalled) from error
            self.written += len(self.rows)
        self.journal.discard()
        self.rows, self.journalled, self.since = [], 0, time.monotonic()


def run_study(study: Study, results_path: str | Path, options: RunOptions, *, data_root_arg: str | None = None) -> int:
    """Run the study's missing trials; the exit code says whether every trial now has a row."""
    named_cluster = bool(options.address or os.environ.get("RAY_ADDRESS"))
    fits = check_before_start(study, options.address)
    with contextlib.ExitStack() as stack:
        try:  # opening folds in the journal a stopped driver left: a write
            results = stack.enter_context(open_store(results_path, options.set_aside_bad_files))
        except OSError as error:
            failed = open_store(results_path)
            return _write_failed(failed, RowsNotWritten(error, kept=failed.journalled_rows(), unsaved=0))
        todo = pending_trials(study, results.statuses(), options.retry_failed)
        if not todo:
            print(f"all {len(study.trials)} trials of {study.name} already have rows in {results.path}")
            return EXIT_OK
        ray = connect(options.address, runtime_environment(data_root_arg, study.trials), study.max_retries)
        try:
            if named_cluster:
                fits(memory.largest_node_memory(ray), "the cluster's largest node")
            fit = NodeFit(ray, study.resources, named_cluster=named_cluster, wait_seconds=options.autoscale_wait)
            fit.check()
            return _drive(ray, study, todo, results, options, fit)
        finally:
            ray.shutdown()


def _drive(ray, study: Study, todo, results: ResultsDir, options: RunOptions, fit: NodeFit) -> int:
    device = device_of(study)
    loop = TaskLoop(ray)
    victims = Victims(loop, study.resources.num_cpus, study.max_retries, [spec for _, spec in todo])
    task = pack_task(ray, remote_pack, study)
    capacity = ray.cluster_resources().get("CPU", 1) / max(study.resources.num_cpus, 1e-3)
    limit = options.max_concurrent or max(2, math.ceil(2 * capacity))
    bar = tqdm(total=len(todo), desc=study.name, unit="trial", disable=not options.progress, dynamic_ncols=True)
    run = _Drive(
        loop,
        task,
        make_packs(study, todo, device),
        victims,
        limit,
        study.max_retries,
        fit,
        bar,
        _Batcher(results, options.flush_rows, options.flush_seconds),
        NodeWatch(ray),
    )
    with loop.stopping_on_signals():
        try:
            stopped = run.until_done()
            run.batcher.flush()
        except RowsNotWritten as failure:
            return _write_failed(results, failure)
        finally:
            run.stop()
        if isinstance(stopped, MachineryFailed):
            return _machinery_failed(results.path, stopped, unfinished=len(todo) - run.batcher.written)
        if stopped is not None:
            print(f"interrupted: {run.batcher.written} rows written to {results.path}; run the same command to finish")
            return EXIT_TERMINATED if loop.stop_signal == signal.SIGTERM else EXIT_INTERRUPTED
    return _summary(study, results)


class _Drive:
    """The drive loop's state: packs waiting, tasks in flight (on the shared task loop), finished rows."""

    def __init__(
        self,
        loop: TaskLoop,
        task,
        packs: list[Pack],
        victims: Victims,
        limit: int,
        max_retries: int,
        fit: NodeFit,
        bar,
        batcher: _Batcher,
        watch: NodeWatch,
    ):
        self.loop, self.task, self.victims, self.limit, self.max_retries = loop, task, victims, limit, max_retries
        self.fit, self.bar, self.batcher, self.watch = fit, bar, batcher, watch
        self.waiting = list(packs)  # in study order; a pack whose victim is still training waits its turn
        self.in_flight: dict = {}  # ref -> pack
        self.failed = 0

    def until_done(self) -> KeyboardInterrupt | MachineryFailed | None:
        """Launch and collect until every pack has its rows; Ctrl-C, SIGTERM or Ray failing under the run
        stops it early (returned)."""
        try:
            while self.waiting or self.in_flight:
                self.fit.check()
                self.watch.check()
                self._launch()
                self.loop.wait(timeout=1.0)  # pack rows and finished victim trainings alike
        except (KeyboardInterrupt, MachineryFailed) as stop:
            return stop
        return None

    def stop(self) -> None:
        self.loop.cancel(self.in_flight, force=True)
        self.batcher.journal.close()
        self.bar.close()

    def _launch(self) -> None:
        for pack in _startable(self.waiting, self.victims, self.limit - len(self.in_flight)):
            if self.victims.state(pack.specs[0]) == "failed":  # no victim, no attack: failed rows with the reason
                self._finished(failed_rows(pack, self.victims.error(pack.specs[0]), attempt=1))
                continue
            pack = dataclasses.replace(pack, extra={**pack.extra, **self.victims.columns(pack.specs[0])})
            ref = self.task.remote(pack, *self.victims.payload(pack.specs[0]))
            self.in_flight[ref] = pack
            self.loop.submit(ref, self._collect)

    def _collect(self, ref) -> None:
        pack = self.in_flight.pop(ref)
        self._finished(collect(self.loop.ray, ref, pack, self.max_retries))

    def _finished(self, rows: list[dict]) -> None:
        self.batcher.add(rows)  # in the journal, on disk, before anything else happens
        self.failed += sum(row["status"] == "failed" for row in rows)
        self.bar.update(len(rows))
        self.bar.set_postfix(failed=self.failed, refresh=False)


def _write_failed(results: ResultsDir, failure: RowsNotWritten) -> int:
    """One line on stderr: the results, the OS error, where the finished rows are; exit code 1."""
    kept = f"; {_rows(failure.kept)} kept in {results.journal_dir} for the next run" if failure.kept else ""
    unsaved = f"; {_rows(failure.unsaved)} could not be kept" if failure.unsaved else ""
    fix = "free space or make it writable" if results.filesystem is None else "check the endpoint and the bucket"
    error = str(failure.error).splitlines()[0] if str(failure.error) else failure.error
    print(
        f"gradinv run: cannot write results to {results.path}: {error}{kept}{unsaved}; {fix}, "
        "then run the same command (it skips what has a row)",
        file=sys.stderr,
    )
    return EXIT_WRITE_FAILED


def _machinery_failed(path: Path, failure: MachineryFailed, unfinished: int) -> int:
    """One line on stderr: what failed, how many trials did not finish (no row: the next run runs them); exit 1."""
    trials = f"{unfinished} trial" + ("s" if unfinished != 1 else "")
    print(
        f"gradinv run: Ray failed under the run ({failure.what}): {trials} did not finish and have no row; "
        f"the finished rows are in {path}; run the same command to run the rest",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE


def _rows(count: int) -> str:
    return f"{count} finished row" + ("s" if count != 1 else "")


def _startable(waiting: list[Pack], victims: Victims, slots: int) -> list[Pack]:
    """Up to ``slots`` packs, in order, whose victim is untrained, ready or failed; taken off ``waiting``."""
    chosen = []
    for pack in list(waiting):
        if len(chosen) >= slots:
            break
        if victims.state(pack.specs[0]) != "training":
            waiting.remove(pack)
            chosen.append(pack)
    return chosen


def _summary(study: Study, results: ResultsDir) -> int:
    statuses = results.statuses()
    keys = [trial_key(spec) for spec in study.trials]
    present = [statuses[k] for k in keys if k in statuses]
    counts = {s: present.count(s) for s in sorted(set(present))}
    missing = len(keys) - len(present)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no rows"
    print(f"{study.name}: {len(keys)} trials: {summary}" + (f", {missing} without a row" if missing else ""))
    print(f"results: {results.path}")
    return EXIT_OK if missing == 0 else EXIT_INCOMPLETE
