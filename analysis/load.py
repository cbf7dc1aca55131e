"""Reading a results directory: the Parquet files directly, light columns first, images on demand.

Every trial's scalars fit in memory even for very large studies; the PNG columns do not, so they
are read only for the trials a view needs (``load_images``) or streamed batch by batch
(``iter_image_rows``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gradinv.errors import ConfigError

METRICS = ("psnr", "ssim", "label_accuracy")
# Columns that describe what a trial produced or where it ran; every other column except the
# identity columns is a setting, so parameters added to the schema later group like the rest.
IDENTITY = ("study", "key", "candidate")
OUTCOMES = (
    "checkpoint_key", "model_accuracy", "psnr", "ssim", "mse", "feature_mse", "label_accuracy",
    "psnr_per_image", "ssim_per_image", "mse_per_image", "feature_mse_per_image", "truth_png",
    "reconstruction_png", "restart_scores", "curve_iterations", "curve_costs", "iterations_run", "status",
    "error", "attempt", "started_at", "finished_at", "attack_seconds", "task_seconds", "lanes", "threads",
    "host", "node_id", "worker_pid", "device", "gradinv_version", "torch_version", "torchvision_version",
    "python_version", "commit",
)  # fmt: skip
HEAVY = ("truth_png", "reconstruction_png", "restart_scores", "curve_iterations", "curve_costs")
# Settings that tell repetitions apart (which client, which seed) rather than define a setting.
REPETITION = ("images", "model_seed", "data_order_seed", "attack_seed")
_NULLABLE_INTS = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}


def result_files(path: str | Path) -> list[Path]:
    """The visible Parquet files of a results directory; a missing or empty one is a user error."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("results", str(path), "name an existing results directory (gradinv run --results DIR)")
    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files or all(pq.ParquetFile(f).metadata.num_rows == 0 for f in files):
        raise ConfigError("results", str(path), "it holds no trial rows yet; run a study into it first")
    return files


def dataset(path: str | Path) -> ds.Dataset:
    """All files as one dataset under their unified schema (older files may lack newer columns)."""
    files = result_files(path)
    schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet")


def load_trials(path: str | Path) -> pd.DataFrame:
    """One row per trial with every column except images and curves; list settings become text."""
    data = dataset(path)
    columns = [name for name in data.schema.names if name not in HEAVY]
    frame = data.to_table(columns=columns).to_pandas(types_mapper=_NULLABLE_INTS.get)
    for name in settings_columns(frame):
        if pa.types.is_list(data.schema.field(name).type):
            frame[name] = frame[name].map(_list_text)
    return frame


def _list_text(values) -> str | None:
    return None if values is None else ",".join(str(v) for v in values)


def settings_columns(frame: pd.DataFrame) -> list[str]:
    return [name for name in frame.columns if name not in IDENTITY and name not in OUTCOMES]


def varying_settings(frame: pd.DataFrame) -> list[str]:
    """Settings with more than one value across ``frame``, repetitions left out. Nulls do not count:
    a null means "does not apply" (local steps under FedSGD), which another setting already says."""
    return [name for name in settings_columns(frame) if name not in REPETITION and frame[name].nunique() > 1]


def load_images(path: str | Path, keys: list[str]) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """Key -> (ground-truth PNGs, reconstruction PNGs) for the given trials only."""
    if not keys:
        return {}
    table = dataset(path).to_table(
        columns=["key", "truth_png", "reconstruction_png"], filter=pc.field("key").isin(list(keys))
    )
    return {
        key: (truth or [], recon or [])
        for key, truth, recon in zip(*(table[c].to_pylist() for c in ("key", "truth_png", "reconstruction_png")))
    }


def iter_image_rows(path: str | Path, batch_rows: int = 256) -> Iterator[dict]:
    """Finished trials one at a time, images included, without holding more than one batch."""
    data = dataset(path)
    columns = [name for name in data.schema.names if name not in ("restart_scores", "curve_iterations", "curve_costs")]
    for batch in data.to_batches(columns=columns, filter=pc.field("status") == "ok", batch_size=batch_rows):
        yield from batch.to_pylist()
