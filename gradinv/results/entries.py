"""The entries of a results directory: what each is, from its inode alone (opening a FIFO would block),
and why one is not a file of ours. Readers take every visible name as a Parquet file, so anything else
visible there is named in one line like a damaged file; gradinv creates and deletes files only in
directories of its own, so ``_journal`` or ``_quarantine`` as a link is refused, and so is any file there
it did not write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa

from gradinv.errors import ConfigError

from . import schema  # read as schema.SCHEMA, so that a substituted schema reaches the directory too
from .journal import is_journal_name, stream_schema

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "device",
    stat.S_IFBLK: "device",
}


def entry_kind(path: Path, follow: bool) -> str | None:
    """What ``path`` is, from its inode alone (opening a FIFO would block): "file", "directory",
    "symbolic link" (``follow`` False), "FIFO", ...; "broken link" or None where nothing is there."""
    try:
        mode = os.stat(path).st_mode if follow else os.lstat(path).st_mode
    except FileNotFoundError:
        return "broken link" if follow and os.path.lexists(path) else None
    return KINDS.get(stat.S_IFMT(mode), "special file")


def visible_problem(entry: Path) -> str | None:
    """Why a visible entry is not a results file (pandas and pyarrow would read it as one); None if it is."""
    kind = entry_kind(entry, follow=True)
    if kind is None:  # replaced by nothing since it was listed
        return None
    if kind != "file":
        stalls = "hang on" if kind == "FIFO" else "fail at"
        return f"a {kind}, not a results file; Parquet readers of the directory would {stalls} it"
    if entry.suffix != ".parquet":
        return "not a results file: pandas and pyarrow read every visible file of the directory as Parquet"
    return schema.file_problem(entry)


def journal_problem(entry: Path) -> str | None:
    """Why an entry of ``_journal/`` is not a journal this gradinv wrote (and may fold in, then delete)."""
    if not is_journal_name(entry.name):
        return "not a journal gradinv wrote (those are named PID-NANOSECONDS.arrows)"
    kind = entry_kind(entry, follow=False)
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
        return (
            f"a journal of {held} (this gradinv writes format {schema.RESULTS_FORMAT}); "
            "the gradinv that wrote it folds it in"
        )
    return schema.schema_problem(written)


def _journal_format(written: pa.Schema) -> int | None:
    """A journal's results format: stamped in its schema; one written before the stamp is this format's
    when its columns are exactly this schema's."""
    stamp = (written.metadata or {}).get(schema.FORMAT_KEY)
    if stamp is not None:
        return int(stamp) if stamp.isdigit() else None
    return schema.RESULTS_FORMAT if written.equals(schema.SCHEMA) else None


def own_directory(path: Path) -> Path:
    """``path``, unless a link or not a directory sits there: gradinv creates and deletes files in it, which
    through a link would land in (or vanish from) another directory."""
    kind = entry_kind(path, follow=False)
    if kind not in (None, "directory"):
        raise ConfigError(
            "results file",
            str(path),
            f"it is a {kind}, not a directory gradinv made; remove it (gradinv creates and deletes files there)",
        )
    return path
