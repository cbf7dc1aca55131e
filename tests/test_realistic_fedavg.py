"""The realistic FedAvg attacker (Dimitrov et al., "Data Leakage in Federated Averaging", TMLR 2022): an
attacker that does not know the client's mini-batch order (``attacker_order: unknown``), its local learning
rate (``attacker_local_lr``) or its step count (``attacker_local_steps``); with ``epoch_prior`` each local
epoch unrolls candidates of its own, tied by the order-invariant epoch prior. The defaults keep the
attacker that knows all three, bit for bit and key for key."""

import pytest
import torch

from gradinv.attacks.epoch_prior import EpochCandidates
from gradinv.attacks.objective import IGConfig
from gradinv.client.defences import attacker_update
from gradinv.client.update import client_update, minibatch_schedule, model_state
from gradinv.errors import ConfigError
from gradinv.parameters import ClientSettings, DefenceSettings
from gradinv.results.schema import parameter_columns, trial_key
from gradinv.trial.run import run_trials
from gradinv.trial.spec import TrialSpec

IMAGES, CLASSES = 4, 3
FEDAVG = {"fl": "fedavg", "local_lr": 0.5}  # a large step: a wrong order shows far above float rounding
TINY_UNKNOWN_ORDER = dict(  # a trial of two shuffled epochs in an unknown order, small enough to run at once
    dataset="faces",
    images=(0, 1, 2, 3),
    image_size=8,
    width=2,
    iterations=4,
    fl="fedavg",
    local_steps=4,
    local_batch_size=2,
    local_lr=0.1,
    attacker_order="unknown",
)


@pytest.fixture(scope="module")
def client():
    """A small nonlinear model and four 4x4 images with labels 0, 1, 2, 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, CLASSES)
    ).eval()
    return model, torch.randn(IMAGES, 1, 4, 4), torch.tensor([0, 1, 2, 0])


def predicted(model, images, labels, fl: ClientSettings, attacker: dict | None = None) -> tuple:
    """The client's true update, and the attacker's prediction at ``images`` (its own ``attacker_*``
    beliefs in ``attacker``; the client trains by ``fl`` alone)."""
    sent = client_update(model, images, labels, fl)
    believed = ClientSettings(**{**fl.__dict__, **(attacker or {})})
    predict = attacker_update(DefenceSettings(), type(sent)(sent.tensors, believed, sent.num_images))
    return sent.tensors, predict(model, *model_state(model), images, labels)


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def gap(a: tuple, b: tuple) -> float:
    """The largest coordinate difference relative to the update's largest coordinate."""
    scale = max(x.abs().max().item() for x in a)
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) / scale


def test_the_default_attacker_knows_the_order_and_predicts_the_sent_update_exactly(client):
    fl = ClientSettings(**FEDAVG, local_steps=4, local_batch_size=2)  # two epochs of shuffled pairs
    sent, known = predicted(*client, fl)
    assert same(sent, known)
    _, explicit = predicted(*client, fl, {"attacker_order": "known", "attacker_local_lr": None})
    assert same(explicit, known)


def test_over_two_shuffled_epochs_the_unknown_order_attacker_misses_the_update_at_the_true_images(client):
    fl = ClientSettings(**FEDAVG, local_steps=4, local_batch_size=2)
    schedule = [batch.tolist() for batch in minibatch_schedule(IMAGES, fl)]
    assert schedule == [[0, 1], [3, 2], [0, 2], [3, 1]]  # epoch 2 pairs the images otherwise than index order
    sent, unknown = predicted(*client, fl, {"attacker_order": "unknown"})  # [0, 1], [2, 3], [0, 1], [2, 3]
    assert gap(sent, unknown) > 0.05


def test_within_one_epoch_an_unknown_order_is_a_relabelling_of_the_candidates(client):
    """One epoch: the unknown-order attacker's slices hold the client's batches when its candidates stand
    in the client's order, so the true images so arranged give the true update (up to rounding: a batch's
    mean loss does not depend on the order inside it)."""
    model, images, labels = client
    fl = ClientSettings(**FEDAVG, local_steps=2, local_batch_size=2, data_order_seed=1)
    order = torch.cat(minibatch_schedule(IMAGES, fl))
    assert order.tolist() == [1, 3, 2, 0]  # pairs {1, 3} and {0, 2}, not the index order's {0, 1} and {2, 3}
    sent, in_index_order = predicted(model, images, labels, fl, {"attacker_order": "unknown"})
    assert gap(sent, in_index_order) > 0.05
    _, arranged = predicted(model, images[order], labels[order], fl, {"attacker_order": "unknown"})
    assert gap(sent, arranged) < 1e-6
    _, known = predicted(model, images[order], labels[order], fl)  # the known order, at the wrong positions
    assert gap(sent, known) > 0.05


