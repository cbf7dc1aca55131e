"""Data-only baselines: pool statistics and scores against a direct computation, from training images only."""

import gzip
import math

import numpy as np
import pytest
import skimage.data
import torch

from gradinv import data, dataset_specs
from gradinv.baselines import BaselinePool, score_baselines
from gradinv.errors import ConfigError


def faces01(indices) -> np.ndarray:
    """lfw_subset images at ``indices`` as the loader sees them: uint8 pixels over 255, ``[N, 25, 25]``."""
    return np.round(skimage.data.lfw_subset()[list(indices)] * 255).astype(np.uint8) / 255


def psnr_by_formula(guess: np.ndarray, truth: np.ndarray) -> float:
    return 10 * math.log10(1 / float(((guess - truth) ** 2).mean()))


def test_faces_pool_and_scores_equal_a_direct_computation():
    pool = BaselinePool.for_dataset("faces", pool_size=20)
    train = dataset_specs.FACES_SPLIT.train[:20]
    images = faces01(train)
    labels = np.array([1 if index < 100 else 0 for index in train])
    assert torch.allclose(pool.mean_image[0].double(), torch.from_numpy(images.mean(0)), atol=1e-6)
    assert pool.channel_means.item() == pytest.approx(images.mean(), abs=1e-6)
    assert set(pool.class_means) == {0, 1}
    for label in (0, 1):
        direct = torch.from_numpy(images[labels == label].mean(0))
        assert torch.allclose(pool.class_means[label][0].double(), direct, atol=1e-6)

    truth = faces01([dataset_specs.FACES_SPLIT.test[0]])  # one attacked face
    scores, _ = score_baselines(pool.guesses(torch.tensor([1])), torch.from_numpy(truth).float().view(1, 1, 25, 25))
    expected = {
        "mean_image": psnr_by_formula(images.mean(0), truth[0]),
        "flat": psnr_by_formula(np.full((25, 25), images.mean()), truth[0]),
        "class_mean": psnr_by_formula(images[labels == 1].mean(0), truth[0]),
    }
    for name, value in expected.items():
        assert scores[f"baseline_psnr_{name}"] == pytest.approx(value, abs=1e-3)
        assert -1 <= scores[f"baseline_ssim_{name}"] <= 1
    assert scores["baseline_psnr"] == pytest.approx(max(expected.values()), abs=1e-3)


def test_the_pool_never_holds_an_attacked_image():
    pool = BaselinePool.for_dataset("faces", pool_size=len(dataset_specs.FACES_SPLIT.train))
    not_attacked = [index for index in range(200) if index not in dataset_specs.FACES_SPLIT.test]
    assert torch.allclose(pool.mean_image[0].double(), torch.from_numpy(faces01(not_attacked).mean(0)), atol=1e-6)
    with pytest.raises(ConfigError, match="pool_size: 151.*use 1 to 150"):
        BaselinePool.for_dataset("faces", pool_size=151)  # the pool cannot reach into the test split


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_pool_is_the_first_training_images():
    def idx_images(name: str, count: int) -> np.ndarray:
        with gzip.open(data.DEBIAN_FASHION_MNIST / name) as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=16)[: count * 784].reshape(count, 28, 28) / 255

    pool = BaselinePool.for_dataset("fashion-mnist", pool_size=10)
    train_mean = torch.from_numpy(idx_images("train-images-idx3-ubyte.gz", 10).mean(0))
    test_mean = torch.from_numpy(idx_images("t10k-images-idx3-ubyte.gz", 10).mean(0))
    assert torch.allclose(pool.mean_image[0].double(), train_mean, atol=1e-6)
    assert not torch.allclose(pool.mean_image[0].double(), test_mean, atol=1e-2)


