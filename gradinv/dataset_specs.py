"""The datasets by name: shape, classes, normalisation and split, without loading anything.

Torch-free, so that commands that only read results (the report's class counts) stay light.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import require

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


@dataclass(frozen=True)
class BundledSplit:
    """A disjoint train/test split of a bundled image set, as indices into its images.

    Checkpoint recipes and trial keys carry ``version``: change the indices only with a new version.
    """

    version: int
    test: tuple[int, ...]
    train: tuple[int, ...]

    def __post_init__(self):
        assert not set(self.test) & set(self.train), "a split's test and train images must be disjoint"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int  # native side length; images are square after loading
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_images: int  # how many images the test split holds
    split: BundledSplit | None = None  # bundled sets: the split defined here; None: the source's own
    trainable: bool = True  # False: every image is attacked, none is left to train on
    train_images: int = 0  # how many images the training split holds (0: none)
    sizes: tuple[tuple[int, int], ...] = ()  # image folders: the (width, height) pairs the files come in

    @property
    def split_version(self) -> int:
        """0 for a source's own published split, else the version of the split defined here."""
        return self.split.version if self.split else 0


# skimage's lfw_subset holds 100 faces (label 1), then 100 non-faces (label 0). The attacked test split
# is the first 25 of each, faces first, so the first test images are faces a reader recognises. The
# other 150 train victims, alternating face and non-face so that any first N are balanced.
FACES_SPLIT = BundledSplit(
    version=1,
    test=(*range(0, 25), *range(100, 125)),
    train=tuple(index for pair in zip(range(25, 100), range(125, 200)) for index in pair),
)

# The paper's normalisation, digit for digit as its reference implementation publishes it (inversefed/consts.py,
# commit 1157b61): the box the attack keeps pixels in follows from these. Fashion-MNIST and faces are ours.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)
CIFAR10_STD = (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)
CIFAR100_MEAN = (0.5071598291397095, 0.4866936206817627, 0.44120192527770996)
CIFAR100_STD = (0.2673342823982239, 0.2564384639263153, 0.2761504650115967)
MNIST_MEAN, MNIST_STD = (0.13066373765468597,), (0.30810782313346863,)

DATASETS = {
    s.name: s
    for s in (
        DatasetSpec("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), 10_000, train_images=60_000),
        DatasetSpec("mnist", 1, 28, 10, MNIST_MEAN, MNIST_STD, 10_000, train_images=60_000),
        DatasetSpec("cifar10", 3, 32, 10, CIFAR10_MEAN, CIFAR10_STD, 10_000, train_images=50_000),
        DatasetSpec("cifar100", 3, 32, 100, CIFAR100_MEAN, CIFAR100_STD, 10_000, train_images=50_000),
        DatasetSpec("imagenet", 3, 224, 1000, IMAGENET_MEAN, IMAGENET_STD, 50_000, train_images=1_281_167),
        # Labeled Faces in the Wild subset bundled with scikit-image, split by FACES_SPLIT.
        DatasetSpec(
            "faces",
            1,
            25,
            2,
            (0.3771,),
            (0.2728,),
            len(FACES_SPLIT.test),
            split=FACES_SPLIT,
            train_images=len(FACES_SPLIT.train),
        ),
        DatasetSpec("photos", 3, 224, len(PHOTO_NAMES), IMAGENET_MEAN, IMAGENET_STD, len(PHOTO_NAMES), trainable=False),
    )
}


def dataset_spec(name: str) -> DatasetSpec:
    """A built-in dataset's spec, or that of an image folder (``folder:PATH``, read from its files)."""
    if isinstance(name, str) and name.startswith("folder:"):
        from .image_folders import folder_facts  # reads the files (PIL, torchvision) when a folder is named

        return DatasetSpec(name, **folder_facts(name))
    require(
        name in DATASETS,
        "dataset",
        name,
        f"choose one of {', '.join(DATASETS)}, or folder:PATH (an image folder: PATH/train/<class>/*, "
        "PATH/test/<class>/*)",
    )
    return DATASETS[name]
