"""The attack's side of a trial: which family runs and the settings of each (the imprint block, the
optimiser every optimising attack reads, inverting gradients' own choices), and how ``layers`` is stored."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .conditions import epochs_in_unknown_order
from .knobs import SEED_FIX, Part, at_least, knob, positive

LABEL_METHODS = ("bias_counts", "ilrg")  # gradinv.attacks.labels
THREAT_MODELS = ("honest", "malicious")
BN_STATS = ("running", "batch")
COSTS = ("cosine", "l2", "l1", "max", "simlocal")
DECAYS = ("step", "step-eighths", "cosine", "none")
INITS = ("randn", "rand", "zeros", "patterned")
LAYER_WEIGHTINGS = ("equal", "linear", "exp")
# Named tensor sets: the first / last K parameter tensors (fewer when the model has fewer), the K of
# largest target norm, or `batch`: 8 tensors drawn afresh at every evaluation.
LAYER_SETS = ("all", "first4", "first5", "first10", "first50", "last5", "last10", "last50", "top10", "top50", "batch")
OPTIMIZERS = ("adam", "sgd", "lbfgs")
OUTPUT_GRADIENTS = ("computed", "read")
PATTERN_SIDE = 4  # init patterned: breaching's patterned-4
SCORINGS = ("loss", "tv", "pixelmean", "pixelmedian")


def _seeded_attack(trial) -> bool:
    return trial.family.seeded


@dataclass(frozen=True, kw_only=True)
class AttackSettings(Part):
    """Which attack family runs, and the seed of its random start."""

    # the family's name is checked by the trial (gradinv.trial), which imports the registry
    attack: str = knob("ig", kind="str", help="the attack family (gradinv.attacks.registry)")
    attack_seed: int = knob(
        0,
        kind="int",
        repetition=True,
        help="seeds the attack's starting images",
        arrow="int64",
        lane_shared=False,
        applies=_seeded_attack,
        check=at_least(0),
        fix=SEED_FIX,
    )
    label_method: str = knob(
        "bias_counts",
        kind="str",
        choices=LABEL_METHODS,
        lane_shared=False,
        applies=lambda t: t.labels == "recovered",
        help="how recovered labels are read off the update: the classifier's bias-gradient "
        "counts, or iLRG (Ma et al. 2023; FedSGD, fewer images than classes)",
    )
    threat_model: str = knob(
        "honest",
        kind="str",
        choices=THREAT_MODELS,
        help="honest (-but-curious): the server attacks updates of the model it trains; "
        "malicious: it may ship a modified model first (the imprint attack)",
    )


# An image darker or brighter than the whole sample falls outside every bin and is lost: of n sample images,
# 2/(n+1) of the client's images on average (two thirds at n = 2), under a tenth from 20 up.
MIN_IMPRINT_SAMPLE = 20
IMPRINT_SAMPLE_FIX = (
    f"use {MIN_IMPRINT_SAMPLE} or more training images: the bins span the sample's brightness, and "
    "with n images 2/(n+1) of the client's images fall outside them and are lost"
)


@dataclass(frozen=True, kw_only=True)
class ImprintSettings(Part):
    """The malicious server's imprint block (gradinv.attacks.imprint, Fowl et al. 2022)."""

    imprint_bins: int = knob(
        256,
        kind="int",
        check=at_least(2),
        fix="use 2 or more bins",
        search="choices",
        help="brightness bins of the imprint block; an image alone in its bin comes back exactly",
    )
    imprint_sample: int = knob(
        1000,
        kind="int",
        check=at_least(MIN_IMPRINT_SAMPLE),
        fix=IMPRINT_SAMPLE_FIX,
        help="training images whose brightness quantiles set the bins (the attacker's prior)",
    )


@dataclass(frozen=True, kw_only=True)
class OptimiserSettings(Part):
    """What every optimising attack (inverting gradients, DLG) reads."""

    iterations: int = knob(
        24_000, kind="int", help="optimisation steps per restart", check=at_least(1), fix="use at least 1 iteration"
    )
    lr: float = knob(
        0.1,
        kind="float",
        help="the step size (inverting gradients: Adam's only)",
        lane_shared=False,
        check=positive,
        fix="use a positive step size",
        search="log",
        applies=lambda t: t.optimizer == "adam",
    )


def _restarts(trial) -> bool:
    return trial.restarts > 1


