"""gradinv's attack against a frozen transcription of the reference implementation (inversefed).

The transcription below restates, in plain autograd and in the reference's order of operations, what
its documented closure computes: the candidate update of the current images (the parameter gradient,
or K unrolled local SGD steps on fixed slices), the cost over the selected tensors (`sim`, `l2`, `l1`,
`max`, `simlocal` with `equal`, `linear` or `exp` weights), plus TV, and its image gradient. Its
optimisation loop is torch's own optimisers (Adam, SGD with the reference's settings, L-BFGS) with
``MultiStepLR`` at the reference's milestones and the box projection after each step. Everything runs
in float64 on a tiny ConvNet; costs, image gradients and images must agree to 1e-5 relative.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gradinv import metrics, models
from gradinv.attacks.inverting import final_images, initial_images, invert_gradients, median_filter, step_size_factor
from gradinv.attacks.objective import IGConfig, LaneObjective
from gradinv.client.update import client_update, minibatch_schedule
from gradinv.parameters import ClientSettings
from gradinv.trial import TrialSpec

RTOL = 1e-5
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST


# ---------------------------------------------------------------------------------------------
# The transcription


def reference_candidate(model, x, labels, local_steps=None, local_lr=1e-4, batch_size=0):
    """The update the reference compares: the loss gradient (FedSGD), or theta_K - theta_0 after K
    SGD steps where step i uses slice i mod (n // batch_size) of the images (all when 0)."""
    names = [name for name, _ in model.named_parameters()]
    start = {name: p for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    if local_steps is None:
        loss = F.cross_entropy(model(x), labels)
        return list(torch.autograd.grad(loss, list(start.values()), create_graph=True))
    current = dict(start)
    for i in range(local_steps):
        if batch_size == 0:
            inputs, targets = x, labels
        else:
            piece = i % (len(x) // batch_size)
            inputs = x[piece * batch_size : (piece + 1) * batch_size]
            targets = labels[piece * batch_size : (piece + 1) * batch_size]
        loss = F.cross_entropy(functional_call(model, (current, buffers), (inputs,)), targets)
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=True)
        current = {n: current[n] - local_lr * g for n, g in zip(names, grads)}
    return [current[n] - start[n] for n in names]


def reference_indices(target, indices):
    count = len(target)
    if isinstance(indices, list):
        return indices
    if indices == "def":
        return list(range(count))
    if indices.startswith("top"):
        norms = torch.stack([t.norm() for t in target])
        return torch.topk(norms, int(indices[3:])).indices.tolist()
    size = int(indices.lstrip("firstla"))
    return list(range(count))[-size:] if indices.startswith("last") else list(range(size))


def reference_weights(count, weights, like):
    descending = torch.arange(count, 0, -1, dtype=like.dtype)
    if weights == "linear":
        return descending / count
    if weights == "exp":
        soft = descending.softmax(dim=0)
        return soft / soft[0]
    return torch.ones(count, dtype=like.dtype)


def reference_cost(candidate, target, cost_fn, indices, weights):
    chosen = reference_indices(target, indices)
    w = reference_weights(len(target), weights, target[0])
    total, own_norm, target_norm = 0, 0, 0
    for i in chosen:
        difference = candidate[i] - target[i]
        if cost_fn == "l2":
            total = total + difference.pow(2).sum() * w[i]
        elif cost_fn == "l1":
            total = total + difference.abs().sum() * w[i]
        elif cost_fn == "max":
            total = total + difference.abs().max() * w[i]
        elif cost_fn == "sim":
            total = total - (candidate[i] * target[i]).sum() * w[i]
            own_norm = own_norm + candidate[i].pow(2).sum() * w[i]
            target_norm = target_norm + target[i].pow(2).sum() * w[i]
        elif cost_fn == "simlocal":
            similarity = F.cosine_similarity(candidate[i].flatten(), target[i].flatten(), 0, 1e-10)
            total = total + 1 - similarity * w[i]
    if cost_fn == "sim":
        total = 1 + total / own_norm.sqrt() / target_norm.sqrt()
    return total


def reference_tv(x):
    return (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean() + (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()


def reference_closure(
    model, x, labels, target, *, cost_fn="sim", indices="def", weights="equal", tv=1e-4, signed=False, **local
):
    """The reference's closure at images ``x``: (cost, image gradient)."""
    x = x.detach().clone().requires_grad_(True)
    cost = reference_cost(reference_candidate(model, x, labels, **local), target, cost_fn, indices, weights)
    if tv > 0:
        cost = cost + tv * reference_tv(x)
    cost.backward()
    return cost.detach(), (x.grad.sign() if signed else x.grad)


def reference_attack(
    model,
    x0,
    labels,
    target,
    *,
    optim="adam",
    lr=0.1,
    iterations=8,
    boxed=True,
    signed=True,
    tv=1e-4,
    lr_decay=True,
    **closure,
):
    """The reference's restart loop: optimiser, MultiStepLR stepped per iteration, box projection."""
    x = x0.detach().clone().requires_grad_(True)
    optimiser = {
        "adam": lambda: torch.optim.Adam([x], lr=lr),
        "sgd": lambda: torch.optim.SGD([x], lr=0.01, momentum=0.9, nesterov=True),
        "LBFGS": lambda: torch.optim.LBFGS([x]),
    }[optim]()
    milestones = [iterations // 2.667, iterations // 1.6, iterations // 1.142]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.1)

    def step_closure():
        optimiser.zero_grad()
        cost, grad = reference_closure(model, x, labels, target, tv=tv, signed=signed, **closure)
        x.grad = grad
        return cost

    for _ in range(iterations):
        optimiser.step(step_closure)
        if lr_decay:
            scheduler.step()
        with torch.no_grad():
            if boxed:
                x.data = torch.max(torch.min(x, torch.tensor((1 - MEAN) / STD)), torch.tensor(-MEAN / STD))
    return x.detach()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def setting():
    model = models.build_model("convnet", channels=1, num_classes=10, image_size=8, width=2, seed=0).double()
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 1, 8, 8, generator=generator, dtype=torch.float64) - MEAN) / STD
    labels = torch.tensor([3, 1, 3, 7])
    guess = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
    return model, images, labels, guess


def ours(model, images, labels, guess, config, fl=ClientSettings()):
    update = client_update(model, images, labels, fl)
    grad, total, _ = LaneObjective(model, [update], labels[None], [config])(guess[None])
    return total[0], grad[0], update


def close(a, b):
    return (a - b).norm() <= RTOL * b.norm()


OPTIONS = [  # (gradinv's settings, the reference's)
    (dict(), dict()),
    (dict(tv=0.0), dict(tv=0.0)),
    (dict(cost="l2"), dict(cost_fn="l2")),
    (dict(cost="l1"), dict(cost_fn="l1")),
    (dict(cost="max"), dict(cost_fn="max")),
    (dict(cost="simlocal"), dict(cost_fn="simlocal")),
    (dict(layer_weighting="linear"), dict(weights="linear")),
    (dict(layer_weighting="exp"), dict(weights="exp")),
    (dict(layer_weighting="exp", cost="simlocal"), dict(weights="exp", cost_fn="simlocal")),
    (dict(layers=(0, 5, -1, -7)), dict(indices=[0, 5, -1, -7])),
    (dict(layers=(2, 3), layer_weighting="linear", cost="l1"), dict(indices=[2, 3], weights="linear", cost_fn="l1")),
    *[
        (dict(layers=name), dict(indices=name))
        for name in ("first4", "first5", "first10", "first50", "last5", "last10", "last50", "top10", "top50")
    ],
    (dict(layers="last5", layer_weighting="exp", cost="l2"), dict(indices="last5", weights="exp", cost_fn="l2")),
]


def _reference_set(indices, count):
    """first50 / top50 / last50 on a model of fewer tensors: the reference indexes past the end or asks
    topk for too many; gradinv takes them all, which is the reference's cost over every tensor."""
    if isinstance(indices, str) and indices[-2:] == "50" and count < 50:
        return "def"
    return indices


@pytest.mark.parametrize("settings, reference", OPTIONS)
@pytest.mark.parametrize("batch", [1, 4])
def test_cost_and_image_gradient_match_the_reference(setting, settings, reference, batch):
    model, images, labels, guess = setting
    images, labels, guess = images[:batch], labels[:batch], guess[:batch]
    total, grad, update = ours(model, images, labels, guess, IGConfig(**settings))
    reference = {**reference, "indices": _reference_set(reference.get("indices", "def"), len(update.tensors))}
    cost, reference_grad = reference_closure(model, guess, labels, list(update.tensors), **reference)
    assert abs(total - cost) <= RTOL * abs(cost), (float(total), float(cost))
    assert close(grad, reference_grad)


@pytest.mark.parametrize("steps, batch_size", [(2, 0), (5, 0), (3, 2), (5, 3)])
def test_fedavg_cost_matches_the_reference_with_sequential_slices(setting, steps, batch_size):
    model, images, labels, guess = setting
    fl = ClientSettings(
        fl="fedavg", local_steps=steps, local_lr=0.05, local_batch_size=batch_size, batch_order="sequential"
    )
    total, grad, update = ours(model, images, labels, guess, IGConfig(), fl)
    local = dict(local_steps=steps, local_lr=0.05, batch_size=batch_size)
    cost, reference_grad = reference_closure(model, guess, labels, list(update.tensors), **local)
    assert abs(total - cost) <= RTOL * abs(cost) and close(grad, reference_grad)


def test_sequential_batches_are_the_reference_slices_and_drop_the_rest():
    fl = ClientSettings(fl="fedavg", local_steps=5, local_batch_size=2, batch_order="sequential")
    assert [s.tolist() for s in minibatch_schedule(5, fl)] == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]


def test_batch_set_compares_the_drawn_tensors(setting):
    model, images, labels, guess = setting
    update = client_update(model, images, labels, ClientSettings())
    objective = LaneObjective(model, [update], labels[None], [IGConfig(layers="batch")], seed=5)
    mask = objective._batch_mask()
    objective.draws.manual_seed(5)
    grad, total, _ = objective(guess[None])
    drawn = mask[0].nonzero().flatten().tolist()
    assert len(drawn) == 8
    cost, reference_grad = reference_closure(model, guess, labels, list(update.tensors), indices=drawn)
    assert abs(total[0] - cost) <= RTOL * abs(cost) and close(grad[0], reference_grad)
    assert not torch.equal(objective._batch_mask(), objective._batch_mask())  # drawn afresh at every evaluation


# ---------------------------------------------------------------------------------------------
# The optimisation loop: start, schedule, optimisers, box


@pytest.mark.parametrize("iterations", [50, 300, 1000, 24_000])
def test_step_decay_follows_the_reference_multistep_schedule(iterations):
    x = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.SGD([x], lr=1.0)
    milestones = [iterations // 2.667, iterations // 1.6, iterations // 1.142]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.1)
    expected = []
    for _ in range(iterations):
        expected.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    ours_ = [step_size_factor(i, iterations, "step") for i in range(iterations)]
    assert np.allclose(ours_, expected, rtol=1e-12, atol=0)
    assert [i for i in range(1, iterations) if ours_[i] != ours_[i - 1]] == [int(m) for m in milestones]
    if iterations == 24_000:
        assert milestones == [8998, 14999, 21015]


@pytest.mark.parametrize("init", ["randn", "rand"])
def test_starting_images_are_the_reference_draws(init):
    shape = (2, 1, 8, 8)
    generator = torch.Generator().manual_seed(3)
    draw = torch.randn if init == "randn" else lambda *a, **k: (torch.rand(*a, **k) - 0.5) * 2
    expected = draw((1, *shape), generator=generator, dtype=torch.float64)
    assert torch.equal(initial_images(shape, 1, init, 3, torch.float64), expected)
    assert expected.min() < -0.5 and expected.max() > 0.5  # rand reaches below zero: [-1, 1)


LOOPS = [  # (gradinv's settings, the reference's)
    (dict(), dict()),
    (dict(init="rand"), dict()),
    (dict(init="zeros"), dict()),
    (dict(boxed=False), dict(boxed=False)),
    (dict(signed=False, lr=0.05), dict(signed=False, lr=0.05)),
    (dict(decay="none"), dict(lr_decay=False)),
    (dict(cost="l2", layer_weighting="exp"), dict(cost_fn="l2", weights="exp")),
    (dict(optimizer="sgd", signed=False), dict(optim="sgd", signed=False)),
    (dict(optimizer="sgd"), dict(optim="sgd")),
    (
        dict(optimizer="lbfgs", signed=False, tv=0.0, iterations=3),
        dict(optim="LBFGS", signed=False, tv=0.0, iterations=3),
    ),
]


def attack_and_reference(setting, config, **reference):
    model, images, labels, _ = setting
    images, labels = images[:2], labels[:2]
    update = client_update(model, images, labels, ClientSettings())
    box = (torch.full((1, 1, 1), -MEAN / STD), torch.full((1, 1, 1), (1 - MEAN) / STD))
    result = invert_gradients(model, [update], labels[None], [config], [4], box, images.shape)
    x0 = initial_images(images.shape, 1, config.init, 4, torch.float64)[0]
    return result.images[0], reference_attack(model, x0, labels, list(update.tensors), **reference)


@pytest.mark.parametrize("settings, reference", LOOPS)
def test_attack_loop_reaches_the_reference_images(setting, settings, reference):
    images, expected = attack_and_reference(setting, IGConfig(**{"iterations": 8, **settings}), **reference)
    assert close(images, expected)


def test_clamping_the_start_is_a_deviation(setting):
    images, expected = attack_and_reference(setting, IGConfig(iterations=8, clamp_init=True))
    assert not close(images, expected)


def test_median_filter_is_a_reflect_padded_3x3_median():
    x = torch.randn(2, 3, 1, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    padded = np.pad(x.numpy(), [(0, 0)] * 3 + [(1, 1), (1, 1)], mode="reflect")
    expected = np.empty_like(x.numpy())
    for i in range(6):
        for j in range(5):
            expected[..., i, j] = np.median(padded[..., i : i + 3, j : j + 3].reshape(*x.shape[:3], 9), axis=-1)
    assert np.array_equal(median_filter(x).numpy(), expected)


def test_restart_choices_follow_the_reference_scoring():
    runs = torch.randn(2, 4, 1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([[0.5, 0.2, 0.1, 0.3], [0.4, float("inf"), 0.6, 0.05]])
    pick = lambda **s: final_images(runs, scores, IGConfig(restarts=4, **s))  # noqa: E731
    assert torch.equal(pick(), runs[[0, 1], [2, 3]])
    tvs = torch.stack([torch.stack([reference_tv(r) for r in lane]) for lane in runs])
    assert torch.equal(pick(scoring="tv"), runs[[0, 1], tvs.argmin(dim=1)])
    assert torch.allclose(pick(scoring="pixelmean"), runs.mean(dim=1))
    assert torch.equal(pick(scoring="pixelmedian"), runs.median(dim=1).values)
    # tol: restarts run in turn and stop at the first that reaches it; later ones never ran
    assert torch.equal(pick(tol=0.25), runs[[0, 1], [1, 3]])  # lane 0 stops at restart 1; lane 1 at its last
    assert torch.equal(pick(tol=0.45), runs[[0, 1], [1, 0]])  # lane 1 stops at once
    assert torch.allclose(pick(tol=0.25, scoring="pixelmean"), torch.stack([runs[0, :2].mean(0), runs[1].mean(0)]))


def test_inception_scoring_is_refused_in_one_line():
    with pytest.raises(ValueError, match="scoring: 'inception' is not valid; it needs Inception weights"):
        TrialSpec(restarts=2, scoring="inception")


def test_known_labels_pair_reconstructions_only_within_their_label():
    truth = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.5, 1.0)])
    recon = truth[[1, 0, 2]]  # position 0 holds image 1's pixels though it was optimised for image 0's label
    labels = torch.tensor([4, 5, 4])
    assert metrics.match_to_truth(recon, truth).tolist() == [1, 0, 2]  # free matching undoes the swap
    assert metrics.match_to_truth(recon, truth, labels).tolist() == [0, 1, 2]  # within labels it cannot


def test_precision_follows_the_update(setting):
    model, images, labels, _ = setting
    update = client_update(model, images[:1], labels[:1], ClientSettings())
    objective = LaneObjective(model, [update], labels[None, :1], [IGConfig()])
    assert objective.tv_weights.dtype == objective.gradient_cost.weights.dtype == torch.float64
