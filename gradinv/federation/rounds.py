"""Rounds on disk: entries of this machine's cache (gradinv.cache) beside the zoo's checkpoints, under
``CACHE/federations/KEY/``: ``round-00005.pt`` (the state dict) and ``round-00005.json`` (the global model's
test accuracy, which clients took part in each round so far, the recipe). Round 0 and every
``checkpoint_every``-th round are kept, and so is each round asked for; a killed training resumes from
the last round kept (gradinv.federation.training).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import Entry, cache_dir, keys
from ..errors import require
from .recipe import Federation


@dataclass
class Round:
    """The global model after ``number`` rounds, and its sidecar."""

    federation: Federation
    number: int
    state: dict[str, torch.Tensor]
    sidecar: dict

    def model(self) -> torch.nn.Module:
        model = self.federation.initial_model()
        model.load_state_dict(self.state)
        return model.eval()

    def participation(self, client: int) -> list[int]:
        """The rounds (up to this one) in which ``client`` trained."""
        return participation(self.sidecar, client)


def participation(sidecar: dict, client: int) -> list[int]:
    """The rounds, up to the sidecar's, in which ``client`` trained."""
    return [int(r) for r, chosen in sidecar["participants"].items() if client in chosen]


def attacked_images(federation: Federation, sidecar: dict, client: int, positions: Sequence[int]) -> list[int]:
    """Training-subset indices of the attacked client's images: its own partition in an order drawn
    from ``(model_seed, 0, client)`` (round 0 trains no client, so no training draw shares the seed),
    at ``positions`` (the trial's ``images``, checked by :meth:`Federation.check_positions`)."""
    own = np.asarray(sidecar["partitions"][client])
    order = np.random.default_rng([federation.model_seed, 0, client]).permutation(own)
    for position in positions:
        require(
            position < len(order),
            "images",
            position,
            f"client {client} holds {len(order)} images; use positions 0 to {len(order) - 1}",
        )
    return [int(order[position]) for position in positions]


def victim_columns(federation: Federation, sidecar: dict, client: int) -> dict:
    """The columns a row attacking ``client`` of this round's global model carries."""
    return {
        "federation_key": federation.key,
        "model_accuracy": sidecar["test_accuracy"],
        "client_label_histogram": sidecar["label_histograms"][client],
        "client_rounds": participation(sidecar, client),
    }


def federation_dir(federation: Federation, cache: str | os.PathLike | None = None) -> Path:
    """Where this machine keeps the federation's rounds: beside the zoo's checkpoints."""
    return cache_dir(cache) / "federations" / federation.key


def round_entry(federation: Federation, number: int, cache: str | os.PathLike | None = None) -> Entry:
    """Where this machine keeps round ``number``: ``round-00005.pt`` and ``.json`` in the federation's folder."""
    name = f"round-{number:05d}"
    return Entry(federation_dir(federation, cache), name, "federation", f"round {number}", "run again to retrain it")


ROUND_FIELDS = {
    "key": str,
    "round": int,
    "test_accuracy": (int, float),
    "participants": dict,
    "partitions": list,
    "label_histograms": list,
    "training_seconds": (int, float),
}  # what readers of a round's sidecar use


def _sidecar_problem(federation: Federation, number: int, info: dict) -> str | None:
    """What is wrong with a round's sidecar that has ROUND_FIELDS: another round's, or not one partition
    of image indices and one label histogram per client."""
    clients = federation.fed_clients
    if info["round"] != number:
        return f"holds round {info['round']}"
    for name in ("partitions", "label_histograms"):
        found = info[name]
        if len(found) != clients or not all(isinstance(part, list) for part in found):
            return f"holds {len(found)} {name} for {clients} clients"
    if not all(isinstance(index, int) for part in info["partitions"] for index in part):
        return "holds partitions that are not image indices"
    return None


def load_round(federation: Federation, number: int, cache: str | os.PathLike | None = None) -> Round | None:
    """Round ``number`` as kept on this machine, or None when it was not kept."""
    problem = functools.partial(_sidecar_problem, federation, number)
    found = round_entry(federation, number, cache).load(federation.initial_model, ROUND_FIELDS, problem)
    return None if found is None else Round(federation, number, *found)


def kept_rounds(
    federation: Federation, rounds: Sequence[int], cache: str | os.PathLike | None = None
) -> dict[int, Round]:
    """The rounds asked for, as kept on this machine (train them first)."""
    found = {number: load_round(federation, number, cache) for number in rounds}
    missing = [number for number, kept in found.items() if kept is None]
    require(not missing, "round", missing[:1] and missing[0], "train the federation to it first")
    return found


def resume_point(federation: Federation, up_to: int, cache: str | os.PathLike | None = None) -> Round | None:
    """The last round up to ``up_to`` kept on this machine, where training resumes; None when none is."""
    kept = [int(key.split("-")[1]) for key in keys(federation_dir(federation, cache), "round-*")]
    earlier = [number for number in kept if number <= up_to]
    return load_round(federation, max(earlier), cache) if earlier else None


def store_round(kept: Round, cache: str | os.PathLike | None) -> None:
    round_entry(kept.federation, kept.number, cache).store(kept.state, kept.sidecar)
