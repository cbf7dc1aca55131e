"""Evaluating candidates on Ray: each candidate's trials run as lane packs in Ray generator tasks
that stream a comparable cost at every checkpoint and then their rows. The driver collects the
streams, cancels a pruned candidate's tasks (its trials become pruned rows), and writes an
evaluation's rows once it has them all. A candidate whose trial keys all have finished rows takes
them instead of running again.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
from dataclasses import dataclass, field

from gradinv.results.store import ResultsDir
from gradinv.trial import TrialSpec

from ..study import Study
from ..task_loop import TaskLoop, device_of, failed_rows, finished, make_packs, pack_task, stopped_rows, task_error
from ..victim_training import Victims, victim_from_checkpoint
from ..worker import Pack, PackStopped, current_attempt, now, run_pack

# ---------------------------------------------------------------------------------------------
# Inside a Ray worker: a pack streamed checkpoint by checkpoint


KNOWN = ("key", "status", "psnr", "ssim", "baseline_psnr")  # what the driver keeps of a finished row


class CandidateStopped(PackStopped):
    pass


def stream_pack(pack: Pack, weights: bytes | None = None, sidecar: dict | None = None):
    """Ray generator task: ("checkpoint", keys, iteration, costs, (PSNR, SSIM) per lane) at every
    checkpoint of the lanes running, then ("rows", rows). The attack runs in a thread (a callback cannot yield);
    when the task is cancelled, the thread stops at its next checkpoint. A trained victim arrives as
    its weights and sidecar, as in `gradinv run`."""
    attempt = current_attempt()
    victim, images = victim_from_checkpoint(weights, sidecar) if weights is not None else (None, None)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def on_checkpoint(keys: tuple[str, ...], iteration: int, costs: list[float], quality: list) -> None:
        if stop.is_set():
            raise CandidateStopped("cancelled by the tuning driver")
        events.put(("checkpoint", keys, iteration, costs, quality))

    def attack() -> None:
        try:
            events.put(("rows", run_pack(pack, attempt, victim=victim, on_checkpoint=on_checkpoint, images=images)))
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
    curves: dict = field(default_factory=dict)  # key -> [(iteration, gradient cost)]
    quality: dict = field(default_factory=dict)  # key -> [(PSNR, SSIM)] at the same checkpoints
    rows: dict = field(default_factory=dict)  # key -> row
    reported: int = 0  # checkpoints reported to Optuna
    started: object = None
    pruned: bool = False

    def done(self) -> bool:
        return not self.running


class Driver:
    """Ray tasks in flight for several evaluations; rows written once per finished evaluation."""

    def __init__(self, ray, study: Study, results: ResultsDir):
        self.ray, self.study, self.results = ray, study, results
        self.device = device_of(study)
        self.task = pack_task(ray, stream_pack, study, num_returns="streaming")
        self.loop = TaskLoop(ray)
        self.victims = Victims(self.loop, study.resources.num_cpus, study.max_retries, [])
        self.known = self._finished_rows()
        self.active: list[Evaluation] = []
        self.events: list[tuple[Evaluation, int | None]] = []  # taken by the loop's callbacks, returned by poll

    def _finished_rows(self) -> dict[str, dict]:
        """Key -> {status, psnr, ssim, baseline_psnr} of every ok or failed row (pruned rows are incomplete)."""
        table = self.results.read(list(KNOWN)).to_pylist()
        return {row["key"]: row for row in table if row["status"] in ("ok", "failed")}

    def reusable(self, specs: dict) -> bool:
        return all(key in self.known for key in specs)

    def start(self, evaluation: Evaluation) -> Evaluation:
        """Submit the evaluation's packs once their victims are trained (other streams go on meanwhile)."""
        study = dataclasses.replace(self.study, lanes=self.study.lanes or len(evaluation.specs))
        evaluation.started = now()
        self.active.append(evaluation)
        for pack in make_packs(study, list(evaluation.specs.items()), self.device):
            pack = dataclasses.replace(pack, candidate=evaluation.number)
            victim = self._victim(pack.specs[0])
            if victim == "failed":
                evaluation.rows.update(
                    {row["key"]: row for row in failed_rows(pack, self.victims.error(pack.specs[0]), 1)}
                )
                continue
            pack = dataclasses.replace(pack, extra={**pack.extra, **self.victims.columns(pack.specs[0])})
            gen = self.task.remote(pack, *self.victims.payload(pack.specs[0]))
            evaluation.running[gen] = pack
            self.loop.submit(gen, functools.partial(self._ready, evaluation))
        if evaluation.done():  # every victim failed: nothing will stream, so say so now
            self.events.append((evaluation, None))
        return evaluation

    def _victim(self, spec: TrialSpec) -> str:
        """The victim's state once it is not training: untrained, ready or failed."""
        self.victims.need(spec)
        while self.victims.state(spec) == "training":
            self.loop.wait(timeout=1.0)  # streams of other evaluations keep arriving as events
        return self.victims.state(spec)

    def poll(self, timeout: float = 1.0) -> list[tuple[Evaluation, int | None]]:
        """Take what the ready streams hold: (evaluation, checkpoints complete on all its trials, or None)."""
        self.loop.wait(timeout)
        events, self.events = self.events, []
        return events

    def _ready(self, evaluation: Evaluation, gen) -> None:
        """One item of a ready stream; the stream goes back on the loop while it has more."""
        checkpoint = self._take(evaluation, gen)
        if gen in evaluation.running:
            self.loop.submit(gen, functools.partial(self._ready, evaluation))
        self.events.append((evaluation, checkpoint))

    def _take(self, evaluation: Evaluation, gen) -> int | None:
        pack = evaluation.running[gen]
        try:
            item = finished(self.ray, next(gen))  # Ray failing under it raises MachineryFailed: no rows
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
        _, keys, iteration, costs, quality = item
        for key, cost, scores in zip(keys, costs, quality):
            curve = evaluation.curves.setdefault(key, [])
            if any(done == iteration for done, _ in curve):  # run again alone after a pack-mate raised
                continue
            curve.append((iteration, cost))
            evaluation.quality.setdefault(key, []).append(tuple(scores))
        return self.complete_checkpoints(evaluation)

    def complete_checkpoints(self, evaluation: Evaluation) -> int:
        return min((len(evaluation.quality.get(key, [])) for key in evaluation.specs), default=0)

    def _add_failed(self, evaluation: Evaluation, pack: Pack, error: Exception) -> None:
        rows = failed_rows(pack, task_error(error), self.study.max_retries + 1, evaluation.started)
        evaluation.rows.update({row["key"]: row for row in rows})

    def cancel(self, evaluation: Evaluation, reason: str) -> None:
        """Stop the evaluation's tasks; its unfinished trials become pruned rows."""
        self.loop.cancel(evaluation.running)
        for pack in evaluation.running.values():
            rows = stopped_rows(pack, "pruned", reason, evaluation.curves, evaluation.quality, evaluation.started)
            evaluation.rows.update({row["key"]: row for row in rows})
        evaluation.running.clear()
        evaluation.pruned = True

    def abandon(self, evaluation: Evaluation) -> None:
        self.loop.cancel(evaluation.running)
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
                self.known[row["key"]] = {k: row.get(k) for k in KNOWN}
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
