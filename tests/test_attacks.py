"""The attack library on tiny shapes: exact analytic results, label recovery, IG and DLG bars.

Bars on optimised results are medians over several images (an optimiser's trajectory amplifies
last-bit differences between CPUs, kernels and thread counts), set from the spread that
``benchmarks/portability.py`` measures; each runs once more with the attack disabled (one iteration,
or an update that carries nothing about the images), where the same bar must fail.
"""

import dataclasses
import statistics

import pytest
import torch
from torch.func import grad_and_value

from gradinv import baselines, data, metrics
from gradinv.attacks.analytic import first_linear_input
from gradinv.attacks.inverting import invert_gradients
from gradinv.attacks.labels import batch_labels, idlg_label
from gradinv.attacks.objective import IGConfig
from gradinv.client.update import client_update, minibatch_schedule, model_state, parameter_update
from gradinv.parameters import ClientSettings
from gradinv.trial import TrialSpec, run_trials
from gradinv.victims import Untrained

SMALL = TrialSpec(dataset="fashion-mnist", image_size=16, model="convnet", width=8, iterations=200, tv=1e-4)


def client(spec: TrialSpec):
    model = Untrained(spec).model()
    images01, labels = data.load_images(spec.dataset, spec.images, image_size=spec.image_size)
    images = data.normalise(images01, spec.data_spec)
    return model, images, labels, client_update(model, images, labels, spec.fl_config())


def random_update(update):
    """An update of the same shapes that carries nothing about the client's images: a control."""
    generator = torch.Generator().manual_seed(0)
    return dataclasses.replace(update, tensors=tuple(torch.randn(t.shape, generator=generator) for t in update.tensors))


