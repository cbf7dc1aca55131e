"""`gradinv attack`: one reconstruction, written as metrics.json and a side-by-side PNG."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
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


def update_command(
    paths: list, spec: TrialSpec, *, out: Path | None, results, data_root=None, device: str = "cpu"
) -> int:
    """`gradinv attack --update`: one capture into ``out`` (its files), or captures into ``results`` (rows)."""
    from gradinv.errors import ConfigError

    from .captured_results import attack_into_results, refuse_several_without_results

    if results is None:
        update = refuse_several_without_results(paths)
        if out is None:
            raise ConfigError("--out", None, "name the output directory (--out DIR), or the results (--results DIR)")
        return attack_update(update, spec, out, data_root=data_root, device=device)
    if out is not None:
        raise ConfigError("--out", str(out), "leave it out with --results: the rows hold the images (gradinv report)")
    return attack_into_results(paths, spec, results, data_root=data_root, device=device)


def attack_update(update: Path, spec: TrialSpec, out: Path, *, data_root=None, device: str = "cpu") -> int:
    """`gradinv attack --update FILE`: the captured update attacked with the flags' settings (the file gives
    the weights and the client's recipe), its files written into ``out``; a summary line printed."""
    from gradinv.capture import load_update
    from gradinv.trial.captured import attack_captured, captured_model, captured_spec

    capture = load_update(update)
    checked = captured_spec(capture, spec)  # the flags and the model against the file, before anything runs
    captured_model(capture, checked)
    if capture.images is not None:  # scored against the dataset's baseline: a missing dataset fails here
        data.open_dataset(checked.dataset, data_root, image_size=checked.image_size)
    memory.refuse_unfit([checked], 1, memory.machine_memory(), "this machine", device=device)
    total = 1 if "iterations" in checked.not_applicable() else (checked.max_iterations or checked.iterations)
    with tqdm(total=total, desc="attack", unit="it", dynamic_ncols=True) as bar:
        outcome = attack_captured(
            capture, spec, data_root=data_root, device=device, on_progress=lambda done: bar.update(done - bar.n)
        )
    if outcome.status != "ok":
        print(f"gradinv attack: failed: {outcome.error}", file=sys.stderr)
        return 1
    document = metrics_document(outcome, device) | {"update_file": str(update), "labels": outcome.per_image["label"]}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "metrics.json", json.dumps(document, indent=2).encode())
    if outcome.reconstruction is not None:
        picture = io.BytesIO()
        if outcome.truth is not None:
            data.side_by_side(outcome.truth, outcome.reconstruction).save(picture, format="PNG")
        else:  # one row of reconstructions
            Image.fromarray(np.concatenate([data.to_uint8(image) for image in outcome.reconstruction], axis=1)).save(
                picture, format="PNG"
            )
        write_atomic(out / "reconstruction.png", picture.getvalue())
    m = outcome.metrics
    if outcome.zero_update:
        print("the captured update is exactly zero: nothing to attack")
    elif m["ground_truth"]:
        print(
            f"PSNR {m['psnr']:.2f} dB (gain {m.get('psnr_gain', math.nan):+.2f})  SSIM {m['ssim']:.3f}  "
            f"labels {m['label_accuracy']:.0%}  {outcome.seconds:.1f} s  -> {out}"
        )
    else:
        print(
            f"no ground truth in the update file: gradient cost {m['gradient_cost']:.4g}  "
            f"labels {outcome.per_image['label']}  {outcome.seconds:.1f} s  -> {out}"
        )
    return 0
