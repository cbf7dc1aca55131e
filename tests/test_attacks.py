"""The attack library on tiny shapes: exact analytic results, label recovery, IG and DLG bars."""

import dataclasses

import pytest
import torch
from torch.func import grad_and_value

from gradinv import data, metrics
from gradinv.attacks.analytic import first_linear_input
from gradinv.attacks.inverting import IGConfig, invert_gradients
from gradinv.attacks.labels import batch_labels, idlg_label
from gradinv.fl import FLConfig, client_update, minibatch_schedule, model_state, parameter_update
from gradinv.trial import TrialSpec, build_victim, run_trials

SMALL = TrialSpec(dataset="fashion-mnist", image_size=16, model="convnet", width=8, iterations=200, tv=1e-4)


def client(spec: TrialSpec):
    model = build_victim(spec)
    images01, labels = data.load_images(spec.dataset, spec.images, image_size=spec.image_size)
    images = data.normalise(images01, spec.data_spec)
    return model, images, labels, client_update(model, images, labels, spec.fl_config())


def test_analytic_attack_recovers_mlp_input_exactly():
    spec = TrialSpec(dataset="fashion-mnist", images=(3,), model="mlp", width=32, attack="analytic")
    model, images, _, update = client(spec)
    recovered = first_linear_input(model, update)
    assert (recovered - images.flatten()).abs().max() < 1e-4
    outcome = run_trials([spec])[0]
    assert outcome.metrics["psnr"] > 60


def test_idlg_recovers_every_single_image_label():
    spec = dataclasses.replace(SMALL, width=4)
    model = build_victim(spec)
    images01, labels = data.load_images(spec.dataset, tuple(range(50)), image_size=16)
    images = data.normalise(images01, spec.data_spec)
    found = [idlg_label(client_update(model, images[i : i + 1], labels[i : i + 1], FLConfig()), 10) for i in range(50)]
    assert found == labels.tolist()


@pytest.mark.parametrize("batch, bar", [(4, 1.0), (8, 0.75)])
def test_batch_label_recovery(batch, bar):
    accuracies = []
    for start in range(0, 4 * batch, batch):
        spec = dataclasses.replace(SMALL, images=tuple(range(start, start + batch)))
        _, _, labels, update = client(spec)
        accuracies.append(metrics.label_accuracy(batch_labels(update, 10), labels))
    assert sum(accuracies) / len(accuracies) >= bar


FEDAVG_SETTINGS = [
    dict(local_steps=1),
    dict(local_steps=5, local_lr=1e-4),
    dict(local_steps=3, local_lr=0.05, local_batch_size=2, data_order_seed=7),
    dict(local_steps=4, local_lr=0.1, local_batch_size=3),  # a ragged last mini-batch
]


@pytest.mark.parametrize("settings", FEDAVG_SETTINGS)
def test_attacker_unrolls_the_clients_update_exactly(settings):
    spec = dataclasses.replace(SMALL, images=(0, 1, 2, 3), fl="fedavg", **settings)
    model, images, labels, update = client(spec)
    params, buffers = model_state(model)
    schedule = minibatch_schedule(len(images), update.fl)

    def attacker(x):  # the same path the attack differentiates through
        guess = parameter_update(model, params, buffers, x, labels, update.fl, schedule)
        return sum(g.sum() for g in guess), guess

    _, (_, unrolled) = grad_and_value(attacker, has_aux=True)(images)
    assert max((a - b).abs().max().item() for a, b in zip(unrolled, update.tensors)) < 1e-6


def test_minibatch_schedule_covers_each_image_once_per_epoch():
    schedule = minibatch_schedule(5, FLConfig("fedavg", local_steps=6, local_batch_size=2, data_order_seed=3))
    first_epoch = torch.cat(schedule[:3]).sort().values
    second_epoch = torch.cat(schedule[3:]).sort().values
    assert first_epoch.tolist() == second_epoch.tolist() == [0, 1, 2, 3, 4]


