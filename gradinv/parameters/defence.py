"""What the client does to protect its update, and how much of it the attacker mirrors."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .knobs import SEED_FIX, ZOO, Part, at_least, knob, positive

PRUNE_SCOPES = ("layer", "global")
ROUNDINGS = ("stochastic", "nearest")


def _pruned(trial) -> bool:
    return trial.keep_fraction < 1


def _quantised(trial) -> bool:
    return trial.quant_bits is not None


def _dp_sgd(trial) -> bool:
    return trial.dp_clip is not None


def _randomised(trial) -> bool:
    """Whether a defence draws random numbers (from ``defence_seed``)."""
    return (
        trial.noise_std > 0
        or (_quantised(trial) and trial.quant_rounding == "stochastic")
        or (_dp_sgd(trial) and (trial.dp_noise > 0 or trial.dp_sample_rate < 1))
    )


def _dp_mechanism(trial) -> bool:
    """Whether a differentially private mechanism runs, so that ``dp_delta`` sets its (epsilon, delta).
    The update-level Gaussian mechanism (the clip bounds the sensitivity, the noise hides it), and
    DP-SGD in the local training (per-example clip and noise)."""
    return (trial.clip_update is not None and trial.noise_std > 0) or (_dp_sgd(trial) and trial.dp_noise > 0)


def _unrolls_defences(trial) -> bool:
    """Whether the attack can mirror the defences in its cost (inverting gradients' LaneObjective)."""
    return trial.family.mirrors_defences


def _fraction(value) -> bool:
    return 0 < value <= 1


# The quantiser (gradinv.client.defences) rounds to 2**bits levels in the update's float32: past its 24-bit
# significand finer levels change nothing, and a level count past 64 bits overflows (OverflowError).
MAX_QUANT_BITS = 32
QUANT_BITS_FIX = (
    f"use 1 to {MAX_QUANT_BITS} bits (finer levels than a float32 update's 24-bit precision change "
    "nothing), or leave it out for no quantisation"
)
# Delta is the chance that the guarantee fails outright; sound choices lie below 1/n for the n images
# protected (1/n > 7e-7 for every training set here). Below 1e-12 a smaller delta protects nothing more
# in practice and only inflates epsilon through ln(1/delta) (a subnormal such as 1e-320 is not even the
# number written: it is stored as 9.99989e-321).
MIN_DP_DELTA = 1e-12
DP_DELTA_FIX = (
    f"use a delta from {MIN_DP_DELTA:g} to below 1 (1e-5 is usual): a smaller chance of failure than "
    f"{MIN_DP_DELTA:g} protects nothing more and only inflates epsilon"
)


@dataclass(frozen=True, kw_only=True)
class DefenceSettings(Part):
    """What the client does to its update before sending it (gradinv.client.defences, applied in this order:
    clip, noise, pruning, quantisation), DP-SGD in its local training (gradinv.client.dp_training), how much of it the
    attacker mirrors, and secure aggregation over several clients. Defaults: no defence."""

    dp_clip: float | None = knob(
        None,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="DP-SGD in local training: the per-example clipping norm (default: no DP-SGD)",
        rules=[(math.isfinite, "use a finite norm")],
        check=positive,
        fix="use a positive clipping norm, or leave it out for no DP-SGD",
    )
    dp_noise: float = knob(
        0.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="DP-SGD: the noise multiplier (noise std over dp_clip); 0: none",
        applies=_dp_sgd,
        rules=[(math.isfinite, "use a finite multiplier")],
        check=at_least(0),
        fix="use 0 (no noise) or more",
    )
    dp_sample_rate: float = knob(
        1.0,
        kind="float",
        defence=True,
        applies=_dp_sgd,
        check=_fraction,
        help="DP-SGD: each image's chance to be in a step's batch (Poisson); 1: every image",
        fix="use a rate above 0 and at most 1 (1: every image in every step)",
    )
    dp_aware: bool = knob(
        False,
        kind="bool",
        defence=True,
        help="the attacker unrolls DP-SGD's per-example clip and batches",
        applies=lambda t: _dp_sgd(t) and _unrolls_defences(t),
    )

    clip_update: float | None = knob(
        None,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="clip the whole update to this L2 norm (default: no clip)",
        rules=[(math.isfinite, "use a finite norm")],
        check=positive,
        fix="use a positive norm, or leave it out for no clip",
    )
    noise_std: float = knob(
        0.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="std of the Gaussian noise added to the update; 0: none",
        rules=[(math.isfinite, "use a finite std")],
        check=at_least(0),
        fix="use 0 (no noise) or more",
    )
    keep_fraction: float = knob(
        1.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="keep this fraction of largest-magnitude coordinates; 1: all",
        check=_fraction,
        fix="use a fraction above 0 and at most 1 (1: no pruning)",
    )
    prune_scope: str = knob(
        "layer",
        kind="str",
        defence=True,
        recipes=(ZOO,),
        choices=PRUNE_SCOPES,
        applies=_pruned,
        help="prune within each parameter tensor, or over the whole update",
    )
    quant_bits: int | None = knob(
        None,
        kind="int",
        defence=True,
        recipes=(ZOO,),
        help="quantise each tensor to this many bits (default: none)",
        rules=[(lambda v: v <= MAX_QUANT_BITS, QUANT_BITS_FIX)],
        check=at_least(1),
        fix="use 1 bit or more, or leave it out for no quantisation",
    )
    quant_rounding: str = knob(
        "stochastic",
        kind="str",
        defence=True,
        recipes=(ZOO,),
        choices=ROUNDINGS,
        applies=_quantised,
        help="stochastic (unbiased, QSGD-style) or nearest (1 bit: scaled signSGD)",
    )
    defence_seed: int = knob(
        0,
        kind="int",
        defence=True,
        recipes=(ZOO,),
        help="seeds the noise and the stochastic rounding",
        arrow="int64",
        applies=_randomised,
        check=at_least(0),
        fix=SEED_FIX,
    )
    prune_aware: bool = knob(
        False,
        kind="bool",
        defence=True,
        help="the attacker compares only the coordinates the update kept",
        applies=lambda t: _pruned(t) and _unrolls_defences(t),
    )
    clip_aware: bool = knob(
        False,
        kind="bool",
        defence=True,
        help="the attacker clips its candidate update the same way",
        applies=lambda t: t.clip_update is not None and _unrolls_defences(t),
    )
    dp_delta: float = knob(
        1e-5,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="the delta of the reported (epsilon, delta) privacy",
        applies=_dp_mechanism,
        rules=[(lambda v: not 0 < v < MIN_DP_DELTA, DP_DELTA_FIX)],
        check=lambda v: 0 < v < 1,
        fix="use a delta between 0 and 1",
    )
    aggregated_clients: int = knob(
        1,
        kind="int",
        defence=True,
        check=at_least(1),
        fix="use 1 (no aggregation) or more clients",
        help="secure aggregation: the server sees only the mean update of this many clients; "
        "the trial's images are split in order into equal groups, one per client; 1: none",
    )
