"""The results dataset: one Parquet directory, one explicit Arrow schema, one row per trial key.

Files are written under a hidden temporary name and renamed into place, so a reader (pandas,
pyarrow, DuckDB, Hugging Face ``datasets``) never sees half a file: readers skip names that start
with '.' or '_'. One driver at a time may write a directory (an OS file lock, released on death).
The schema, the trial key and the results format are gradinv.results.schema's.

Readers take every visible name in the directory as a Parquet file, so anything else visible there
(a FIFO, a directory, notes.txt) is named in one line like a damaged file, and gradinv creates and
deletes files only in directories of its own (gradinv.results.entries). Where a crash left two rows of
one key, every reader counts the same one (gradinv.results.winners).
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
from .entries import entry_kind, journal_problem, own_directory, visible_problem
from .journal import JOURNAL_DIR, RowJournal, read_journals
from .winners import Winners

LOCK_NAME = ".gradinv.lock"
SET_ASIDE_DIR = "_quarantine"  # bad files moved here; readers skip names that start with '_'
SET_ASIDE_FLAG = "--set-aside-bad-files"


class ResultsDir:
    """A results directory: read it freely; write it only inside ``with`` (lock, repair, atomic files).
    gradinv.results.remote.RemoteResults is the same for a prefix in object storage."""

    filesystem = None  # pyarrow's, for readers of ``files()``: None is the local disk
    FILES_WORD, PLACE_WORD = "files", "directory"  # what messages call the results' files and their home

    def __init__(self, path: str | Path, set_aside_bad_files: bool = False):
        self.path = Path(path)
        self.local_home = self.path  # where the driver keeps its own files (Optuna's storage)
        self.journal_dir = self.path / JOURNAL_DIR
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError("--results", str(path), "name a directory, not a file")
        self.set_aside_bad_files = set_aside_bad_files  # on entering: move bad files aside instead of refusing
        self._lock = filelock.FileLock(str(self.path / LOCK_NAME), timeout=0)

    def __enter__(self) -> ResultsDir:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._refuse_a_foreign_lock()
            self._lock.acquire()
        except filelock.Timeout:  # a TimeoutError, hence an OSError: first
            raise ConfigError(
                "--results",
                str(self.path),
                "another gradinv driver is writing there; wait for it or use another directory",
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

    def exists(self) -> bool:
        return self.path.is_dir()

    def files(self) -> list[Path]:
        """The visible ``*.parquet`` files that are regular files (or links to one), in name order."""
        visible = self._visible()
        return [entry for entry in visible if entry.suffix == ".parquet" and entry_kind(entry, follow=True) == "file"]

    def _visible(self) -> list[Path]:
        """Every name pandas, pyarrow and DuckDB read as data here: all that does not start with '.' or '_'."""
        if not self.path.is_dir():
            return []
        return sorted(entry for entry in self.path.iterdir() if not entry.name.startswith((".", "_")))

    def checked_files(self) -> list[Path]:
        """The visible files, each checked from its footer (or, not a regular ``*.parquet`` file, from
        its name and inode alone, never opened), and the journal's; a bad one is named in one line
        (ConfigError)."""
        bad = self._bad_files()
        if bad:
            (file, problem), others = next(iter(bad.items())), len(bad) - 1
            raise self.bad_file_error(file, problem + (f" (and {others} more bad files)" if others else ""))
        return self.files()

    def _bad_files(self) -> dict[Path, str]:
        """Each visible entry that is not a results file and each entry of the journal that is not a
        journal of ours, with why."""
        found = {entry: visible_problem(entry) for entry in self._visible()}
        found.update(self._bad_journal_entries())
        return {entry: problem for entry, problem in found.items() if problem}

    def _bad_journal_entries(self) -> dict[Path, str | None]:
        return {entry: journal_problem(entry) for entry in self._journal_entries()}

    def require_current_format(self) -> None:
        """Refuse to add trials to files of another results format: their keys would never match ours."""
        for file in self.files():
            held = schema.format_of(self._footer(file))
            if held != schema.RESULTS_FORMAT:
                written = f"results format {held}" if held else f"{self.FILES_WORD} of an unknown results format"
                raise ConfigError(
                    "--results",
                    str(self.path),
                    f"it holds {written} ({self._file_name(file)}), this gradinv writes format "
                    f"{schema.RESULTS_FORMAT}; run into a new {self.PLACE_WORD} "
                    "(status, report and export still read this one)",
                )

    def _footer(self, file: Path) -> pa.Schema:
        """The schema in ``file``'s footer, read without its pages."""
        return pq.read_schema(file, filesystem=self.filesystem)

    def _file_name(self, file: Path) -> str:
        """``file`` as messages name it: its name, without the directory's path."""
        return file.name

    def bad_file_error(self, file: Path, problem: str, footer: bool = True) -> ConfigError:
        """``footer``: the problem shows in the footer, so that the set-aside flag finds the file too."""
        fix = f"move it out of {file.parent}"
        if footer:
            fix += f", or pass {SET_ASIDE_FLAG} to `gradinv run` to move such files into {self.path / SET_ASIDE_DIR}"
        return ConfigError("results file", str(file), f"{problem}; {fix}")

    def _set_aside_bad_files(self) -> None:
        """Move each bad file into SET_ASIDE_DIR, never deleting it (it may be someone's data), and say so."""
        for file, problem in self._bad_files().items():
            target = own_directory(self.path / SET_ASIDE_DIR) / file.name
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # an earlier file of the same name was set aside already
                target = target.with_name(f"{file.stem}-{uuid.uuid4().hex[:8]}{file.suffix}")
            os.replace(file, target)
            print(f"set aside {file} ({problem}) -> {target}", file=sys.stderr)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The rows that count (one per key, see ``Winners``) of every file."""
        read = {str(file): self._read_file(file, _with_key(columns)) for file in self.checked_files()}
        read = {file: table for file, table in read.items() if table is not None}
        winners = Winners({file: table["key"].to_pylist() for file, table in read.items()})
        tables = [winners.filter(table, file) for file, table in read.items()]
        tables = [table.select(columns) if columns else table for table in tables]
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

    def winners(self, files: list[Path]) -> Winners:
        """Which row of each key counts among ``files`` (read from their key columns)."""
        read = {str(file): self._read_file(file, ["key"]) for file in files}
        return Winners({file: table["key"].to_pylist() for file, table in read.items() if table is not None})

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
        """Rewrite older files without ``keys`` (the new file holds their replacement rows). A file that is
        not ours or is damaged (since the directory was opened) is left as it is: the next command names
        it, and readers count the new rows, which are newer."""
        for file in self.files():
            if file == keep or schema.file_problem(file):
                continue
            try:
                old_keys = pq.read_table(file, columns=["key"])["key"].to_pylist()
                if not keys.intersection(old_keys):
                    continue
                table = pq.read_table(file, schema=schema.SCHEMA)
            except (OSError, pa.ArrowException):  # damaged pages behind a sound footer, or gone
                continue
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

    # The row journal (gradinv/results/journal.py): finished rows on disk before their batch file is written.

    def journal(self) -> RowJournal:
        """A new journal for this writer's rows (write inside ``with`` only), stamped with the results format."""
        stamp = {**schema.SCHEMA.metadata, schema.FORMAT_KEY: str(schema.RESULTS_FORMAT).encode()}
        return RowJournal(own_directory(self.journal_dir), schema.SCHEMA.with_metadata(stamp))

    def journal_files(self) -> list[Path]:
        """The journals of this directory; anything else in ``_journal/`` is named in one line (ConfigError)."""
        entries = self._journal_entries()
        for entry in entries:
            if problem := journal_problem(entry):
                raise self.bad_file_error(entry, problem)
        return entries

    def _journal_entries(self) -> list[Path]:
        directory = own_directory(self.journal_dir)
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def read_journal(self, columns: list[str] | None = None) -> pa.Table:
        """Rows in journals: a running driver's not yet in a batch file, or a stopped driver's not yet folded in."""
        table = read_journals(self.journal_files(), schema.SCHEMA)
        return table.select(columns) if columns else table

    def journalled_rows(self) -> int:
        return self.read_journal(["key"]).num_rows

    def fold_journal(self) -> int:
        """Move the rows of journals left by a stopped driver into one batch file; how many there were."""
        files = self.journal_files()
        table = read_journals(files, schema.SCHEMA)
        if table.num_rows:
            self._write_table(table)
        for file in files:
            file.unlink()
        return table.num_rows

    def keep_one_row_per_key(self) -> None:
        """Repair what a crash between writing a replacement and dropping the old row left behind: each
        file keeps the rows that count (``Winners``), as every reader counts them meanwhile."""
        self._clear_leftovers()
        files = self.files()
        winners = self.winners(files)
        if not winners.duplicated:
            return
        for file in files:
            table = self._read_file(file, None)
            if table is None:  # gone since it was listed: nothing left of it to repair
                continue
            kept = winners.filter(table, str(file))
            if kept.num_rows < table.num_rows:
                self._replace_file(file, kept)

    def _clear_leftovers(self) -> None:
        """Delete the hidden temporary files of writes a crash cut short: no reader sees them, nothing needs them."""
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink()

    def _refuse_a_foreign_lock(self) -> None:
        """Taking the lock opens its file for writing (and truncates it): through a link it would
        write another file."""
        lock = self.path / LOCK_NAME
        kind = entry_kind(lock, follow=False)
        if kind not in (None, "file"):
            raise ConfigError("results file", str(lock), f"it is a {kind}, not gradinv's lock file; remove it")


def _with_key(columns: list[str] | None) -> list[str] | None:
    return None if columns is None or "key" in columns else [*columns, "key"]
