"""This machine's cache of trained models: the zoo's checkpoints and the federations' rounds, one store.

An entry is ``KEY.pt`` (a state dict, loaded with ``weights_only=True``, so a planted pickle runs no code)
beside ``KEY.json`` (its sidecar: what was trained and how). Both are written under temporary names and
renamed, the sidecar last, so a sidecar marks a complete entry and a crash leaves none half-written. Every
load checks the sidecar for the fields its reader declares and the weights for the shapes of their model;
a damaged entry is one line naming its files and how to rebuild it. A file lock lets processes that miss
the same entry build it once.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import filelock
import torch

from .errors import ConfigError
from .files import write_atomic

Fields = dict[str, type | tuple[type, ...]]  # sidecar field -> the type(s) its readers rely on
State = dict[str, torch.Tensor]


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The cache of this machine: the argument, else $GRADINV_CACHE, else ~/.cache/gradinv/zoo."""
    root = explicit or os.environ.get("GRADINV_CACHE") or Path.home() / ".cache" / "gradinv" / "zoo"
    return Path(root).expanduser()


class Unreadable(Exception):
    """A cache file that is there but damaged or not ours; the message says what is wrong."""


@dataclass(frozen=True)
class Entry:
    """One cached model, and how its one-line error names it when it is damaged."""

    directory: Path
    key: str
    field: str  # the error's field: the kind of entry ("checkpoint", "federation")
    name: str  # the error's subject ("it", "round 3")
    rebuild: str  # how to rebuild it ("run again to retrain it")

    @property
    def weights(self) -> Path:
        return self.directory / f"{self.key}.pt"

    @property
    def sidecar(self) -> Path:
        return self.directory / f"{self.key}.json"

    def load(
        self,
        model: Callable[[], torch.nn.Module],
        fields: Fields,
        problem: Callable[[dict], str | None] = lambda _: None,
    ) -> tuple[State, dict] | None:
        """The weights and sidecar, or None when the entry was not stored. The weights must have the names
        and shapes of ``model()``'s (built only when the entry is there); the sidecar must have ``fields``,
        and ``problem(sidecar)`` says what else is wrong with it (phrased after its file name), or None."""
        if not self.sidecar.exists():
            return None
        try:
            info = read_sidecar(self.sidecar, fields)
            if found := problem(info):
                raise Unreadable(f"{self.sidecar.name} {found}")
            return read_weights(self.weights, model().state_dict()), info
        except Unreadable as damage:
            raise self.damaged(str(damage)) from None

    def damaged(self, problem: str) -> ConfigError:
        """The one line for a damaged entry: what is wrong, which files to delete, how to rebuild them."""
        fix = f"delete {self.weights.name} and {self.sidecar.name} and {self.rebuild}"
        return ConfigError(self.field, str(self.weights), f"{self.name} is unreadable ({problem}); {fix}")

    def store(self, state: State, sidecar: dict) -> None:
        """Write the entry: the weights first, then the sidecar that marks it complete."""
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.weights, to_bytes(state))
        write_atomic(self.sidecar, json.dumps(sidecar, indent=2).encode())


def lock(directory: Path, name: str) -> filelock.FileLock:
    """The lock ``directory/NAME.lock`` that one process holds while it builds what others would too."""
    directory.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(directory / f"{name}.lock"))


def read_sidecar(path: Path, fields: Fields) -> dict:
    """A sidecar's JSON, with the ``fields`` every reader relies on."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise Unreadable(f"{path.name}: {type(error).__name__}") from None
    found = info if isinstance(info, dict) else {}
    bad = [name for name, kind in fields.items() if not isinstance(found.get(name), kind)]
    if bad:
        raise Unreadable(f"{path.name} lacks {', '.join(bad)}")
    return info


def read_weights(path: Path, expected: State) -> State:
    """A state dict saved by :meth:`Entry.store`, with exactly the tensors and shapes of ``expected``."""
    if not zipfile.is_zipfile(path):  # missing, empty, truncated or not a torch archive
        raise Unreadable(f"{path.name} is not a complete torch archive")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # holds more than tensors: weights_only refuses it
        raise Unreadable(f"{path.name} holds more than tensors") from None
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):  # torch's damaged-archive errors; anything else is a bug
            raise
        raise Unreadable(f"{path.name} is damaged") from None
    if not isinstance(state, dict) or _shapes(state) != _shapes(expected):
        raise Unreadable(f"{path.name} does not hold this recipe's model")
    return state


def _shapes(state: dict) -> dict:
    return {name: tuple(value.shape) if isinstance(value, torch.Tensor) else None for name, value in state.items()}


def to_bytes(state: State) -> bytes:
    """Weights as sent through Ray's object store: the bytes of a ``.pt`` file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(payload: bytes) -> State:
    """Weights received through Ray's object store, loaded as the cache loads them (tensors only)."""
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Listed:
    """One entry of a directory: its sidecar, or why the sidecar cannot be read."""

    key: str
    info: dict | None
    problem: str = ""


def keys(directory: Path, pattern: str = "*") -> list[str]:
    """The sorted keys matching ``pattern`` of the entries stored in ``directory`` (each has its sidecar)."""
    return sorted(path.stem for path in directory.glob(f"{pattern}.json")) if directory.is_dir() else []


def sidecars(directory: Path, fields: Fields) -> list[Listed]:
    """The sidecar of every entry stored in ``directory``, or why it cannot be read, by key."""
    return [_listed(directory / f"{key}.json", fields) for key in keys(directory)]


def _listed(sidecar: Path, fields: Fields) -> Listed:
    try:
        return Listed(sidecar.stem, read_sidecar(sidecar, fields))
    except Unreadable as problem:
        return Listed(sidecar.stem, None, str(problem))
