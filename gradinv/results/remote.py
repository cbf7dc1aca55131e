"""Results in object storage (``--results s3://bucket/prefix``): the results directory's contract, remotely.

The same dataset as on a local disk (one Parquet object per batch, one row per key, the same readers'
rule where a crash left two rows of a key), with these differences in mechanism:

- each object is uploaded whole: staged under ``_staging/`` and copied into its final name, so that a
  reader never sees a partial object;
- the row journal stays on the driver's disk, under ``gradinv.results.location.local_home(URI)``: a rerun
  on the same machine folds a killed driver's rows in (another machine cannot see them);
- one driver at a time: a lease object instead of the OS lock (gradinv.results.lease, with its limits);
- an unreachable endpoint, a missing bucket or refused credentials are one line (ConfigError) naming the
  journal's rows, which stay for the next run.

``open_store`` picks the local or the remote kind for a ``--results`` value.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradinv.errors import ConfigError

from . import location, schema
from .journal import JOURNAL_DIR
from .lease import Lease
from .store import SET_ASIDE_DIR, SET_ASIDE_FLAG, ResultsDir

URI_NOTE = "uri.txt"  # in the local home: which results its journals belong to
VISIBLE_PROBLEM = "not a results file: pandas and pyarrow read every visible object of the prefix as Parquet"


def open_store(results: str | os.PathLike, set_aside_bad_files: bool = False) -> ResultsDir:
    """The results at ``results``: a local directory (a path or ``file://``) or a prefix in object storage."""
    if location.is_remote(results):
        return RemoteResults(str(results), set_aside_bad_files)
    return ResultsDir(location.local_path(results), set_aside_bad_files)


class RemoteResults(ResultsDir):
    """A prefix in object storage; ``files()`` are paths of ``filesystem`` (``bucket/prefix/part-....parquet``)."""

    FILES_WORD, PLACE_WORD = "objects", "prefix"

    def __init__(self, uri: str, set_aside_bad_files: bool = False):
        self.location = location.open_location(uri)
        self.path = self.location.uri  # shown in messages
        self.filesystem = self.location.fs
        self.local_home = location.local_home(self.location.uri)
        self.journal_dir = self.local_home / JOURNAL_DIR
        self.set_aside_bad_files = set_aside_bad_files
        self._lease: Lease | None = None

    def __enter__(self) -> RemoteResults:
        self.local_home.mkdir(parents=True, exist_ok=True)
        (self.local_home / URI_NOTE).write_text(self.location.uri + "\n")  # which results these journals are
        try:
            self.location.require_bucket()
            self._lease = Lease(self.location)
            self._lease.acquire()
        except OSError as error:
            raise self.reach_error(error) from None
        try:
            self.location.clear_staging()
            if self.set_aside_bad_files:
                self._set_aside_bad_files()
            else:
                self.checked_files()
            self.require_current_format()
            self.keep_one_row_per_key()
            self.fold_journal()
        except OSError as error:
            self._lease.release()
            raise self.reach_error(error) from None
        except BaseException:
            self._lease.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lease.release()

    def reach_error(self, error: OSError) -> ConfigError:
        """The endpoint's failure as one line, naming the rows the local journal keeps for the next run."""
        found = self.reach_failure(error)
        kept = self.journalled_rows()
        if not kept:
            return found
        return ConfigError(found.field, found.value, f"{found.fix}; {kept} finished rows kept in {self.journal_dir}")

    def reach_failure(self, error: OSError) -> ConfigError:
        return location.reach_error(self.location.uri, error)

    def exists(self) -> bool:
        """Whether the prefix holds anything (object storage has no empty folders); a missing bucket is
        one line (ConfigError)."""
        try:
            if self.location.entries():
                return True
            self.location.require_bucket()
            return False
        except OSError as error:
            raise self.reach_failure(error) from None

    def journal(self):
        self.local_home.mkdir(parents=True, exist_ok=True)
        return super().journal()

    def _infos(self) -> list[pafs.FileInfo]:
        """The visible entries: every name that does not start with '.' or '_'."""
        return [info for info in self.location.entries() if not info.base_name.startswith((".", "_"))]

    def files(self) -> list[str]:
        return [info.path for info in self._infos() if info.type == pafs.FileType.File and _parquet(info.path)]

    def _bad_files(self) -> dict:
        found = {info.path: self._problem(info) for info in self._infos()}
        found.update(super()._bad_journal_entries())
        return {entry: problem for entry, problem in found.items() if problem}

    def _problem(self, info: pafs.FileInfo) -> str | None:
        if info.type != pafs.FileType.File:
            return "a folder (a prefix), not a results file; Parquet readers of the prefix would fail at it"
        if not _parquet(info.path):
            return VISIBLE_PROBLEM
        try:
            return schema.schema_problem(self._footer(info.path))
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as error:
            if _endpoint_failed(error):
                raise
            return f"not a readable Parquet file ({location.first_line(error)})"

    def _file_name(self, file: str) -> str:
        return _name(file)

    def bad_file_error(self, file, problem: str, footer: bool = True) -> ConfigError:
        if not isinstance(file, str):  # a local journal entry
            return super().bad_file_error(file, problem, footer)
        fix = f"delete it or move it out of {self.path}"
        if footer:
            fix += f", or pass {SET_ASIDE_FLAG} to `gradinv run` to move such objects under {SET_ASIDE_DIR}/"
        return ConfigError("results file", f"{self.location.fs.type_name}://{file}", f"{problem}; {fix}")

    def _set_aside_bad_files(self) -> None:
        for file, problem in self._bad_files().items():
            if not isinstance(file, str):  # a journal on this disk: never moved, named
                raise super().bad_file_error(file, problem)
            target = self.location.full(f"{SET_ASIDE_DIR}/{_name(file)}-{uuid.uuid4().hex[:8]}")
            self.filesystem.move(file, target)
            print(f"set aside {file} ({problem}) -> {target}", file=sys.stderr)

    def _read_file(self, file: str, columns: list[str] | None) -> pa.Table | None:
        try:
            return pq.read_table(file, columns=columns, schema=schema.SCHEMA, filesystem=self.filesystem)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as error:
            if _endpoint_failed(error):
                raise
            raise self.bad_file_error(file, f"damaged ({location.first_line(error)})", footer=False) from None

    def _write_table(self, table: pa.Table) -> str:
        self._lease.verify()  # another driver took over (ours expired): stop, the journal keeps the rows
        final = self.location.full(f"part-{_stamp()}.parquet")
        self._write_atomically(table, final)
        self._drop_keys(set(table["key"].to_pylist()), keep=final)
        return final

    def _drop_keys(self, keys: set[str], keep: str) -> None:
        for file in self.files():
            if file == keep:
                continue
            try:
                old_keys = pq.read_table(file, columns=["key"], filesystem=self.filesystem)["key"].to_pylist()
                if keys.intersection(old_keys):
                    table = pq.read_table(file, schema=schema.SCHEMA, filesystem=self.filesystem)
                    self._replace_file(file, table.filter(pa.array([k not in keys for k in old_keys])))
            except (OSError, pa.ArrowException) as error:  # damaged or gone: the next command names it
                if _endpoint_failed(error):
                    raise

    def _replace_file(self, file: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            self.filesystem.delete_file(file)
            return
        self._write_atomically(table, file)

    def _write_atomically(self, table: pa.Table, final: str) -> None:
        stamp = {schema.FORMAT_KEY: str(schema.RESULTS_FORMAT)}
        stamped = table.replace_schema_metadata({**(table.schema.metadata or {}), **stamp})
        sink = pa.BufferOutputStream()
        pq.write_table(stamped, sink)  # serialised first: the upload is one whole buffer
        self.location.write_whole(_name(final), sink.getvalue().to_pybytes())

    def _clear_leftovers(self) -> None:
        self.location.clear_staging()  # uploads a crash cut short, under _staging/


def _parquet(path: str) -> bool:
    return path.endswith(".parquet")


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _stamp() -> str:
    return f"{time.time_ns():019d}-{uuid.uuid4().hex[:8]}"


def _endpoint_failed(error: BaseException) -> bool:
    """pyarrow raises OSError for a broken connection as for a damaged file; the SDK's words tell them apart."""
    text = str(error)
    return "AWS Error" in text or "curlCode" in text or "GCS" in text
