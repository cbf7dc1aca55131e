"""The results dataset: one Parquet directory, one explicit Arrow schema, one row per trial key.

Files are written under a hidden temporary name and renamed into place, so a reader (pandas,
pyarrow, DuckDB, Hugging Face ``datasets``) never sees half a file: readers skip names that start
with '.' or '_'. One driver at a time may write a directory (an OS file lock, released on death).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import filelock
import pyarrow as pa
import pyarrow.parquet as pq

from gradinv import models
from gradinv.errors import ConfigError
from gradinv.trial import DEFAULTS, TrialSpec

SCHEMA_VERSION = 1
RESULTS_FORMAT = 1  # part of every trial key: bump only when old results can no longer be compared
LOCK_NAME = ".gradinv.lock"

_PARAMETER_TYPES = {
    "dataset": pa.string(), "images": pa.list_(pa.int32()), "image_size": pa.int32(), "labels": pa.string(),
    "model": pa.string(), "width": pa.int32(), "model_seed": pa.int64(), "trained_epochs": pa.int32(), "train_subset": pa.int32(),
    "fl": pa.string(), "local_steps": pa.int32(), "local_lr": pa.float64(), "local_batch_size": pa.int32(),
    "data_order_seed": pa.int64(), "attack": pa.string(), "iterations": pa.int32(), "restarts": pa.int32(),
    "tv": pa.float64(), "lr": pa.float64(), "cost": pa.string(), "decay": pa.string(), "init": pa.string(),
    "layer_weighting": pa.string(), "layers": pa.list_(pa.int32()), "attack_seed": pa.int64(),
}  # fmt: skip
assert set(_PARAMETER_TYPES) == set(DEFAULTS), "every trial parameter needs a column"

METRICS = ("psnr", "ssim", "mse", "feature_mse")
_floats = pa.list_(pa.float64())

SCHEMA = pa.schema(
    [
        pa.field("study", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("candidate", pa.int32()),  # tuning candidate number; null for `run` studies
        *[pa.field(name, kind) for name, kind in _PARAMETER_TYPES.items()],
        pa.field("images_per_client", pa.int32()),
        pa.field("checkpoint_key", pa.string()),
        pa.field("model_accuracy", pa.float64()),
        *[pa.field(name, pa.float64()) for name in METRICS],
        pa.field("label_accuracy", pa.float64()),
        *[pa.field(f"{name}_per_image", _floats) for name in METRICS],
        pa.field("truth_png", pa.list_(pa.binary())),
        pa.field("reconstruction_png", pa.list_(pa.binary())),
        pa.field("restart_scores", _floats),
        pa.field("curve_iterations", pa.list_(pa.int32())),
        pa.field("curve_costs", _floats),
        pa.field("iterations_run", pa.int32()),
        pa.field("status", pa.string(), nullable=False),  # ok, failed or pruned
        pa.field("error", pa.string()),
        pa.field("attempt", pa.int32()),
        pa.field("started_at", pa.timestamp("ms", tz="UTC")),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        pa.field("attack_seconds", pa.float64()),
        pa.field("task_seconds", pa.float64()),
        pa.field("lanes", pa.int32()),
        pa.field("threads", pa.int32()),
        pa.field("host", pa.string()),
        pa.field("node_id", pa.string()),
        pa.field("worker_pid", pa.int32()),
        pa.field("device", pa.string()),
        pa.field("gradinv_version", pa.string()),
        pa.field("torch_version", pa.string()),
        pa.field("torchvision_version", pa.string()),
        pa.field("python_version", pa.string()),
        pa.field("commit", pa.string()),
    ],
    metadata={"gradinv.schema_version": str(SCHEMA_VERSION)},
)


def trial_key(spec: TrialSpec) -> str:
    """A hash of the resolved non-default parameters and the results format: stable as fields are added."""
    canonical = json.dumps({"format": RESULTS_FORMAT, **spec.non_default()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def parameter_columns(spec: TrialSpec) -> dict:
    """Every parameter as its own column; those that do not apply to the trial are null."""
    values = dataclasses.asdict(spec.resolved())
    for name in spec.not_applicable():
        values[name] = None
    if values["width"] is None and "width" not in spec.not_applicable():
        values["width"] = models.default_width(spec.model)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values["images_per_client"] = len(spec.images)
    return values


def empty_row() -> dict:
    return {name: None for name in SCHEMA.names}


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**empty_row(), **row} for row in rows], schema=SCHEMA)


# ---------------------------------------------------------------------------------------------
# The directory


class ResultsDir:
    """A results directory: read it freely; write it only inside ``with`` (lock, repair, atomic files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError("--results", str(path), "name a directory, not a file")
        self._lock = filelock.FileLock(str(self.path / LOCK_NAME), timeout=0)

    def __enter__(self) -> "ResultsDir":
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise ConfigError(
                "--results", str(self.path), "another gradinv driver is writing there; wait for it or use another directory"
            ) from None
        self.keep_one_row_per_key()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*.parquet") if not p.name.startswith((".", "_")))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = [pq.read_table(f, columns=columns, schema=SCHEMA) for f in self.files()]
        if not tables:
            return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def statuses(self) -> dict[str, str]:
        """Key -> status of every row present."""
        table = self.read(["key", "status"])
        return dict(zip(table["key"].to_pylist(), table["status"].to_pylist()))

    def write(self, rows: list[dict]) -> Path | None:
        """One new file holding ``rows``; rows with keys already present replace the old ones."""
        if not rows:
            return None
        table = to_table(rows)
        name = f"part-{time.time_ns():019d}-{uuid.uuid4().hex[:8]}.parquet"
        final = self.path / name
        partial = self.path / f".{name}.tmp"
        pq.write_table(table, partial)
        os.replace(partial, final)
        self._drop_keys(set(table["key"].to_pylist()), keep=final)
        return final

    def _drop_keys(self, keys: set[str], keep: Path) -> None:
        """Rewrite older files without ``keys`` (the new file holds their replacement rows)."""
        for file in self.files():
            if file == keep:
                continue
            old_keys = pq.read_table(file, columns=["key"])["key"].to_pylist()
            if not keys.intersection(old_keys):
                continue
            table = pq.read_table(file, schema=SCHEMA)
            mask = pa.array([k not in keys for k in old_keys])
            self._replace_file(file, table.filter(mask))

    def _replace_file(self, file: Path, table: pa.Table) -> None:
        if table.num_rows == 0:
            file.unlink()
            return
        partial = file.with_name(f".{file.name}.tmp")
        pq.write_table(table, partial)
        os.replace(partial, file)

    def keep_one_row_per_key(self) -> None:
        """Repair what a crash between writing a replacement and dropping the old row left behind."""
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink()
        files = self.files()
        newest: dict[str, Path] = {}
        duplicated = False
        for file in files:  # names sort by time: later files win
            for key in pq.read_table(file, columns=["key"])["key"].to_pylist():
                duplicated |= key in newest
                newest[key] = file
        if not duplicated:
            return
        for file in files:
            table = pq.read_table(file, schema=SCHEMA)
            keys = table["key"].to_pylist()
            seen: set[str] = set()
            mask = []
            for key in keys:
                mask.append(newest[key] == file and key not in seen)
                seen.add(key)
            if not all(mask):
                self._replace_file(file, table.filter(pa.array(mask)))
