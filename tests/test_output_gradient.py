"""``output_gradient: read``: the candidate's update pulled back from the client's own loss gradient at the
logits, read off the update's classifier bias gradient (one image, one step as the attacker sees it), on tiny
shapes."""

import dataclasses

import pytest
import torch

from gradinv import data
from gradinv.attacks.objective import LaneObjective
from gradinv.client.update import client_update
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec
from gradinv.trial.run import run_trials
from gradinv.victims import Untrained
from sweep.cli.main import main

SPEC = TrialSpec(dataset="fashion-mnist", image_size=12, model="convnet", width=4, iterations=3, images=(3,))
READ = dataclasses.replace(SPEC, output_gradient="read")


def one_client(spec: TrialSpec, model: torch.nn.Module | None = None):
    model = model or Untrained(spec).model()
    images01, labels = data.load_images(spec.dataset, spec.images, image_size=spec.image_size)
    images = data.normalise(images01, spec.data_spec)
    return model, images, labels, client_update(model, images, labels, spec.fl_config())


def match_at_truth(spec: TrialSpec, labels_given: torch.Tensor, model=None) -> float:
    """The gradient cost of the true image, with ``labels_given`` as the attacker's labels."""
    model, images, _, update = one_client(spec, model)
    objective = LaneObjective(model, [update], labels_given[None], [spec.ig_config()])
    return objective.match(images[None]).item()


def test_the_read_gradient_gives_the_sent_update_at_the_truth_without_the_label():
    _, _, labels, _ = one_client(SPEC)
    wrong = (labels + 1) % 10
    assert match_at_truth(SPEC, labels) < 1e-6  # the paper's attacker, told the label
    assert match_at_truth(SPEC, wrong) > 1e-2  # ... and told a wrong one
    assert match_at_truth(READ, wrong) < 1e-6  # reading dL/dz, the label plays no part


def test_a_victim_certain_to_float32s_floor_is_matched_exactly():
    """A margin of 60 logits: softmax's true-class entry rounds to 1, so the client's update is the other
    logit's gradient times exp(-60) and nothing of its own; the read gradient carries exactly that."""
    model, images, labels, _ = one_client(SPEC)
    with torch.no_grad():
        logits = model(images)
        model[-1].bias += 60 * torch.nn.functional.one_hot(labels, 10)[0] - logits[0] + logits[0].mean()
    _, _, _, update = one_client(SPEC, model)
    bias = update.tensors[-1]
    assert bias[labels[0]] == 0 and 0 < bias.abs().max() < 1e-20
    assert match_at_truth(READ, labels, model) < 1e-6


def test_the_cost_under_l2_compares_the_read_gradient_unscaled():
    l2 = dataclasses.replace(READ, cost="l2")
    _, _, labels, _ = one_client(l2)
    assert match_at_truth(l2, labels) < 1e-12


def test_packed_lanes_match_their_single_runs():
    specs = [dataclasses.replace(READ, images=(i,), tv=tv) for i, tv in ((1, 1e-4), (2, 1e-3))]
    packed = run_trials(specs)
    alone = [run_trials([spec])[0] for spec in specs]
    for together, single in zip(packed, alone):
        assert together.metrics["psnr"] == pytest.approx(single.metrics["psnr"], abs=1e-3)


def test_a_one_step_attacker_reads_a_fedavg_update_of_small_steps_nearly_exactly():
    """Three local steps sum three nearly equal output gradients into the bias gradient: at the paper's local
    lr (1e-4) the one-step attacker's update at the truth is the sent one to float32's noise; at 0.1 the
    steps move the model, and the approximation shows."""
    costs = {}
    for lr in (1e-4, 1e-1):
        spec = dataclasses.replace(READ, fl="fedavg", local_steps=3, local_lr=lr, attacker_local_steps=1)
        _, _, labels, _ = one_client(spec)
        costs[lr] = match_at_truth(spec, labels)
    assert costs[1e-4] < 1e-5 and costs[1e-1] > 1e-2
    one = dataclasses.replace(READ, fl="fedavg", local_steps=1, local_lr=1e-1)  # a client of one step: exact
    assert match_at_truth(one, one_client(one)[2]) < 1e-6


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"fl": "fedavg", "local_steps": 2}, "fl is fedavg with 2 local steps"),
        ({"fl": "fedavg", "local_steps": 2, "attacker_local_steps": 2}, "fl is fedavg with 2 local steps"),
        ({"images": (0, 1)}, "holds 2 images"),
        ({"images": (0, 1), "aggregated_clients": 2}, "holds 2 images"),
        ({"dp_clip": 1.0, "dp_noise": 0.1}, "dp_clip is 1.0"),
    ],
)
def test_read_is_refused_where_the_bias_gradient_sums_several_images_or_steps(settings, named):
    with pytest.raises(ConfigError) as refused:
        dataclasses.replace(READ, **settings)
    assert (
        refused.value.field == "output_gradient"
        and named in str(refused.value)
        and "use computed" in str(refused.value)
    )


def test_a_model_without_a_linear_classifier_is_refused_in_one_line():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 12), torch.nn.Flatten())
    _, images, labels, update = one_client(READ, model)
    with pytest.raises(ConfigError) as refused:
        LaneObjective(model, [update], labels[None], [READ.ig_config()])
    assert refused.value.field == "output_gradient" and "use output_gradient computed" in str(refused.value)


def test_the_cli_refuses_an_unknown_value(tmp_path, capsys):
    assert main(["attack", "--output-gradient", "guessed", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_gradient: " in err[0] and not (tmp_path / "out").exists()


def test_the_default_keeps_every_key():
    assert TrialSpec().non_default() == {} and "output_gradient" in TrialSpec(output_gradient="read").non_default()
