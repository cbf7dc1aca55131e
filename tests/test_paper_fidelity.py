"""Where gradinv meets the paper's reference implementation (inversefed, commit 1157b61) outside the attack:
its normalisation constants, and its one-image label rule under FedAvg, where gradinv deliberately differs."""

import pytest
import torch

from gradinv import data
from gradinv.attacks.labels import idlg_label
from gradinv.client.update import client_update
from gradinv.dataset_specs import DATASETS
from gradinv.models import build_model
from gradinv.parameters import ClientSettings

# inversefed/consts.py as published.
PUBLISHED = {
    "cifar10": (
        (0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
        (0.24703224003314972, 0.24348513782024384, 0.26158785820007324),
    ),
    "cifar100": (
        (0.5071598291397095, 0.4866936206817627, 0.44120192527770996),
        (0.2673342823982239, 0.2564384639263153, 0.2761504650115967),
    ),
    "mnist": ((0.13066373765468597,), (0.30810782313346863,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_normalisation_constants_are_the_published_ones_digit_for_digit(dataset):
    spec = DATASETS[dataset]
    assert (spec.mean, spec.std) == PUBLISHED[dataset]


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_the_pixel_box_follows_from_the_published_constants(dataset):
    low, high = data.pixel_box(DATASETS[dataset], torch.zeros((), dtype=torch.float64))
    mean, std = PUBLISHED[dataset]
    assert low.flatten().tolist() == [-m / s for m, s in zip(mean, std)]
    assert high.flatten().tolist() == [(1 - m) / s for m, s in zip(mean, std)]


def _reference_idlg(update) -> int:
    """The reference's one-image rule: argmin over classes of the classifier weight entry's row sums, read off
    the client's message as it is (for FedAvg, the weight change theta_K - theta_0)."""
    return int(update.tensors[-2].sum(dim=-1).argmin())


# The quickstart's FedAvg client: 3 local SGD steps at lr 1e-4 on one Fashion-MNIST image, untrained ConvNet.
FEDAVG = ClientSettings(fl="fedavg", local_steps=3)


@pytest.mark.parametrize("model", ["convnet", "convnet-paper"])
def test_fedavg_one_image_labels_need_the_update_sign_flipped(model):
    """A FedAvg update points against the gradient: the true class's row, the one row whose gradient sums
    below zero, sums above zero in the update. gradinv flips the sign first; the reference does not and so
    picks a wrong class on every image (here mostly class 2), while under FedSGD the two rules agree."""
    spec = data.dataset_spec("fashion-mnist")
    victim = build_model(model, channels=1, num_classes=10, image_size=28, width=4, seed=0)
    truth, ours, reference, fedsgd = [], [], [], []
    for index in range(6):
        images01, labels = data.load_images("fashion-mnist", [index])
        images = data.normalise(images01, spec)
        update = client_update(victim, images, labels, FEDAVG)
        truth.append(int(labels))
        ours.append(idlg_label(update, 10))
        reference.append(_reference_idlg(update))
        fedsgd.append(_reference_idlg(client_update(victim, images, labels, ClientSettings())))
    assert truth == [9, 2, 1, 1, 6, 1]
    assert ours == truth and fedsgd == truth
    assert reference == [2, 3, 2, 2, 2, 2]
