"""The row journal: each finished row on disk moments after the driver receives it.

The driver writes results in batches (one Parquet file per batch keeps a study to few files), so a
batch's rows wait in memory until it is written. The journal closes that gap: every group of rows
the driver receives (one task's) is appended to an Arrow IPC stream under ``_journal/`` and synced
to disk (fsync) before the driver moves on. Once a batch file holds the rows, their journal is
deleted. A driver that dies (SIGKILL, the out-of-memory killer, a lost machine) leaves its journal
behind, and the next writer of the directory folds it into a batch file.

Readers of the dataset (pandas, pyarrow, DuckDB, ``datasets``) skip names that start with '_', so
they never see a journal. What else may sit in ``_journal/`` (foreign files, links) gradinv.results.store
judges before anything here reads or deletes it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pyarrow as pa

JOURNAL_DIR = "_journal"
SUFFIX = ".arrows"  # an Arrow IPC stream
NAME = re.compile(r"[0-9]+-[0-9]{19}\.arrows")  # PID-NANOSECONDS.arrows, as RowJournal names its files


class RowJournal:
    """One driver's journal: an Arrow IPC stream, created at the first append, synced per append."""

    def __init__(self, directory: Path, schema: pa.Schema):
        self.directory, self.schema = directory, schema
        self.path: Path | None = None
        self._file = None
        self._writer = None

    def append(self, table: pa.Table) -> None:
        """Append ``table`` and sync it to disk; an OSError (full or read-only disk) propagates."""
        if self._writer is None:
            self._open()
        try:
            self._writer.write_table(table)
            os.fsync(self._file.fileno())
        except BaseException:
            self.close()  # a torn batch ends this file; what came before it stays readable
            raise

    def close(self) -> None:
        """Stop appending; the file stays for the next writer of the directory to fold in.

        No end-of-stream marker is written (the disk may be full): readers stop at the end of the
        last whole batch anyway."""
        if self._writer is not None:
            self._file.close()
            self._writer = self._file = None

    def discard(self) -> None:
        """Close and delete the journal (a batch file now holds its rows); the next append starts anew."""
        path, self.path = self.path, None
        self.close()
        if path is not None:
            path.unlink(missing_ok=True)

    def _open(self) -> None:
        self.directory.mkdir(exist_ok=True)
        self.path = self.directory / f"{os.getpid()}-{time.time_ns():019d}{SUFFIX}"
        self._file = open(self.path, "xb", buffering=0)  # unbuffered: fsync syncs every byte
        try:
            self._writer = pa.ipc.new_stream(self._file, self.schema)
        except BaseException:
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)
            raise
        _sync_directory(self.directory)  # the new name survives a power loss too


def is_journal_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def stream_schema(path: Path) -> pa.Schema | None:
    """The schema a journal was written with; None when it was cut short before its header (no rows)."""
    try:
        with pa.OSFile(str(path)) as source, pa.ipc.open_stream(source) as reader:
            return reader.schema
    except (pa.ArrowInvalid, FileNotFoundError):
        return None


def read_journals(files: list[Path], schema: pa.Schema) -> pa.Table:
    """Every complete batch in ``files`` under ``schema`` (a column a journal lacks is null); a batch cut
    short by a crash mid-append is left out."""
    tables = []
    for path in files:
        batches, written = [], None
        try:
            with pa.OSFile(str(path)) as source, pa.ipc.open_stream(source) as reader:
                written = reader.schema
                while True:
                    batches.append(reader.read_next_batch())
        except StopIteration:
            pass
        except (pa.ArrowInvalid, OSError):  # a torn tail (or no header at all): what came before stands
            pass
        if batches:
            tables.append(_conform(pa.Table.from_batches(batches, schema=written), schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order, nulls where it has none (written before they existed)."""
    columns = [
        table[name] if name in table.column_names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(schema.names, schema)
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
