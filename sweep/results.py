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
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import filelock
import pyarrow as pa
import pyarrow.parquet as pq

from gradinv.errors import ConfigError
from gradinv.files import write_atomic

from .journal import JOURNAL_DIR, RowJournal, journal_files, read_journals

if TYPE_CHECKING:  # gradinv.trial imports torch: readers of results (status, report, export) do without
    from gradinv.trial import TrialSpec

SCHEMA_VERSION = 3  # 2: baselines, gains, quality curves, pack ids
# 3: each column's role (ROLE_KEY) in its field metadata
RESULTS_FORMAT = 3  # part of every trial key: bump only when old results can no longer be compared
# 2: the step decay's milestones are the reference's, the first images are no longer clamped into the
#    pixel box, `exp` layer weights are e^-i and `rand` starts are uniform in [-1, 1)
# 3: a family's rows and keys carry only the settings it reads (DLG: no inverting-gradients settings)
LOCK_NAME = ".gradinv.lock"
SET_ASIDE_DIR = "_quarantine"  # bad files moved here; readers skip names that start with '_'
SET_ASIDE_FLAG = "--set-aside-bad-files"

def parameter_types() -> dict[str, pa.DataType]:
    """Each declared trial parameter's column type (gradinv.parameters), in declaration order."""
    from gradinv.parameters import parameters

    return {name: _ARROW_TYPES[knob.arrow] for name, knob in parameters().items()}


_ARROW_TYPES = {"int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
                "bool": pa.bool_(), "list<int32>": pa.list_(pa.int32())}  # fmt: skip
_PARAMETER_TYPES = parameter_types()

# Every column has one role, written into its field metadata so that readers (analysis) take it from
# the files: identity names the row, settings define the trial (the parameters and the client's image
# count), outcomes are what the trial measured (per-image lists too: a few numbers a row), provenance is
# where, when and how it ran, heavy columns (images, curves, restart scores) are read only for the
# trials a view needs. A file without roles (schema 1 and 2) takes these by column name.
ROLE_KEY = b"gradinv.role"
ROLES = IDENTITY, SETTING, OUTCOME, PROVENANCE, HEAVY = ("identity", "setting", "outcome", "provenance", "heavy")
# Settings that tell repetitions of a setting apart (which client's images, which seed), flagged in the
# field metadata too: analysis compares settings across them, never by them.
REPETITION_KEY = b"gradinv.repetition"
REPETITION = ("images", "model_seed", "data_order_seed", "attack_seed")

METRICS = ("psnr", "ssim", "mse", "feature_mse")
BASELINES = ("baseline_psnr", "baseline_psnr_mean_image", "baseline_psnr_flat", "baseline_psnr_class_mean",
             "baseline_ssim_mean_image", "baseline_ssim_flat", "baseline_ssim_class_mean")  # fmt: skip
_floats = pa.list_(pa.float64())


def _with_role(role: str, *fields: pa.Field) -> list[pa.Field]:
    """``fields`` with ``role`` in their metadata, repetition settings flagged as such."""
    flag = {REPETITION_KEY: b"true"}
    return [field.with_metadata({ROLE_KEY: role.encode(), **(flag if field.name in REPETITION else {})})
            for field in fields]  # fmt: skip


