"""The victim as a simulated federation's global model, and which of its clients is attacked."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .conditions import federated
from .knobs import FEDERATION, MOMENTUM_FIX, Part, at_least, is_momentum, knob, positive

PARTITIONS = ("iid", "dirichlet")


def _dirichlet(trial) -> bool:
    return federated(trial) and trial.partition == "dirichlet"


@dataclass(frozen=True, kw_only=True)
class FederationSettings(Part):
    """The victim as the global model after ``round`` rounds of a simulated federation (gradinv.federation),
    and which of its clients sends the attacked update. Default: no federation. The ``fed_*`` knobs are its
    clients' local training: ClientSettings says which ``local_*`` knob each one is."""

    round: int | None = knob(
        None,
        kind="int",
        check=at_least(0),
        fix="use 0 (the initial model) or a later round",
        help="the victim: a federation's global model after this many rounds (default: none)",
    )
    fed_rounds: int = knob(
        20,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=at_least(0),
        fix="use 0 or more rounds",
        help="rounds the federation runs to; round may not exceed it",
    )
    fed_clients: int = knob(
        10,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=at_least(1),
        fix="use 1 or more clients",
        help="clients in the federation, each holding a part of the train_subset",
    )
    partition: str = knob(
        "iid",
        kind="str",
        recipes=(FEDERATION,),
        choices=PARTITIONS,
        applies=federated,
        help="how the clients' images are split: iid, or dirichlet (label-skewed)",
    )
    alpha: float = knob(
        1.0,
        kind="float",
        recipes=(FEDERATION,),
        applies=_dirichlet,
        check=lambda v: math.isfinite(v) and v > 0,
        fix="use a concentration above 0 (0.1: skewed labels, 100: near-uniform)",
        help="dirichlet: the concentration over labels",
    )
    min_partition_size: int = knob(
        10,
        kind="int",
        recipes=(FEDERATION,),
        applies=_dirichlet,
        check=at_least(0),
        fix="use 0 or more",
        help="dirichlet: redraw until every client holds at least this many images",
    )
    clients_per_round: int | None = knob(
        None,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=at_least(1),
        fix="use 1 or more",
        help="clients drawn to train in each round (default: all)",
    )
    fed_epochs: int = knob(
        1,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=at_least(1),
        fix="use 1 or more",
        help="local epochs per round, the attacked client's under fedavg too",
    )
    fed_batch_size: int = knob(
        16,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=at_least(1),
        fix="use 1 or more",
        help="images per local SGD step in the federation",
    )
    fed_lr: float = knob(
        0.01,
        kind="float",
        recipes=(FEDERATION,),
        applies=federated,
        check=positive,
        fix="use a positive step size",
        help="the federation's local SGD step size",
    )
    fed_momentum: float = knob(
        0.0,
        kind="float",
        recipes=(FEDERATION,),
        applies=federated,
        check=is_momentum,
        fix=MOMENTUM_FIX,
        help="the federation's local SGD momentum (as local_momentum); 0: plain SGD",
    )
    attacked_client: int = knob(
        0,
        kind="int",
        repetition=True,
        applies=federated,
        check=at_least(0),
        fix="use 0 or a later client",
        help="the client whose update is attacked (its own images, drawn from its partition)",
    )
