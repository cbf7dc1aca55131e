"""Datasets by name, their normalisation, and image I/O.

Images travel as float tensors in [0, 1] (``[B, C, H, W]``); models see them normalised with the
dataset's mean and std. Nothing here reaches for the network unless ``download=True`` is passed.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset_specs import PHOTO_NAMES, DatasetSpec, dataset_spec
from .errors import ConfigError, require
from .files import write_atomic
from .image_folders import is_folder, open_folder

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit argument, else $GRADINV_DATA, else ~/.cache/gradinv/data."""
    root = explicit or os.environ.get("GRADINV_DATA") or Path.home() / ".cache" / "gradinv" / "data"
    return Path(root).expanduser()


def normalise(images01: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    mean, std = _stats(spec, images01)
    return (images01 - mean) / std


def denormalise(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    mean, std = _stats(spec, images)
    return images * std + mean


def pixel_box(spec: DatasetSpec, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds of valid pixels in normalised coordinates, shaped [C, 1, 1]."""
    mean, std = _stats(spec, like)
    return (0 - mean) / std, (1 - mean) / std


def _stats(spec: DatasetSpec, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(spec.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    return mean, std


# ---------------------------------------------------------------------------------------------
# Loading


def load_images(
    name: str,
    indices: tuple[int, ...] | list[int],
    root: str | os.PathLike | None = None,
    *,
    split: str = "test",
    image_size: int | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at ``indices`` of a split as ``([B, C, H, W] in [0, 1], labels [B])``."""
    dataset = open_dataset(name, root, split=split, image_size=image_size, download=download)
    for index in indices:
        require(0 <= index < len(dataset), "image", index, f"use an index from 0 to {len(dataset) - 1} for {name}")
    pairs = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in pairs])
    labels = torch.tensor([int(label) for _, label in pairs], dtype=torch.long)
    return images, labels


def open_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    split: str = "test",
    image_size: int | None = None,
    download: bool = False,
):
    """A torchvision-style dataset yielding ``(image [C, H, W] in [0, 1], label)``."""
    spec = dataset_spec(name)
    require(split in ("train", "test"), "split", split, "use 'train' or 'test'")
    transform = _transform(spec, image_size)
    if is_folder(name):
        return open_folder(name, split, transform, image_size)
    root = data_root(root)
    if name in ("faces", "photos"):
        return _TensorDataset(*_bundled_split(spec, split), transform)
    return _torchvision_dataset(name, root, split == "train", transform, download)


def _transform(spec: DatasetSpec, image_size: int | None):
    from torchvision import transforms

    steps = []
    if spec.name == "imagenet":
        steps += [transforms.Resize(256), transforms.CenterCrop(224)]
    steps.append(transforms.ToTensor())
    if image_size is not None and image_size != spec.size:
        steps.append(transforms.Resize((image_size, image_size), antialias=True))
    return transforms.Compose(steps)


class _TensorDataset(torch.utils.data.Dataset):
    """In-memory images (uint8 HWC arrays) that go through the same transform as torchvision's."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return self.transform(image), int(self.labels[index])


def _bundled_split(spec: DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A bundled set's images and labels for one split: its ``BundledSplit``, else all of them (test only)."""
    require(
        split == "test" or spec.trainable,
        "dataset",
        spec.name,
        f"its {spec.test_images} images are all attacked and none is left to train on; use trained_epochs 0 "
        "or a dataset with a training split",
    )
    images, labels = _bundled(spec.name)
    if spec.split is None:
        return images, labels
    chosen = list(spec.split.test if split == "test" else spec.split.train)
    return images[chosen], labels[chosen]


@functools.cache
def _bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images shipped inside scikit-image's wheel: no download, no data root."""
    import skimage.data
    from skimage.transform import resize

    if name == "faces":
        faces = skimage.data.lfw_subset()  # float in [0, 1], 100 faces then 100 non-faces
        images = np.round(faces * 255).astype(np.uint8)
        labels = np.array([1] * 100 + [0] * (len(faces) - 100))
        return images, labels
    photos = []
    for photo_name in PHOTO_NAMES:
        photo = getattr(skimage.data, photo_name)()[..., :3]
        side = min(photo.shape[:2])
        top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        square = photo[top : top + side, left : left + side]
        photos.append(np.round(resize(square, (224, 224), anti_aliasing=True) * 255).astype(np.uint8))
    return np.stack(photos), np.arange(len(photos))


# How torchvision's dataset classes say that files are missing or damaged: "Dataset not found ...",
# "Dataset metadata file not found ...", "The archive ... is not present in the root directory ...".
MISSING_DATA_WORDS = ("not found", "is not present in the root directory")