@dataclass(frozen=True, kw_only=True)
class InvertingSettings(Part):
    """Inverting gradients only: each of the reference implementation's choices, by name."""

    restarts: int = knob(
        1,
        kind="int",
        help="independent starts; the best one is kept",
        search="choices",
        check=at_least(1),
        fix="use at least 1 restart",
    )
    tv: float = knob(
        1e-4,
        kind="float",
        help="the total-variation weight",
        lane_shared=False,
        search="log",
        check=at_least(0),
        fix="use a TV weight of 0 or more",
    )
    tv_inner_exp: float = knob(
        1.0,
        kind="float",
        check=positive,
        fix="use a positive exponent (1: the paper's TV)",
        search=(1.0, 2.0),
        help="TV as mean((|dx|^p + |dy|^p)^q), p this exponent; p = q = 1 is the paper's anisotropic TV, "
        "p 2 and q 0.5 the isotropic TV of breaching's modern recipe (Geiping et al.)",
    )
    tv_outer_exp: float = knob(
        1.0,
        kind="float",
        check=positive,
        fix="use a positive exponent (1: the paper's TV)",
        search=(0.5, 1.0),
        help="TV's outer exponent q (see tv_inner_exp)",
    )
    feature_prior: float = knob(
        0.0,
        kind="float",
        check=at_least(0),
        fix="use 0 (off) or a positive weight",
        search="log",
        help="weight of the feature prior (breaching's modern recipe, Geiping et al.): the classifier's "
        "input for each label, read off the update's classifier weight and bias rows, against the "
        "candidate's, as squared distance over the read feature's squared norm; 0: off",
    )
    image_prior: float = knob(
        0.0,
        kind="float",
        check=at_least(0),
        fix="use 0 (off) or a positive weight",
        search="log",
        help="weight of the L2 image prior (See-Through-Gradients, Yin et al. 2021): the mean squared "
        "pixel of the candidate in normalised units; 0: off",
    )
    epoch_prior: float = knob(
        0.0,
        kind="float",
        check=at_least(0),
        fix="use 0 (one candidate per image, shared by the epochs) or a positive weight",
        search="log",
        applies=lambda t: epochs_in_unknown_order(t) > 1,
        help="FedAvg over several epochs in an order the attacker does not know (attacker_order unknown; "
        "Dimitrov et al., Data Leakage in Federated Averaging, TMLR 2022): each epoch unrolls candidates "
        "of its own, and this weighs their order-invariant epoch prior (each epoch's maximum over its "
        "candidates of a fixed random convolution, against every other epoch's, as squared distance); "
        "the reconstruction is the epochs' mean, matched within labels; 0: one candidate per image, "
        "shared by the epochs",
    )
    output_gradient: str = knob(
        "computed",
        kind="str",
        choices=OUTPUT_GRADIENTS,
        search=OUTPUT_GRADIENTS,
        help="the loss gradient at the logits that the candidate's update is backpropagated from: "
        "computed from its own cross-entropy (the paper's), or read off the sent update's output bias "
        "gradient, which is the client's exactly (R-GAP's first step, Zhu and Blaschko 2021; one image "
        "per client, FedSGD, or FedAvg with attacker_local_steps 1: its steps' summed, read as one step's)",
    )
    # tune searches only the costs whose scales the pruner can compare across candidates
    cost: str = knob("cosine", kind="str", help="the gradient distance", choices=COSTS, search=("cosine", "l2"))
    decay: str = knob(
        "step",
        kind="str",
        choices=DECAYS,
        search="choices",
        help="step-size schedule (step: x0.1 at the reference's milestones)",
    )
    init: str = knob(
        "randn",
        kind="str",
        choices=INITS,
        search="choices",
        help="the starting images: standard normal, uniform in [-1, 1), zeros, or patterned (a uniform "
        f"{PATTERN_SIDE}x{PATTERN_SIDE} tile repeated over the image: breaching's modern recipe, Geiping et al.)",
    )
    layer_weighting: str = knob(
        "equal",
        kind="str",
        choices=LAYER_WEIGHTINGS,
        search="choices",
        help="the weight of each parameter tensor (linear/exp: earlier ones weigh more)",
    )
    layers: tuple[int, ...] | str = knob(
        "all",
        kind="ints",
        names=LAYER_SETS,
        check=lambda v: len(v) >= 1,
        fix="list at least one index",
        help="the parameter tensors to match: indices (negative from the end), or a named set",
    )
    clamp_init: bool = knob(False, kind="bool", help="project the first images into the pixel box")
    signed: bool = knob(True, kind="bool", help="step on the sign of the image gradient")
    soft_signed: bool = knob(
        False,
        kind="bool",
        applies=lambda t: t.signed,
        search=(False, True),
        help="soft signs (breaching's modern recipe, Geiping et al.): tanh(g s) / s with s falling "
        "linearly from 1 to 0 over each round, from near-signs to the plain gradient",
    )
    warmup: int = knob(
        0,
        kind="int",
        check=at_least(0),
        fix="use 0 (none) or more iterations",
        search="choices",
        help="iterations over which the step size rises linearly to its schedule's (breaching's modern "
        "recipe and See-Through-Gradients: 50); 0: none",
    )
    langevin: float = knob(
        0.0,
        kind="float",
        check=at_least(0),
        fix="use 0 (off) or a positive scale",
        search="log",
        help="Langevin noise (See-Through-Gradients, Yin et al. 2021; breaching: 0.01): standard normal "
        "noise times this and the step size added to the image gradient at every step; 0: off",
    )

    boxed: bool = knob(True, kind="bool", help="keep pixels in the valid box after every step")
    median_filter: bool = knob(False, kind="bool", help="a 3x3 median filter every 500 iterations")
    optimizer: str = knob("adam", kind="str", help="adam, or the reference's sgd or lbfgs", choices=OPTIMIZERS)
    scoring: str = knob(
        "loss",
        kind="str",
        help="how restarts become one reconstruction",
        choices=SCORINGS,
        applies=_restarts,
        check=lambda v: v != "inception",
        fix="it needs Inception weights that gradinv does not ship; use loss, tv, pixelmean or pixelmedian",
    )
    bn_prior: float = knob(
        0.0,
        kind="float",
        check=at_least(0),
        fix="use 0 (off) or a positive weight",
        search="log",
        help="weight of the BatchNorm prior (GradInversion, Yin et al. 2021): the candidate batch's "
        "feature mean and variance at each BatchNorm layer against bn_stats; 0: off",
    )
    bn_stats: str = knob(
        "running",
        kind="str",
        choices=BN_STATS,
        applies=lambda t: t.bn_prior > 0,
        help="the statistics the attacker knows: the model's running ones (realistic; 0 and 1 in an "
        "untrained model), or the client batch's own (optimistic; needs client_bn train)",
    )
    group_consistency: float = knob(
        0.0,
        kind="float",
        applies=_restarts,
        check=at_least(0),
        search="log",
        fix="use 0 (off) or a positive weight",
        help="weight pulling each restart toward the restarts' aligned mean (GradInversion)",
    )
    tol: float | None = knob(
        None,
        kind="float",
        help="drop the restarts after one that scores at most this",
        applies=_restarts,
        check=math.isfinite,
        fix="use a finite number",
    )
    max_iterations: int | None = knob(
        None,
        kind="int",
        help=(
            "budget where it pays: after `iterations`, a round twice as long (its own step-size schedule) for "
            "each trial whose best gradient cost fell by 5% or more over its last round's last quarter, and so "
            "on while a whole round fits in this many iterations; none: exactly `iterations`"
        ),
        check=at_least(1),
        fix="use a whole number of iterations, at least `iterations`",
    )


# `layers` is one parameter, indices or a set's name, but a list column cannot hold a name: a name is stored,
# and keyed, under `layer_set` (a knob of its own until the two merged), so that keys and files stay valid.
LAYER_SET_COLUMN = "layer_set"


def layers_columns(layers) -> dict:
    """``layers`` as its two results columns: the indices (None for a name) and the set's name ("all" beside
    indices, as before the merge); both None where the parameter does not apply."""
    if layers is None:
        return {"layers": None, LAYER_SET_COLUMN: None}
    named = isinstance(layers, str)
    return {"layers": None if named else list(layers), LAYER_SET_COLUMN: layers if named else "all"}


def layers_of_columns(row: dict) -> tuple[int, ...] | str | None:
    """The ``layers`` a row's two columns hold (None: it did not apply); rows from before the merge too."""
    return tuple(row["layers"]) if row.get("layers") is not None else row.get(LAYER_SET_COLUMN)
