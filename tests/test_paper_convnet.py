"""The paper's ConvNet (``convnet-paper``) against its reference implementation's architecture, and gradinv's
own ``convnet`` beside it: equal parameter shapes, another forward pass."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradinv.errors import ConfigError
from gradinv.models import MODELS, build_model, default_width


def _published_listing(channels: int, num_classes: int, w: int) -> list[tuple[str, nn.Module]]:
    """The module list of inversefed's ``ConvNet`` (commit 1157b61, inversefed/nn/models.py) in its order,
    written out here from the published architecture, including its second ``conv6``/``bn6``/``relu6`` entry."""

    def block(i: int, cin: int, cout: int) -> list[tuple[str, nn.Module]]:
        return [
            (f"conv{i}", nn.Conv2d(cin, cout, kernel_size=3, padding=1)),
            (f"bn{i}", nn.BatchNorm2d(cout)),
            (f"relu{i}", nn.ReLU()),
        ]

    return [
        *block(0, channels, w),
        *block(1, w, 2 * w),
        *block(2, 2 * w, 2 * w),
        *block(3, 2 * w, 4 * w),
        *block(4, 4 * w, 4 * w),
        *block(5, 4 * w, 4 * w),
        ("pool0", nn.MaxPool2d(3)),
        *block(6, 4 * w, 4 * w),
        *block(6, 4 * w, 4 * w),
        *block(7, 4 * w, 4 * w),
        ("pool1", nn.MaxPool2d(3)),
        ("flatten", nn.Flatten()),
        ("linear", nn.Linear(36 * w, num_classes)),
    ]


class ReferenceConvNet(nn.Module):
    """As the reference holds it: the listing in an OrderedDict (a repeated name keeps its first position and
    its last module) inside ``self.model``."""

    def __init__(self, channels: int, num_classes: int, width: int):
        super().__init__()
        self.model = nn.Sequential(OrderedDict(_published_listing(channels, num_classes, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _randomise_running_statistics(model: nn.Module, seed: int) -> None:
    """Untrained BatchNorm layers are the identity in eval mode; other statistics make the test see them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator, dtype=torch.float64))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator, dtype=torch.float64) + 0.5)


def _kinds(model: nn.Module) -> list[str]:
    """The forward pass's layer sequence in short: C conv, P max-pool 2, Q max-pool 3, A adaptive max-pool."""
    short = {nn.Conv2d: "C", nn.AdaptiveMaxPool2d: "A"}
    kinds = []
    for module in model.modules():
        if isinstance(module, nn.MaxPool2d):
            kinds.append("P" if module.kernel_size == 2 else "Q")
        elif type(module) in short:
            kinds.append(short[type(module)])
    return kinds


def test_the_published_listing_has_eight_convolutions_pooled_by_3_after_the_sixth_and_eighth():
    reference = ReferenceConvNet(3, 10, 2)
    assert len([name for name, _ in _published_listing(3, 10, 2) if name.startswith("conv")]) == 9
    assert _kinds(reference) == list("CCCCCCQCCQ")
    assert _kinds(build_model("convnet-paper", channels=3, num_classes=10, image_size=32, width=2)) == list(
        "CCCCCCQCCQA"
    )


@pytest.mark.parametrize(("channels", "side"), [(3, 32), (1, 28)])  # CIFAR and MNIST shapes
def test_convnet_paper_computes_the_reference_forward_pass_from_the_same_weights(channels, side):
    torch.manual_seed(5)
    reference = ReferenceConvNet(channels, 10, 4).double().eval()
    _randomise_running_statistics(reference, seed=6)
    paper = build_model("convnet-paper", channels=channels, num_classes=10, image_size=side, width=4).double()
    stripped = {name.removeprefix("model."): value for name, value in reference.state_dict().items()}
    paper.load_state_dict(stripped)  # strict: the same names and shapes, nothing left over
    images = torch.randn(3, channels, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, found = reference(images), paper(images)
    assert expected.abs().max() > 0.1  # the statistics and weights reach the logits
    assert torch.equal(found, expected)


def test_convnet_has_the_paper_convnets_parameters_but_pools_elsewhere():
    paper = build_model("convnet-paper", channels=1, num_classes=10, image_size=28, width=4, seed=3).double()
    ours = build_model("convnet", channels=1, num_classes=10, image_size=28, width=4, seed=3).double()
    paper_tensors, our_tensors = list(paper.state_dict().values()), list(ours.state_dict().values())
    assert [t.shape for t in paper_tensors] == [t.shape for t in our_tensors]
    assert all(torch.equal(a, b) for a, b in zip(paper_tensors, our_tensors))  # one seed, one set of weights
    assert _kinds(ours) == list("CCCCPCCPCCA")  # max-pool 2 after the fourth and sixth conv
    _randomise_running_statistics(paper, seed=6)
    ours.load_state_dict(dict(zip(ours.state_dict(), paper.state_dict().values())))
    images = torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        gap = (paper(images) - ours(images)).abs().max().item()
    assert gap > 0.01


def test_convnet_paper_default_width_and_its_smallest_images():
    assert "convnet" in MODELS and default_width("convnet-paper") == default_width("convnet") == 64
    for side in (9, 25, 224):  # 25: faces; a 3x3 map is fitted to the classifier from any pooled side
        model = build_model("convnet-paper", channels=1, num_classes=2, image_size=side, width=2)
        with torch.no_grad():
            assert model(torch.zeros(1, 1, side, side)).shape == (1, 2)
    with pytest.raises(ConfigError, match="image_size: 8 is not valid; convnet-paper pools by 3 twice"):
        build_model("convnet-paper", channels=1, num_classes=2, image_size=8, width=2)


def test_a_trial_runs_on_convnet_paper_and_keys_it_by_name():
    from gradinv.results.schema import trial_key
    from gradinv.trial import TrialSpec, run_trials

    common = dict(dataset="faces", image_size=12, width=2, iterations=2)
    paper, ours = TrialSpec(model="convnet-paper", **common), TrialSpec(**common)
    assert paper.key_fields()["model"] == "convnet-paper" and "model" not in ours.key_fields()  # convnet: default
    assert trial_key(paper) != trial_key(ours)
    (outcome,) = run_trials([paper])
    assert outcome.status == "ok" and outcome.metrics["psnr"] > 0
