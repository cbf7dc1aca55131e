"""DP-SGD local training: Opacus' per-example gradients under eval-mode BatchNorm, the attacker's noise-free
twin, seeded noise and sampling, one-line errors, and the accuracy that strong noise costs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradinv import data, models
from gradinv.client import dp_training as dp
from gradinv.client.update import model_state, parameter_update
from gradinv.errors import ConfigError
from gradinv.parameters import ClientSettings

FEDSGD = ClientSettings(fl="fedsgd")
FEDAVG = ClientSettings(fl="fedavg", local_steps=3, local_lr=0.1)


def victim(name: str = "convnet", width: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small eval-mode victim whose BatchNorm statistics are not the identity (as after training)."""
    model = models.build_model(name, channels=1, num_classes=10, image_size=8, width=width, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def client_data(count: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 8, 8, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def largest_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus' hooks on a first layer whose input needs no grad
@pytest.mark.parametrize("name, width", [("convnet", 2), ("resnet20", 1)])
def test_opacus_per_example_gradients_equal_vmap_grad_in_eval_mode(name, width):
    model = victim(name, width)
    images, labels = client_data(5)
    module, optimiser = dp.make_private(
        model,
        lambda ps: torch.optim.SGD(ps, lr=0.0),
        clip=1.0,
        noise_multiplier=0.0,
        expected_batch_size=5,
        noise_seed=0,
    )
    F.cross_entropy(module(images), labels, reduction="sum").backward()
    params, buffers = model_state(model)

    def example_loss(p, x, y):
        return F.cross_entropy(functional_call(model, (p, buffers), (x[None],)), y[None])

    expected = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, images, labels)
    assert [name.removeprefix("_module.") for name, _ in module.named_parameters()] == list(params)
    opacus = [p.grad_sample for p in optimiser.params]
    assert largest_difference(opacus, expected.values()) < 1e-6  # measured 0 (hook samplers: 1.5e-8); values to 5
    untouched = victim(name, width).state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), untouched))


