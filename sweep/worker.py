"""What runs inside a Ray worker: a pack of lane-compatible trials, turned into result rows.

Exceptions never leave a pack, and one trial's error fails that trial alone: when a lane raises, the
pack's trials run again one by one, so the trial that raises becomes a ``failed`` row with its error
and the others keep their results. A pack stopped as a whole (past its timeout, or cancelled) fails
the trials it had not finished; a trial that diverges is a ``failed`` row too. Only a dying worker
escapes, and Ray retries the task.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import signal
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field

import torch

from gradinv import data
from gradinv.attacks.base import TrialTimeout
from gradinv.client.accounting import privacy_columns
from gradinv.provenance import provenance
from gradinv.results.schema import parameter_columns
from gradinv.trial import TrialOutcome, TrialSpec, run_trials


class PackStopped(RuntimeError):
    """Raised by an ``on_checkpoint`` callback to stop the whole pack (a cancelled candidate, say)."""


WHOLE_PACK_STOPS = (TrialTimeout, PackStopped)  # they end every lane at once: no trial runs again


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
        "study": pack.study,
        "key": key,
        "candidate": pack.candidate,
        **parameter_columns(outcome.spec),
        **pack.extra,
        **outcome.image_columns,
        **privacy_columns(outcome.spec),
        **outcome.metrics,
        **{f"{name}_per_image": v for name, v in outcome.per_image.items()},
        "restart_scores": outcome.restart_scores,
        "curve_iterations": [i for i, _ in outcome.curve],
        "curve_costs": [c for _, c in outcome.curve],
        "curve_psnr": [q for q, _ in outcome.quality_curve] or None,
        "curve_ssim": [q for _, q in outcome.quality_curve] or None,
        "curve_gain": curve_gain(outcome),
        "attack_precision": outcome.precision,
        "zero_update": outcome.zero_update,
        "status": outcome.status,
        "error": outcome.error or None,
        "attempt": attempt,
        "attack_seconds": outcome.seconds,
        "lanes": outcome.lanes,
        **timing,
        **where,
    }
    if outcome.curve:
        row["iterations_run"] = outcome.curve[-1][0]
    if outcome.reconstruction is not None:
        row["truth_png"] = [data.png_bytes(image) for image in outcome.truth]
        row["reconstruction_png"] = [data.png_bytes(image) for image in outcome.reconstruction]
    return row


def curve_gain(outcome: TrialOutcome) -> list[float] | None:
    """The gain over the no-information baseline at each checkpoint, as psnr_gain is at the end."""
    baseline = outcome.metrics.get("baseline_psnr")
    if baseline is None or not outcome.quality_curve:
        return None
    return [psnr - baseline for psnr, _ in outcome.quality_curve]


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
        "host": socket.gethostname(),
        "node_id": node_id,
        "worker_pid": os.getpid(),
        "device": info["device"],
        "threads": info["threads"],
        "gradinv_version": info["gradinv"],
        "torch_version": info["torch"],
        "torchvision_version": info["torchvision"],
        "python_version": info["python"],
        "commit": info["commit"],
    }


def current_attempt() -> int:
    """1 for a Ray task's first run, 2 for its first retry, ... (Ray's core worker counts from 0)."""
    from ray._private.worker import global_worker

    return global_worker.core_worker.get_current_task_attempt_number() + 1


def failed_outcomes(pack: Pack, error: str) -> list[TrialOutcome]:
    return [TrialOutcome(spec=spec, status="failed", error=error, lanes=len(pack.specs)) for spec in pack.specs]


def run_pack(pack: Pack, attempt: int = 1, victim=None, on_checkpoint=None, images=None) -> list[dict]:
    """Run a pack's trials together and return one row per trial, in the pack's order.

    ``on_checkpoint(keys, iteration, costs, quality)`` receives the keys of the lanes running, their
    best costs and their (PSNR, SSIM) (one lane's key alone while the trials run one by one after a
    lane raised).
    """
    torch.set_num_threads(pack.threads)
    started, clock = now(), time.monotonic()
    deadline = clock + pack.timeout if pack.timeout else None
    run = functools.partial(
        _run_lanes,
        device=pack.device,
        attempt=attempt,
        victim=victim,
        images=images,
        on_checkpoint=on_checkpoint,
        deadline=deadline,
    )
    try:
        outcomes = run(pack.keys, pack.specs)
    except WHOLE_PACK_STOPS as error:
        outcomes = failed_outcomes(pack, _describe(error))
    except Exception as error:  # noqa: BLE001 - any trial error is data, not a crash
        outcomes = _one_by_one(pack, run) if len(pack.specs) > 1 else failed_outcomes(pack, _describe(error))
    seconds = time.monotonic() - clock
    timing = {
        "started_at": started,
        "finished_at": now(),
        "task_seconds": seconds,
        "trial_seconds": seconds / len(pack.keys),
        "pack_id": uuid.uuid4().hex[:16],
    }
    where = where_am_i(pack.device)
    return [
        outcome_row(pack, key, o, attempt, {**timing, "lane_index": lane}, where)
        for lane, (key, o) in enumerate(zip(pack.keys, outcomes))
    ]


def _run_lanes(keys, specs, *, device, attempt, victim, images, on_checkpoint, deadline) -> list[TrialOutcome]:
    inject_fault(keys, attempt)
    report = None if on_checkpoint is None else functools.partial(on_checkpoint, keys)
    kwargs = {"victim": victim, "images": images} if victim is not None else {}
    return run_trials(list(specs), device=device, deadline=deadline, on_checkpoint=report, **kwargs)


def _one_by_one(pack: Pack, run) -> list[TrialOutcome]:
    """After a lane raised: each trial alone, so that only a trial that raises fails. A stop (the
    pack's timeout, a cancellation) fails the trials not yet run."""
    outcomes = []
    for index, (key, spec) in enumerate(zip(pack.keys, pack.specs)):
        try:
            outcomes += run((key,), (spec,))
        except WHOLE_PACK_STOPS as error:
            return outcomes + [
                TrialOutcome(spec=s, status="failed", error=_describe(error)) for s in pack.specs[index:]
            ]
        except Exception as error:  # noqa: BLE001 - this trial's error is data
            outcomes.append(TrialOutcome(spec=spec, status="failed", error=_describe(error)))
    return outcomes


def _describe(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{place}"


def inject_fault(keys: tuple[str, ...], attempt: int) -> None:
    """Deliberate faults for testing recovery, named by $GRADINV_FAULTS (a JSON file: key -> action).

    Actions: ``raise`` (the trial fails, every time it runs: its pack-mates, run again alone, do not),
    ``exit-first-attempt`` (the worker process dies on the first attempt, as on a lost node),
    ``sleep:SECONDS`` (a slow trial, each time it runs), ``kill-raylet`` and ``kill-raylet-and-hang``
    (Ray fails under the trial: the worker kills its node's raylet, then dies with it or lingers).
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
        if action.startswith("kill-raylet"):
            _kill_raylet()
            if action == "kill-raylet-and-hang":
                time.sleep(300)  # no answer: only the driver's watch on its node can tell
            os._exit(1)


def _kill_raylet() -> None:
    """Kill the raylet that started this worker (its parent process)."""
    raylet = os.getppid()
    with open(f"/proc/{raylet}/comm") as comm:
        name = comm.read().strip()
    if name != "raylet":
        raise RuntimeError(f"the parent of this worker is {name!r}, not a raylet")
    os.kill(raylet, signal.SIGKILL)