def _torchvision_dataset(name: str, root: Path, train: bool, transform, download: bool):
    from torchvision import datasets

    if name == "fashion-mnist" and not download:
        _stage_debian_fashion_mnist(root)
    if name in IDX_FOLDERS:
        _check_idx_files(name, root, train)
    constructors = {
        "fashion-mnist": datasets.FashionMNIST,
        "mnist": datasets.MNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }
    try:
        if name == "imagenet":
            return datasets.ImageNet(str(root / "imagenet"), split="train" if train else "val", transform=transform)
        return constructors[name](str(root), train=train, transform=transform, download=download)
    except RuntimeError as error:
        if not any(words in str(error) for words in MISSING_DATA_WORDS):
            raise  # not a missing dataset: a fault to report as it is
        raise ConfigError("dataset", name, _missing_hint(name, root)) from error
    except FileNotFoundError as error:  # ImageNet: no class folders under the split
        raise ConfigError("dataset", name, _missing_hint(name, root)) from error


def _missing_hint(name: str, root: Path) -> str:
    hints = {
        "fashion-mnist": f"no files under {root / 'FashionMNIST' / 'raw'} or {DEBIAN_FASHION_MNIST}; "
        "run 'apt-get install -y dataset-fashion-mnist'",
        "imagenet": f"no ILSVRC2012 archives or devkit under {root / 'imagenet'}; place them there "
        "(torchvision.datasets.ImageNet layout) and point --data-root or GRADINV_DATA at the parent",
    }
    default = (
        f"no {name} files under {root}; put torchvision's {name} layout there, point --data-root or "
        "GRADINV_DATA at it (torchvision's download=True fetches it where the network allows)"
    )
    return hints.get(name, default)


def _stage_debian_fashion_mnist(root: Path) -> None:
    """Unpack Debian's Fashion-MNIST IDX files into torchvision's layout under the data root."""
    raw = root / "FashionMNIST" / "raw"
    if not DEBIAN_FASHION_MNIST.is_dir():
        return
    for packed in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        target = raw / packed.name[: -len(".gz")]
        if target.exists():
            continue
        try:
            raw.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                "data root",
                str(root),
                f"cannot unpack Fashion-MNIST there ({error.strerror}); "
                "point --data-root or GRADINV_DATA at a directory you can write",
            ) from None
        try:
            with gzip.open(packed, "rb") as source:  # concurrent stagers each rename a complete file
                write_atomic(target, lambda sink: shutil.copyfileobj(source, sink))
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a damaged package file: nothing staged
            raise ConfigError(
                "dataset file",
                str(packed),
                f"it cannot be unpacked ({error}); reinstall it: apt-get install --reinstall dataset-fashion-mnist",
            ) from None


# torchvision's folder of each IDX dataset under the data root, and the bytes of each IDX item type
IDX_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def _check_idx_files(name: str, root: Path, train: bool) -> None:
    """Names a damaged IDX file of the split (an interrupted copy or download) and its fix, where
    torchvision's reader would fail on it with a reshape error that names neither."""
    raw = root / IDX_FOLDERS[name] / "raw"
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        path = raw / f"{'train' if train else 't10k'}-{kind}"
        problem = _idx_problem(path) if path.is_file() else None  # a missing file: torchvision's "not found"
        if problem:
            raise ConfigError("dataset file", str(path), f"{problem}; {_damaged_file_fix(name)}")


def _damaged_file_fix(name: str) -> str:
    if name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
        return f"delete it and gradinv unpacks it again from {DEBIAN_FASHION_MNIST}"
    return "replace it with a complete copy (torchvision's download=True fetches one where the network allows)"


def _idx_problem(path: Path) -> str | None:
    """What is wrong with an IDX file (a header, then the items its dimensions promise), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_ITEM_BYTES:
            return f"it is not an IDX file ({size} bytes, no IDX header): truncated or damaged"
        dimensions = handle.read(4 * magic[3])
    if len(dimensions) < 4 * magic[3]:
        return f"it is truncated ({size} bytes, shorter than its header)"
    items = math.prod(struct.unpack(f">{magic[3]}I", dimensions))
    expected = 4 + len(dimensions) + items * IDX_ITEM_BYTES[magic[2]]
    if size != expected:
        return f"it holds {size} bytes where its header promises {expected}: truncated or damaged"
    return None


# ---------------------------------------------------------------------------------------------
# Image I/O


def to_uint8(image01: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] to an ``H x W (x C)`` uint8 array."""
    array = (image01.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = np.transpose(array, (1, 2, 0))
    return array[..., 0] if array.shape[2] == 1 else array


def png_bytes(image01: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image01)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def side_by_side(truth01: torch.Tensor, recon01: torch.Tensor) -> Image.Image:
    """Ground truth (top row) over reconstructions (bottom row), one column per image."""
    rows = [np.concatenate([to_uint8(image) for image in batch], axis=1) for batch in (truth01, recon01)]
    return Image.fromarray(np.concatenate(rows, axis=0))
