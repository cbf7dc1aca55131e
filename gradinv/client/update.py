"""What a federated client sends: a FedSGD gradient or a FedAvg weight update, after its defences.

The pipeline: the victim's weights -> local training (:class:`ClientSettings`, DP-SGD when the trial asks)
-> defences (gradinv.client.defences) -> the update -> with secure aggregation, the mean of several clients'
updates (:func:`aggregate`), which is all the server sees.
One pure function, :func:`parameter_update`, computes the update from images and labels. The client
calls it on its real data; the attacker calls the same function on its guesses inside
``torch.func.grad`` and so unrolls the client's local training differentiably, with the gradient
flowing only into the images.

BatchNorm (``client_bn``): in ``eval`` the client's forward normalises with the model's running
statistics; in ``train`` each forward normalises with its own batch's statistics, as a client
training in train mode does (GradInversion's threat model), for the client and the attacker alike.
The running buffers are then left as they are: a train-mode client would also update them, but
they are not part of the update it sends, so every forward here reads them and none writes them
(which is also what ``torch.func.grad``/``vmap`` require). With ``train`` the client also records
each BatchNorm layer's input mean and variance on its first local step's batch
(:attr:`ClientUpdate.bn_batch_stats`), which GradInversion's optimistic attacker knows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from ..parameters import ClientSettings
from .local_sgd import local_sgd

Defence = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]  # an update in, the update sent out
LayerStats = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per BatchNorm layer in module order: (mean, var) [C]


@dataclass(frozen=True)
class PrivateTraining:
    """DP-SGD in the client's local training (gradinv.client.dp_training): per-example clip, noise, Poisson batches."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    seed: int  # the batches and the noise


@dataclass(frozen=True)
class ClientUpdate:
    """A client's message (or, under secure aggregation, the mean of ``clients`` messages): tensors in
    the model's parameter order, and how they were made."""

    tensors: tuple[torch.Tensor, ...]
    fl: ClientSettings
    num_images: int  # every client's together; each client holds num_images // clients
    defences: tuple[Defence, ...] = ()  # applied after local training, in order; the attacker knows them
    private: PrivateTraining | None = None  # DP-SGD in the local training (the clients differ only in seed)
    batches: tuple[list[torch.Tensor], ...] | None = None  # DP-SGD: per client, each step's indices into its images
    clients: int = 1  # secure aggregation: how many clients' updates the tensors average
    bn_batch_stats: tuple[LayerStats, ...] | None = None  # client_bn train: per client, its first step's BN input stats

    @property
    def images_per_client(self) -> int:
        return self.num_images // self.clients


def model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached parameters and buffers for ``functional_call``."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return params, buffers


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@contextlib.contextmanager
def batch_norm_mode(model: nn.Module, client_bn: str) -> Iterator[None]:
    """Within the block, the model's BatchNorm layers normalise as ``client_bn`` says; the other
    layers keep their mode. ``train``: each batch's own statistics, with the running buffers neither
    read nor written (``track_running_stats`` off for the block), so that nothing is mutated inside
    ``grad``/``vmap``. ``eval``: the model as it is."""
    norms = list(batch_norms(model).values()) if client_bn == "train" else []
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.training, m.track_running_stats = training, tracking


def forward(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    client_bn: str,
) -> torch.Tensor:
    """The model's logits for ``images`` at ``params`` with BatchNorm in the client's mode."""
    if client_bn == "eval":  # today's path, unchanged
        return functional_call(model, (params, buffers), (images,))
    with batch_norm_mode(model, client_bn):
        return functional_call(model, (params, buffers), (images,))


def feature_statistics(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    client_bn: str,
) -> LayerStats:
    """Each BatchNorm layer's input mean and (biased, as BatchNorm normalises with it) variance per
    channel over the batch and spatial positions, in module order. Differentiable in ``images`` and
    usable under ``vmap``: the hooks only compute from the inputs they see, nothing is written."""
    norms = batch_norms(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name):
        def hook(_, inputs):
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            seen[name] = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in norms.items()]
    try:
        forward(model, params, buffers, images, client_bn)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(seen[name] for name in norms if name in seen)


def minibatch_schedule(num_images: int, fl: ClientSettings) -> list[torch.Tensor | None]:
    """The image indices of each local step (None: all images).

    ``shuffled``: every local epoch visits the images in a new order (from ``data_order_seed``), its
    last mini-batch smaller when the batch size does not divide them. ``sequential`` (the reference):
    step ``i`` takes the fixed slice ``i mod (n // batch)``; the last ``n mod batch`` images are never used.
    """
    batch = fl.local_batch_size or num_images
    if fl.fl == "fedsgd" or batch >= num_images:
        return [None] * (fl.local_steps if fl.fl == "fedavg" else 1)
    if fl.batch_order == "sequential":
        slices = num_images // batch
        return [torch.arange(i % slices * batch, (i % slices + 1) * batch) for i in range(fl.local_steps)]
    generator = torch.Generator().manual_seed(fl.data_order_seed)
    schedule: list[torch.Tensor | None] = []
    while len(schedule) < fl.local_steps:
        order = torch.randperm(num_images, generator=generator, device="cpu")  # the generator's device
        schedule += [order[i : i + batch] for i in range(0, num_images, batch)]
    return schedule[: fl.local_steps]