@pytest.mark.parametrize("fl", [FEDSGD, FEDAVG], ids=["fedsgd", "fedavg"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_noise_free_client_equals_the_attackers_clipped_update(fl, sample_rate):
    model, (images, labels) = victim(), client_data()
    clip = 0.5  # below every example's gradient norm here, so clipping acts
    sent, batches = dp.dp_local_training(
        model, images, labels, fl=fl, clip=clip, noise_multiplier=0.0, sample_rate=sample_rate, seed=3
    )
    params, buffers = model_state(model)
    unrolled = dp.clipped_update(
        model, params, buffers, images, labels, fl=fl, clip=clip, batches=batches, sample_rate=sample_rate
    )
    assert largest_difference(sent, unrolled) < 1e-6  # measured at most 7.5e-9 (values up to 0.07)
    unclipped = parameter_update(model, params, buffers, images, labels, fl, [None] * dp.accounting_steps(fl))
    assert largest_difference(sent, unclipped) > 1e-3  # the clipping is what makes them agree


def test_empty_poisson_batches_are_steps_of_noise_alone():
    model, (images, labels) = victim(), client_data(3)
    fl = dataclasses.replace(FEDAVG, local_steps=4)
    arguments = {"fl": fl, "clip": 0.5, "sample_rate": 0.3, "seed": 3}
    sent, batches = dp.dp_local_training(model, images, labels, noise_multiplier=0.0, **arguments)
    assert [len(b) for b in batches] == [0, 1, 0, 0]  # this seed's draw
    params, buffers = model_state(model)
    unrolled = dp.clipped_update(
        model, params, buffers, images, labels, fl=fl, clip=0.5, batches=batches, sample_rate=0.3
    )
    assert largest_difference(sent, unrolled) < 1e-6
    noisy, _ = dp.dp_local_training(model, images, labels, noise_multiplier=1.0, **arguments)
    assert largest_difference(noisy, sent) > 1e-3


def test_the_image_gradient_flows_through_the_clipped_update():
    model, (images, labels) = victim(), client_data(4)
    params, buffers = model_state(model)
    batches = [torch.tensor([0, 2, 3]), torch.tensor([1]), torch.tensor([], dtype=torch.long)]
    target = [torch.randn_like(p) for p in params.values()]

    def loss(guess):
        update = dp.clipped_update(
            model, params, buffers, guess, labels, fl=FEDAVG, clip=0.5, batches=batches, sample_rate=0.5
        )
        flat = torch.cat([u.flatten() for u in update])
        return 1 - F.cosine_similarity(flat, torch.cat([t.flatten() for t in target]), dim=0)

    image_gradient = torch.func.grad(loss)(images.clone())
    assert torch.isfinite(image_gradient).all() and image_gradient.abs().sum() > 0


def test_noise_is_seeded_and_has_the_declared_scale():
    model, (images, labels) = victim(width=4), client_data(8)
    clip, noise = 0.5, 2.0

    def run(multiplier: float, seed: int):
        return dp.dp_local_training(
            model, images, labels, fl=FEDSGD, clip=clip, noise_multiplier=multiplier, sample_rate=1.0, seed=seed
        )[0]

    first, again, other, clean = run(noise, 0), run(noise, 0), run(noise, 1), run(0.0, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert largest_difference(first, other) > 0.1
    added = torch.cat([(a - b).flatten() for a, b in zip(first, clean)])
    expected_std = noise * clip / len(images)  # summed clipped gradients + N(0, (noise clip)^2), over 8 images
    assert added.numel() > 2000  # measured below: 1.003x over 13,018 coordinates
    assert added.std().item() == pytest.approx(expected_std, rel=0.1)


def test_poisson_batches_are_seeded_and_returned():
    model, (images, labels) = victim(), client_data(8)
    fl = dataclasses.replace(FEDAVG, local_steps=6)

    def run(seed: int):
        return dp.dp_local_training(
            model, images, labels, fl=fl, clip=1.0, noise_multiplier=1.0, sample_rate=0.4, seed=seed
        )

    (update, batches), (update_again, batches_again), (_, other_batches) = run(5), run(5), run(6)
    assert len(batches) == 6 and all(b.dtype == torch.long and len(set(b.tolist())) == len(b) for b in batches)
    assert len({len(b) for b in batches}) > 1  # Poisson: the batch size varies
    assert [b.tolist() for b in batches] == [b.tolist() for b in batches_again]
    assert [b.tolist() for b in batches] != [b.tolist() for b in other_batches]
    assert all(torch.equal(a, b) for a, b in zip(update, update_again))
    full = dp.dp_local_training(model, images, labels, fl=fl, clip=1.0, noise_multiplier=1.0, sample_rate=1.0, seed=5)
    assert all(torch.equal(b, torch.arange(8)) for b in full[1])


def test_accounting_steps():
    assert dp.accounting_steps(FEDSGD) == 1 and dp.accounting_steps(FEDAVG) == 3


def test_a_batch_of_one_image_is_accepted():
    model, (images, labels) = victim(), client_data(1)
    sent, batches = dp.dp_local_training(
        model, images, labels, fl=FEDSGD, clip=0.5, noise_multiplier=0.0, sample_rate=1.0, seed=0
    )
    params, buffers = model_state(model)
    unrolled = dp.clipped_update(model, params, buffers, images, labels, fl=FEDSGD, clip=0.5, batches=batches)
    assert largest_difference(sent, unrolled) < 1e-6


@pytest.mark.parametrize(
    "change, field",
    [
        ({"clip": 0.0}, "dp_clip"),
        ({"clip": None}, "dp_clip"),
        ({"noise_multiplier": -0.5}, "dp_noise"),
        ({"sample_rate": 0.0}, "dp_sample_rate"),
        ({"sample_rate": 1.5}, "dp_sample_rate"),
        ({"count": 0}, "images_per_client"),
    ],
)
def test_bad_inputs_are_one_line_config_errors(change, field):
    images, labels = client_data(change.pop("count", 4))
    arguments = {"fl": FEDAVG, "clip": 1.0, "noise_multiplier": 1.0, "sample_rate": 1.0, "seed": 0, **change}
    with pytest.raises(ConfigError) as raised:
        dp.dp_local_training(victim(), images, labels, **arguments)
    assert raised.value.field == field and "\n" not in str(raised.value)


def fashion_mnist(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = data.open_dataset("fashion-mnist", split=split, image_size=8)
    pairs = [dataset[i] for i in range(count)]
    images = torch.stack([image for image, _ in pairs])
    return data.normalise(images, data.dataset_spec("fashion-mnist")), torch.tensor([label for _, label in pairs])


def test_strong_noise_costs_accuracy_that_plain_training_reaches():
    """An MLP on 512 Fashion-MNIST images at 8x8, 3 epochs of batches of 32, the same batches for both.
    Measured test accuracy (500 images): plain 0.57, clip 1 alone 0.53, noise multiplier 8: 0.15."""
    train_images, train_labels = fashion_mnist("train", 512)
    test_images, test_labels = fashion_mnist("test", 500)
    order = torch.Generator().manual_seed(0)
    batches = [torch.randperm(512, generator=order).split(32) for _ in range(3)]

    def accuracy(noise: float | None) -> float:
        model = models.build_model("mlp", channels=1, num_classes=10, image_size=8, width=32, seed=0)
        if noise is None:
            optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
        else:
            module, optimiser = dp.make_private(
                model,
                lambda ps: torch.optim.SGD(ps, lr=0.5),
                clip=1.0,
                noise_multiplier=noise,
                expected_batch_size=32,
                noise_seed=0,
            )
        for indices in (index for epoch in batches for index in epoch):
            x, y = train_images[indices], train_labels[indices]
            if noise is None:
                optimiser.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimiser.step()
            else:
                dp.dp_training_step(module, optimiser, x, y)
        if noise is not None:
            model.load_state_dict(module.to_standard_module().state_dict(), strict=False)
        with torch.no_grad():
            return (model.eval()(test_images).argmax(1) == test_labels).float().mean().item()

    plain, private = accuracy(None), accuracy(8.0)
    assert plain >= 0.45  # chance is 0.1
    assert private <= plain - 0.2
