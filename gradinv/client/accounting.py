"""Privacy accounting: the (epsilon, delta) that a client's noisy update guarantees, through Opacus' accountants.

The DP-SGD epsilon (:func:`epsilon`) is *example-level* and covers *this client's one update*: it
bounds what the update reveals about any one image of the client being added or removed, given the
per-example clipping norm, the noise and the sampling. It is not the federation's guarantee, which
composes over rounds and over the clients.

Kept free of torch at import (``gradinv status/report`` stay light); Opacus loads on the first call.
"""

from __future__ import annotations

import math
import warnings

from ..errors import require

ACCOUNTANTS = ("rdp", "prv")  # Opacus' Renyi-DP and privacy-random-variable accountants; "rdp" is the default
# Opacus' "gdp" is left out: its central-limit approximation is far off for the few steps of one update
# (epsilon 57 where the exact Gaussian mechanism gives 10, at noise multiplier 0.5 and one step).


ACCOUNTANT = "rdp"  # the one whose figures land in the rows (its name in the `accountant` column)


def accounting_steps(fl) -> int:
    """The DP-SGD steps behind one update (``fl``: the trial or its client settings): 1 for FedSGD,
    the local steps for FedAvg."""
    return fl.local_steps if fl.fl == "fedavg" else 1


def privacy_columns(trial) -> dict:
    """A row's privacy outcomes: DP-SGD's example-level ``epsilon`` for this update (with the
    ``accountant``), and ``update_epsilon`` of the update-level clip and noise; null where off."""
    dp_sgd = trial.dp_clip is not None
    update_level = trial.clip_update is not None and trial.noise_std > 0
    return {
        "epsilon": epsilon(trial.dp_noise, trial.dp_sample_rate, accounting_steps(trial), trial.dp_delta)
        if dp_sgd
        else None,
        "accountant": ACCOUNTANT if dp_sgd or update_level else None,
        "update_epsilon": gaussian_mechanism_epsilon(trial.noise_std / trial.clip_update, trial.dp_delta)
        if update_level
        else None,
    }


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps, each the sampled Gaussian mechanism.

    ``noise_multiplier``: the noise std over the clipping norm; 0 (no noise) gives infinity.
    ``sample_rate``: each image's probability of joining a step's batch (Poisson sampling); 1 = every
    step uses every image. ``accountant`` names the Opacus accountant, to be recorded with the figure.
    """
    require(accountant in ACCOUNTANTS, "accountant", accountant, f"choose one of {', '.join(ACCOUNTANTS)}")
    require(noise_multiplier >= 0, "dp_noise", noise_multiplier, "use a noise multiplier of 0 (off) or more")
    require(0 < sample_rate <= 1, "dp_sample_rate", sample_rate, "use a sample rate in (0, 1]")
    require(steps >= 1, "steps", steps, "account for at least 1 step")
    require(0 < delta < 1, "dp_delta", delta, "use a delta in (0, 1), e.g. 1e-5")
    if noise_multiplier == 0:
        return math.inf
    import numpy as np
    from opacus.accountants.registry import create_accountant

    spent = create_accountant(accountant)
    spent.history = [(noise_multiplier, sample_rate, steps)]  # Opacus' own record of `steps` identical steps
    with (
        np.errstate(divide="ignore"),
        warnings.catch_warnings(),
    ):  # PRV takes log(1 - q), -inf at q = 1, and masks it out
        # At little noise RDP's best order is its smallest: the bound is loose there, and Opacus warns on every call
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        return float(spent.get_epsilon(delta))


def gaussian_mechanism_epsilon(noise_multiplier: float, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of one release of the Gaussian mechanism (sample rate 1, one step).

    For the update-level defence (clip the whole update to ``clip_update``, add noise of std
    ``noise_std``) pass ``noise_std / clip_update``: that is the guarantee for the client's update
    being present or absent (sensitivity ``clip_update``, the client-level relation of DP-FedAvg), for
    this one update. Two updates of the same client that differ in one image can lie ``2 * clip_update``
    apart, so under that replace relation pass ``noise_std / (2 * clip_update)``.
    """
    return epsilon(noise_multiplier, 1.0, 1, delta, accountant)
