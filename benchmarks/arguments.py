"""Command-line argument types shared by the benchmark scripts."""

import argparse


def positive(text: str) -> int:
    """A whole number of at least 1, or argparse's one-line usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; use 1 or more")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0, or argparse's one-line usage error."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not valid; use a finite number above 0")
    return value