def mean_psnr(spec: TrialSpec, reconstruction: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR on [0, 1] pixels of normalised images, each matched to its truth as scoring does."""
    recon = data.denormalise(reconstruction, spec.data_spec).clamp(0, 1)
    truth = data.denormalise(images, spec.data_spec)
    return metrics.psnr(recon[metrics.match_to_truth(recon, truth)], truth).mean().item()


def gains_over_guessing(outcomes) -> list[float]:
    """Each one-image trial's PSNR above the best guess made from the data alone (gradinv.baselines):
    what the update leaked, not what any picture of a face would score."""
    gains = []
    for outcome in outcomes:
        spec = outcome.spec
        _, labels = data.load_images(spec.dataset, spec.images, image_size=spec.image_size)
        pool = baselines.BaselinePool.for_dataset(spec.dataset, spec.image_size)
        guessed = baselines.score_baselines(pool.guesses(labels), outcome.truth)[0]["baseline_psnr"]
        gains.append(outcome.metrics["psnr"] - guessed)
    return gains


ATTACK_OR_CONTROL = pytest.mark.parametrize("attack", [True, False], ids=["attack", "disabled"])


@pytest.mark.numeric
@ATTACK_OR_CONTROL
def test_analytic_attack_recovers_mlp_input_exactly(attack, bars):
    spec = TrialSpec(dataset="fashion-mnist", images=(3,), model="mlp", width=32, attack="analytic")
    model, images, _, update = client(spec)
    recovered = first_linear_input(model, update if attack else random_update(update)).view_as(images)
    bars.below("analytic MLP: largest pixel error", (recovered - images).abs().max().item(), 1e-4, holds=attack)
    if attack:
        bars.at_least("analytic MLP: PSNR [dB]", run_trials([spec])[0].metrics["psnr"], 60)
    else:
        bars.at_least("analytic MLP: PSNR [dB]", mean_psnr(spec, recovered, images), 60, holds=False)


def test_idlg_recovers_every_single_image_label():
    spec = dataclasses.replace(SMALL, width=4)
    model = Untrained(spec).model()
    images01, labels = data.load_images(spec.dataset, tuple(range(50)), image_size=16)
    images = data.normalise(images01, spec.data_spec)
    updates = [client_update(model, images[i : i + 1], labels[i : i + 1], ClientSettings()) for i in range(50)]
    found = [idlg_label(update, 10) for update in updates]
    assert found == labels.tolist()


@pytest.mark.numeric
@ATTACK_OR_CONTROL
@pytest.mark.parametrize("batch, bar", [(4, 1.0), (8, 0.75)])
def test_batch_label_recovery(batch, bar, attack, bars):
    accuracies = []
    for start in range(0, 4 * batch, batch):
        spec = dataclasses.replace(SMALL, images=tuple(range(start, start + batch)))
        _, _, labels, update = client(spec)
        found = batch_labels(update if attack else random_update(update), 10)
        accuracies.append(metrics.label_accuracy(found, labels))
    bars.at_least(f"batch of {batch}: mean label accuracy", statistics.mean(accuracies), bar, holds=attack)


FEDAVG_SETTINGS = [
    dict(local_steps=1),
    dict(local_steps=5, local_lr=1e-4),
    dict(local_steps=3, local_lr=0.05, local_batch_size=2, data_order_seed=7),
    dict(local_steps=4, local_lr=0.1, local_batch_size=3),  # a ragged last mini-batch
    dict(local_steps=3, local_lr=0.05, local_momentum=0.9, local_batch_size=2),
]


@pytest.mark.numeric
@pytest.mark.parametrize("settings", FEDAVG_SETTINGS)
def test_attacker_unrolls_the_clients_update_exactly(settings, bars):
    spec = dataclasses.replace(SMALL, images=(0, 1, 2, 3), fl="fedavg", **settings)
    model, images, labels, update = client(spec)
    params, buffers = model_state(model)
    schedule = minibatch_schedule(len(images), update.fl)

    def attacker(x):  # the same path the attack differentiates through
        guess = parameter_update(model, params, buffers, x, labels, update.fl, schedule)
        return sum(g.sum() for g in guess), guess

    _, (_, unrolled) = grad_and_value(attacker, has_aux=True)(images)
    difference = max((a - b).abs().max().item() for a, b in zip(unrolled, update.tensors))
    bars.below("FedAvg unrolled by the attacker vs the client's update, largest difference", difference, 1e-6)


def test_local_momentum_is_torch_sgds():
    spec = dataclasses.replace(
        SMALL, images=(0, 1, 2, 3), fl="fedavg", local_steps=3, local_lr=0.05, local_momentum=0.9, local_batch_size=2
    )
    model, images, labels, update = client(spec)
    reference = dataclasses.replace(update.fl, local_momentum=0.0)
    assert not torch.allclose(update.tensors[0], client_update(model, images, labels, reference).tensors[0])
    start = [p.detach().clone() for p in model.parameters()]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for indices in minibatch_schedule(len(images), update.fl):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(images[indices]), labels[indices]).backward()
        optimiser.step()
    steps = [p.detach() - s for p, s in zip(model.parameters(), start)]
    assert max((a - b).abs().max().item() for a, b in zip(steps, update.tensors)) < 1e-6


def test_minibatch_schedule_covers_each_image_once_per_epoch():
    schedule = minibatch_schedule(5, ClientSettings(fl="fedavg", local_steps=6, local_batch_size=2, data_order_seed=3))
    first_epoch = torch.cat(schedule[:3]).sort().values
    second_epoch = torch.cat(schedule[3:]).sort().values
    assert first_epoch.tolist() == second_epoch.tolist() == [0, 1, 2, 3, 4]


def small_faces(seeds: list[int], iterations: int):
    """IG on one 16x16 face per client, packed as lanes; each image attacked with its own seed."""
    specs = [
        TrialSpec(
            dataset="faces",
            images=(image,),
            image_size=16,
            model="convnet",
            width=16,
            iterations=iterations,
            attack_seed=seed,
        )
        for image, seed in enumerate(seeds)
    ]
    return run_trials(specs)


@pytest.mark.numeric
@ATTACK_OR_CONTROL
def test_inverting_gradients_reconstructs_small_faces(attack, bars):
    seeds = bars.seeds(5)
    start = small_faces(seeds, iterations=1)  # its curve holds each lane's cost at its starting image
    outcomes = small_faces(seeds, iterations=300) if attack else start
    assert all(o.status == "ok" and o.metrics["label_accuracy"] == 1.0 for o in outcomes)
    if attack:
        assert all(len(o.curve) == 8 and o.curve[-1][0] == 300 for o in outcomes)
    gain = statistics.median(gains_over_guessing(outcomes))
    bars.at_least("IG small faces: median PSNR above the data-only guess [dB]", gain, 1.5, holds=attack)
    # The curve holds the best restart's cost at each checkpoint, not the best so far, and it need not
    # fall from one checkpoint to the next; its minimum is what the attack reached, against its start.
    reached = [min(cost for _, cost in o.curve) / s.curve[0][1] for o, s in zip(outcomes, start)]
    bars.below("IG small faces: median best cost / starting cost", statistics.median(reached), 0.5, holds=attack)
    bars.below("IG small faces: largest best cost / starting cost", max(reached), 1.0, holds=attack)


def test_same_trial_gives_identical_numbers():
    spec = dataclasses.replace(SMALL, iterations=40, restarts=2, fl="fedavg", local_steps=2)
    first, second = run_trials([spec])[0], run_trials([spec])[0]
    assert first.metrics == second.metrics
    assert first.restart_scores == second.restart_scores


def test_restart_winner_is_lowest_gradient_cost_and_nan_never_wins():
    spec = dataclasses.replace(SMALL, iterations=30)
    model, images, labels, update = client(spec)
    box = data.pixel_box(spec.data_spec, images)
    good = invert_gradients(
        model, [update], labels[None], [IGConfig(iterations=30, restarts=3, tv=1e-4, lr=0.1)], [0], box, images.shape
    )
    assert good.restart_scores.shape == (1, 3)
    poisoned = dataclasses.replace(update, tensors=tuple(t * float("nan") for t in update.tensors))
    both = invert_gradients(
        model,
        [update, poisoned],
        torch.stack([labels, labels]),
        [IGConfig(iterations=30, restarts=3, tv=1e-4, lr=0.1)] * 2,
        [0, 0],
        box,
        images.shape,
    )
    assert torch.isinf(both.restart_scores[1]).all()
    assert torch.isfinite(both.restart_scores[0]).all()
    assert torch.isfinite(both.images[0]).all()


@pytest.mark.numeric
@ATTACK_OR_CONTROL
@pytest.mark.parametrize("labels", ["known", "recovered"])
def test_dlg_recovers_tiny_faces(labels, attack, bars):
    # L-BFGS settles in whichever basin last-bit differences pick: per image, anything from below the
    # data-only guess to 80 dB. The median over nine faces is the bar.
    specs = [
        TrialSpec(
            dataset="faces",
            images=(image,),
            image_size=8,
            model="lenet-zhu",
            width=48,
            attack="dlg",
            iterations=100 if attack else 1,
            lr=1.0,
            labels=labels,
            attack_seed=seed,
        )
        for image, seed in enumerate(bars.seeds(9))
    ]
    outcomes = run_trials(specs)
    assert all(o.status == "ok" for o in outcomes)
    gain = statistics.median(gains_over_guessing(outcomes))
    bars.at_least(f"DLG {labels} labels: median PSNR above the data-only guess [dB]", gain, 5, holds=attack)
    if labels == "recovered":
        accuracy = statistics.mean(o.metrics["label_accuracy"] for o in outcomes)
        bars.at_least("DLG recovered labels: mean label accuracy", accuracy, 1.0, holds=attack)


def test_dlg_lanes_side_by_side_equal_each_alone_and_report_checkpoints():
    specs = [
        TrialSpec(
            dataset="faces",
            images=(image,),
            image_size=8,
            model="lenet-zhu",
            width=8,
            attack="dlg",
            iterations=16,
            lr=1.0,
            attack_seed=image,
        )
        for image in (0, 1)
    ]
    checkpoints = []
    together = run_trials(specs, on_checkpoint=lambda i, costs, quality: checkpoints.append((i, costs, quality)))
    alone = [run_trials([spec])[0] for spec in specs]
    for both, one in zip(together, alone):
        assert torch.equal(both.reconstruction, one.reconstruction)  # the lanes do not interact
    assert [i for i, _, _ in checkpoints] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert all(len(costs) == len(quality) == 2 for _, costs, quality in checkpoints)
    assert checkpoints[-1][2][0][0] == pytest.approx(together[0].metrics["psnr"])  # the last checkpoint is the result


def test_a_stalled_dlg_lane_stops_stepping_with_the_images_it_would_end_with(monkeypatch):
    # On a ReLU ConvNet L-BFGS's line search soon finds no step; from then on every step repeats the last.
    spec = TrialSpec(dataset="faces", images=(0,), image_size=8, model="convnet", width=4, attack="dlg", iterations=40)
    steps = []
    real_step = torch.optim.LBFGS.step
    monkeypatch.setattr(torch.optim.LBFGS, "step", lambda self, closure: steps.append(1) or real_step(self, closure))
    settled = run_trials([spec])[0]
    assert len(steps) < 40  # it stopped early
    monkeypatch.setattr(
        "gradinv.attacks.dlg._Lane.settled", property(lambda self: False, lambda self, value: None), raising=False
    )
    steps.clear()
    every_step = run_trials([spec])[0]
    assert len(steps) == 40 and torch.equal(settled.reconstruction, every_step.reconstruction)


@pytest.mark.numeric
@ATTACK_OR_CONTROL
def test_unrolling_attacker_beats_one_that_assumes_fedsgd(attack, bars):
    spec = TrialSpec(
        dataset="faces",
        images=(0, 1, 2, 3),
        model="convnet",
        width=8,
        fl="fedavg",
        local_steps=4,
        local_lr=0.1,
        local_batch_size=2,
        iterations=150 if attack else 1,
    )
    model, images, labels, update = client(spec)
    box = data.pixel_box(spec.data_spec, images)
    as_gradient = dataclasses.replace(update, tensors=tuple(-t for t in update.tensors), fl=ClientSettings())
    scores = []
    for assumed in (update, as_gradient):
        result = invert_gradients(model, [assumed], labels[None], [spec.ig_config()], bars.seeds(1), box, images.shape)
        scores.append(mean_psnr(spec, result.images[0], images))
    unrolled, assumed_fedsgd = scores
    bars.at_least("FedAvg: PSNR unrolled minus assuming FedSGD [dB]", unrolled - assumed_fedsgd, 3, holds=attack)


def test_metrics_on_known_answers():
    truth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(metrics.psnr(truth, truth)).all()
    assert torch.allclose(metrics.ssim(truth, truth), torch.ones(3))
    assert metrics.psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)).item() == pytest.approx(20.0)
    shuffled = truth[[2, 0, 1]]
    assert torch.equal(shuffled[metrics.match_to_truth(shuffled, truth)], truth)
    assert metrics.label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 3])) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# The reference's knobs as trial settings (tests/test_reference_parity.py checks their numbers)


def test_layers_take_named_sets_and_negative_indices_and_refuse_bad_ones(tmp_path, capsys):
    from gradinv.results.schema import trial_key
    from sweep.cli.main import main

    named = TrialSpec(layers="top10")
    assert named.ig_config().layers == "top10" and named.key_fields() == {"layer_set": "top10"}  # keyed as before
    assert trial_key(TrialSpec(layers="all")) == trial_key(TrialSpec())
    assert TrialSpec(layers=(0, -1)).ig_config().layers == (0, -1)
    for bad, message in [
        ((0, 34), "use indices from -34 to 33"),
        ((1, -33), "list each parameter tensor once"),
        ("last7", "give a list of indices or one of all, first4, "),
    ]:
        with pytest.raises(ValueError, match=message):
            TrialSpec(layers=bad)  # convnet: 34 parameter tensors
    assert main(["attack", "--layers", "0,x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers: '0,x'" in err[0] and not (tmp_path / "out").exists()


def test_new_settings_keep_keys_and_collapse_where_they_do_not_apply():
    assert TrialSpec().non_default() == {}
    base = TrialSpec(restarts=1)
    assert TrialSpec(restarts=1, scoring="tv", tol=0.1).resolved() == base.resolved()
    assert TrialSpec(optimizer="sgd", lr=0.5).resolved() == TrialSpec(optimizer="sgd").resolved()
    assert TrialSpec(batch_order="sequential").resolved() == base.resolved()  # FedSGD has no mini-batches
    sequential = TrialSpec(fl="fedavg", batch_order="sequential", local_batch_size=2, images=(0, 1, 2))
    assert dataclasses.replace(sequential, data_order_seed=5).resolved() == sequential.resolved()
    assert TrialSpec(attack="dlg", median_filter=True).resolved() == TrialSpec(attack="dlg").resolved()


@pytest.mark.parametrize("optimizer", ["sgd", "lbfgs"])
def test_packed_lanes_of_sgd_and_lbfgs_match_their_single_runs(optimizer):
    spec = dataclasses.replace(SMALL, images=(0,), optimizer=optimizer, signed=False, restarts=2, iterations=3)
    model, _, _, _ = client(spec)
    updates, labels = [], []
    for image in (0, 1):
        _, images, y, update = client(dataclasses.replace(spec, images=(image,)))
        updates.append(update)
        labels.append(y)
    box = data.pixel_box(spec.data_spec, images)
    configs = [spec.ig_config(), dataclasses.replace(spec.ig_config(), tv=1e-2)]
    packed = invert_gradients(model, updates, torch.stack(labels), configs, [0, 1], box, images.shape)
    for lane in (0, 1):
        alone = invert_gradients(
            model, updates[lane : lane + 1], labels[lane][None], configs[lane : lane + 1], [lane], box, images.shape
        )
        assert torch.allclose(packed.images[lane], alone.images[0], rtol=0, atol=1e-4)


def test_a_trial_records_its_unmatched_psnr():
    outcome = run_trials([dataclasses.replace(SMALL, images=(0, 1), iterations=3)])[0]
    assert len(outcome.per_image["psnr_unmatched"]) == 2
    assert outcome.metrics["psnr_unmatched"] == pytest.approx(statistics.mean(outcome.per_image["psnr_unmatched"]))
