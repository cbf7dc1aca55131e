"""The driver's side of Ray tasks, shared by `run`, `tune` and victim training: trials grouped into
packs, a pack submitted as a task (retried by Ray when its worker dies), one loop that waits on
everything in flight and hands each ready task to its owner, and the rows of a task whose own code
failed or that was stopped before its trials finished (Ray failing under a task gives none:
MachineryFailed).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
import types
from collections.abc import Callable
from itertools import groupby

from gradinv import memory
from gradinv.dataset_specs import dataset_spec
from gradinv.image_folders import is_folder
from gradinv.trial import TrialOutcome, TrialSpec, lane_signature

from .stopping import Stopped
from .study import Study
from .worker import Pack, failed_outcomes, now, outcome_row, where_am_i

DEFAULT_LANES = {"cpu": 1, "cuda": 16}


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
            extra = {"study_overrides": list(study.overrides)} if study.overrides else {}
            extra |= data_columns(specs[0])  # lanes share the dataset
            packs.append(Pack(study.name, keys, specs, threads, device, timeout, extra=extra))
    packs.sort(key=lambda pack: min(order[k] for k in pack.keys))
    return packs


def data_columns(spec: TrialSpec) -> dict:
    """An image folder's normalisation (from its files, not the study) as columns; none for a built-in set,
    whose normalisation is fixed by its name."""
    if not is_folder(spec.dataset):
        return {}
    info = dataset_spec(spec.dataset)
    return {"data_mean": list(info.mean), "data_std": list(info.std)}


def pack_task(ray, function, study: Study, **options):
    """``function`` as a Ray task with a trial's resources, submitted as ``task.remote(pack, *args)``;
    Ray runs it again only when its worker dies (an exception in a trial is a failed row, not a retry).
    Each pack also asks for the ``memory`` its trials are estimated to need (gradinv.memory, at most
    the largest node's), so that Ray never starts more of them on a node than it holds."""
    resources = study.resources
    remote = ray.remote(function)
    fixed = dict(
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        max_retries=study.max_retries,
        retry_exceptions=False,
        **options,
    )
    largest = memory.largest_node_memory(ray)

    def submit(pack: Pack, *args):
        sized = {"memory": memory.request(pack.specs[0], len(pack.specs), largest, pack.device)} if largest else {}
        return remote.options(**fixed, **sized).remote(pack, *args)

    return types.SimpleNamespace(remote=submit)


def device_of(study: Study) -> str:
    return "cuda" if study.resources.num_gpus > 0 else "cpu"


def ready(ray, refs: list, timeout: float) -> list:
    """The refs that are ready: waits up to ``timeout`` for the first, then takes every other one
    ready by then (one wait per burst, not per task)."""
    if not refs:
        return []
    done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
    if done:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return done


class TaskLoop:
    """Everything the driver has in flight (trial packs, streamed candidates, victim trainings) and one
    wait over all of it: each ref is submitted with the callback that takes it once it is ready. A
    streaming task's callback submits its generator again while the stream goes on."""

    def __init__(self, ray):
        self.ray = ray
        self.pending: dict = {}  # ref or generator -> on_ready(ref)
        self.stop_signal: int | None = None

    @contextlib.contextmanager
    def stopping_on_signals(self):
        """Inside, Ctrl-C and SIGTERM are recorded and raised as Stopped at the next `wait`, not wherever
        they land: an interrupt raised inside Ray's wait was once lost, and Ray's own SIGTERM handler
        exits at once, losing rows not yet in a batch file. Later signals are ignored while those rows
        are written."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return

        def record(signum, frame):
            if self.stop_signal is None:
                self.stop_signal = signum

        previous = {signum: signal.signal(signum, record) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def __len__(self) -> int:
        return len(self.pending)

    def submit(self, ref, on_ready: Callable[[object], None]):
        self.pending[ref] = on_ready
        return ref

    def wait(self, timeout: float) -> None:
        """Hand every ready ref to its callback, waiting up to ``timeout`` for the first; raises Stopped
        once a stop signal came (see `stopping_on_signals`)."""
        self._raise_if_stopped()
        failure = None
        for ref in ready(self.ray, list(self.pending), timeout):
            on_ready = self.pending.pop(ref, None)
            if on_ready is None:  # cancelled by an earlier callback of this burst
                continue
            try:
                on_ready(ref)
            except MachineryFailed as failed:  # the rest of the burst finished: their rows count
                failure = failure or failed
        if failure is not None:
            raise failure
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        if self.stop_signal is not None:
            raise Stopped(self.stop_signal)

    def cancel(self, refs, *, force: bool = False) -> None:
        """Stop tasks still in flight (force: kill a plain task's worker; a stream stops at its next checkpoint)."""
        for ref in list(refs):
            if self.pending.pop(ref, None) is not None:
                self.ray.cancel(ref, force=force)


def task_error(error: BaseException) -> str:
    """A task's failure in one line: its type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def failed_rows(pack: Pack, message: str, attempt: int, started_at=None) -> list[dict]:
    """Rows for trials that never produced their own (the task died for good, or had no victim)."""
    timing = {"started_at": started_at or now(), "finished_at": now(), "task_seconds": None}
    return [
        outcome_row(pack, key, outcome, attempt, timing, nowhere(pack.device))
        for key, outcome in zip(pack.keys, failed_outcomes(pack, message))
    ]


def stopped_rows(pack: Pack, status: str, reason: str, curves: dict, qualities: dict, started_at) -> list[dict]:
    """Rows for a pack's trials stopped by the driver (a pruned candidate): ``status``, the reason,
    and the cost and (PSNR, SSIM) curves each had streamed so far."""
    timing = {"started_at": started_at, "finished_at": now(), "task_seconds": None}
    rows = []
    for key, spec in zip(pack.keys, pack.specs):
        outcome = TrialOutcome(
            spec=spec,
            status=status,
            error=reason,
            curve=curves.get(key, []),
            quality_curve=qualities.get(key, []),
            lanes=len(pack.keys),
        )
        rows.append(outcome_row(pack, key, outcome, 1, timing, nowhere(pack.device)))
    return rows


@functools.cache
def nowhere(device: str) -> dict:
    """The host and provenance columns of a row no worker wrote: null."""
    return {name: None for name in where_am_i(device)}


def collect(ray, ref, pack: Pack, max_retries: int) -> list[dict]:
    """A finished task's rows; a task that raised (its own error, retried by nobody) gives failed rows;
    Ray failing under it raises MachineryFailed (no rows: the trials did not run to their end)."""
    try:
        return finished(ray, ref)
    except ray.exceptions.RayError as error:
        return failed_rows(pack, task_error(error), attempt=max_retries + 1)


class MachineryFailed(Exception):
    """Ray failed under the run (its raylet or GCS gone, a node or a worker lost beyond retries, an object
    lost): the tasks it took did not run to their own end, so their trials get no row and run again next
    time; the driver stops and says so."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def finished(ray, ref):
    """``ray.get(ref)``; a failure of Ray itself raises MachineryFailed, the task's own error (a
    RayTaskError: its code raised) stays a RayError for the caller to record."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError:
        raise
    except ray.exceptions.RayError as error:
        raise MachineryFailed(task_error(error)) from error


class NodeWatch:
    """Whether the Ray node this driver runs on is still alive, asked of the GCS every few seconds: a
    raylet killed under tasks whose workers linger never fails them, and the driver would wait forever."""

    POLL_SECONDS = 5.0

    def __init__(self, ray, clock=time.monotonic):
        self.ray, self.clock = ray, clock
        self.node_id = ray.get_runtime_context().get_node_id()
        self.polled = clock()

    def check(self) -> None:
        """Raise MachineryFailed once the GCS counts this driver's node dead (or cannot be asked)."""
        if self.clock() - self.polled < self.POLL_SECONDS:
            return
        self.polled = self.clock()
        try:
            alive = any(node["NodeID"] == self.node_id and node.get("Alive") for node in self.ray.nodes())
        except self.ray.exceptions.RayError as error:
            raise MachineryFailed(f"the GCS cannot be reached ({task_error(error)})") from error
        if not alive:
            raise MachineryFailed("the Ray node of this driver died (its raylet is gone)")
