"""Reading a results directory, or a prefix in object storage (``s3://bucket/prefix``, gradinv.results.remote):
the Parquet files directly, light columns first, images on demand.

Every trial's scalars fit in memory even for very large studies; the heavy columns (images, curves)
do not, so they are read only for the trials a view needs (``load_images``, ``load_curves``) or
streamed batch by batch (``iter_image_rows``). Which columns are settings, outcomes or heavy the
files say (analysis.roles). Where a crash left two rows of one key, the one the runner keeps counts
(gradinv.results.winners.Winners).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gradinv.errors import ConfigError
from gradinv.results.location import is_remote
from gradinv.results.remote import open_store
from gradinv.results.store import ResultsDir
from gradinv.results.winners import Winners

from . import roles
from .roles import Roles

IMAGES = ("truth_png", "reconstruction_png")
# The best restart's gradient cost and quality at each checkpoint
CURVES = ("curve_iterations", "curve_costs", "curve_psnr", "curve_ssim", "curve_gain")
_NULLABLE_INTS = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}


def existing(path: str | Path, field: str, fix: str) -> ResultsDir:
    """The results at ``path`` for reading (no lock, no repair); ConfigError(field, path, fix) when there are none."""
    if not is_remote(path) and not Path(path).is_dir():
        raise ConfigError(field, str(path), fix)
    store = open_store(path)
    if not store.exists():
        raise ConfigError(field, str(path), fix)
    return store


def result_files(path: str | Path) -> list[Path] | list[str]:
    """The visible Parquet files of a results directory (paths of its ``filesystem`` when remote); a
    missing or empty one, or one holding a damaged or foreign file, is a user error."""
    store = existing(path, "results", "name an existing results directory (gradinv run --results DIR)")
    files = store.checked_files()  # reading only: no lock
    if not files or all(pq.read_metadata(f, filesystem=store.filesystem).num_rows == 0 for f in files):
        raise ConfigError("results", str(path), "it holds no trial rows yet; run a study into it first")
    return files


def require_outside(flag: str, target: str | Path, results: str | Path) -> None:
    """A file written into a results directory is read back as results by every Parquet reader
    (pandas, pyarrow, DuckDB take each file inside), so outputs go beside it."""
    if is_remote(results):  # a local output is never inside a bucket
        return
    inside, results = Path(target).resolve(), Path(results).resolve()
    if inside == results or results in inside.parents:
        beside = results.parent / f"{results.name}-{Path(target).name}"
        raise ConfigError(flag, str(target), f"name a place outside the results directory {results}, e.g. {beside}")


def dataset(path: str | Path) -> ds.Dataset:
    """All files as one dataset, each column with its role in the field metadata; columns an older
    file lacks read as nulls (every column a file has is the schema's, of the same type:
    ``result_files`` checked that)."""
    files = result_files(path)
    filesystem = open_store(path).filesystem
    schema = roles.annotated(pq.read_schema(f, filesystem=filesystem) for f in files)
    return ds.dataset([str(f) for f in files], schema=schema, format="parquet", filesystem=filesystem)


def column_roles(path: str | Path) -> Roles:
    """Each column's role, as the directory's files declare it."""
    return Roles.of_schema(dataset(path).schema)


def load_trials(path: str | Path) -> pd.DataFrame:
    """One row per trial with every column except the heavy ones; list settings become text."""
    data = dataset(path)
    declared = Roles.of_schema(data.schema)
    columns = [name for name in data.schema.names if name not in declared.heavy]
    frame = _counted(path, data, columns).to_pandas(types_mapper=_NULLABLE_INTS.get)
    for name in declared.settings_in(frame):
        if pa.types.is_list(data.schema.field(name).type):
            frame[name] = frame[name].map(_list_text)
    return frame


def _list_text(values) -> str | None:
    return None if values is None else ",".join(str(v) for v in values)


def load_images(path: str | Path, keys: list[str]) -> dict[str, tuple[list[bytes], list[bytes]]]:
    """Key -> (ground-truth PNGs, reconstruction PNGs) for the given trials only."""
    if not keys:
        return {}
    data, columns = dataset(path), ["key", *IMAGES]
    table = _counted(path, data, columns, filter=pc.field("key").isin(list(keys)))
    return {key: (truth or [], recon or []) for key, truth, recon in zip(*(table[c].to_pylist() for c in columns))}


def load_curves(path: str | Path, keys: list[str]) -> pd.DataFrame:
    """Key and curves (checkpoint iterations, best cost, PSNR, SSIM and gain of the best restart) of the given
    trials; empty lists where a row has none (written before the curve was recorded, or pruned before a
    checkpoint)."""
    columns = ["key", *CURVES]
    if not keys:  # an empty value set has no type to match the keys' against
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    data = dataset(path)
    frame = _counted(path, data, columns, filter=pc.field("key").isin(list(keys))).to_pandas()
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
    table = _counted(path, dataset(path), ["key", FILE], filter=pc.field("status") == "ok")
    return list(zip(table["key"].to_pylist(), table[FILE].to_pylist()))


def iter_image_rows(path: str | Path, batch_rows: int = 256) -> Iterator[dict]:
    """Finished trials one at a time, images included, without holding more than one batch."""
    data = dataset(path)
    heavy = Roles.of_schema(data.schema).heavy
    columns = [name for name in data.schema.names if name not in heavy or name in IMAGES]
    winners = _winners(path, data)
    with _damage_named(path, data, columns):
        batches = data.to_batches(columns=[*columns, FILE], filter=pc.field("status") == "ok", batch_size=batch_rows)
        for batch in batches:
            table = pa.Table.from_batches([batch])
            yield from winners.filter(table, table[FILE]).select(columns).to_pylist()


FILE = "__filename"  # the file a dataset row was read from (pyarrow's special field)


def _counted(path: str | Path, data: ds.Dataset, columns: list[str], filter=None) -> pa.Table:
    """``columns`` of the rows that count (one per key, whatever ``filter`` leaves out: an older row of a
    key whose newest row is filtered out does not count either)."""
    winners = _winners(path, data)
    wanted = list(dict.fromkeys([*columns, "key", FILE]))
    with _damage_named(path, data, list(dict.fromkeys([*columns, "key"]))):
        table = data.to_table(columns=wanted, filter=filter)
    return winners.filter(table, table[FILE]).select(columns)


def _winners(path: str | Path, data: ds.Dataset) -> Winners:
    with _damage_named(path, data, ["key"]):
        store = open_store(path)
        return store.winners([Path(file) if store.filesystem is None else file for file in data.files])


@contextmanager
def _damage_named(path: str | Path, data: ds.Dataset, columns: list[str]) -> Iterator[None]:
    """Damage past a sound footer (checked already) shows only when pages are read: one line naming
    the file instead of pyarrow's traceback."""
    try:
        yield
    except FileNotFoundError:  # replaced by a writer since it was listed: not damage
        raise
    except (OSError, pa.ArrowException) as error:
        store = open_store(path)
        bad = (f.path for f in data.get_fragments() if not _readable(f, columns))
        damaged = next(bad, str(path))
        damaged = damaged if store.filesystem else Path(damaged)
        problem = f"damaged ({str(error).splitlines()[0]})"
        raise store.bad_file_error(damaged, problem, footer=False) from None


def _readable(fragment: ds.Fragment, columns: list[str]) -> bool:
    try:
        fragment.to_table(columns=columns)
    except (OSError, pa.ArrowException):
        return False
    return True
