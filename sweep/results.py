"""The results dataset: one Parquet directory, one explicit Arrow schema, one row per trial key.

Files are written under a hidden temporary name and renamed into place, so a reader (pandas,
pyarrow, DuckDB, Hugging Face ``datasets``) never sees half a file: readers skip names that start
with '.' or '_'. One driver at a time may write a directory (an OS file lock, released on death).
The schema, the trial key and the results format are sweep.schema's.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import filelock
import pyarrow as pa
import pyarrow.parquet as pq

from gradinv.errors import ConfigError
from gradinv.files import write_atomic

from . import schema  # read as schema.SCHEMA, so that a substituted schema reaches the directory too
from .journal import JOURNAL_DIR, RowJournal, journal_files, read_journals

LOCK_NAME = ".gradinv.lock"
SET_ASIDE_DIR = "_quarantine"  # bad files moved here; readers skip names that start with '_'
SET_ASIDE_FLAG = "--set-aside-bad-files"


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
        bad = {file: problem for file in files if (problem := schema.file_problem(file))}
        if bad:
            (file, problem), others = next(iter(bad.items())), len(bad) - 1
            raise self.bad_file_error(file, problem + (f" (and {others} more bad files)" if others else ""))
        return files

    def require_current_format(self) -> None:
        """Refuse to add trials to files of another results format: their keys would never match ours."""
        for file in self.files():
            held = schema.results_format(file)
            if held != schema.RESULTS_FORMAT:
                written = f"results format {held}" if held else "files of an unknown results format"
                raise ConfigError("--results", str(self.path), f"it holds {written} ({file.name}), this gradinv writes "
                                  f"format {schema.RESULTS_FORMAT}; run into a new directory (status, report and export still read this one)")  # fmt: skip

    def bad_file_error(self, file: Path, problem: str, footer: bool = True) -> ConfigError:
        """``footer``: the problem shows in the footer, so that the set-aside flag finds the file too."""
        fix = f"move it out of {self.path}"
        if footer:
            fix += f", or pass {SET_ASIDE_FLAG} to `gradinv run` to move such files into {self.path / SET_ASIDE_DIR}"
        return ConfigError("results file", str(file), f"{problem}; {fix}")

    def _set_aside_bad_files(self) -> None:
        """Move each bad file into SET_ASIDE_DIR, never deleting it (it may be someone's data), and say so."""
        for file in self.files():
            problem = schema.file_problem(file)
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
            return schema.SCHEMA.empty_table().select(columns) if columns else schema.SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def _read_file(self, file: Path, columns: list[str] | None) -> pa.Table | None:
        """One file under SCHEMA; None when a writer replaced it by nothing since it was listed."""
        try:
            return pq.read_table(file, columns=columns, schema=schema.SCHEMA)
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
        return self._write_table(schema.to_table(rows))

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
            table = pq.read_table(file, schema=schema.SCHEMA)
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
        stamp = {schema.FORMAT_KEY: str(schema.RESULTS_FORMAT)}
        stamped = table.replace_schema_metadata({**(table.schema.metadata or {}), **stamp})
        write_atomic(final, lambda sink: pq.write_table(stamped, sink), sync=True)

    # The row journal (sweep/journal.py): finished rows on disk before their batch file is written.

    def journal(self) -> RowJournal:
        """A new journal for this writer's rows (write inside ``with`` only)."""
        return RowJournal(self.path / JOURNAL_DIR, schema.SCHEMA)

    def read_journal(self, columns: list[str] | None = None) -> pa.Table:
        """Rows in journals: a running driver's not yet in a batch file, or a stopped driver's not yet folded in."""
        table = read_journals(journal_files(self.path / JOURNAL_DIR), schema.SCHEMA)
        return table.select(columns) if columns else table

    def journalled_rows(self) -> int:
        return self.read_journal(["key"]).num_rows

    def fold_journal(self) -> int:
        """Move the rows of journals left by a stopped driver into one batch file; how many there were."""
        files = journal_files(self.path / JOURNAL_DIR)
        table = read_journals(files, schema.SCHEMA)
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
            table = pq.read_table(file, schema=schema.SCHEMA)
            keys = table["key"].to_pylist()
            seen: set[str] = set()
            mask = []
            for key in keys:
                mask.append(newest[key] == file and key not in seen)
                seen.add(key)
            if not all(mask):
                self._replace_file(file, table.filter(pa.array(mask)))
