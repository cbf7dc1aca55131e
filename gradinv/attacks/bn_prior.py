"""GradInversion's priors (Yin et al., "See through Gradients: Image Batch Recovery via GradInversion",
CVPR 2021): BatchNorm statistics (R_feat) and group consistency (R_group).

R_feat: a candidate batch's features at each BatchNorm layer ``l`` should have the statistics that
layer expects, ``sum_l ||mu_l(x) - mu_l*||_2 + ||sigma2_l(x) - sigma2_l*||_2`` with per-channel means
and (biased) variances of the layer's inputs over the batch and spatial positions. The targets are
the model's running statistics (``bn_stats`` ``running``: realistic, but 0 and 1 in an untrained model)
or the client batch's own, recorded when it trained with BatchNorm in train mode (``batch``: the
paper's optimistic threat model; :attr:`gradinv.client.update.ClientUpdate.bn_batch_stats`). The candidate's
features come from the same forward the client ran (``client_bn``) on the images of the client's
first local step; under secure aggregation each client's group of candidate images is compared with
that client's statistics and the distances add up (the optimistic attacker knows each client's).

R_group: with several restarts, each is pulled toward their pixel-wise mean, ``||x_r - mean_r' x_r'||_2``.
The paper registers the restarts to each other before averaging; there is no spatial registration
here, so the consensus is the plain mean. It is held constant (detached) in each evaluation, so a
run's cost still depends on its own images alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import vmap

from ..client.update import ClientUpdate, LayerStats, batch_norms, feature_statistics, minibatch_schedule
from ..errors import require


def feature_distance(stats: LayerStats, targets: LayerStats) -> torch.Tensor:
    """R_feat of one batch: the L2 distances of each layer's mean and variance to their targets, summed."""
    return sum(
        torch.linalg.vector_norm(mean - target_mean) + torch.linalg.vector_norm(var - target_var)
        for (mean, var), (target_mean, target_var) in zip(stats, targets, strict=True)
    )


def running_statistics(model: nn.Module, buffers: dict[str, torch.Tensor]) -> LayerStats:
    """The model's running (mean, var) of every BatchNorm layer, in module order."""
    names = list(batch_norms(model))
    require(
        all(f"{name}.running_mean" in buffers for name in names),
        "bn_stats",
        "running",
        "the model's BatchNorm layers keep no running statistics; use bn_stats batch",
    )
    return tuple((buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"]) for name in names)


def target_statistics(
    model: nn.Module, buffers: dict[str, torch.Tensor], updates: Sequence[ClientUpdate], bn_stats: str
) -> list[LayerStats]:
    """Per layer, ``(mean, var)`` targets of shape ``[L, K, C]`` (lanes, clients, channels)."""
    clients = updates[0].clients
    if bn_stats == "running":
        per_client = [running_statistics(model, buffers)] * clients
        per_lane = [per_client] * len(updates)
    else:
        require(
            all(u.bn_batch_stats is not None for u in updates),
            "bn_stats",
            bn_stats,
            "the client recorded no batch statistics: it must run BatchNorm in train mode (client_bn train)",
        )
        per_lane = [u.bn_batch_stats for u in updates]
    layers = len(per_lane[0][0])
    return [
        tuple(
            torch.stack([torch.stack([client[layer][part] for client in lane]) for lane in per_lane]) for part in (0, 1)
        )
        for layer in range(layers)
    ]


class BatchNormPrior:
    """R_feat of each run's candidate batch, ``[N]`` from images ``[N, B, C, H, W]``, batched over runs
    by ``vmap`` (one run: the function itself). ``per_run`` turns ``[L, ...]`` into ``[N, ...]``."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        bn_stats: str,
        per_run: Callable[[torch.Tensor], torch.Tensor],
    ):
        require(
            len(batch_norms(model)) > 0,
            "bn_prior",
            "> 0",
            "the model has no BatchNorm layers (norm group?); use norm batch or bn_prior 0",
        )
        sent = updates[0]  # lanes share the client recipe
        size, client_bn = sent.images_per_client, sent.fl.client_bn
        first = minibatch_schedule(size, sent.fl)[0]
        targets = [
            tuple(per_run(part) for part in layer) for layer in target_statistics(model, buffers, updates, bn_stats)
        ]
        self.flat_targets = [part for layer in targets for part in layer]  # mean, var of layer 0, then layer 1, ...

        def one_run(x, *flat):  # x [B, C, H, W]; flat: per layer mean and var targets [K, C]
            total = 0
            for client, images in enumerate(x.split(size)):
                stats = feature_statistics(
                    model, params, buffers, images if first is None else images[first], client_bn
                )
                wanted = [(flat[2 * i][client], flat[2 * i + 1][client]) for i in range(len(flat) // 2)]
                total = total + feature_distance(stats, wanted)
            return total

        self.one_run = one_run
        self.batched = vmap(one_run)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1:
            return self.one_run(x[0], *(t[0] for t in self.flat_targets)).unsqueeze(0)
        return self.batched(x, *self.flat_targets)


def group_consistency(x: torch.Tensor, restarts: int) -> torch.Tensor:
    """R_group per run, ``[N]`` from lane-major runs ``[L * R, ...]``: each restart's L2 distance to
    the (detached, unregistered) mean of its lane's restarts."""
    runs = x.view(-1, restarts, *x.shape[1:])
    consensus = runs.detach().mean(dim=1, keepdim=True)
    return torch.linalg.vector_norm((runs - consensus).flatten(2), dim=2).flatten()