def attacker_schedule(num_images: int, fl: ClientSettings, epochs: int = 1) -> list[torch.Tensor | None]:
    """The mini-batches the attacker unrolls over its candidate images (None: all of them).

    ``attacker_order: known``: the client's own (:func:`minibatch_schedule`). ``unknown`` (Dimitrov et al.,
    TMLR 2022): the attacker cannot know how a shuffled client drew its mini-batches, so each epoch takes
    its candidates in index order, in the client's batch size (the last batch smaller, as the client's),
    the same slices every epoch: one candidate per image, shared by the epochs; or, with ``epochs``
    above 1 (``epoch_prior``), ``num_images`` candidates of each epoch's own, epoch after epoch. Full
    batches and ``sequential`` slices follow the index order already: there the two agree.
    """
    batch = fl.local_batch_size or num_images
    if fl.attacker_order == "known" or fl.fl == "fedsgd" or fl.batch_order == "sequential" or batch >= num_images:
        return minibatch_schedule(num_images, fl)
    epoch = [torch.arange(start, min(start + batch, num_images)) for start in range(0, num_images, batch)]
    own = num_images if epochs > 1 else 0  # each epoch's first candidate
    return [epoch[step % len(epoch)] + step // len(epoch) * own for step in range(fl.local_steps)]


def parameter_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    fl: ClientSettings,
    schedule: list[torch.Tensor | None],
) -> tuple[torch.Tensor, ...]:
    """FedSGD: the loss gradient. FedAvg: theta_K - theta_0 after the local SGD steps.

    ``labels`` are class indices ``[B]`` or class probabilities ``[B, K]``.
    """

    def loss(p, x, y):
        return F.cross_entropy(forward(model, p, buffers, x, fl.client_bn), y)

    def gradient(p, indices):
        return grad(loss)(p, *((images, labels) if indices is None else (images[indices], labels[indices])))

    return local_sgd(params, gradient, fl, schedule)


def output_gradient_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    output_gradient: torch.Tensor,
    fl: ClientSettings,
) -> tuple[torch.Tensor, ...]:
    """FedSGD's parameter gradient backpropagated from a given loss gradient at the logits, ``[B, K]``:
    with the client's own (its output bias gradient), the client's computation exactly, softmax's
    rounding included, for any candidate ``images``."""

    def pulled(p):
        return (forward(model, p, buffers, images, fl.client_bn) * output_gradient).sum()

    return tuple(grad(pulled)(params).values())


def local_training(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, fl: ClientSettings
) -> tuple[torch.Tensor, ...]:
    """The client's training on its normalised ``images``: the gradient (FedSGD) or theta_K - theta_0 (FedAvg)."""
    params, buffers = model_state(model)
    schedule = minibatch_schedule(len(images), fl)
    with torch.no_grad():
        tensors = parameter_update(model, params, buffers, images, labels, fl, schedule)
    return tuple(t.detach() for t in tensors)


def client_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fl: ClientSettings,
    defences: tuple[Defence, ...] = (),
    private: PrivateTraining | None = None,
) -> ClientUpdate:
    """What the client sends: the victim's weights -> local training (DP-SGD when ``private``) -> each
    defence in turn -> the update."""
    batches = None
    stats = None
    if fl.client_bn == "train":  # what GradInversion's optimistic attacker knows: the first step's batch
        first = minibatch_schedule(len(images), fl)[0]
        with torch.no_grad():
            stats = (
                feature_statistics(model, *model_state(model), images if first is None else images[first], "train"),
            )
    if private is None:
        tensors = local_training(model, images, labels, fl)
    else:
        from .dp_training import dp_local_training  # Opacus: only trials with DP-SGD load it

        tensors, batches = dp_local_training(
            model,
            images,
            labels,
            fl=fl,
            clip=private.clip,
            seed=private.seed,
            noise_multiplier=private.noise_multiplier,
            sample_rate=private.sample_rate,
        )
    for defence in defences:
        tensors = defence(tensors)
    return ClientUpdate(
        tensors,
        fl,
        len(images),
        tuple(defences),
        private,
        None if batches is None else (batches,),
        bn_batch_stats=stats,
    )


def average(updates: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The server's arithmetic under secure aggregation: the coordinate-wise mean of the updates."""
    return tuple(torch.stack(parts).mean(dim=0) for parts in zip(*updates))


def aggregate(updates: Sequence[ClientUpdate]) -> ClientUpdate:
    """Secure aggregation: the server learns only the mean of the clients' updates (one client: its own).

    With FedSGD and equally many images per client the mean of the clients' mean gradients is the
    gradient over all their images, as if one client held them; FedAvg's local steps or the clients'
    defences make the two differ.
    """
    if len(updates) == 1:
        return updates[0]
    first = updates[0]
    batches = None if first.batches is None else tuple(b for u in updates for b in u.batches)
    stats = None if first.bn_batch_stats is None else tuple(s for u in updates for s in u.bn_batch_stats)
    return ClientUpdate(
        average([u.tensors for u in updates]),
        first.fl,
        sum(u.num_images for u in updates),
        first.defences,
        first.private,
        batches,
        clients=sum(u.clients for u in updates),
        bn_batch_stats=stats,
    )
