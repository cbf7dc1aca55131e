"""Victim weights from a file (the ``weights`` knob): a ``state_dict`` saved with
``torch.save(model.state_dict(), PATH)``, loaded into the model the trial builds (``model``, ``width``,
``norm``, ``dataset``, ``image_size``) in place of its seeded initial weights.

Reading never runs code from the file (``torch.load(..., weights_only=True)``). ``.safetensors`` files are
refused with the fix: the ``safetensors`` package is not a dependency of gradinv.

A trial is keyed by the file's content, not its path: :func:`digest` is the SHA-256 of the file's bytes
(``weights_sha256`` in the trial's key fields), so editing the file gives new keys and copying it elsewhere
keeps them. Digests and the names and shapes a file holds are cached by (path, size, modification time), so
that thousands of trials sharing one file read it once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Mapping
from typing import Any

import torch

from . import models
from .errors import ConfigError, require

SAVE_HINT = "save one with torch.save(model.state_dict(), PATH)"
PREFIXES = ("module.", "model.")  # what DataParallel and some reference code put before the names


def absolute(path: str) -> str:
    """The path made absolute against the working directory (Ray's workers may start elsewhere)."""
    return os.path.abspath(os.path.expanduser(path))


def _stat(path: str) -> tuple[int, int]:
    require(os.path.isfile(path), "weights", path, f"no such file; give the path of a state_dict ({SAVE_HINT})")
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def digest(path: str) -> str:
    """The SHA-256 (hex) of the file's content, after checking that it holds a state_dict."""
    return _summary(path, *_stat(path))[0]


def shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the file's state_dict."""
    return dict(_summary(path, *_stat(path))[1])


@functools.lru_cache(maxsize=64)
def _summary(path: str, size: int, mtime_ns: int) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    sha256, state = _read(path)
    return sha256, tuple((name, tuple(tensor.shape)) for name, tensor in state.items())


def _read(path: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The file's SHA-256 and its state_dict, checked to be names mapped to tensors."""
    require(
        not path.endswith(".safetensors"),
        "weights",
        path,
        f"safetensors files are not supported (the safetensors package is not installed); {SAVE_HINT}",
    )
    try:
        with open(path, "rb") as file:
            content = file.read()
        state = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable, not a torch file, damaged, or holding more than plain data
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ConfigError("weights", path, f"not a readable torch.save file ({reason}); {SAVE_HINT}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # a training checkpoint
        fix = "save the model's own state_dict (the file holds a checkpoint dict with a 'state_dict' entry)"
        raise ConfigError("weights", path, f"{fix}; {SAVE_HINT}")
    require(
        isinstance(state, Mapping) and len(state) > 0,
        "weights",
        path,
        f"it holds a {type(state).__name__}, not a state_dict (parameter names to tensors); {SAVE_HINT}",
    )
    for name, tensor in state.items():
        require(
            isinstance(name, str) and isinstance(tensor, torch.Tensor),
            "weights",
            path,
            f"its entry {name!r} is a {type(tensor).__name__}, not a tensor: not a state_dict; {SAVE_HINT}",
        )
    return hashlib.sha256(content).hexdigest(), dict(state)


@functools.cache
def model_shapes(model: str, channels: int, num_classes: int, side: int, width: int | None, norm: str) -> dict:
    """Name -> shape of the model's state_dict (built on the meta device: no memory, no numbers)."""
    with torch.device("meta"):
        victim = models.build_model(
            model, channels=channels, num_classes=num_classes, image_size=side, width=width, norm=norm
        )
    return {name: tuple(tensor.shape) for name, tensor in victim.state_dict().items()}


def _fix(spec: Any) -> str:
    width = spec.width or models.default_width(spec.model)
    built = f"model {spec.model}" + (f", width {width}" if width else "")
    built += f", norm {spec.norm}, dataset {spec.dataset}, image_size {spec.side}"
    return f"save the state_dict of the trial's model ({built}), or set those to the file's model"


def check_fits(spec: Any, path: str) -> None:
    """A ConfigError naming the first entry where the file's state_dict and the trial's model differ: an entry
    the model lacks, one the file lacks, or a shape."""
    found = shapes(path)
    info = spec.data_spec
    own = model_shapes(spec.model, info.channels, info.num_classes, spec.side, spec.width, spec.norm)
    fix = _fix(spec)
    for name, shape in found.items():
        if name not in own:
            bare = next((name[len(p) :] for p in PREFIXES if name.startswith(p) and name[len(p) :] in own), None)
            hint = f"drop the {name[: len(name) - len(bare)]!r} prefix from the file's names" if bare else fix
            raise ConfigError(f"weights: state[{name}]", list(shape), f"the model has no such entry; {hint}")
        require(shape == own[name], f"weights: state[{name}]", list(shape), f"the model's is {list(own[name])}; {fix}")
    missing = [name for name in own if name not in found]
    require(not missing, "weights: state", missing[:1], f"the file lacks the model's entry; {fix}")


def load_into(model: torch.nn.Module, path: str, sha256: str | None = None) -> torch.nn.Module:
    """The model holding the file's weights; ``sha256``: the digest the trial was keyed with, checked (a file
    changed since, or another file at the same path on another machine, would give a row under a wrong key)."""
    found, state = _read(path)
    require(
        sha256 is None or found == sha256,
        "weights",
        path,
        f"the file changed after its trials were keyed (sha256 {sha256[:12] if sha256 else ''}..., now "
        f"{found[:12]}...); restore it, or run the study again to key the new weights",
    )
    model.load_state_dict(state)
    return model
