"""Files written whole or not at all, with the permissions of any other file the process creates.

The content first fills a temporary file beside the target, which is then renamed into place: a
reader sees the old file or the new one, never half of one. The temporary file is new, under a name
nobody can guess, so it is never written through a link someone placed there. The temporary file is created like
``open()`` creates any file, mode 0o666 narrowed by the umask (0644 under the usual 022), so that a
cache or an output folder shared by a group stays readable to it; ``tempfile``'s files are 0600.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], None], *, sync: bool = False) -> None:
    """Write ``content`` (bytes, or a function that writes into the open file) to ``path`` atomically.

    ``sync``: flush to the disk before the rename, so the new file survives a power loss too. A failed
    write (a full or read-only disk) leaves nothing behind.
    """
    partial = partial_name(path)
    try:
        with open(partial, "xb") as handle:  # x: a new file, never another writer's
            if callable(content):
                content(handle)
            else:
                handle.write(content)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def partial_name(path: Path) -> Path:
    """A temporary name beside ``path`` for a file to create exclusively (``open(..., "x")``) and rename into
    place. Unguessable, so nobody can have placed a link there: a fixed name (``.index.csv.tmp``) could be a
    link to another file, which writing the name would overwrite."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def require_writable_directory(flag: str, directory: str | os.PathLike) -> None:
    """Refuses, writing nothing, a directory the command could not create or write into: the nearest of
    it and its parents that exists must be a directory this process may write."""
    wanted = Path(directory).expanduser()
    nearest = wanted
    while not os.path.exists(nearest) and nearest != nearest.parent:  # false for a dangling link: its parent
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(
            flag, str(directory), f"{nearest} is not a directory; name a directory (it is created if missing)"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):  # also false on a read-only file system
        raise ConfigError(flag, str(directory), f"{nearest} is not writable here; name a directory you can write")
