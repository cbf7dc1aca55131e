"""`gradinv run`: a study's trials as Ray tasks, their rows in the results directory, exactly once.

The driver alone writes results. It keeps a bounded number of tasks in flight, writes finished rows
in batches (by count or time), and on Ctrl-C writes what has finished before it exits. Re-running
the same command skips every key that already has a row.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from tqdm import tqdm

from gradinv.provenance import commit
from gradinv.trial import TrialSpec, lane_signature

from .checkpoints import Victims, victim_from_checkpoint
from .execution import Pack, failed_outcomes, now, outcome_row, run_pack, where_am_i
from .results import ResultsDir, trial_key
from .study import Study

EXIT_OK, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 130
DEFAULT_LANES = {"cpu": 1, "cuda": 16}


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None
    max_concurrent: int | None = None  # tasks in flight; None: twice what the cluster can run at once
    retry_failed: bool = False
    flush_rows: int = 64
    flush_seconds: float = 15.0
    progress: bool = True


def pending_trials(study: Study, statuses: dict[str, str], retry_failed: bool) -> list[tuple[str, TrialSpec]]:
    """Trials without a row, plus failed ones when asked to retry them."""
    todo = []
    for spec in study.trials:
        key = trial_key(spec)
        status = statuses.get(key)
        if status is None or (retry_failed and status == "failed"):
            todo.append((key, spec))
    return todo


def make_packs(study: Study, todo: list[tuple[str, TrialSpec]], device: str) -> list[Pack]:
    """Group lane-compatible trials into packs of at most ``lanes`` trials, in study order."""
    lanes = study.lanes or DEFAULT_LANES[device]
    threads = max(1, int(study.resources.num_cpus))
    order = {key: i for i, (key, _) in enumerate(todo)}
    ordered = sorted(todo, key=lambda item: (repr(lane_signature(item[1])), order[item[0]]))
    packs = []
    for _, group in groupby(ordered, key=lambda item: repr(lane_signature(item[1]))):
        group = list(group)
        for start in range(0, len(group), lanes):
            chunk = group[start : start + lanes]
            keys, specs = zip(*chunk)
            timeout = study.timeout * len(chunk) if study.timeout else None
            packs.append(Pack(study.name, keys, specs, threads, device, timeout))
    packs.sort(key=lambda pack: min(order[k] for k in pack.keys))
    return packs


def runtime_environment(data_root_arg: str | None) -> dict:
    """What remote workers need from the driver's environment (not its disk)."""
    env = {"GRADINV_COMMIT": commit()}
    root = data_root_arg or os.environ.get("GRADINV_DATA")
    if root:
        env["GRADINV_DATA"] = str(Path(root).expanduser().resolve())
    # GRADINV_CACHE stays each node's own: a node's workers inherit it from its `ray start`.
    if os.environ.get("GRADINV_FAULTS"):
        env["GRADINV_FAULTS"] = os.environ["GRADINV_FAULTS"]
    return {"env_vars": env}


def connect(address: str | None, runtime_env: dict, max_retries: int):
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local Ray instance."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and not os.environ.get("RAY_AUTH_MODE") and _token_available():
        # A driver that names its cluster does not turn token mode on by itself.
        os.environ["RAY_AUTH_MODE"] = "token"
    options = dict(runtime_env=runtime_env, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if address is None:
        # A new local instance ("local": never a stray one found in /tmp/ray). Cap Ray's
        # out-of-memory retries, unlimited by default, like ours.
        address = "local"
        options["_system_config"] = {"task_oom_retries": max_retries}
    ray.init(address=address, **options)
    return ray


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists())  # fmt: skip


def current_attempt() -> int:
    """1 for a task's first run, 2 for its first retry, ... (Ray's core worker counts from 0)."""
    from ray._private.worker import global_worker

    return global_worker.core_worker.get_current_task_attempt_number() + 1


def remote_pack(pack: Pack, weights: bytes | None = None, sidecar: dict | None = None) -> list[dict]:
    """A pack on a Ray worker; a trained victim arrives as its weights (from the object store) and sidecar."""
    attempt = current_attempt()
    victim = None
    if weights is not None:
        victim = victim_from_checkpoint(weights, sidecar)
    return run_pack(pack, attempt, victim=victim)