def test_one_batch_of_every_image_needs_no_order(client):
    for batch in (0, IMAGES):
        fl = ClientSettings(**FEDAVG, local_steps=1, local_batch_size=batch)
        sent, known = predicted(*client, fl)
        _, unknown = predicted(*client, fl, {"attacker_order": "unknown"})
        assert same(known, unknown) and same(sent, unknown)


def test_a_guessed_learning_rate_equal_to_the_true_one_is_the_known_case(client):
    fl = ClientSettings(**FEDAVG, local_steps=4, local_batch_size=2)
    sent, guessed = predicted(*client, fl, {"attacker_local_lr": fl.local_lr, "attacker_local_steps": 4})
    assert same(sent, guessed)


def test_a_wrong_guess_predicts_the_training_it_guessed(client):
    model, images, labels = client
    one_step = ClientSettings(**FEDAVG)  # one full-batch step: the update is -lr * gradient
    sent, doubled = predicted(model, images, labels, one_step, {"attacker_local_lr": 2 * one_step.local_lr})
    # theta_1 - theta_0 in float32: rounding of the order of a weight's ulp
    assert all(torch.allclose(d, 2 * s, rtol=1e-5, atol=1e-6) for d, s in zip(doubled, sent))
    two_steps = ClientSettings(**FEDAVG, local_steps=2, local_batch_size=2)
    sent, first_only = predicted(model, images, labels, two_steps, {"attacker_local_steps": 1})
    first_step = client_update(model, images, labels, ClientSettings(**FEDAVG, local_batch_size=2)).tensors
    assert same(first_only, first_step) and gap(sent, first_only) > 0.1


def test_the_defaults_keep_every_trial_key_and_inapplicable_beliefs_collapse():
    base = dict(fl="fedavg", images=(0, 1, 2, 3), local_steps=4, local_batch_size=2)
    today = TrialSpec(**base)
    assert today.key_fields() == {"images": [0, 1, 2, 3], "fl": "fedavg", "local_steps": 4, "local_batch_size": 2}
    explicit = TrialSpec(**base, attacker_order="known", attacker_local_lr=None, attacker_local_steps=None)
    assert trial_key(explicit) == trial_key(today)
    order_free = (  # where no order can be missed: full batches, the reference's fixed slices, FedSGD
        TrialSpec(**{**base, "local_batch_size": 0}, attacker_order="unknown"),
        TrialSpec(**base, batch_order="sequential", attacker_order="unknown"),
        TrialSpec(images=(0, 1), attacker_order="unknown", attacker_local_lr=0.1, attacker_local_steps=2),
    )
    for spec in order_free:
        assert not {"attacker_order", "attacker_local_lr", "attacker_local_steps"} & set(spec.key_fields())
    realistic = TrialSpec(**base, attacker_order="unknown", attacker_local_lr=1e-3, attacker_local_steps=2)
    assert realistic.key_fields() == {
        **today.key_fields(),
        "attacker_order": "unknown",
        "attacker_local_lr": 1e-3,
        "attacker_local_steps": 2,
    }


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("attacker_order", "guessed", "choose one of known, unknown"),
        ("attacker_local_lr", 0.0, "use a positive learning rate"),
        ("attacker_local_lr", -1e-4, "use a positive learning rate"),
        ("attacker_local_lr", float("inf"), "use a finite number"),
        ("attacker_local_steps", 0, "use at least 1 step"),
    ],
)
def test_a_bad_belief_is_one_line_naming_field_value_and_fix(field, value, fix):
    with pytest.raises(ConfigError) as refused:
        TrialSpec(fl="fedavg", **{field: value})
    message = str(refused.value)
    assert field in message and str(value) in message and fix in message and "\n" not in message


def test_rows_record_what_the_attacker_knew():
    spec = TrialSpec(**TINY_UNKNOWN_ORDER, attacker_local_lr=0.05)
    columns = parameter_columns(spec)
    assert (columns["attacker_order"], columns["attacker_local_lr"], columns["attacker_local_steps"]) == (
        "unknown",
        0.05,
        None,
    )
    (outcome,) = run_trials([spec])
    assert outcome.status == "ok" and len(outcome.curve) > 0
    fedsgd = parameter_columns(TrialSpec(images=(0, 1), attacker_order="unknown"))
    assert fedsgd["attacker_order"] is None and fedsgd["attacker_local_lr"] is None  # FedSGD: not applicable


TWO_EPOCHS = ClientSettings(**FEDAVG, local_steps=4, local_batch_size=2, attacker_order="unknown")
PER_EPOCH = IGConfig(epoch_prior=1.0)  # the attacker's settings: each epoch candidates of its own


