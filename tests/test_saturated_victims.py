"""A victim sure of its answers: its update for the client's images, or for the attacker's guesses, falls
below what float32 holds. A lane whose every restart ends in NaN in float32 is attacked again in float64;
an update that is exactly zero is an ok row that says so (the attacker is left with the data mean).

The victim is a linear model on 8x8 faces with a chosen logit margin: softmax's other-class probability
is exp(-margin), which float32 keeps down to about exp(-103) and float64 to about exp(-745)."""

import pytest
import torch

from gradinv import data
from gradinv.trial.run import NO_FINITE_RESTART, run_trials
from gradinv.trial.spec import TrialSpec

SPEC = TrialSpec(dataset="faces", images=(0,), image_size=8, width=2, iterations=30, init="randn", restarts=2)
NON_FACE = 30  # of the other class than image 0


def linear_victim(bias: float, truth_margin: float | None = None) -> torch.nn.Module:
    """Logits whose margin for image 0's class is ``bias`` + d . x: every image is pushed ``bias`` logits
    towards that class, and d brings image 0 itself to ``truth_margin`` (no d when None)."""
    truth01, labels = data.load_images("faces", [0], image_size=8)
    x = data.normalise(truth01, SPEC.data_spec).flatten()
    d = torch.zeros_like(x) if truth_margin is None else (truth_margin - bias) * x / (x @ x)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x.numel(), 2))
    towards = torch.tensor([1.0, -1.0]) if int(labels[0]) == 0 else torch.tensor([-1.0, 1.0])
    with torch.no_grad():
        model[1].weight.copy_(towards[:, None] * d / 2)
        model[1].bias.copy_(towards * bias / 2)
    return model


def attack(model: torch.nn.Module, specs=(SPEC,)):
    return run_trials(list(specs), victim=lambda spec: model)


def test_a_float32_attack_that_ends_in_nan_is_run_again_in_float64():
    (outcome,) = attack(linear_victim(bias=400, truth_margin=40))  # random starts sit ~400 logits deep
    assert outcome.status == "ok" and outcome.precision == "float64" and not outcome.zero_update
    assert all(torch.isfinite(torch.tensor(outcome.restart_scores)))


def test_an_ordinary_victim_is_attacked_once_in_float32():
    (outcome,) = attack(linear_victim(bias=2, truth_margin=2))
    assert outcome.status == "ok" and outcome.precision == "float32"


def test_nan_in_float64_too_is_a_failure_that_says_what_was_tried():
    (outcome,) = attack(linear_victim(bias=5000, truth_margin=40))  # beyond float64's exp(-745) too
    assert outcome.status == "failed" and outcome.error == NO_FINITE_RESTART
    assert "float32 and again in float64" in outcome.error


def test_an_exactly_zero_update_is_an_ok_row_scored_as_the_data_mean():
    (outcome,) = attack(linear_victim(bias=200))  # exp(-200) underflows float32: the update is zero
    assert outcome.status == "ok" and outcome.zero_update and outcome.curve == []
    assert outcome.metrics["psnr"] == pytest.approx(outcome.metrics["baseline_psnr_flat"], abs=1e-4)
    assert outcome.metrics["psnr_gain"] <= 0


def test_in_a_pack_the_zero_update_lane_is_left_out_and_the_other_attacked():
    non_face = TrialSpec(**{**SPEC.__dict__, "images": (NON_FACE,)})  # pushed away from its class: a gradient
    zero, attacked = attack(linear_victim(bias=200), (SPEC, non_face))
    assert zero.zero_update and zero.status == "ok"
    assert not attacked.zero_update and attacked.precision is not None and attacked.lanes == 1


def test_a_fedavg_victim_whose_steps_vanish_below_a_weights_precision_is_still_matched():
    """Candidate steps of about 1e-176 vanish in theta_K - theta_0 even in float64; summed on their own they
    survive, and the float64 retry finds the client's images."""
    fedavg = TrialSpec(**{**SPEC.__dict__, "fl": "fedavg", "local_steps": 2, "local_lr": 1e-2})
    (outcome,) = attack(linear_victim(bias=400, truth_margin=5), (fedavg,))
    assert outcome.status == "ok" and outcome.precision == "float64"
