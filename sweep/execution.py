"""What runs inside a Ray worker: a pack of lane-compatible trials, turned into result rows.

Exceptions never leave a pack: a trial that raises, times out or diverges becomes a ``failed`` row.
Only a dying worker escapes, and Ray retries the task.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch

from gradinv import data
from gradinv.provenance import provenance
from gradinv.trial import TrialOutcome, TrialSpec, run_trials

from .results import parameter_columns


@dataclass(frozen=True)
class Pack:
    """Trials that run as one computation (their lanes), and how."""

    study: str
    keys: tuple[str, ...]
    specs: tuple[TrialSpec, ...]
    threads: int = 1
    device: str = "cpu"
    timeout: float | None = None  # seconds for the whole pack
    candidate: int | None = None
    extra: dict = field(default_factory=dict)  # columns shared by every row (checkpoint key, ...)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def outcome_row(pack: Pack, key: str, outcome: TrialOutcome, attempt: int, timing: dict, where: dict) -> dict:
    row = {
        "study": pack.study, "key": key, "candidate": pack.candidate, **parameter_columns(outcome.spec),
        **pack.extra, **outcome.metrics, **{f"{name}_per_image": v for name, v in outcome.per_image.items()},
        "restart_scores": outcome.restart_scores,
        "curve_iterations": [i for i, _ in outcome.curve], "curve_costs": [c for _, c in outcome.curve],
        "status": outcome.status, "error": outcome.error or None, "attempt": attempt,
        "attack_seconds": outcome.seconds, "lanes": outcome.lanes, **timing, **where,
    }  # fmt: skip
    if outcome.curve:
        row["iterations_run"] = outcome.curve[-1][0]
    if outcome.reconstruction is not None:
        row["truth_png"] = [data.png_bytes(image) for image in outcome.truth]
        row["reconstruction_png"] = [data.png_bytes(image) for image in outcome.reconstruction]
    return row


def where_am_i(device: str) -> dict:
    info = provenance(device)
    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except ImportError:  # the pack can also run without Ray
        pass
    return {
        "host": socket.gethostname(), "node_id": node_id, "worker_pid": os.getpid(), "device": info["device"],
        "threads": info["threads"], "gradinv_version": info["gradinv"], "torch_version": info["torch"],
        "torchvision_version": info["torchvision"], "python_version": info["python"], "commit": info["commit"],
    }  # fmt: skip


def failed_outcomes(pack: Pack, error: str) -> list[TrialOutcome]:
    return [TrialOutcome(spec=spec, status="failed", error=error, lanes=len(pack.specs)) for spec in pack.specs]


def run_pack(pack: Pack, attempt: int = 1, victim=None, on_checkpoint=None) -> list[dict]:
    """Run a pack's trials together and return one row per trial."""
    torch.set_num_threads(pack.threads)
    started, clock = now(), time.monotonic()
    deadline = clock + pack.timeout if pack.timeout else None
    try:
        inject_fault(pack.keys, attempt)
        kwargs = {"victim": victim} if victim is not None else {}
        outcomes = run_trials(list(pack.specs), device=pack.device, deadline=deadline, on_checkpoint=on_checkpoint, **kwargs)
    except Exception as error:  # noqa: BLE001 - any trial error is data, not a crash
        outcomes = failed_outcomes(pack, _describe(error))
    timing = {"started_at": started, "finished_at": now(), "task_seconds": time.monotonic() - clock}
    where = where_am_i(pack.device)
    return [outcome_row(pack, key, o, attempt, timing, where) for key, o in zip(pack.keys, outcomes)]


def _describe(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{place}"


def inject_fault(keys: tuple[str, ...], attempt: int) -> None:
    """Deliberate faults for testing recovery, named by $GRADINV_FAULTS (a JSON file: key -> action).

    Actions: ``raise`` (the trial fails), ``exit-first-attempt`` (the worker process dies on the
    first attempt, as on a lost node), ``sleep:SECONDS`` (a slow trial).
    """
    path = os.environ.get("GRADINV_FAULTS")
    if not path:
        return
    with open(path) as handle:
        faults = json.load(handle)
    for key in keys:
        action = faults.get(key, "")
        if action == "raise":
            raise RuntimeError(f"injected fault for trial {key}")
        if action == "exit-first-attempt" and attempt == 1:
            os._exit(1)
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