def test_each_epochs_own_candidates_in_the_clients_order_give_the_sent_update(client):
    """Two epochs pair the four images otherwise ({0, 1} {3, 2}, then {0, 2} {3, 1}): no one candidate per
    image in fixed slices can hold both, but each epoch's own candidates can."""
    model, images, labels = client
    sent = client_update(model, images, labels, TWO_EPOCHS)
    order = torch.cat(minibatch_schedule(IMAGES, TWO_EPOCHS))
    assert order.tolist() == [0, 1, 3, 2, 0, 2, 3, 1]
    predict = attacker_update(PER_EPOCH, sent)
    arranged = predict(model, *model_state(model), images[order], labels[order])
    assert gap(sent.tensors, arranged) < 1e-6
    in_index_order = predict(model, *model_state(model), images.repeat(2, 1, 1, 1), labels.repeat(2))
    assert gap(sent.tensors, in_index_order) > 0.05


def test_the_prior_ignores_the_order_within_an_epoch_and_pulls_different_sets_together():
    epochs = EpochCandidates(clients=1, epochs=2, per_client=3)
    images = torch.rand(1, 3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        assert epochs.prior(torch.cat([images, images[:, order]], dim=1)).item() == 0
    other = images.clone()
    other[:, 1] = 1 - other[:, 1]  # the second epoch holds another image in place of image 1
    candidates = torch.cat([images, other], dim=1).requires_grad_(True)
    before = epochs.prior(candidates)
    assert before.item() > 1e-3
    (gradient,) = torch.autograd.grad(before.sum(), candidates)
    assert epochs.prior(candidates.detach() - 0.1 * gradient / gradient.abs().max()).item() < before.item()


def test_the_reconstruction_is_each_epochs_candidates_matched_within_labels_and_averaged():
    epochs = EpochCandidates(clients=1, epochs=2, per_client=3)
    images = torch.arange(3 * 4, dtype=torch.float32).view(1, 3, 1, 2, 2)
    labels = epochs.per_epoch(torch.tensor([[5, 7, 5]]))
    assert labels.tolist() == [[5, 7, 5, 5, 7, 5]]
    swapped = images[:, [2, 1, 0]]  # images 0 and 2 share label 5: the second epoch holds them swapped
    assert torch.equal(epochs.images(torch.cat([images, swapped], dim=1), labels), images)
    two_clients = EpochCandidates(clients=2, epochs=2, per_client=1)
    candidates = torch.tensor([0.0, 2.0, 10.0, 14.0]).view(1, 4, 1, 1, 1)  # client 0: 0, 2; client 1: 10, 14
    labels = two_clients.per_epoch(torch.tensor([[1, 1]]))
    assert two_clients.images(candidates, labels).flatten().tolist() == [1.0, 12.0]


def test_epoch_prior_applies_only_to_several_epochs_of_unknown_order():
    base = dict(fl="fedavg", images=(0, 1, 2, 3), local_batch_size=2, attacker_order="unknown", epoch_prior=0.1)
    assert TrialSpec(**base, local_steps=4).key_fields()["epoch_prior"] == 0.1
    for spec in (
        TrialSpec(**base, local_steps=2),  # one epoch
        TrialSpec(**{**base, "attacker_order": "known"}, local_steps=4),
        TrialSpec(**base, local_steps=4, attacker_local_steps=2),  # the attacker unrolls one epoch
    ):
        assert "epoch_prior" not in spec.key_fields()
        assert parameter_columns(spec)["epoch_prior"] is None


@pytest.mark.parametrize(
    "others, fix",
    [
        ({"epoch_prior": -1.0}, "use 0 (one candidate per image, shared by the epochs) or a positive weight"),
        ({"epoch_prior": 1.0, "bn_prior": 0.1}, "bn_prior is 0.1; use 0"),
        ({"epoch_prior": 1.0, "feature_prior": 0.1}, "feature_prior is 0.1; use 0"),
    ],
)
def test_a_bad_epoch_prior_is_one_line_naming_field_value_and_fix(others, fix):
    base = dict(fl="fedavg", images=(0, 1, 2, 3), local_batch_size=2, local_steps=4, attacker_order="unknown")
    with pytest.raises(ConfigError) as refused:
        TrialSpec(**base, **others)
    message = str(refused.value)
    assert "epoch_prior" in message and str(others["epoch_prior"]) in message and fix in message
    assert "\n" not in message


def test_a_trial_with_each_epochs_candidates_reconstructs_the_clients_images():
    spec = TrialSpec(**TINY_UNKNOWN_ORDER, epoch_prior=0.1)
    (outcome,) = run_trials([spec])
    assert outcome.status == "ok" and outcome.reconstruction.shape == (4, 1, 8, 8)
    assert parameter_columns(spec)["epoch_prior"] == 0.1
