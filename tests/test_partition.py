"""Client partitions: disjoint and complete, seeded, label-skewed by alpha, and checked inputs."""

import numpy as np
import pytest

from gradinv.errors import ConfigError
from gradinv.partition import dirichlet_partition, iid_partition, label_histogram

BALANCED = np.repeat(np.arange(10), 100)  # 1000 items, 10 classes of 100
# 500 items with uneven class counts, the size of a small Fashion-MNIST training pool
UNEVEN = np.random.default_rng(7).integers(0, 10, size=500)


def mean_label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the total-variation distance from the client's label distribution
    to the whole set's: 0 when every client mirrors the set, near 1 when each holds one class."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    shares = [np.array(label_histogram(labels, part, 10)) / len(part) for part in parts]
    distances = [0.5 * np.abs(share - overall).sum() for share in shares]
    return float(np.mean(distances))


def assert_exact_cover(parts: list[np.ndarray], num_items: int) -> None:
    together = np.concatenate(parts)
    assert len(together) == num_items
    assert np.array_equal(np.sort(together), np.arange(num_items))
    assert all(np.array_equal(part, np.sort(part)) for part in parts)


def dirichlet(labels, seed, **options):
    return dirichlet_partition(labels, 10, options.pop("alpha", 0.5), seed, **options)


@pytest.mark.parametrize("num_items, clients", [(1000, 10), (500, 7), (5, 5), (3, 1)])
def test_iid_partition_covers_every_item_once_in_near_equal_parts(num_items, clients):
    parts = iid_partition(num_items, clients, seed=0)
    assert len(parts) == clients
    assert_exact_cover(parts, num_items)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("labels", [BALANCED, UNEVEN], ids=["balanced", "uneven"])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("self_balancing", [False, True])
def test_dirichlet_partition_covers_every_item_once(labels, alpha, self_balancing):
    parts = dirichlet(labels, 0, alpha=alpha, self_balancing=self_balancing, min_partition_size=0)
    assert len(parts) == 10
    assert_exact_cover(parts, len(labels))


def test_the_seed_alone_decides_the_partition():
    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    assert same(iid_partition(1000, 10, seed=3), iid_partition(1000, 10, seed=3))
    assert not same(iid_partition(1000, 10, seed=3), iid_partition(1000, 10, seed=4))
    assert same(dirichlet(BALANCED, 3), dirichlet(BALANCED, 3))
    assert not same(dirichlet(BALANCED, 3), dirichlet(BALANCED, 4))


def test_small_alpha_skews_labels_and_large_alpha_mirrors_the_whole_set():
    skew = {
        alpha: [mean_label_skew(BALANCED, dirichlet(BALANCED, seed, alpha=alpha)) for seed in range(30)]
        for alpha in (0.1, 100.0)
    }
    # Measured over seeds 0-49 (10 clients, 1000 items, min_partition_size 10):
    # alpha 0.1 gives 0.590-0.745, alpha 100 gives 0.031-0.046.
    assert min(skew[0.1]) >= 0.45
    assert max(skew[100.0]) <= 0.10


def test_label_histogram_counts_each_class_of_the_chosen_items():
    labels = np.array([0, 2, 2, 1, 2, 0])
    assert label_histogram(labels, np.array([1, 2, 5]), 4) == [1, 0, 2, 0]
    assert label_histogram(labels, np.array([], dtype=int), 3) == [0, 0, 0]
    with pytest.raises(ConfigError, match="num_classes"):
        label_histogram(labels, np.array([1]), 2)


@pytest.mark.parametrize("seed", range(5))
def test_redrawing_reaches_the_minimum_size_one_draw_misses(seed):
    # For these seeds the first draw leaves some client under 50 items (alpha 0.5).
    with pytest.raises(ConfigError, match="min_partition_size"):
        dirichlet(BALANCED, seed, min_partition_size=50, max_tries=1)
    parts = dirichlet(BALANCED, seed, min_partition_size=50, max_tries=10)
    assert min(len(part) for part in parts) >= 50
    assert_exact_cover(parts, len(BALANCED))


def test_an_unreachable_minimum_size_names_the_field_and_the_smallest_size_reached():
    # Every client holding exactly 100 of 1000 items is allowed but all but impossible at alpha 0.1.
    with pytest.raises(ConfigError, match="min_partition_size") as raised:
        dirichlet(BALANCED, 0, alpha=0.1, min_partition_size=100)
    assert raised.value.field == "min_partition_size"
    assert "never held more than" in raised.value.fix and "raise alpha" in raised.value.fix


@pytest.mark.parametrize("labels", [BALANCED, UNEVEN], ids=["balanced", "uneven"])
def test_self_balancing_caps_a_client_at_the_average_plus_one_class(labels):
    # A client takes a further class only while it holds no more than len/clients items, and
    # one class adds at most that class's whole count: so no client exceeds the sum of the two.
    cap = len(labels) / 10 + np.bincount(labels).max()
    for seed in range(30):
        for alpha in (0.1, 0.5):
            parts = dirichlet(labels, seed, alpha=alpha, self_balancing=True, min_partition_size=0)
            assert max(len(part) for part in parts) <= cap
    # Without it the cap is no law: at alpha 0.1 clients reach 281 items (measured, seeds 0-29).
    unbalanced = [dirichlet(BALANCED, seed, alpha=0.1, min_partition_size=0) for seed in range(30)]
    largest = [max(len(part) for part in parts) for parts in unbalanced]
    assert max(largest) > len(BALANCED) / 10 + 100


@pytest.mark.parametrize(
    "options, field",
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "0.5"}, "alpha"),
        ({"clients": 0}, "clients"),
        ({"clients": 1001}, "clients"),
        ({"clients": 2.0}, "clients"),
        ({"min_partition_size": -1}, "min_partition_size"),
        ({"min_partition_size": 101}, "min_partition_size"),
        ({"max_tries": 0}, "max_tries"),
        ({"labels": BALANCED.astype(float)}, "labels"),
        ({"labels": BALANCED.reshape(100, 10)}, "labels"),
    ],
)
def test_bad_dirichlet_inputs_name_their_field(options, field):
    arguments = {"labels": BALANCED, "clients": 10, "alpha": 0.5, "seed": 0} | options
    with pytest.raises(ConfigError, match=f"^{field}:") as raised:
        dirichlet_partition(**arguments)
    assert raised.value.field == field


@pytest.mark.parametrize("clients", [0, 11])
def test_bad_iid_client_counts_name_the_field(clients):
    with pytest.raises(ConfigError, match="^clients:"):
        iid_partition(10, clients, seed=0)
