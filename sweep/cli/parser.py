"""The command line's argument parser (a usage error is one line and exit code 2, not a usage dump) and
the checks of its path flags that run before any work: a path is never empty, and a directory to
write is one that can be."""

from __future__ import annotations

import argparse
from pathlib import Path


EXIT_USAGE = 2


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