class _Batcher:
    """Finished rows, written as one file per batch (by count or age) and on every exit path."""

    def __init__(self, results: ResultsDir, rows: int, seconds: float):
        self.results, self.limit_rows, self.limit_seconds = results, rows, seconds
        self.rows: list[dict] = []
        self.since = time.monotonic()
        self.written = 0

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.limit_rows or time.monotonic() - self.since >= self.limit_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.results.write(self.rows)
            self.written += len(self.rows)
        self.rows, self.since = [], time.monotonic()


def run_study(study: Study, results_path: str | Path, options: RunOptions, *, data_root_arg: str | None = None) -> int:
    """Run the study's missing trials; the exit code says whether every trial now has a row."""
    with ResultsDir(results_path) as results:
        todo = pending_trials(study, results.statuses(), options.retry_failed)
        if not todo:
            print(f"all {len(study.trials)} trials of {study.name} already have rows in {results.path}")
            return EXIT_OK
        ray = connect(options.address, runtime_environment(data_root_arg), study.max_retries)
        try:
            return _drive(ray, study, todo, results, options)
        finally:
            ray.shutdown()


def _drive(ray, study: Study, todo, results: ResultsDir, options: RunOptions) -> int:
    device = "cuda" if study.resources.num_gpus > 0 else "cpu"
    victims = Victims(ray, study.resources.num_cpus, study.max_retries, [spec for _, spec in todo])
    packs = make_packs(study, todo, device)
    task = ray.remote(remote_pack).options(
        num_cpus=study.resources.num_cpus, num_gpus=study.resources.num_gpus,
        max_retries=study.max_retries, retry_exceptions=False,
    )  # fmt: skip
    capacity = ray.cluster_resources().get("CPU", 1) / max(study.resources.num_cpus, 1e-3)
    limit = options.max_concurrent or max(2, math.ceil(2 * capacity))
    batcher = _Batcher(results, options.flush_rows, options.flush_seconds)
    in_flight: dict = {}
    waiting = list(packs)  # in study order; a pack whose victim is still training waits its turn
    failed = 0
    bar = tqdm(total=len(todo), desc=study.name, unit="trial", disable=not options.progress, dynamic_ncols=True)
    try:
        while waiting or in_flight:
            victims.poll(timeout=0 if in_flight else 1.0)
            for pack in _startable(waiting, victims, limit - len(in_flight)):
                if victims.state(pack.specs[0]) == "failed":  # no victim, no attack: failed rows with the reason
                    batcher.add(_failed_rows(pack, victims.error(pack.specs[0]), attempt=1))
                    bar.update(len(pack.keys))
                    continue
                pack = dataclasses.replace(pack, extra=victims.columns(pack.specs[0]))
                in_flight[task.remote(pack, *victims.payload(pack.specs[0]))] = pack
            if not in_flight:
                continue
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if done:  # take everything else that is ready too: one wait per burst, not per task
                done, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=0)
            for ref in done:
                rows = _collect(ray, ref, in_flight.pop(ref), study.max_retries)
                failed += sum(row["status"] == "failed" for row in rows)
                batcher.add(rows)
                bar.update(len(rows))
                bar.set_postfix(failed=failed, refresh=False)
        batcher.flush()
    except KeyboardInterrupt:
        batcher.flush()
        for ref in in_flight:
            ray.cancel(ref, force=True)
        bar.close()
        print(f"interrupted: {batcher.written} rows written to {results.path}; run the same command to finish")
        return EXIT_INTERRUPTED
    bar.close()
    return _summary(study, results)


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


def _collect(ray, ref, pack: Pack, max_retries: int) -> list[dict]:
    """The pack's rows; a task that failed for good (its worker died every time) gives failed rows."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return _failed_rows(pack, message, attempt=max_retries + 1)


def _failed_rows(pack: Pack, message: str, attempt: int) -> list[dict]:
    """Rows for trials that never produced their own (the task died for good, or had no victim)."""
    timing = {"started_at": now(), "finished_at": now(), "task_seconds": None}
    where = {name: None for name in where_am_i(pack.device)}
    return [outcome_row(pack, key, outcome, attempt, timing, where)
            for key, outcome in zip(pack.keys, failed_outcomes(pack, message))]  # fmt: skip


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
