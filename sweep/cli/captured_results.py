"""`gradinv attack --update FILE|DIR ... --results DIR`: captured updates (gradinv.capture) attacked into the
results dataset, one row each, so that `gradinv status`, `report` and `export` read them as a study's trials.

A row's key is the attack's settings (as a study trial's) and the capture file's sha256: a rerun skips the
captures that already have a row, and a changed file or setting is a new row. Every file is read and checked
against the flags before the results are opened: a bad one is one line, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gradinv import data, memory
from gradinv.capture import CapturedUpdate, load_update
from gradinv.errors import ConfigError, require
from gradinv.results.remote import open_store
from gradinv.results.schema import captured_key, to_table
from gradinv.trial import TrialOutcome, TrialSpec
from gradinv.trial.captured import attack_captured, captured_model, captured_spec

from ..study import NAME_PATTERN
from ..task_loop import data_columns
from ..worker import Pack, now, outcome_row, where_am_i

DEFAULT_STUDY = "captured"  # the rows' study where the results' own name is not a study name


@dataclass(frozen=True)
class Capture:
    """One capture file, read and checked against the flags."""

    path: Path
    sha256: str
    update: CapturedUpdate
    spec: TrialSpec  # the flags' settings with the file's recipe (captured_spec)
    key: str


def capture_files(paths: list) -> list[Path]:
    """The files named: each path a capture file, or a directory whose ``*.pt`` files (sorted) are."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.glob("*.pt") if p.is_file())
            require(bool(found), "--update", str(path), "this directory holds no *.pt captures; name files or another")
            files += found
        else:
            files.append(path)  # load_update names a missing one
    return list(dict.fromkeys(files))


def checked(path: Path, spec: TrialSpec, data_root, device: str) -> Capture:
    """The capture at ``path`` with its trial and key; a problem is a ConfigError that names the file."""
    try:
        update = load_update(path)
        trial = captured_spec(update, spec)
        captured_model(update, trial)
        if update.images is not None:  # scored against the dataset's baselines: a missing dataset fails here
            data.open_dataset(trial.dataset, data_root, image_size=trial.image_size)
        memory.refuse_unfit([trial], 1, memory.machine_memory(), "this machine", device=device)
    except ConfigError as error:
        if str(path) in str(error):
            raise
        raise ConfigError(f"{path}: {error.field}", error.value, error.fix) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Capture(path, digest, update, trial, captured_key(trial, digest))


def attack_into_results(paths: list, spec: TrialSpec, results, *, data_root=None, device: str = "cpu") -> int:
    """Each capture not yet in ``results`` attacked and written as a row; exit 0 when every one is ok."""
    captures = {}
    for path in capture_files(paths):  # all checked before anything is opened or written
        capture = checked(path, spec, data_root, device)
        captures.setdefault(capture.key, capture)  # the same content under two names: one row
    study = study_name(results)
    with open_store(results) as store:
        stored = store.statuses()
        todo = [capture for key, capture in captures.items() if key not in stored]
        if not todo:
            print(f"all {len(captures)} captured updates already have rows in {store.path}")
            return 0
        rows = attack_all(todo, study, store, data_root, device)
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"{len(rows)} rows written to {store.path} ({len(captures) - len(todo)} already there, {failed} failed)")
    return 1 if failed else 0


def attack_all(todo: list[Capture], study: str, store, data_root, device: str) -> list[dict]:
    """Rows of ``todo``, journalled as each finishes and written as one file at the end, also when stopped."""
    journal, rows = store.journal(), []
    try:
        for capture in todo:
            row = attacked_row(capture, study, data_root, device)
            journal.append(to_table([row]))
            rows.append(row)
            print(f"{capture.path}: {summary(row)}")
    finally:
        store.write(rows)
        journal.discard()
    return rows


def attacked_row(capture: Capture, study: str, data_root, device: str) -> dict:
    """The capture attacked (a progress bar while it runs) as a row of ``study``, named by its file and digest."""
    spec = capture.spec
    total = 1 if "iterations" in spec.not_applicable() else (spec.max_iterations or spec.iterations)
    started, clock = now(), time.monotonic()
    with tqdm(total=total, desc=capture.path.name, unit="it", dynamic_ncols=True, leave=False) as bar:
        outcome = attack_captured(
            capture.update, spec, data_root=data_root, device=device, on_progress=lambda done: bar.update(done - bar.n)
        )
    seconds = time.monotonic() - clock
    extra = {"update_sha256": capture.sha256, "update_file": str(capture.path), **data_columns(spec)}
    pack = Pack(study, (capture.key,), (outcome.spec,), torch.get_num_threads(), device, extra=extra)
    timing = {"started_at": started, "finished_at": now(), "task_seconds": seconds, "trial_seconds": seconds}
    timing |= {"pack_id": uuid.uuid4().hex[:16], "lane_index": 0}
    return with_images(outcome, lambda shown: outcome_row(pack, capture.key, shown, 1, timing, where_am_i(device)))


def with_images(outcome: TrialOutcome, row_of) -> dict:
    """``row_of(outcome)``; without ground truth, the reconstructions alone (the row's truth_png stays null)."""
    if outcome.truth is not None or outcome.reconstruction is None:
        return row_of(outcome)
    row = row_of(dataclasses.replace(outcome, reconstruction=None))
    row["reconstruction_png"] = [data.png_bytes(image) for image in outcome.reconstruction]
    return row


def summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"failed: {row['error']}"
    if row["zero_update"]:
        return "the update is exactly zero: nothing to attack"
    if row["ground_truth"]:
        gain = row.get("psnr_gain")
        return f"PSNR {row['psnr']:.2f} dB (gain {float('nan') if gain is None else gain:+.2f})  SSIM {row['ssim']:.3f}"
    return f"no ground truth: gradient cost {row['gradient_cost']:.4g}  labels {row['label_per_image']}"


def study_name(results) -> str:
    """The rows' study: the results' last path part (results/flower: flower) when it is a study name."""
    name = str(results).rstrip("/").rsplit("/", 1)[-1]
    return name if NAME_PATTERN.match(name) else DEFAULT_STUDY


def refuse_several_without_results(paths: list) -> Path:
    """The one capture file `--update` names when there is no --results; several are rows of results."""
    files = capture_files(paths)
    if len(files) != 1 or Path(paths[0]).is_dir():
        shown = " ".join(map(str, paths))
        raise ConfigError("--update", shown, "attack several captures into results: add --results DIR")
    return files[0]
