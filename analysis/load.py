"""Reading a results directory: the Parquet files directly, light columns first, images on demand.

Every trial's scalars fit in memory even for very large studies; the PNG columns do not, so they
are read only for the trials a view needs (``load_images``) or streamed batch by batch
(``iter_image_rows``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gradinv.errors import ConfigError
from sweep.results import _PARAMETER_TYPES, SCHEMA, ResultsDir

METRICS = ("psnr", "psnr_gain", "ssim", "label_accuracy")
# A setting is what defines a trial: every trial parameter, and the client's image count. Every other
# column (metrics, baselines, curves, timings, provenance) is an outcome, so columns the schema gains
# later never split a setting in two.
SETTINGS = (*_PARAMETER_TYPES, "images_per_client")
HEAVY = ("truth_png", "reconstruction_png", "restart_scores", "curve_iterations", "curve_costs", "curve_psnr",
         "curve_ssim")  # fmt: skip
CURVES = ("curve_iterations", "curve_psnr", "curve_ssim")
# Settings that tell repetitions apart (which client, which seed) rather than define a setting.
REPETITION = ("images", "model_seed", "data_order_seed", "attack_seed")
_NULLABLE_INTS = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}


def result_files(path: str | Path) -> list[Path]:
    """The visible Parquet files of a results directory; a missing or empty one, or one holding a
    damaged or foreign file, is a user error."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("results", str(path), "name an existing results directory (gradinv run --results DIR)")
    files = ResultsDir(path).checked_files()  # reading only: no lock
    if not files or all(pq.read_metadata(f).num_rows == 0 for f in files):
        raise ConfigError("results", str(path), "it holds no trial rows yet; run a study into it first")
    return files


def require_outside(flag: str, target: str | Path, results: str | Path) -> None:
    """A file written into a results directory is read back as results by every Parquet reader
    (pandas, pyarrow, DuckDB take each file inside), so outputs go beside it."""
    inside, results = Path(target).resolve(), Path(results).resolve()
    if inside == results or results in inside.parents:
        beside = results.parent / f"{results.name}-{Path(target).name}"
        raise ConfigError(flag, str(target), f"name a place outside the results directory {results}, e.g. {beside}")


def dataset(path: str | Path) -> ds.Dataset:
    """All files as one dataset under the current schema: columns an older file lacks read as nulls
    (every column a file has is the schema's, of the same type: ``result_files`` checked that)."""
    return ds.dataset([str(f) for f in result_files(path)], schema=SCHEMA, format="parquet")


def load_trials(path: str | Path) -> pd.DataFrame:
    """One row per trial with every column except images and curves; list settings become text."""
    data = dataset(path)
    columns = [name for name in data.schema.names if name not in HEAVY]
    with _damage_named(path, data, columns):
        table = data.to_table(columns=columns)
    frame = table.to_pandas(types_mapper=_NULLABLE_INTS.get)
    for name in settings_columns(frame):
        if pa.types.is_list(data.schema.field(name).type):
            frame[name] = frame[name].map(_list_text)
    return frame


def _list_text(values) -> str | None:
    return None if values is None else ",".join(str(v) for v in values)


def settings_columns(frame: pd.DataFrame) -> list[str]:
    return [name for name in frame.columns if name in SETTINGS]


def varying_settings(frame: pd.DataFrame) -> list[str]:
    """Settings with more than one value across ``frame``, repetitions left out. Nulls do not count:
    a null means "does not apply" (local steps under FedSGD), which another setting already says."""
    return [name for name in settings_columns(frame) if name not in REPETITION and frame[name].nunique() > 1]


def load_images(path: str | Path, keys: list[str]) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """Key -> (ground-truth PNGs, reconstruction PNGs) for the given trials only."""
    if not keys:
        return {}
    data, columns = dataset(path), ["key", "truth_png", "reconstruction_png"]
    with _damage_named(path, data, columns):
        table = data.to_table(columns=columns, filter=pc.field("key").isin(list(keys)))
    return {
        key: (truth or [], recon or [])
        for key, truth, recon in zip(*(table[c].to_pylist() for c in ("key", "truth_png", "reconstruction_png")))
    }


def load_curves(path: str | Path, keys: list[str]) -> pd.DataFrame:
    """Key and quality curve (checkpoint iterations, PSNR and SSIM of the best restart) of the given trials;
    empty lists where a row has none (written before curves were recorded, or pruned before a checkpoint)."""
    data, columns = dataset(path), ["key", *CURVES]
    with _damage_named(path, data, columns):
        table = data.to_table(columns=columns, filter=pc.field("key").isin(list(keys)))
    frame = table.to_pandas()
    for name in CURVES:
        frame[name] = frame[name].map(lambda values: [] if values is None else list(values))
    return frame


def compute_seconds(frame: pd.DataFrame) -> pd.Series:
    """Each trial's share of the compute its task spent. Trials packed as lanes of one task share its
    time, so ``task_seconds`` repeats on every lane; rows written before ``trial_seconds`` existed
    split it evenly between the lanes."""
    lanes = frame["lanes"].astype("Float64").fillna(1).clip(lower=1)
    return frame["trial_seconds"].astype("Float64").fillna(frame["task_seconds"].astype("Float64") / lanes)


def finished_keys(path: str | Path) -> list[tuple[str, str]]:
    """(key, file holding its row) of every finished trial."""
    data = dataset(path)
    with _damage_named(path, data, ["key", "status"]):
        table = data.to_table(columns=["key", "__filename"], filter=pc.field("status") == "ok")
    return list(zip(table["key"].to_pylist(), table["__filename"].to_pylist()))


def iter_image_rows(path: str | Path, batch_rows: int = 256) -> Iterator[dict]:
    """Finished trials one at a time, images included, without holding more than one batch."""
    data = dataset(path)
    columns = [name for name in data.schema.names if name not in HEAVY or name.endswith("_png")]
    with _damage_named(path, data, columns):
        for batch in data.to_batches(columns=columns, filter=pc.field("status") == "ok", batch_size=batch_rows):
            yield from batch.to_pylist()


@contextmanager
def _damage_named(path: str | Path, data: ds.Dataset, columns: list[str]) -> Iterator[None]:
    """Damage past a sound footer (checked already) shows only when pages are read: one line naming
    the file instead of pyarrow's traceback."""
    try:
        yield
    except FileNotFoundError:  # replaced by a writer since it was listed: not damage
        raise
    except (OSError, pa.ArrowException) as error:
        damaged = next((Path(f.path) for f in data.get_fragments() if not _readable(f, columns)), Path(path))
        problem = f"damaged ({str(error).splitlines()[0]})"
        raise ResultsDir(path).bad_file_error(damaged, problem, footer=False) from None


def _readable(fragment: ds.Fragment, columns: list[str]) -> bool:
    try:
        fragment.to_table(columns=columns)
    except (OSError, pa.ArrowException):
        return False
    return True
