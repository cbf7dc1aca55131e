"""Dimitrov et al.'s per-epoch candidates and order-invariant epoch prior ("Data Leakage in Federated
Averaging", TMLR 2022).

A FedAvg client that shuffles its images into mini-batches anew every epoch visits each image once per
epoch, in an order the attacker does not know. With ``epoch_prior`` above 0 the attacker unrolls each
epoch over candidates of its own (gradinv.client.update.attacker_schedule), so that no epoch's order is
forced on another, and ties the epochs by the prior: every epoch holds the same set of images, so any
summary of an epoch's candidates that ignores their order should agree between epochs. The summary is
the paper's: a fixed random 3x3 convolution of every candidate (96 channels), then the maximum over the
epoch's candidates at each position and channel; the prior is the mean squared difference of that
summary between every two epochs. The reconstruction is the candidates' mean over the epochs, each
epoch's matched to the first epoch's (within the labels each was given: the Hungarian assignment of
least squared distance), as the paper's code reads it.

A run's candidates are laid out client by client, each client's epoch by epoch, each epoch's image by
image: ``[K * E * S, C, H, W]`` for ``K`` clients (secure aggregation) of ``S`` images and ``E`` epochs.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

OTHER_LABEL = 1e30  # a pairing across labels: never the assignment's choice while a same-label one exists
PROJECTION_CHANNELS, PROJECTION_SEED = 96, 0  # the random convolution the epochs' summaries are taken through


@dataclass(frozen=True)
class EpochCandidates:
    clients: int
    epochs: int
    per_client: int  # images

    def per_epoch(self, per_image: torch.Tensor) -> torch.Tensor:
        """The same for every epoch's candidates, ``[N, K * S, ...]`` to ``[N, K * E * S, ...]``: their labels,
        and their start (the shared candidates' start, from which each epoch departs as its own steps ask)."""
        runs, rest = len(per_image), per_image.shape[2:]
        per_client = per_image.view(runs, self.clients, 1, self.per_client, *rest)
        return per_client.expand(-1, -1, self.epochs, -1, *rest).reshape(runs, -1, *rest)

    def _matched(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, K * E * S, ...]`` as ``[N, K, E, S, ...]``, each epoch's candidates reordered onto the
        first epoch's. The assignment reads detached images; the reordering keeps their gradients."""
        runs = len(x)
        grouped = x.view(runs, self.clients, self.epochs, self.per_client, -1)
        classes = labels if labels.dim() == 2 else labels.argmax(-1)
        tags = classes.view(runs, self.clients, self.epochs, self.per_client)
        with torch.no_grad():
            first = grouped[:, :, :1]
            distances = torch.cdist(first.expand_as(grouped).double(), grouped.double()).square()
            across = tags[:, :, :1, :, None] != tags[:, :, :, None, :]  # [N, K, E, S (first), S (own)]
            distances = torch.where(across, OTHER_LABEL, distances).cpu().numpy()
        order = torch.arange(self.per_client).repeat(runs, self.clients, self.epochs, 1)
        for run, client, epoch in itertools.product(range(runs), range(self.clients), range(1, self.epochs)):
            rows, columns = linear_sum_assignment(distances[run, client, epoch])
            order[run, client, epoch, torch.from_numpy(rows)] = torch.from_numpy(columns)
        gather = order.to(x.device)[..., None].expand_as(grouped)
        return grouped.gather(3, gather).view(runs, self.clients, self.epochs, self.per_client, *x.shape[2:])

    def prior(self, x: torch.Tensor) -> torch.Tensor:
        """Twice the variance over the epochs of each epoch's order-free summary (the mean squared difference
        between every two epochs' summaries), averaged over its entries, per run ``[N]``."""
        runs = len(x)
        projected = F.conv2d(x.flatten(0, 1), *_projection(x.shape[2], x.dtype, x.device), padding=1)
        summaries = projected.view(runs, self.clients, self.epochs, self.per_client, -1).amax(dim=3)
        return 2 * summaries.var(dim=2, unbiased=False).flatten(1).mean(1)

    def images(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The reconstruction: the matched candidates' mean over the epochs, ``[N, K * S, ...]``."""
        return self._matched(x, labels).mean(dim=2).flatten(1, 2)


@functools.cache
def _projection(channels: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random 3x3 convolution's weight and bias, drawn as PyTorch initialises a convolution
    (uniform within 1 / sqrt(fan-in)) from a seed of its own, on the CPU so that every device draws the same."""
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    bound = 1 / (channels * 9) ** 0.5
    weight = (torch.rand(PROJECTION_CHANNELS, channels, 3, 3, generator=generator, dtype=dtype) * 2 - 1) * bound
    bias = (torch.rand(PROJECTION_CHANNELS, generator=generator, dtype=dtype) * 2 - 1) * bound
    return weight.to(device), bias.to(device)
