"""`gradinv export`: the reconstructions and their ground truth as PNG files, with an index.

The index (index.csv and index.parquet, the same rows) has one row per reconstructed image: the trial
key, the image's position in the client's batch and its index in the dataset, both file names
(relative to the export directory), the image's own scores and PSNR gain over the no-information
baseline, the trial's mean PSNR and baseline PSNR, the victim's accuracy and every setting. The same
entries, images inside, make the Hugging Face dataset (analysis.export_hf).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from gradinv.errors import ConfigError
from gradinv.files import write_atomic

from . import load
from .roles import PER_IMAGE_SUFFIX, Roles

IMAGES_DIR = "images"
FILE_SAFE_KEY = re.compile(r"[0-9A-Za-z]{1,64}")


def export(results: str | Path, to: str | Path) -> pd.DataFrame:
    """Write every finished trial's images under ``to``; returns the index it wrote."""
    to = Path(to)
    prepare(results, to, IMAGES_DIR)
    roles = load.column_roles(results)
    entries = [entry for row in load.iter_image_rows(results) for entry in _write_trial(row, to, roles)]
    index = pd.DataFrame(entries)
    _write_index(index, to)
    return index


def prepare(results: str | Path, to: Path, folder: str) -> None:
    """Refuse, writing nothing, a ``to`` that is a file or lies inside the results, and results without rows
    or with keys unfit to name files; then create ``to / folder``."""
    if to.exists() and not to.is_dir():
        raise ConfigError("--to", str(to), "name a directory (it is created if missing)")
    load.require_outside("--to", to, results)
    load.result_files(results)  # a missing or empty results directory fails before anything is written
    _require_file_safe_keys(results)
    try:
        (to / folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            "--to",
            str(to),
            f"cannot write there ({error.strerror or error}: {error.filename}); name a writable directory",
        ) from None


def _require_file_safe_keys(results: str | Path) -> None:
    """Keys name the exported files, so each must be a plain name (gradinv's are 20 hex digits): a row
    written by other means must not write outside ``--to`` (a key such as ``../../x``)."""
    for key, file in load.finished_keys(results):
        if not FILE_SAFE_KEY.fullmatch(key):
            raise ConfigError(
                "key",
                key,
                "a trial key names exported files, so it must be 1 to 64 letters and digits "
                f"(gradinv writes 20 hex digits); remove that row's file {file}",
            )


def _write_trial(row: dict, to: Path, roles: Roles) -> list[dict]:
    def files(position: int, truth: bytes, recon: bytes) -> dict:
        names = {f"{kind}_file": image_name(row["key"], position, kind) for kind in ("truth", "reconstruction")}
        write_atomic(_inside(to, names["truth_file"]), truth)  # a new file renamed into place: never through a link
        write_atomic(_inside(to, names["reconstruction_file"]), recon)
        return names

    return [{name: _text(value) for name, value in entry.items()} for entry in image_entries(row, roles, files)]


def image_name(key: str, position: int, kind: str) -> str:
    """Where the PNG export puts an image (``kind``: truth or reconstruction), relative to ``--to``."""
    return f"{IMAGES_DIR}/{key}-{position}-{kind}.png"


def image_entries(row: dict, roles: Roles, images: Callable[[int, bytes, bytes], dict]) -> list[dict]:
    """One entry per reconstructed image of a finished trial: its identity, position and index in the
    dataset, the columns ``images(position, truth_png, reconstruction_png)`` gives (the images or their
    files), its own scores, the trial's, and every setting (list settings as lists)."""
    settings = {name: row[name] for name in roles.settings if name in row}
    indices, per_image = row.get("images") or [], roles.per_image()
    entries = []
    for position, (truth, recon) in enumerate(zip(row["truth_png"] or [], row["reconstruction_png"] or [])):
        entries.append(
            {
                "key": row["key"],
                "study": row["study"],
                "candidate": row.get("candidate"),
                "position": position,
                "image": _at(indices, position),
                **images(position, truth, recon),
                **{name: _at(row.get(f"{name}{PER_IMAGE_SUFFIX}"), position) for name in per_image},
                "trial_psnr": row["psnr"],
                "baseline_psnr": row["baseline_psnr"],
                "label_accuracy": row["label_accuracy"],
                "model_accuracy": row["model_accuracy"],
                **settings,
            }
        )
    return entries


def _inside(to: Path, name: str) -> Path:
    """``to / name``, which must resolve to a place under ``to`` (a link inside ``to`` could lead out)."""
    path = to / name
    if to.resolve() not in path.resolve().parents:
        raise ConfigError(
            "--to",
            str(to),
            f"{name} would be written outside it, to {path.resolve()}; name a directory whose folders are not links",
        )
    return path


def _text(value):
    """List settings (images, layers) as JSON text, so CSV and Parquet hold the same value."""
    return json.dumps(value) if isinstance(value, list) else value


def _at(values, position: int):
    return values[position] if values and position < len(values) else None


def _write_index(index: pd.DataFrame, to: Path) -> None:
    """Each file whole or not at all, through a temporary file made new (a fixed temporary name could be
    a link someone placed in ``to``, and writing it would overwrite the file it points to)."""
    write_atomic(to / "index.csv", lambda sink: index.to_csv(sink, index=False))
    write_atomic(to / "index.parquet", lambda sink: index.to_parquet(sink, index=False))
