"""Datasets from image folders: ``folder:PATH`` names torchvision's ImageFolder layout,
``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

The files say the rest: the channels (1 when every image is grayscale, else 3), the side (when every image
is the same square; otherwise the trial sets ``image_size``), the classes (the class folders, sorted, as
ImageFolder numbers them) and the normalisation (each channel's mean and standard deviation over the
training split's pixels, computed once per process). A folder's spec is cached until a directory in the
layout changes (a file added, removed or renamed); a file rewritten in place keeps the cached spec.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import ConfigError, require

FOLDER_PREFIX = "folder:"
SPLITS = ("train", "test")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes without colour
LAYOUT = "PATH/train/<class>/*.png and PATH/test/<class>/* (torchvision's ImageFolder layout)"


def is_folder(name: str) -> bool:
    return isinstance(name, str) and name.startswith(FOLDER_PREFIX)


def folder_path(name: str) -> Path:
    """The directory a ``folder:PATH`` name points at, checked to exist."""
    raw = name[len(FOLDER_PREFIX) :]
    require(raw.strip() != "", "dataset", name, f"give a directory after 'folder:' that holds {LAYOUT}")
    path = Path(raw).expanduser()
    require(path.is_dir(), "dataset", name, f"{path} is not an existing directory; give one that holds {LAYOUT}")
    return path


def folder_facts(name: str) -> dict:
    """The fields of ``folder:PATH``'s DatasetSpec (gradinv.dataset_specs) but its name, read from its files
    (once per process while its directories stay)."""
    path = folder_path(name)
    return dict(_facts(name, str(path.resolve()), _fingerprint(path)))


def require_side(name: str, sizes: tuple, image_size: int | None) -> None:
    """Images of mixed sizes (or one non-square size) load only when ``image_size`` makes them one square."""
    one_square = len(sizes) <= 1 and all(width == height for width, height in sizes)
    if image_size is not None or one_square:
        return
    shown = ", ".join(f"{width}x{height}" for width, height in sizes)
    raise ConfigError(
        "image_size",
        None,
        f"the images of {name} are {shown} (width x height), not one square size; set image_size "
        "to resize them all to that side",
    )


def open_folder(name: str, split: str, transform, image_size: int | None):
    """One split of a folder as a torchvision ImageFolder yielding ``(image [C, H, W] in [0, 1], label)``."""
    facts = folder_facts(name)
    require_side(name, facts["sizes"], image_size)
    return _image_folder(name, folder_path(name), split, facts["channels"], transform)


def _fingerprint(path: Path) -> tuple:
    """The modification times of the layout's directories: they change when a file comes or goes."""
    stamps = [(str(path), path.stat().st_mtime_ns)]
    with os.scandir(path) as entries:
        found = {entry.name: entry for entry in entries}
    for split in SPLITS:
        if split in found and found[split].is_dir():
            stamps.append((split, found[split].stat().st_mtime_ns))
            with os.scandir(path / split) as classes:
                stamps += [(f"{split}/{c.name}", c.stat().st_mtime_ns) for c in classes if c.is_dir()]
    return tuple(sorted(stamps))


@functools.lru_cache(maxsize=16)
def _facts(name: str, path: str, fingerprint: tuple) -> tuple:
    root = Path(path)
    for split in SPLITS:
        require(
            (root / split).is_dir(),
            "dataset",
            name,
            f"it has no {split}/ directory; put the {split} images in {root / split}/<class>/ (torchvision's "
            "ImageFolder layout)",
        )
    splits = {split: _image_folder(name, root, split, 3, None) for split in SPLITS}
    train, test = splits["train"], splits["test"]
    require(
        train.classes == test.classes,
        "dataset",
        name,
        f"train/ has the classes {train.classes} and test/ {test.classes}; give both the same class folders",
    )
    sizes, gray = set(), True
    for split in SPLITS:
        for file, _ in splits[split].samples:
            with _opened(file) as image:
                sizes.add(image.size)
                gray = gray and image.mode in GRAY_MODES
                _decoded(image, file)  # a damaged file is named here, before any trial loads it
    channels = 1 if gray else 3
    mean, std = _statistics(name, train.samples, channels)
    side = max(max(size) for size in sizes)  # nominal: require_side asks for image_size unless all one square
    facts = {
        "channels": channels,
        "size": side,
        "num_classes": len(train.classes),
        "mean": mean,
        "std": std,
        "test_images": len(test),
        "train_images": len(train),
        "sizes": tuple(sorted(sizes)),
    }
    return tuple(facts.items())  # immutable: the cache hands out copies


def _image_folder(name: str, root: Path, split: str, channels: int, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root / split), transform=transform, loader=functools.partial(_load, channels))
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        message = str(error).rstrip(". ")
        raise ConfigError(
            "dataset",
            name,
            f"{split}/: {message}; put images in every class folder ({split}/<class>/*) or remove the empty ones",
        ) from None


def _opened(file: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(file)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ConfigError("dataset file", file, f"it is not a readable image ({error}); replace or delete it") from None


def _load(channels: int, file: str):
    """ImageFolder's loader: the image in one mode for the whole folder ('L' or 'RGB')."""
    with _opened(file) as image:
        return _decoded(image, file).convert("L" if channels == 1 else "RGB")


def _decoded(image, file: str):
    try:
        image.load()
    except (OSError, ValueError) as error:  # a header that opens over data that does not decode
        raise ConfigError("dataset file", file, f"it is not a readable image ({error}); replace or delete it") from None
    return image


def _statistics(name: str, samples: list, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each channel's mean and standard deviation over every pixel of the training images, in [0, 1]."""
    import numpy as np

    total = np.zeros(channels)
    squares = np.zeros(channels)
    pixels = 0
    for file, _ in samples:
        array = np.asarray(_load(channels, file), dtype=np.float64).reshape(-1, channels) / 255
        total += array.sum(axis=0)
        squares += (array**2).sum(axis=0)
        pixels += len(array)
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0))
    require(
        all(value > 0 for value in std),
        "dataset",
        name,
        "its training images are one flat colour in some channel, so they cannot be normalised; add varied images",
    )
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