def test_class_mean_guesses_follow_labels_and_fall_back_to_the_pool_mean():
    pool = BaselinePool.for_dataset("faces", image_size=8, pool_size=2)  # one face, one non-face
    guesses = pool.guesses(torch.tensor([0, 1, 7]))
    assert {name: tuple(g.shape) for name, g in guesses.items()} == {
        "mean_image": (3, 1, 8, 8),
        "flat": (3, 1, 8, 8),
        "class_mean": (3, 1, 8, 8),
    }
    assert torch.equal(guesses["class_mean"][0], pool.class_means[0])
    assert torch.equal(guesses["class_mean"][1], pool.class_means[1])
    assert torch.equal(guesses["class_mean"][2], pool.mean_image)  # a class the pool lacks
    assert torch.allclose(guesses["flat"][0], torch.full((1, 8, 8), pool.channel_means.item()))
    guesses["mean_image"].zero_()
    assert pool.mean_image.abs().sum() > 0  # guesses are copies: the shared pool stays intact


def test_recovered_labels_in_any_order_score_like_aligned_ones():
    pool = BaselinePool.for_dataset("faces", image_size=8)
    truth, labels = data.load_images("faces", [0, 30, 1], image_size=8)  # face, non-face, face
    aligned, _ = score_baselines(pool.guesses(labels), truth)
    shuffled, _ = score_baselines(pool.guesses(labels[[1, 2, 0]]), truth)
    assert shuffled == pytest.approx(aligned)


def test_pools_are_computed_once_per_dataset_side_and_size():
    first = BaselinePool.for_dataset("faces", image_size=8, pool_size=30)
    assert BaselinePool.for_dataset("faces", image_size=8, pool_size=30) is first
    assert BaselinePool.for_dataset("faces", pool_size=30) is BaselinePool.for_dataset("faces", 25, 30)
    assert BaselinePool.for_dataset("faces", image_size=8, pool_size=31) is not first


@pytest.mark.parametrize("dataset, pool_size, field", [("photos", 1, "dataset"), ("faces", 0, "pool_size")])
def test_a_pool_without_training_images_is_one_clear_error(dataset, pool_size, field):
    with pytest.raises(ConfigError) as caught:
        BaselinePool.for_dataset(dataset, pool_size=pool_size)
    assert caught.value.field == field and "\n" not in str(caught.value)


def test_every_trial_row_carries_its_baselines_and_gain():
    from gradinv.trial import TrialSpec, run_trials

    spec = TrialSpec(dataset="faces", images=(0, 30), image_size=8, model="convnet", width=4, iterations=5)
    outcome = run_trials([spec])[0]
    truth, labels = data.load_images("faces", [0, 30], image_size=8)
    expected, best_per_image = score_baselines(BaselinePool.for_dataset("faces", image_size=8).guesses(labels), truth)
    assert {k: outcome.metrics[k] for k in expected} == pytest.approx(expected)
    assert outcome.metrics["psnr_gain"] == pytest.approx(outcome.metrics["psnr"] - expected["baseline_psnr"], abs=1e-5)
    gains = torch.tensor(outcome.per_image["psnr"]) - best_per_image
    assert outcome.per_image["psnr_gain"] == pytest.approx(gains.tolist(), abs=1e-5)
    assert len(outcome.quality_curve) == len(outcome.curve) == 5  # PSNR and SSIM at every checkpoint
    assert outcome.quality_curve[-1][0] == pytest.approx(outcome.metrics["psnr"], abs=1e-4)


def test_a_changed_split_changes_the_keys_of_its_trials_and_checkpoints():
    import dataclasses
    import hashlib
    import json

    from gradinv.results.schema import RESULTS_FORMAT, trial_key
    from gradinv.trial import TrialSpec
    from gradinv.zoo import Recipe

    def unversioned(spec):  # how a key was made before datasets had split versions
        canonical = json.dumps({"format": RESULTS_FORMAT, **spec.non_default()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    faces, fmnist = TrialSpec(dataset="faces"), TrialSpec(dataset="fashion-mnist")
    assert trial_key(faces) != unversioned(faces)
    assert trial_key(fmnist) == unversioned(fmnist)
    recipe = Recipe("faces", "convnet", 8, 1)
    canonical = json.dumps(dataclasses.asdict(recipe), sort_keys=True, separators=(",", ":"))
    assert recipe.key != "convnet-faces-e1-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
    with pytest.raises(ConfigError, match="dataset: 'photos' .* keeps no images to train on"):  # the recipe's rule
        TrialSpec(dataset="photos", trained_epochs=1)
    with pytest.raises(ConfigError, match="dataset"):
        Recipe("photos", "convnet", 8, 1)
