"""The command line's argument parser (a usage error is one line and exit code 2, not a usage dump) and
the checks of its path flags that run before any work: a path is never empty, and a directory to
write is one that can be."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gradinv.errors import ConfigError

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143  # a shell gives a signal 128 + its number


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def path(text: str) -> Path:
    """A path flag's value (``type=path``): an empty one is refused, where Path('') would be the current
    directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; name a path (an empty one is not the current "
                                         "directory: write . for that)")  # fmt: skip
    return Path(text)


def require_writable_directory(flag: str, directory: str | os.PathLike) -> None:
    """Refuses, writing nothing, a directory the command could not create or write into: the nearest of
    it and its parents that exists must be a directory this process may write."""
    wanted = Path(directory).expanduser()
    nearest = wanted
    while not os.path.exists(nearest) and nearest != nearest.parent:  # false for a dangling link: its parent
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(flag, str(directory), f"{nearest} is not a directory; name a directory (it is created "
                                                "if missing)")  # fmt: skip
    if not os.access(nearest, os.W_OK | os.X_OK):  # also false on a read-only file system
        raise ConfigError(flag, str(directory), f"{nearest} is not writable here; name a directory you can write")
