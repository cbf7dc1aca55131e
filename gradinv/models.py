"""Victim models by name. Every model takes normalised images of any size and channel count
(``convnet-paper``: at least 9 pixels a side). A name ``package.module:function`` is the user's own
factory (gradinv.model_factories)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import model_factories
from .dataset_specs import dataset_spec
from .errors import require


@dataclass(frozen=True)
class ModelInfo:
    build: Callable[[int, int, int, int], nn.Module]  # (channels, num_classes, width, image_size)
    default_width: int | None  # None: the model has no width parameter


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class ConvNet(nn.Sequential):
    """gradinv's ConvNet (``convnet``): the paper's eight 3x3 conv-BN-ReLU layers of widths w, 2w, 2w, 4w (x5)
    and classifier, pooled differently: max-pool 2 after the fourth and sixth conv, adaptive max-pool 3 at the
    end. Kept as it is so that trial keys, results and replays made with it stay valid; for numbers comparable
    with the paper's, use ``convnet-paper``."""

    def __init__(self, channels: int, num_classes: int, width: int):
        w = width
        super().__init__(
            *_conv_bn_relu(channels, w),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            *_conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(4 * w, 4 * w),
            *_conv_bn_relu(4 * w, 4 * w),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(4 * w, 4 * w),
            *_conv_bn_relu(4 * w, 4 * w),
            nn.AdaptiveMaxPool2d(3),
            nn.Flatten(),
            nn.Linear(36 * w, num_classes),
        )


PAPER_CONVNET_MIN_SIDE = 9  # two max-pools of 3 leave at least one pixel


class PaperConvNet(nn.Sequential):
    """The paper's ConvNet as its reference implementation builds it (inversefed's ``ConvNet``, commit 1157b61):
    eight 3x3 conv-BN-ReLU layers of widths w, 2w, 2w, 4w (x5), max-pool 3 after the sixth and the eighth.

    Module names are the reference's, so its state dicts load once their ``model.`` prefix is dropped. The
    parameters are created in the order of ``ConvNet``'s, so the same seed gives both the same weights.
    """

    def __init__(self, channels: int, num_classes: int, width: int):
        w = width
        sides = (channels, w, 2 * w, 2 * w, 4 * w, 4 * w, 4 * w, 4 * w, 4 * w)
        layers: list[tuple[str, nn.Module]] = []
        for i in range(8):
            conv, norm, relu = _conv_bn_relu(sides[i], sides[i + 1])
            layers += [(f"conv{i}", conv), (f"bn{i}", norm), (f"relu{i}", relu)]
            if i == 5:
                layers.append(("pool0", nn.MaxPool2d(3)))
        layers += [
            ("pool1", nn.MaxPool2d(3)),
            # The reference's classifier needs a 3x3 map (sides 27 to 35: CIFAR, MNIST), where this pool is the
            # identity; at other sides it fits the map to the classifier instead of failing.
            ("fit", nn.AdaptiveMaxPool2d(3)),
            ("flatten", nn.Flatten()),
            ("linear", nn.Linear(36 * w, num_classes)),
        ]
        super().__init__(OrderedDict(layers))


def _paper_convnet(channels: int, num_classes: int, width: int, side: int) -> PaperConvNet:
    require(
        side >= PAPER_CONVNET_MIN_SIDE,
        "image_size",
        side,
        f"convnet-paper pools by 3 twice: use images of at least {PAPER_CONVNET_MIN_SIDE} pixels a side",
    )
    return PaperConvNet(channels, num_classes, width)


class LeNetZhu(nn.Sequential):
    """The LeNet variant of Zhu et al. (DLG): sigmoid activations, strided 5x5 convolutions."""

    def __init__(self, channels: int, num_classes: int, width: int):
        super().__init__(
            nn.Conv2d(channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.AdaptiveAvgPool2d(8),
            nn.Flatten(),
            nn.Linear(64 * width, num_classes),
        )


class MLP(nn.Sequential):
    """Two hidden fully connected layers; its first layer's input is recoverable analytically."""

    def __init__(self, channels: int, num_classes: int, width: int, image_size: int):
        super().__init__(
            nn.Flatten(),
            nn.Linear(channels * image_size * image_size, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers) with base width 16 x multiplier."""

    def __init__(self, channels: int, num_classes: int, width: int, depth: int):
        super().__init__()
        blocks = (depth - 2) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            for block in range(blocks):
                layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def _torchvision_resnet(arch: str, channels: int, num_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return model


MODELS: dict[str, ModelInfo] = {
    "convnet": ModelInfo(lambda c, k, w, s: ConvNet(c, k, w), 64),
    "convnet-paper": ModelInfo(_paper_convnet, 64),  # the reference's default width (its ConvNet, ConvNet64)
    "lenet-zhu": ModelInfo(lambda c, k, w, s: LeNetZhu(c, k, w), 12),
    "mlp": ModelInfo(lambda c, k, w, s: MLP(c, k, w, s), 256),
    **{
        f"resnet{depth}": ModelInfo(lambda c, k, w, s, depth=depth: CifarResNet(c, k, w, depth), 1)
        for depth in (20, 32, 44)
    },
    **{
        arch: ModelInfo(lambda c, k, w, s, arch=arch: _torchvision_resnet(arch, c, k), None)
        for arch in ("resnet18", "resnet50")
    },
}


def default_width(name: str) -> int | None:
    """The model's own width; None: it has none (a factory's: it gets ``width`` only when the trial sets one)."""
    if model_factories.is_factory(name):
        model_factories.parse(name)
        return None
    # the registry's names, and the way to bring one's own (gradinv.model_factories, docs/your-own.md)
    require(name in MODELS, "model", name, f"choose one of {', '.join(MODELS)}, or your own as package.module:function")
    return MODELS[name].default_width


def build_model(
    name: str,
    *,
    channels: int,
    num_classes: int,
    image_size: int,
    width: int | None = None,
    seed: int = 0,
    norm: str = "batch",
    source_sha256: str | None = None,
) -> nn.Module:
    """The model ``name`` initialised from ``seed`` (same seed, same weights), in eval mode.

    ``norm="group"``: every BatchNorm replaced by GroupNorm with Opacus' own fixer (``gcd(32, C)``
    groups), which DP-SGD training needs (BatchNorm mixes the examples of a batch); the other layers'
    weights are the same as with BatchNorm. ``source_sha256``: a factory's source digest the trial was keyed
    with, checked before the factory runs."""
    info_width = default_width(name)
    width = info_width if width is None else width
    if info_width is not None:
        require(isinstance(width, int) and width >= 1, "width", width, "use a whole number of at least 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_factories.is_factory(name):
            model_factories.check_source(name, source_sha256)
            model = model_factories.build(
                name, channels=channels, num_classes=num_classes, image_size=image_size, width=width
            )
        else:
            model = MODELS[name].build(channels, num_classes, width, image_size)
    if norm == "group":
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    return model.eval()


def initial_model(settings) -> nn.Module:
    """The model a trial, a zoo recipe or a federation starts from, built for its dataset: ``settings`` has
    ``model``, ``dataset``, ``image_size`` (None: the dataset's), ``width``, ``model_seed`` and ``norm``."""
    spec = dataset_spec(settings.dataset)
    return build_model(
        settings.model,
        channels=spec.channels,
        num_classes=spec.num_classes,
        image_size=settings.image_size or spec.size,
        width=settings.width,
        seed=settings.model_seed,
        norm=settings.norm,
        source_sha256=getattr(settings, "model_source_sha256", None),
    )
