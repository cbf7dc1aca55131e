"""The results dataset: one Parquet directory, one explicit Arrow schema, one row per trial key.

Files are written under a hidden temporary name and renamed into place, so a reader (pandas,
pyarrow, DuckDB, Hugging Face ``datasets``) never sees half a file: readers skip names that start
with '.' or '_'. One driver at a time may write a directory (an OS file lock, released on death).
The schema, the trial key and the results format are gradinv.results.schema's.

Readers take every visible name in the directory as a Parquet file, so anything else visible there
(a FIFO, a directory, notes.txt) is named in one line like a damaged file. Where a crash left two rows
of one key, every reader counts the same one (``Winners``). gradinv creates and deletes files only in
directories of its own: ``_journal`` or ``_quarantine`` as a link is refused, and so is any file there
it did not write.
"""

from __future__ import annotations

import os
import stat
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
from .journal import JOURNAL_DIR, RowJournal, is_journal_name, read_journals, stream_schema

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
            self._refuse_a_foreign_lock()
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
        """The visible ``*.parquet`` files that are regular files (or links to one), in name order."""
        visible = self._visible()
        return [entry for entry in visible if entry.suffix == ".parquet" and _kind(entry, follow=True) == "file"]

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
        found = {entry: _visible_problem(entry) for entry in self._visible()}
        found.update({entry: _journal_problem(entry) for entry in self._journal_entries()})
        return {entry: problem for entry, problem in found.items() if problem}

    def require_current_format(self) -> None:
        """Refuse to add trials to files of another results format: their keys would never match ours."""
        for file in self.files():
            held = schema.results_format(file)
            if held != schema.RESULTS_FORMAT:
                written = f"results format {held}" if held else "files of an unknown results format"
                raise ConfigError("--results", str(self.path), f"it holds {written} ({file.name}), this gradinv writes "
                                  f"format {schema.RESULTS_FORMAT}; run into a new directory (status, report and export still read this one)")

    def bad_file_error(self, file: Path, problem: str, footer: bool = True) -> ConfigError:
        """``footer``: the problem shows in the footer, so that the set-aside flag finds the file too."""
        fix = f"move it out of {file.parent}"
        if footer:
            fix += f", or pass {SET_ASIDE_FLAG} to `gradinv run` to move such files into {self.path / SET_ASIDE_DIR}"
        return ConfigError("results file", str(file), f"{problem}; {fix}")

    def _set_aside_bad_files(self) -> None:
        """Move each bad file into SET_ASIDE_DIR, never deleting it (it may be someone's data), and say so."""
        for file, problem in self._bad_files().items():
            target = _own_directory(self.path / SET_ASIDE_DIR) / file.name
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

    def winners(self, files: list[Path]) -> "Winners":
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
        return RowJournal(_own_directory(self.path / JOURNAL_DIR), schema.SCHEMA.with_metadata(stamp))

    def journal_files(self) -> list[Path]:
        """The journals of this directory; anything else in ``_journal/`` is named in one line (ConfigError)."""
        entries = self._journal_entries()
        for entry in entries:
            if problem := _journal_problem(entry):
                raise self.bad_file_error(entry, problem)
        return entries

    def _journal_entries(self) -> list[Path]:
        directory = _own_directory(self.path / JOURNAL_DIR)
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
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink()
        files = self.files()
        winners = self.winners(files)
        if not winners.duplicated:
            return
        for file in files:
            table = pq.read_table(file, schema=schema.SCHEMA)
            kept = winners.filter(table, str(file))
            if kept.num_rows < table.num_rows:
                self._replace_file(file, kept)

    def _refuse_a_foreign_lock(self) -> None:
        """Taking the lock opens its file for writing (and truncates it): through a link it would
        write another file."""
        lock = self.path / LOCK_NAME
        kind = _kind(lock, follow=False)
        if kind not in (None, "file"):
            raise ConfigError("results file", str(lock), f"it is a {kind}, not gradinv's lock file; remove it")


