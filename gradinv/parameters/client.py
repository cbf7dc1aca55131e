"""The client's side of a trial: whose images it holds and how it computes its update."""

from __future__ import annotations

from dataclasses import dataclass

from .conditions import local_fedavg, order_matters
from .knobs import FEDERATION, MOMENTUM_FIX, SEED_FIX, ZOO, Part, at_least, is_momentum, knob, positive

LABELS = ("known", "recovered")
CLIENT_NORMS = ("eval", "train")
FL_MODES = ("fedsgd", "fedavg")
BATCH_ORDERS = ("shuffled", "sequential")
ATTACKER_ORDERS = ("known", "unknown")
REALISTIC = "Dimitrov et al., Data Leakage in Federated Averaging, TMLR 2022"  # the realistic FedAvg attacker


@dataclass(frozen=True, kw_only=True)
class DataSettings(Part):
    """Whose images the client holds."""

    dataset: str = knob(
        "fashion-mnist",
        kind="str",
        recipes=(ZOO, FEDERATION),
        help="fashion-mnist, faces, photos, mnist, cifar10, cifar100, imagenet, or folder:PATH (an image folder: "
        "PATH/train/<class>/*, PATH/test/<class>/*; untrained victims only)",
    )
    images: tuple[int, ...] = knob(
        (0,),
        kind="ints",
        help="the client's images: indices into the test split",
        lane_shared=len,
        repetition=True,
        rules=[
            (lambda v: len(v) >= 1, "give at least one image index"),
            (lambda v: len(set(v)) == len(v), "list each image once"),
        ],
        repeat_flag="image",
    )
    image_size: int | None = knob(
        None,
        kind="int",
        help="resize images to this side (default: the dataset's own)",
        recipes=(ZOO, FEDERATION),
        check=at_least(4),
        fix="use 4 or more",
    )
    labels: str = knob(
        "known",
        kind="str",
        help="known to the attacker, or recovered from the update",
        choices=LABELS,
        lane_shared=False,
    )


@dataclass(frozen=True, kw_only=True)
class ClientSettings(Part):
    """How the client computes its update (FedSGD or FedAvg); the attacker knows all of it unless the
    ``attacker_*`` knobs say otherwise (FedAvg's realistic attacker, gradinv.client.defences.attacker_update).

    Local training, one vocabulary: ``local_*`` is the attacked client's FedAvg here, ``fed_*``
    (FederationSettings) a simulated federation's clients'. In a federation the attacked client trains by
    the federation's recipe, converted in one place (gradinv.trial.TrialRules.fl_config): ``fed_lr`` is
    ``local_lr``, ``fed_momentum`` ``local_momentum``, ``fed_batch_size`` ``local_batch_size`` (0 where it
    holds every image), ``fed_epochs`` ``local_steps`` (epochs x mini-batches per epoch). Both names stay:
    trial keys and results columns carry them."""

    fl: str = knob(
        "fedsgd",
        kind="str",
        help="fedsgd (one gradient) or fedavg (local SGD steps; in a federation, the federation's local training)",
        choices=FL_MODES,
    )
    local_steps: int = knob(
        1,
        kind="int",
        help="FedAvg: SGD steps on the client's images",
        applies=local_fedavg,
        check=at_least(1),
        fix="use at least 1 local step",
    )
    local_lr: float = knob(
        1e-4,
        kind="float",
        help="FedAvg: the local learning rate",
        applies=local_fedavg,
        check=positive,
        fix="use a positive local learning rate",
    )
    local_batch_size: int = knob(
        0,
        kind="int",
        help="FedAvg: images per local step; 0: all of them",
        applies=local_fedavg,
        check=at_least(0),
        fix="use 0 (all) or more",
    )
    data_order_seed: int = knob(
        0,
        kind="int",
        repetition=True,
        help="FedAvg: shuffles the mini-batches of each local epoch",
        arrow="int64",
        check=at_least(0),
        fix=SEED_FIX,
        applies=lambda t: local_fedavg(t) and t.batch_order != "sequential",
    )
    batch_order: str = knob(
        "shuffled",
        kind="str",
        choices=BATCH_ORDERS,
        applies=local_fedavg,
        help="FedAvg mini-batches: reshuffled each epoch, or the reference's fixed slices",
    )
    client_bn: str = knob(
        "eval",
        kind="str",
        choices=CLIENT_NORMS,
        help="BatchNorm in the client's forward pass: eval (the model's running statistics) or "
        "train (each batch's own, as in GradInversion's threat model)",
    )
    local_momentum: float = knob(
        0.0,
        kind="float",
        applies=local_fedavg,
        check=is_momentum,
        fix=MOMENTUM_FIX,
        help="FedAvg: SGD momentum of the local steps (PyTorch's: v = m v + g, step lr v); 0: plain SGD",
    )
    attacker_order: str = knob(
        "known",
        kind="str",
        choices=ATTACKER_ORDERS,
        applies=order_matters,
        help="FedAvg with shuffled mini-batches: the attacker knows the client's data order, or (unknown, the "
        f"realistic case of {REALISTIC}) unrolls the same steps over its candidates in index order, "
        "fixed consecutive slices every epoch",
    )
    attacker_local_lr: float | None = knob(
        None,
        kind="float",
        applies=local_fedavg,
        check=positive,
        fix="use a positive learning rate, or leave it out (the attacker knows local_lr)",
        help=f"FedAvg: the attacker's guess of local_lr ({REALISTIC}); none: it knows local_lr",
    )
    attacker_local_steps: int | None = knob(
        None,
        kind="int",
        applies=local_fedavg,
        check=at_least(1),
        fix="use at least 1 step, or leave it out (the attacker knows local_steps)",
        help=f"FedAvg: the attacker's guess of local_steps ({REALISTIC}); none: it knows local_steps",
    )
