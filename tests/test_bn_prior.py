"""GradInversion's BatchNorm prior and group consistency, and the client's train-mode BatchNorm, on tiny shapes."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import vmap

from gradinv.attacks import steps
from gradinv.attacks.bn_prior import BatchNormPrior, feature_distance, group_consistency
from gradinv.attacks.inverting import initial_images, invert_gradients
from gradinv.attacks.objective import IGConfig, LaneObjective, total_variation
from gradinv.client.defences import attacker_update
from gradinv.client.update import (
    aggregate,
    client_update,
    feature_statistics,
    minibatch_schedule,
    model_state,
)
from gradinv.errors import ConfigError
from gradinv.models import build_model
from gradinv.parameters import ClientSettings

BOX = (torch.full((3, 1, 1), -2.0), torch.full((3, 1, 1), 2.0))
FEDAVG = ClientSettings(fl="fedavg", local_steps=3, local_lr=0.05, local_batch_size=2, data_order_seed=7)


def convnet(norm: str = "batch") -> nn.Module:
    return build_model("convnet", channels=3, num_classes=4, image_size=8, width=4, norm=norm)


def batch(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 8, 8, generator=generator), torch.arange(size) % 4


def restarts(count: int):
    """``per_run`` for one lane of ``count`` restarts."""
    return lambda per_lane: per_lane.repeat_interleave(count, dim=0)


def buffers_of(model: nn.Module) -> dict:
    return {name: b.clone() for name, b in model.named_buffers()}


def test_the_prior_is_zero_at_the_batch_whose_statistics_are_the_targets_and_positive_elsewhere():
    model, (images, labels) = convnet(), batch()
    update = client_update(model, images, labels, ClientSettings(client_bn="train"))
    prior = BatchNormPrior(model, *model_state(model), [update], "batch", restarts(2))
    other, _ = batch(seed=1)
    at_truth, elsewhere = prior(torch.stack([images, other])).tolist()
    assert at_truth < 1e-5  # measured 0.0 (seeds 0-3)
    # another random batch, measured 1.47 to 1.61 (seeds 0-3)
    assert elsewhere > 0.5


def test_running_statistics_are_the_targets_of_a_model_whose_running_statistics_are_a_batchs():
    model, (images, labels) = convnet(), batch()
    params, buffers = model_state(model)
    with torch.no_grad():  # each layer's running statistics := this batch's, so eval forward = train forward
        for (_, norm), (mean, var) in zip(_norms(model), feature_statistics(model, params, buffers, images, "train")):
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
    prior = BatchNormPrior(
        model, *model_state(model), [client_update(model, images, labels, ClientSettings())], "running", restarts(2)
    )
    other, _ = batch(seed=1)
    at_truth, elsewhere = prior(torch.stack([images, other])).tolist()
    assert at_truth < 1e-4  # measured 0.0 (seeds 0-3)
    assert elsewhere > 0.5  # measured 1.47 to 1.61 (seeds 0-3)


def _norms(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


class TwoBlocks(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> linear, with a non-trivial first BN affine map."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv1, self.bn1 = nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)
            self.conv2, self.bn2 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
            self.head = nn.Linear(3 * 4 * 4, 4)
            with torch.no_grad():
                self.bn1.weight.uniform_(0.5, 1.5), self.bn1.bias.uniform_(-1, 1)

    def forward(self, x):
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x).flatten(1))


def by_hand(model: TwoBlocks, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The BatchNorm inputs' batch statistics, normalising with them as a train-mode client does."""
    stats = []
    h = model.conv1(x)
    for bn, conv in ((model.bn1, model.conv2), (model.bn2, None)):
        mean, var = h.mean(dim=(0, 2, 3)), ((h - h.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean(dim=(0, 2, 3))
        stats.append((mean, var))
        if conv is not None:
            normed = (h - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + bn.eps).sqrt()
            h = conv(torch.relu(normed * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)))
    return stats


@pytest.mark.parametrize(
    "fl", [ClientSettings(client_bn="train"), dataclasses.replace(FEDAVG, client_bn="train")], ids=["fedsgd", "fedavg"]
)
def test_the_client_records_its_first_batchs_batch_norm_input_statistics(fl):
    model = TwoBlocks().eval()
    images, labels = batch(size=5)
    update = client_update(model, images, labels, fl)
    first = images if fl.fl == "fedsgd" else images[minibatch_schedule(len(images), fl)[0]]
    with torch.no_grad():
        expected = by_hand(model, first)
    (recorded,) = update.bn_batch_stats
    assert len(recorded) == 2
    for (mean, var), (want_mean, want_var) in zip(recorded, expected):
        torch.testing.assert_close(mean, want_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(var, want_var, rtol=0, atol=1e-6)
    assert fl.fl == "fedsgd" or len(first) == 2  # FedAvg: the first mini-batch alone


@pytest.mark.parametrize("base", [ClientSettings(), FEDAVG], ids=["fedsgd", "fedavg"])
def test_train_mode_changes_the_update_and_the_attacker_unrolls_either_mode_exactly(base):
    model, (images, labels) = convnet(), batch()
    before = buffers_of(model)
    sent = {
        mode: client_update(model, images, labels, dataclasses.replace(base, client_bn=mode))
        for mode in ("eval", "train")
    }
    change = max((a - b).abs().max().item() for a, b in zip(sent["eval"].tensors, sent["train"].tensors))
    # largest coordinate change, measured 1.1 to 2.0 (FedSGD), 0.088 to 0.146 (FedAvg), seeds 0-3
    assert change > 1e-3
    params, buffers = model_state(model)
    for mode, update in sent.items():
        predict = attacker_update(IGConfig(), update)
        runs = torch.stack([images, images])  # under vmap, as the attack computes it
        unrolled = vmap(lambda x, predict=predict: predict(model, params, buffers, x, labels))(runs)
        worst = max((u - t).abs().max().item() for u, t in zip(unrolled, update.tensors))
        assert worst < 1e-6, (mode, worst)
    assert sent["eval"].bn_batch_stats is None
    after = buffers_of(model)  # the running statistics are read, never written; the model stays in eval
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(m.training for m in model.modules())


def test_a_zero_prior_and_a_single_restarts_group_weight_change_no_bit_of_the_attack():
    model, (images, labels) = convnet(), batch()
    update = client_update(model, images, labels, ClientSettings(client_bn="train"))

    def attack(**settings):
        config = IGConfig(iterations=6, **settings)
        return invert_gradients(model, [update], labels.unsqueeze(0), [config], [0], BOX, images.shape).images

    plain = attack()
    assert torch.equal(plain, attack(bn_prior=0.0, group_consistency=0.0))
    assert torch.equal(plain, attack(group_consistency=1.0))  # one restart: nothing to be consistent with
    assert not torch.equal(plain, attack(bn_prior=0.1, bn_stats="batch"))


def test_the_objective_is_the_gradient_cost_plus_tv_plus_the_weighted_priors():
    model, (images, labels) = convnet(), batch()
    update = client_update(model, images, labels, ClientSettings(client_bn="train"))
    x = torch.stack([batch(seed=s)[0] for s in (1, 2, 3, 4)])  # one lane, four restarts
    plain = LaneObjective(model, [update], labels.unsqueeze(0), [IGConfig(restarts=4)])
    priors = LaneObjective(
        model,
        [update],
        labels.unsqueeze(0),
        [IGConfig(restarts=4, bn_prior=0.2, bn_stats="batch", group_consistency=0.3)],
    )
    _, total, match = plain(x)
    assert torch.equal(total, match + plain.tv_weights * total_variation(x))
    _, with_priors, _ = priors(x)
    feature = BatchNormPrior(model, *model_state(model), [update], "batch", plain.per_run)(x)
    torch.testing.assert_close(with_priors, total + 0.2 * feature + 0.3 * group_consistency(x, 4))


def test_the_prior_batched_over_runs_equals_each_run_alone():
    model, (images, labels) = convnet(), batch()
    updates = [
        client_update(model, images, labels, ClientSettings(client_bn="train")),
        client_update(model, batch(seed=5)[0], labels, ClientSettings(client_bn="train")),
    ]
    x = torch.stack([batch(seed=s)[0] for s in range(4)])  # two lanes, two restarts each
    batched = BatchNormPrior(model, *model_state(model), updates, "batch", restarts(2))(x)
    alone = [
        BatchNormPrior(model, *model_state(model), [updates[r // 2]], "batch", lambda t: t)(x[r : r + 1])
        for r in range(4)
    ]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)
    params, buffers = model_state(model)
    exact = feature_distance(feature_statistics(model, params, buffers, x[3], "train"), updates[1].bn_batch_stats[0])
    torch.testing.assert_close(batched[3], exact, rtol=1e-5, atol=1e-5)


def test_under_secure_aggregation_each_clients_group_meets_its_own_statistics():
    model, (images, labels) = convnet(), batch()
    fl = ClientSettings(client_bn="train")
    sent = aggregate(
        [client_update(model, images[:2], labels[:2], fl), client_update(model, images[2:], labels[2:], fl)]
    )
    assert len(sent.bn_batch_stats) == 2
    prior = BatchNormPrior(model, *model_state(model), [sent], "batch", restarts(2))
    swapped = torch.cat([images[2:], images[:2]])
    at_truth, groups_swapped = prior(torch.stack([images, swapped])).tolist()
    assert at_truth < 1e-5  # measured 0.0 (seeds 0-3)
    assert groups_swapped > 0.5  # the groups' images swapped between clients: measured 3.5 to 4.1 (seeds 0-3)


def test_group_consistency_pulls_the_restarts_together():
    model, (images, labels) = convnet(), batch()
    update = client_update(model, images, labels, ClientSettings(client_bn="train"))
    apart, together = (restart_spread(model, update, labels, weight) for weight in (0.0, 10.0))
    # measured (seeds 0-3): 26.5 to 28.6 apart, 1.41 to 1.45 together
    assert together < 0.5 * apart


def restart_spread(model, update, labels, weight: float, iterations: int = 30) -> float:
    """The restarts' mean L2 distance to their mean after ``iterations`` of the attack's own Adam steps
    (run by hand: the attack's result keeps one image per lane)."""
    config = IGConfig(iterations=iterations, restarts=3, group_consistency=weight)
    objective = LaneObjective(model, [update], labels.unsqueeze(0), [config])
    step = steps.adam(objective, torch.full((config.restarts, 1, 1, 1, 1), config.lr), steps.Direction(config.signed))
    x = initial_images((4, 3, 8, 8), config.restarts, config.init, 0)
    for iteration in range(iterations):
        x, _ = step(x, iteration, 1.0, 0.0)
    return group_consistency(x, config.restarts).mean().item()


def test_misconfigurations_are_refused_with_the_fix():
    model, (images, labels) = convnet(), batch()
    eval_update = client_update(model, images, labels, ClientSettings())
    with pytest.raises(ConfigError, match="client_bn train"):
        BatchNormPrior(model, *model_state(model), [eval_update], "batch", lambda t: t)
    plain = convnet(norm="group")
    with pytest.raises(ConfigError, match="no BatchNorm"):
        BatchNormPrior(
            plain, *model_state(plain), [client_update(plain, images, labels, ClientSettings())], "running", lambda t: t
        )
    with pytest.raises(ConfigError, match="L-BFGS"):
        IGConfig(restarts=2, optimizer="lbfgs", group_consistency=0.1)


@pytest.mark.parametrize(
    "settings, line",
    [
        (
            dict(bn_prior=0.1, bn_stats="batch"),
            "bn_stats: 'batch' is not valid; a client batch's own statistics exist only "
            "when it runs BatchNorm in train mode: set client_bn train",
        ),
        (
            dict(client_bn="train", dp_clip=1.0),
            "client_bn: 'train' is not valid; DP-SGD here runs BatchNorm in eval mode "
            "(Opacus' per-example gradients); use eval",
        ),
    ],
)
def test_a_trial_refuses_settings_that_contradict_the_clients_batch_norm(settings, line):
    from gradinv.trial import TrialSpec

    with pytest.raises(ConfigError) as error:
        TrialSpec(**settings)
    assert str(error.value) == line
