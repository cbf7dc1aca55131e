"""`gradinv attack`: one reconstruction, written as metrics.json and a side-by-side PNG."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tqdm import tqdm

from gradinv import data, memory
from gradinv.client.accounting import privacy_columns
from gradinv.files import write_atomic
from gradinv.provenance import provenance
from gradinv.trial import TrialOutcome, TrialSpec, cached_victim, run_trials


def attack(spec: TrialSpec, out: Path, *, data_root=None, device: str = "cpu") -> TrialOutcome:
    """Run one trial with a progress bar and write its files into ``out`` (complete or not at all)."""
    memory.refuse_unfit([spec], 1, memory.machine_memory(), "this machine", device=device)  # before anything loads
    data.open_dataset(
        spec.dataset, data_root, image_size=spec.image_size
    )  # a missing dataset fails here, before any output
    model = cached_victim(spec)  # so does a broken checkpoint; a missing one is trained first
    # analytic families: one step; with max_iterations, the cap (the budget may stop it sooner)
    total = 1 if "iterations" in spec.not_applicable() else (spec.max_iterations or spec.iterations)
    with tqdm(total=total, desc="attack", unit="it", dynamic_ncols=True) as bar:

        def progress(done: int) -> None:
            bar.update(done - bar.n)

        outcome = run_trials([spec], data_root=data_root, device=device, on_progress=progress, victim=lambda _: model)[
            0
        ]
        bar.total = total if not spec.max_iterations else max(bar.n, 1)  # what the budget spent
        bar.update(bar.total - bar.n)
    write_outcome(outcome, out, device)
    return outcome


def metrics_document(outcome: TrialOutcome, device: str) -> dict:
    return {
        "status": outcome.status,
        "error": outcome.error,
        **outcome.metrics,
        **privacy_columns(outcome.spec),
        **{f"{name}_per_image": values for name, values in outcome.per_image.items()},
        "seconds": outcome.seconds,
        "attack_precision": outcome.precision,
        "zero_update": outcome.zero_update,
        "restart_scores": outcome.restart_scores,
        "loss_curve": [{"iteration": i, "cost": c} for i, c in outcome.curve],
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(outcome.spec.resolved()).items()},
        "provenance": provenance(device),
    }


def write_outcome(outcome: TrialOutcome, out: Path, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps(metrics_document(outcome, device), indent=2).encode())
    if outcome.reconstruction is not None:
        picture = io.BytesIO()
        data.side_by_side(outcome.truth, outcome.reconstruction).save(picture, format="PNG")
        write_atomic(out / "reconstruction.png", picture.getvalue())
