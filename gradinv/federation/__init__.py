"""A simulated federation: FedAvg over clients that hold partitions of a training subset. The global
model after round r is a victim like an untrained model or a zoo checkpoint.

- recipe.py: the :class:`Federation` recipe, built from the declared knobs, and its key;
- training.py: FedAvg's rounds (who holds what, who takes part, a client's local training, the server's
  average) and training a federation up to a round;
- rounds.py: a round as this machine's cache keeps it, and what a trial reads of it.

An attacked client computes its update as every victim here does (gradinv.client.update): from the global model,
with BatchNorm as ``client_bn`` says (eval by default: the federation's averaged statistics, which the
attacker knows), and under FedAvg with the federation's local training, momentum included.
"""

from .recipe import Federation, recipe_class
from .rounds import (
    Round,
    attacked_images,
    federation_dir,
    kept_rounds,
    load_round,
    resume_point,
    round_entry,
    victim_columns,
)
from .training import averaged, selected_clients, train, train_client, training_data

__all__ = [
    "Federation",
    "Round",
    "attacked_images",
    "averaged",
    "train_client",
    "federation_dir",
    "kept_rounds",
    "load_round",
    "recipe_class",
    "resume_point",
    "round_entry",
    "selected_clients",
    "train",
    "training_data",
    "victim_columns",
]
