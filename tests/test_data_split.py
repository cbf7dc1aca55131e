"""The faces split: trained victims never see an attacked image; photos cannot train a victim."""

import pytest
import skimage.data

from gradinv import data, dataset_specs
from gradinv.errors import ConfigError


def split_bytes(split: str) -> tuple[list[bytes], list[int]]:
    """Each image of a faces split as the loader's uint8 pixel bytes, with its label."""
    dataset = data.open_dataset("faces", split=split)
    pairs = [dataset[i] for i in range(len(dataset))]
    return [data.to_uint8(image).tobytes() for image, _ in pairs], [label for _, label in pairs]


def test_no_training_image_is_an_attacked_image_and_together_they_are_the_whole_set():
    train, _ = split_bytes("train")
    test, _ = split_bytes("test")
    assert len(set(train)) == 150 and len(set(test)) == 50
    assert not set(train) & set(test)
    source = {(image * 255).round().astype("uint8").tobytes() for image in skimage.data.lfw_subset()}
    assert set(train) | set(test) == source


def test_the_split_is_stratified_and_the_attacked_images_start_with_faces():
    _, train_labels = split_bytes("train")
    _, test_labels = split_bytes("test")
    assert test_labels == [1] * 25 + [0] * 25  # 1: face
    assert sum(train_labels) == 75
    assert all(sum(train_labels[:n]) == n // 2 for n in range(0, 151, 2))  # any first 2k images: k faces
    test, _ = split_bytes("test")
    first_face = (skimage.data.lfw_subset()[0] * 255).round().astype("uint8").tobytes()
    assert test[0] == first_face  # the attacked images open with the set's own first faces


def test_the_spec_records_the_split_and_whether_a_dataset_can_train():
    faces, photos, fmnist = (data.dataset_spec(name) for name in ("faces", "photos", "fashion-mnist"))
    assert faces.split is dataset_specs.FACES_SPLIT and faces.split_version == 1 and faces.test_images == 50
    assert faces.trainable and fmnist.trainable and fmnist.split_version == 0
    assert not photos.trainable and photos.split_version == 0


def test_photos_refuse_to_train_in_one_line():
    with pytest.raises(ConfigError) as caught:
        data.open_dataset("photos", split="train")
    message = str(caught.value)
    assert caught.value.field == "dataset" and "trained_epochs 0" in message and "\n" not in message
    assert len(data.open_dataset("photos", split="test")) == 6