class Winners:
    """Which row of a trial key counts where several hold it (a crash between writing a batch and dropping
    the rows it replaces leaves both): the row in the newest file (names sort by the time they were
    written), the first there. The writer repairs the files by this rule; every reader counts by it
    (``filter``) until then.
    """

    def __init__(self, keys_by_file: dict[str, list[str]]):
        """``keys_by_file``: each file's key column, the files in name order."""
        self.file_of: dict[str, str] = {}
        self.duplicated = False
        for file, keys in keys_by_file.items():
            for key in keys:
                self.duplicated |= key in self.file_of
                self.file_of[key] = file
        self._counted: set[str] = set()

    def filter(self, table: pa.Table, read_from: str | pa.ChunkedArray) -> pa.Table:
        """The rows of ``table`` that count; ``read_from``: the file all rows were read from, or each row's.
        Rows of one file come in its order; a key counted once is never counted again by this reader."""
        if not self.duplicated:
            return table
        files = [read_from] * table.num_rows if isinstance(read_from, str) else read_from.to_pylist()
        mask = []
        for key, file in zip(table["key"].to_pylist(), files):
            counts = self.file_of.get(key) == file and key not in self._counted
            mask.append(counts)
            if counts:
                self._counted.add(key)
        return table.filter(pa.array(mask, pa.bool_()))


def _with_key(columns: list[str] | None) -> list[str] | None:
    return None if columns is None or "key" in columns else [*columns, "key"]


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "device", stat.S_IFBLK: "device"}


def _kind(path: Path, follow: bool) -> str | None:
    """What ``path`` is, from its inode alone (opening a FIFO would block): "file", "directory",
    "symbolic link" (``follow`` False), "FIFO", ...; "broken link" or None where nothing is there."""
    try:
        mode = os.stat(path).st_mode if follow else os.lstat(path).st_mode
    except FileNotFoundError:
        return "broken link" if follow and os.path.lexists(path) else None
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def _visible_problem(entry: Path) -> str | None:
    """Why a visible entry is not a results file (pandas and pyarrow would read it as one); None if it is."""
    kind = _kind(entry, follow=True)
    if kind is None:  # replaced by nothing since it was listed
        return None
    if kind != "file":
        stalls = "hang on" if kind == "FIFO" else "fail at"
        return f"a {kind}, not a results file; Parquet readers of the directory would {stalls} it"
    if entry.suffix != ".parquet":
        return "not a results file: pandas and pyarrow read every visible file of the directory as Parquet"
    return schema.file_problem(entry)


def _journal_problem(entry: Path) -> str | None:
    """Why an entry of ``_journal/`` is not a journal this gradinv wrote (and may fold in, then delete)."""
    if not is_journal_name(entry.name):
        return "not a journal gradinv wrote (those are named PID-NANOSECONDS.arrows)"
    kind = _kind(entry, follow=False)
    if kind not in (None, "file"):
        return f"a {kind}, not a journal gradinv wrote"
    try:
        written = stream_schema(entry) if kind else None
    except OSError as error:  # never folded (and deleted) unread
        return f"cannot be read ({error.strerror or error})"
    if written is None:  # cut short before its header: it holds no rows
        return None
    held = _journal_format(written)
    if held != schema.RESULTS_FORMAT:
        held = f"results format {held}" if held else "an unknown results format"
        return (f"a journal of {held} (this gradinv writes format {schema.RESULTS_FORMAT}); "
                "the gradinv that wrote it folds it in")
    return schema.schema_problem(written)


def _journal_format(written: pa.Schema) -> int | None:
    """A journal's results format: stamped in its schema; one written before the stamp is this format's
    when its columns are exactly this schema's."""
    stamp = (written.metadata or {}).get(schema.FORMAT_KEY)
    if stamp is not None:
        return int(stamp) if stamp.isdigit() else None
    return schema.RESULTS_FORMAT if written.equals(schema.SCHEMA) else None


def _own_directory(path: Path) -> Path:
    """``path``, unless a link or not a directory sits there: gradinv creates and deletes files in it, which
    through a link would land in (or vanish from) another directory."""
    kind = _kind(path, follow=False)
    if kind not in (None, "directory"):
        raise ConfigError("results file", str(path), f"it is a {kind}, not a directory gradinv made; remove it "
                          "(gradinv creates and deletes files there)")
    return path
