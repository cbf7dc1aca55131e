"""Captured updates: one client's update, saved by any training loop and attacked later (`gradinv attack --update`).

:func:`save_update` writes one file with ``torch.save`` of plain tensors, strings and numbers only (read back
with ``torch.load(weights_only=True)``, so loading never runs code from the file); :func:`load_update` reads
and checks it. The format (docs/captured-updates.md), version 1, a dict:

- ``format``: ``"gradinv-update"``, ``version``: 1;
- ``state``: the model's ``state_dict()`` (parameters and buffers) before the update, on the CPU;
- ``parameters``: the parameters' names in ``model.named_parameters()`` order; ``update``: one tensor per
  name, of its shape. FedSGD: the loss gradient. FedAvg: the new parameters minus the old ones;
- ``fl`` (``fedsgd`` or ``fedavg``), ``num_images``; FedAvg's ``local_steps``, ``local_lr``,
  ``local_batch_size`` (0: every image in each step), ``local_momentum``; ``client_bn`` (``eval``: BatchNorm
  with the running statistics, ``train``: each batch's own);
- optional: ``labels`` (int64 ``[num_images]``, what the attacker knows; else recovered from the update) and
  ``images`` (float ``[num_images, C, H, W]`` in [0, 1], the ground truth for audits and tests, never shown
  to the attack).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, require
from .files import write_atomic

FORMAT = "gradinv-update"
VERSION = 1
FL_MODES = ("fedsgd", "fedavg")
CLIENT_BN = ("eval", "train")


@dataclass(frozen=True)
class CapturedUpdate:
    """A captured update, checked: what :func:`load_update` returns."""

    state: dict[str, torch.Tensor]  # the model's state_dict before the update
    parameters: tuple[str, ...]  # the update's order: the model's named_parameters()
    update: tuple[torch.Tensor, ...]
    fl: str
    num_images: int
    local_steps: int = 1
    local_lr: float | None = None
    local_batch_size: int = 0
    local_momentum: float = 0.0
    client_bn: str = "eval"
    labels: torch.Tensor | None = None  # [num_images] int64: known to the attacker
    images: torch.Tensor | None = None  # [num_images, C, H, W] in [0, 1]: ground truth, for scoring only


def save_update(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    num_images: int,
    gradient: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    update: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    local_steps: int = 1,
    local_lr: float | None = None,
    local_batch_size: int = 0,
    local_momentum: float = 0.0,
    client_bn: str = "eval",
    labels: Sequence[int] | torch.Tensor | None = None,
    images: torch.Tensor | None = None,
) -> Path:
    """Write one client's update to ``path`` (whole or not at all) and return the path.

    ``model``: the model as the client received it, before its update (for FedAvg, keep a copy taken before
    local training: ``copy.deepcopy(model)``). Give exactly one of ``gradient`` (FedSGD: the mean loss
    gradient over the client's ``num_images`` images, e.g. ``[p.grad for p in model.parameters()]``) and
    ``update`` (FedAvg: new parameters minus old ones after ``local_steps`` SGD steps at ``local_lr``, of
    ``local_batch_size`` images each, 0: all of them), as tensors in ``model.parameters()`` order or a dict
    by parameter name. ``labels``: the images' labels, if the attacker knows them. ``images``: the client's
    images in [0, 1], unnormalised, ``[num_images, C, H, W]``, only to score the attack against."""
    require((gradient is None) != (update is None), "gradient/update", None, "give exactly one of gradient= or update=")
    fl = "fedsgd" if gradient is not None else "fedavg"
    names = [name for name, _ in model.named_parameters()]
    given = gradient if gradient is not None else update
    if isinstance(given, Mapping):
        missing = [name for name in names if name not in given]
        require(not missing, "update", missing[:1], "give a tensor for every parameter of the model")
        given = [given[name] for name in names]
    document = {
        "format": FORMAT,
        "version": VERSION,
        "state": {name: t.detach().cpu().clone() for name, t in model.state_dict().items()},
        "parameters": names,
        "update": [torch.as_tensor(t).detach().cpu().clone() for t in given],
        "fl": fl,
        "num_images": num_images,
        "local_steps": local_steps,
        "local_lr": local_lr,
        "local_batch_size": local_batch_size,
        "local_momentum": local_momentum,
        "client_bn": client_bn,
    }
    if labels is not None:
        document["labels"] = torch.as_tensor(labels, dtype=torch.long).detach().cpu().clone()
    if images is not None:
        document["images"] = images.detach().cpu().float().clone()
    _checked(document, "save_update")  # a file it writes is one it can read
    path = Path(path)

    def write(file) -> None:
        torch.save(document, file)

    write_atomic(path, write)
    return path


def load_update(path: str | os.PathLike) -> CapturedUpdate:
    """The captured update in ``path``, checked; a bad file is one :class:`ConfigError` naming what and how to fix."""
    path = Path(path)
    where = f"update file {path}"
    require(path.is_file(), "--update", str(path), "name an update file written by gradinv.capture.save_update")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, damaged, or holding objects other than plain data
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ConfigError(
            "--update", str(path), f"not a captured update ({reason}); write it with save_update"
        ) from None
    return _checked(document, where)


def _checked(document, where: str) -> CapturedUpdate:
    """The document as a :class:`CapturedUpdate`, or a ConfigError naming ``where`` and the field."""

    def need(condition: bool, name: str, value, fix: str) -> None:
        require(condition, f"{where}: {name}", value, fix)

    need(
        isinstance(document, dict) and document.get("format") == FORMAT,
        "format",
        document.get("format") if isinstance(document, dict) else type(document).__name__,
        "not a captured update; write one with gradinv.capture.save_update",
    )
    need(
        document.get("version") == VERSION,
        "version",
        document.get("version"),
        f"this gradinv reads version {VERSION}; write the file again with this gradinv's save_update",
    )
    state, names, tensors = document.get("state"), document.get("parameters"), document.get("update")
    need(
        isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values()),
        "state",
        type(state).__name__,
        "save the model's state_dict (name -> tensor)",
    )
    need(
        isinstance(names, list) and all(isinstance(n, str) for n in names) and names,
        "parameters",
        type(names).__name__,
        "list the parameters' names",
    )
    unknown = [name for name in names if name not in state]
    need(not unknown, "parameters", unknown[:1], "name only parameters the state holds")
    need(
        isinstance(tensors, list) and len(tensors) == len(names),
        "update",
        len(tensors) if isinstance(tensors, list) else type(tensors).__name__,
        f"give one tensor per parameter ({len(names)})",
    )
    for name, tensor in zip(names, tensors):
        shape = tuple(state[name].shape)
        need(
            isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == shape,
            f"update[{name}]",
            tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__,
            f"give the parameter's shape {shape}",
        )
        need(
            tensor.is_floating_point() and bool(torch.isfinite(tensor).all()),
            f"update[{name}]",
            str(tensor.dtype),
            "give finite floating-point numbers",
        )
    fl = document.get("fl")
    need(fl in FL_MODES, "fl", fl, "use fedsgd (a gradient) or fedavg (new minus old parameters)")
    count = _whole(document, "num_images", need, 1, "give how many images the client's update was computed on")
    steps = _whole(document, "local_steps", need, 1, "use at least 1 local step")
    batch = _whole(document, "local_batch_size", need, 0, "use 0 (all images in each step) or more")
    lr, momentum = document.get("local_lr"), document.get("local_momentum", 0.0)
    if fl == "fedavg":
        need(_number(lr) and lr > 0, "local_lr", lr, "FedAvg's update needs the client's positive learning rate")
    else:
        need(steps == 1 and batch in (0, count), "local_steps", steps, "a FedSGD gradient is one step on every image")
    need(_number(momentum) and 0 <= momentum < 1, "local_momentum", momentum, "use a momentum in [0, 1)")
    client_bn = document.get("client_bn", "eval")
    need(client_bn in CLIENT_BN, "client_bn", client_bn, "use eval or train")
    labels = document.get("labels")
    if labels is not None:
        classes = _classes(state, names)
        need(
            isinstance(labels, torch.Tensor) and tuple(labels.shape) == (count,) and not labels.is_floating_point(),
            "labels",
            tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__,
            f"give one integer label per image ({count})",
        )
        bad = [int(v) for v in labels if not 0 <= int(v) < classes]
        need(not bad, "labels", bad[:1], f"use labels from 0 to {classes - 1} (the model's classes)")
        labels = labels.long()
    images = document.get("images")
    if images is not None:
        need(
            isinstance(images, torch.Tensor) and images.dim() == 4 and len(images) == count,
            "images",
            tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__,
            f"give [{count}, C, H, W] images",
        )
        need(
            images.is_floating_point() and bool(((images >= 0) & (images <= 1)).all()),
            "images",
            str(images.dtype),
            "give pixels in [0, 1], before normalisation",
        )
    return CapturedUpdate(
        state,
        tuple(names),
        tuple(tensors),
        fl,
        count,
        steps,
        None if lr is None else float(lr),
        batch,
        float(momentum),
        client_bn,
        labels,
        images,
    )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(document: dict, name: str, need, least: int, fix: str) -> int:
    value = document.get(name, {"local_steps": 1, "local_batch_size": 0}.get(name))
    need(isinstance(value, int) and not isinstance(value, bool) and value >= least, name, value, fix)
    return value


def _classes(state: dict, names: list[str]) -> int:
    """The model's classes: the length of its last parameter (the classifier's bias, or its weight's rows)."""
    return int(state[names[-1]].shape[0])