SCHEMA = pa.schema(
    [
        *_with_role(IDENTITY,
            pa.field("study", pa.string(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("candidate", pa.int32()),  # tuning candidate number; null for `run` studies
        ),
        *_with_role(SETTING,
            *[pa.field(name, kind) for name, kind in _PARAMETER_TYPES.items()],
            pa.field("images_per_client", pa.int32()),
        ),
        *_with_role(PROVENANCE, pa.field("checkpoint_key", pa.string())),  # the zoo checkpoint the settings named
        *_with_role(OUTCOME,
            pa.field("model_accuracy", pa.float64()),
            *[pa.field(name, pa.float64()) for name in METRICS],
            pa.field("label_accuracy", pa.float64()),
            # What a data-only attacker scores without the update (gradinv.baselines), and the gain over the best
            *[pa.field(name, pa.float64()) for name in BASELINES],
            pa.field("psnr_gain", pa.float64()),
            pa.field("psnr_gain_per_image", _floats),
            *[pa.field(f"{name}_per_image", _floats) for name in METRICS],
            # PSNR of reconstruction b against image b, unpaired (the reference's fixed order)
            pa.field("psnr_unmatched", pa.float64()),
            pa.field("psnr_unmatched_per_image", _floats),
        ),
        *_with_role(HEAVY,
            pa.field("truth_png", pa.list_(pa.binary())),
            pa.field("reconstruction_png", pa.list_(pa.binary())),
            pa.field("restart_scores", _floats),
            pa.field("curve_iterations", pa.list_(pa.int32())),
            pa.field("curve_costs", _floats),
            pa.field("curve_psnr", _floats),  # quality of the best restart at each checkpoint
            pa.field("curve_ssim", _floats),
        ),
        *_with_role(OUTCOME,
            pa.field("iterations_run", pa.int32()),
            pa.field("status", pa.string(), nullable=False),  # ok, failed or pruned
            pa.field("error", pa.string()),
        ),
        *_with_role(PROVENANCE,
            pa.field("attempt", pa.int32()),
            pa.field("started_at", pa.timestamp("ms", tz="UTC")),
            pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
            pa.field("attack_seconds", pa.float64()),
            pa.field("task_seconds", pa.float64()),
            pa.field("lanes", pa.int32()),
            pa.field("pack_id", pa.string()),  # trials computed together share it
            pa.field("lane_index", pa.int32()),
            pa.field("trial_seconds", pa.float64()),  # this trial's share of its pack's task time
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
        ),
    ],
    metadata={"gradinv.schema_version": str(SCHEMA_VERSION)},
)  # fmt: skip


def trial_key(spec: TrialSpec) -> str:
    """A hash of the resolved non-default parameters and the results format: stable as fields are added."""
    canonical = json.dumps({"format": RESULTS_FORMAT, **spec.key_fields()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def parameter_columns(spec: TrialSpec) -> dict:
    """Every parameter as its own column; those that do not apply to the trial are null."""
    from gradinv import models
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


def file_problem(file: Path) -> str | None:
    """Why ``file`` cannot be read as results, judged from its footer alone; None when it can.

    A file may lack columns (written before they existed), but each column it has must be SCHEMA's,
    of the same type, and the columns every row needs must be there.
    """
    try:
        schema = pq.read_schema(file)
    except FileNotFoundError:  # replaced by nothing since it was listed: not a problem of the file
        return None
    except (OSError, pa.ArrowException) as error:
        return f"not a readable Parquet file ({str(error).splitlines()[0]})"
    foreign = [f"{field.name} ({field.type})" for field in schema
               if field.name not in SCHEMA.names or SCHEMA.field(field.name).type != field.type]  # fmt: skip
    if foreign:
        return f"not a results file: columns outside the results schema: {', '.join(foreign[:3])}"
    missing = [field.name for field in SCHEMA if not field.nullable and field.name not in schema.names]
    return f"not a results file: no {', '.join(missing)} column" if missing else None


FORMAT_KEY = b"gradinv.results_format"
_FORMAT_OF_SCHEMA = {b"1": 1, b"2": 2}  # files written before the format was recorded in them


def results_format(file: Path) -> int | None:
    """The results format a file's keys were made with (from its footer); None when it does not say."""
    metadata = pq.read_schema(file).metadata or {}
    if FORMAT_KEY in metadata:
        text = metadata[FORMAT_KEY]
        return int(text) if text.isdigit() else None
    return _FORMAT_OF_SCHEMA.get(metadata.get(b"gradinv.schema_version"))


# ---------------------------------------------------------------------------------------------
# The directory


class ResultsDir:
    """A results directory: read it freely; write it only inside ``with`` (lock, repair, atomic files)."""

    def __init__(self, path: str | Path, set_aside_bad_files: bool = False):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError("--results", str(path), "name a directory, not a file")
        self.set_aside_bad_files = set_aside_bad_files  # on entering: move bad files aside instead of refusing
        self._lock = filelock.FileLock(str(self.path / LOCK_NAME), timeout=0)

    def __enter__(self) -> "ResultsDir":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except filelock.Timeout:  # a TimeoutError, hence an OSError: first
            raise ConfigError(
                "--results", str(self.path), "another gradinv driver is writing there; wait for it or use another directory"
            ) from None
        except OSError as error:  # read-only file system, no permission
            fix = f"cannot write there ({error.strerror or error}); use a writable directory"
            raise ConfigError("--results", str(self.path), fix) from None
        try:
            if self.set_aside_bad_files:
                self._set_aside_bad_files()
            else:
                self.checked_files()  # refuses a bad file before anything reads or rewrites the others
            self.require_current_format()
            self.keep_one_row_per_key()
            self.fold_journal()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*.parquet") if not p.name.startswith((".", "_")))

    def checked_files(self) -> list[Path]:
        """The visible files, each checked from its footer; a bad one is named in one line (ConfigError)."""
        files = self.files()
        bad = {file: problem for file in files if (problem := file_problem(file))}
        if bad:
            (file, problem), others = next(iter(bad.items())), len(bad) - 1
            raise self.bad_file_error(file, problem + (f" (and {others} more bad files)" if others else ""))
        return files

    def require_current_format(self) -> None:
        """Refuse to add trials to files of another results format: their keys would never match ours."""
        for file in self.files():
            held = results_format(file)
            if held != RESULTS_FORMAT:
                written = f"results format {held}" if held else "files of an unknown results format"
                raise ConfigError("--results", str(self.path), f"it holds {written} ({file.name}), this gradinv writes "
                                  f"format {RESULTS_FORMAT}; run into a new directory (status, report and export still read this one)")  # fmt: skip

    def bad_file_error(self, file: Path, problem: str, footer: bool = True) -> ConfigError:
        """``footer``: the problem shows in the footer, so that the set-aside flag finds the file too."""
        fix = f"move it out of {self.path}"
        if footer:
            fix += f", or pass {SET_ASIDE_FLAG} to `gradinv run` to move such files into {self.path / SET_ASIDE_DIR}"
        return ConfigError("results file", str(file), f"{problem}; {fix}")

    def _set_aside_bad_files(self) -> None:
        """Move each bad file into SET_ASIDE_DIR, never deleting it (it may be someone's data), and say so."""
        for file in self.files():
            problem = file_problem(file)
            if problem is None:
                continue
            target = self.path / SET_ASIDE_DIR / file.name
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # an earlier file of the same name was set aside already
                target = target.with_name(f"{file.stem}-{uuid.uuid4().hex[:8]}{file.suffix}")
            os.replace(file, target)
            print(f"set aside {file} ({problem}) -> {target}", file=sys.stderr)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        tables = [table for f in self.checked_files() if (table := self._read_file(f, columns)) is not None]
        if not tables:
            return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def _read_file(self, file: Path, columns: list[str] | None) -> pa.Table | None:
        """One file under SCHEMA; None when a writer replaced it by nothing since it was listed."""
        try:
            return pq.read_table(file, columns=columns, schema=SCHEMA)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as error:  # a sound footer over damaged pages
            raise self.bad_file_error(file, f"damaged ({str(error).splitlines()[0]})", footer=False) from None

    def statuses(self) -> dict[str, str]:
        """Key -> status of every row present."""
        table = self.read(["key", "status"])
        return dict(zip(table["key"].to_pylist(), table["status"].to_pylist()))

    def write(self, rows: list[dict]) -> Path | None:
        """One new file holding ``rows``; rows with keys already present replace the old ones."""
        if not rows:
            return None
        return self._write_table(to_table(rows))

    def _write_table(self, table: pa.Table) -> Path:
        final = self.path / f"part-{time.time_ns():019d}-{uuid.uuid4().hex[:8]}.parquet"
        self._write_atomically(table, final)
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
        self._write_atomically(table, file)

    @staticmethod
    def _write_atomically(table: pa.Table, final: Path) -> None:
        """A reader sees the whole file or none; synced, so a batch outlives the journal it replaces."""
        stamped = table.replace_schema_metadata({**(table.schema.metadata or {}), FORMAT_KEY: str(RESULTS_FORMAT)})
        write_atomic(final, lambda sink: pq.write_table(stamped, sink), sync=True)

    # The row journal (sweep/journal.py): finished rows on disk before their batch file is written.

    def journal(self) -> RowJournal:
        """A new journal for this writer's rows (write inside ``with`` only)."""
        return RowJournal(self.path / JOURNAL_DIR, SCHEMA)

    def read_journal(self, columns: list[str] | None = None) -> pa.Table:
        """Rows in journals: a running driver's not yet in a batch file, or a stopped driver's not yet folded in."""
        table = read_journals(journal_files(self.path / JOURNAL_DIR), SCHEMA)
        return table.select(columns) if columns else table

    def journalled_rows(self) -> int:
        return self.read_journal(["key"]).num_rows

    def fold_journal(self) -> int:
        """Move the rows of journals left by a stopped driver into one batch file; how many there were."""
        files = journal_files(self.path / JOURNAL_DIR)
        table = read_journals(files, SCHEMA)
        if table.num_rows:
            self._write_table(table)
        for file in files:
            file.unlink()
        return table.num_rows

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
