"""Where a trial's victim comes from: the facts about a trial that the conditions (``applies``) of
several parts read, and the library's callers too."""

from __future__ import annotations


def trained_victim(trial) -> bool:
    """Whether the victim is a checkpoint from the model zoo rather than the seeded untrained model."""
    return trial.trained_epochs > 0


def federated(trial) -> bool:
    """Whether the victim is the global model of a simulated federation after ``round`` rounds."""
    return trial.round is not None