def test_inverting_gradients_reconstructs_a_small_face():
    spec = TrialSpec(dataset="faces", model="convnet", width=8, iterations=300)
    outcome = run_trials([spec])[0]
    assert outcome.status == "ok"
    assert outcome.metrics["psnr"] > 16  # 17.8 dB measured; random images score about 11
    assert outcome.metrics["label_accuracy"] == 1.0
    assert len(outcome.curve) == 8 and outcome.curve[-1][0] == spec.iterations
    assert outcome.curve[-1][1] < outcome.curve[0][1]


def test_same_trial_gives_identical_numbers():
    spec = dataclasses.replace(SMALL, iterations=40, restarts=2, fl="fedavg", local_steps=2)
    first, second = run_trials([spec])[0], run_trials([spec])[0]
    assert first.metrics == second.metrics
    assert first.restart_scores == second.restart_scores


def test_restart_winner_is_lowest_gradient_cost_and_nan_never_wins():
    spec = dataclasses.replace(SMALL, iterations=30)
    model, images, labels, update = client(spec)
    box = data.pixel_box(spec.data_spec, images)
    good = invert_gradients(model, [update], labels[None], [IGConfig(30, 3, 1e-4, 0.1)], [0], box, images.shape)
    assert good.restart_scores.shape == (1, 3)
    poisoned = dataclasses.replace(update, tensors=tuple(t * float("nan") for t in update.tensors))
    both = invert_gradients(model, [update, poisoned], torch.stack([labels, labels]),
                            [IGConfig(30, 3, 1e-4, 0.1)] * 2, [0, 0], box, images.shape)  # fmt: skip
    assert torch.isinf(both.restart_scores[1]).all()
    assert torch.isfinite(both.restart_scores[0]).all()
    assert torch.isfinite(both.images[0]).all()


@pytest.mark.parametrize("labels", ["known", "recovered"])
def test_dlg_recovers_a_tiny_face(labels):
    spec = TrialSpec(dataset="faces", images=(0,), image_size=8, model="lenet-zhu", width=12, attack="dlg",
                     iterations=100, lr=1.0, labels=labels)  # fmt: skip
    outcome = run_trials([spec])[0]
    assert outcome.status == "ok"
    assert outcome.metrics["psnr"] > 30  # 45-78 dB measured
    assert outcome.metrics["label_accuracy"] == 1.0


def test_unrolling_attacker_beats_one_that_assumes_fedsgd():
    spec = TrialSpec(dataset="faces", images=(0, 1, 2, 3), model="convnet", width=8, fl="fedavg", local_steps=4,
                     local_lr=0.1, local_batch_size=2, iterations=150)  # fmt: skip
    model, images, labels, update = client(spec)
    box = data.pixel_box(spec.data_spec, images)
    as_gradient = dataclasses.replace(update, tensors=tuple(-t for t in update.tensors), fl=FLConfig())
    scores = []
    for assumed in (update, as_gradient):
        result = invert_gradients(model, [assumed], labels[None], [spec.ig_config()], [0], box, images.shape)
        recon = data.denormalise(result.images[0], spec.data_spec).clamp(0, 1)
        truth = data.denormalise(images, spec.data_spec)
        scores.append(metrics.psnr(recon[metrics.match_to_truth(recon, truth)], truth).mean().item())
    unrolled, assumed_fedsgd = scores
    assert unrolled > assumed_fedsgd + 0.5


def test_metrics_on_known_answers():
    truth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(metrics.psnr(truth, truth)).all()
    assert torch.allclose(metrics.ssim(truth, truth), torch.ones(3))
    assert metrics.psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)).item() == pytest.approx(20.0)
    shuffled = truth[[2, 0, 1]]
    assert torch.equal(shuffled[metrics.match_to_truth(shuffled, truth)], truth)
    assert metrics.label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 3])) == pytest.approx(2 / 3)
