"""Update-level defences: what a client does to its update before sending it, and what the attacker mirrors.

The client applies the defences its trial declares (:class:`gradinv.parameters.DefenceSettings`) in a
fixed order, each a plain function from the update's tensors to the tensors sent on:

1. **clip** (``clip_update`` = C): the whole update, all tensors together, is scaled by
   ``min(1, C / ||u||_2)``; its norm is then at most C.
2. **Gaussian noise** (``noise_std`` = s): adds ``s * N(0, 1)`` to every coordinate. The numbers come
   from a CPU ``torch.Generator`` seeded from ``defence_seed`` and are moved to the update's device
   afterwards, so every device sends the same update.
3. **pruning** (``keep_fraction`` = f): keeps the ``ceil(f * n)`` coordinates of largest magnitude and
   zeroes the rest, over the ``n`` coordinates of each parameter tensor (scope ``layer``, as
   GradAttack's gradient pruning) or of the whole update (``global``). ``ceil`` keeps at least one
   coordinate whatever ``f``; ties at the threshold are broken by ``torch.topk``.
4. **quantisation** (``quant_bits`` = b): each tensor's nonzero coordinates are rounded to ``2**b``
   evenly spaced levels ``scale * (2 q / (2**b - 1) - 1)``, ``q = 0 .. 2**b - 1``, that span
   ``[-scale, scale]``. Zeros stay zero: a pruned coordinate is not sent, so not quantised.

   - ``stochastic`` (QSGD-style): ``scale`` is the tensor's largest magnitude, so every value lies
     between two levels; it rounds up with probability equal to its distance from the lower level
     over the spacing, which makes the quantised update unbiased. The uniform numbers come from the
     same seed as the noise, from a stream of their own.
   - ``nearest``: the nearest level. At 1 bit ``scale`` is the mean magnitude of the tensor's nonzero
     coordinates (the scale of least squared error), so the update sent is ``sign(x) * mean|x|``:
     scaled signSGD. At 2 bits or more ``scale`` is the largest magnitude, as in the stochastic case.

What the attacker mirrors (:func:`attacker_defences`, :func:`kept_masks`): with ``clip_aware`` it
clips its candidate update exactly as the client did, differentiably, before the cost (this matters
only to costs that see the update's scale: ``l2``, ``l1``, ``max``; the cosine costs ignore a common
factor). With ``prune_aware`` it compares only the coordinates the sent update kept, i.e. its nonzero
ones (a kept coordinate that quantises to zero cannot be told from a pruned one). A naive attacker
compares everything. Noise and quantisation are not inverted: every attacker compares its candidate
against the noisy, quantised update as it was sent.

Secure aggregation (``aggregated_clients`` = K, :func:`sent_update`): the trial's images are split in
order into K equal groups, one per client. Each client runs the whole pipeline above on its own group
(local training, DP-SGD, defences), with seeds of its own: client 0 draws from ``defence_seed`` as a
lone client does, client k > 0 from a seed derived from ``(defence_seed, k)``, so the clients share
no noise, batches or rounding (FedAvg's mini-batch order, from ``data_order_seed``, is one recipe for
all). The server sees only the mean of the K updates (gradinv.client.update.aggregate).
The attacker (:func:`attacker_update`) predicts that mean for its K groups of candidate images, each
group through the client's training and the defences it mirrors; the prune-aware attacker compares the
coordinates the mean kept (where any client kept one).

The realistic FedAvg attacker (Dimitrov et al., "Data Leakage in Federated Averaging", TMLR 2022): by
default the attacker unrolls the client's training exactly as it ran. ``attacker_local_lr`` and
``attacker_local_steps`` replace the learning rate and step count by its guesses (:func:`attacker_recipe`),
and ``attacker_order: unknown`` its knowledge of the shuffled mini-batches by its own order
(gradinv.client.update.attacker_schedule); the client trains as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from ..parameters import ClientSettings, DefenceSettings, extract
from ..parameters.conditions import epochs_spanned
from .update import (
    ClientUpdate,
    Defence,
    PrivateTraining,
    aggregate,
    attacker_schedule,
    average,
    client_update,
    output_gradient_update,
    parameter_update,
)

Tensors = tuple[torch.Tensor, ...]
NOISE_STREAM, ROUNDING_STREAM = 0, 1  # generator seed = 2 * defence_seed + stream: the streams never coincide


def clip(tensors: Tensors, max_norm: float) -> Tensors:
    """The update scaled by ``min(1, max_norm / ||update||_2)`` (differentiable; works under ``vmap``)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
    factor = (max_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
    return tuple(t * factor for t in tensors)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(2 * seed + stream)


def add_noise(tensors: Tensors, std: float, seed: int) -> Tensors:
    """Gaussian noise of standard deviation ``std``, drawn on the CPU tensor by tensor, in order."""
    generator = _generator(seed, NOISE_STREAM)
    return tuple(
        t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device) for t in tensors
    )


def prune(tensors: Tensors, keep_fraction: float, scope: str) -> Tensors:
    """Only the ``ceil(keep_fraction * n)`` largest-magnitude coordinates of each tensor (``layer``) or
    of the whole update (``global``); the rest are zero."""
    if scope == "layer":
        return tuple(_keep_largest(t.reshape(-1), keep_fraction).reshape(t.shape) for t in tensors)
    kept = _keep_largest(torch.cat([t.reshape(-1) for t in tensors]), keep_fraction)
    return tuple(part.reshape(t.shape) for part, t in zip(kept.split([t.numel() for t in tensors]), tensors))


def _keep_largest(flat: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    count = math.ceil(keep_fraction * flat.numel())
    if count >= flat.numel():
        return flat
    chosen = flat.abs().topk(count).indices
    return torch.zeros_like(flat).index_copy_(0, chosen, flat[chosen])


def quantise(tensors: Tensors, bits: int, rounding: str, seed: int) -> Tensors:
    """Each tensor's nonzero coordinates on ``2**bits`` levels (the module's docstring gives the levels)."""
    generator = _generator(seed, ROUNDING_STREAM) if rounding == "stochastic" else None
    return tuple(_quantise_tensor(t, bits, rounding, generator) for t in tensors)


def _quantise_tensor(t: torch.Tensor, bits: int, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    sent = t != 0
    if not sent.any():
        return t
    magnitudes = t[sent].abs()
    scale = magnitudes.mean() if rounding == "nearest" and bits == 1 else magnitudes.max()
    top = 2**bits - 1  # the highest level's index
    position = ((t / scale + 1) / 2 * top).clamp(0, top)  # in level spacings above the lowest level
    if generator is None:
        level = position.round()
    else:
        uniform = torch.rand(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
        level = position.floor() + (uniform < position - position.floor()).to(t.dtype)
    return torch.where(sent, scale * (2 * level / top - 1), torch.zeros_like(t))


def client_defences(source) -> tuple[Defence, ...]:
    """The defences a trial declares, in the order the client applies them; ``source`` is a trial, its
    :class:`DefenceSettings`, or anything holding those fields. Empty when every defence is off."""
    settings = extract(DefenceSettings, source)
    chain: list[Defence] = []
    if settings.clip_update is not None:
        chain.append(functools.partial(clip, max_norm=settings.clip_update))
    if settings.noise_std > 0:
        chain.append(functools.partial(add_noise, std=settings.noise_std, seed=settings.defence_seed))
    if settings.keep_fraction < 1:
        chain.append(functools.partial(prune, keep_fraction=settings.keep_fraction, scope=settings.prune_scope))
    if settings.quant_bits is not None:
        chain.append(
            functools.partial(
                quantise, bits=settings.quant_bits, rounding=settings.quant_rounding, seed=settings.defence_seed
            )
        )
    return tuple(chain)


def attacker_defences(source) -> tuple[Defence, ...]:
    """What the attacker applies to its candidate update before the cost, differentiably: the client's
    clip when ``clip_aware``; nothing else (noise and quantisation are compared as sent)."""
    settings = extract(DefenceSettings, source)
    if settings.clip_aware and settings.clip_update is not None:
        return (functools.partial(clip, max_norm=settings.clip_update),)
    return ()


def kept_masks(source, sent: Tensors) -> Tensors | None:
    """With ``prune_aware`` and pruning on: 1 at each coordinate the sent update kept (its nonzero ones),
    0 elsewhere, in the update's dtype; None: the attacker compares every coordinate."""
    settings = extract(DefenceSettings, source)
    if not (settings.prune_aware and settings.keep_fraction < 1):
        return None
    return tuple((t != 0).to(t.dtype) for t in sent)


def private_training(source) -> PrivateTraining | None:
    """The DP-SGD of the client's local training (gradinv.client.dp_training), or None without ``dp_clip``."""
    settings = extract(DefenceSettings, source)
    if settings.dp_clip is None:
        return None
    return PrivateTraining(settings.dp_clip, settings.dp_noise, settings.dp_sample_rate, settings.defence_seed)


def client_settings(source, client: int) -> DefenceSettings:
    """Client ``client``'s own defence settings: the trial's, with a seed of its own for client k > 0
    (derived from ``defence_seed`` and k); client 0 keeps ``defence_seed``, as a lone client."""
    settings = extract(DefenceSettings, source)
    if client == 0:
        return settings
    seed = np.random.SeedSequence([settings.defence_seed % 2**64, client]).generate_state(1)[0]
    return dataclasses.replace(settings, defence_seed=int(seed))


def sent_update(model, images: torch.Tensor, labels: torch.Tensor, trial) -> ClientUpdate:
    """What the server receives for a trial's normalised ``images``: each client's local training
    (DP-SGD when declared) and defences on its own group of images, averaged over the
    ``aggregated_clients`` clients (one client: its own update)."""
    fl, clients = trial.fl_config(), trial.aggregated_clients
    size = len(images) // clients
    updates = []
    for client, (x, y) in enumerate(zip(images.split(size), labels.split(size))):
        own = client_settings(trial, client)
        updates.append(client_update(model, x, y, fl, client_defences(own), private_training(own)))
    return aggregate(updates)


def attacker_update(source, sent: ClientUpdate):
    """The update the attacker predicts for candidate images, ``(model, params, buffers, images, labels)
    -> tensors``: the images split in order into ``sent.clients`` groups, each through the client's
    local training as the attacker unrolls it and the defences it mirrors, then averaged as the server
    averages (one client: its own update)."""
    settings = extract(DefenceSettings, source)
    epochs = candidate_epochs(source, sent)
    fl = attacker_recipe(sent.fl)
    schedule = attacker_schedule(sent.images_per_client, fl, epochs)
    size = sent.images_per_client * epochs  # each client's candidates
    if getattr(source, "output_gradient", "computed") == "read":  # one FedSGD client; y: its logit gradient
        trainings = [functools.partial(output_gradient_update, fl=fl)]
    else:
        trainings = [_attacker_training(settings, sent, fl, schedule, client) for client in range(sent.clients)]
    mirrored = attacker_defences(settings)

    def client(training, model, params, buffers, x, y):
        update = training(model, params, buffers, x, y)
        for defence in mirrored:
            update = defence(update)
        return update

    def update(model, params, buffers, images, labels):
        groups = zip(trainings, images.split(size), labels.split(size))
        own = [client(training, model, params, buffers, x, y) for training, x, y in groups]
        return own[0] if len(own) == 1 else average(own)

    return update


def candidate_epochs(source, sent: ClientUpdate) -> int:
    """How many local epochs unroll candidates of their own (``epoch_prior`` above 0, where the attacker
    does not know the order of several epochs' shuffled mini-batches); 1: one candidate per image."""
    fl, size = attacker_recipe(sent.fl), sent.images_per_client
    unknown_order = fl.fl == "fedavg" and fl.attacker_order == "unknown" and fl.batch_order == "shuffled"
    if getattr(source, "epoch_prior", 0) <= 0 or not (unknown_order and 0 < fl.local_batch_size < size):
        return 1
    return epochs_spanned(size, fl.local_batch_size, fl.local_steps)


def attacker_recipe(fl: ClientSettings) -> ClientSettings:
    """The client's local training as the attacker believes it: its guesses ``attacker_local_lr`` and
    ``attacker_local_steps`` in place of the client's (None: it knows them). FedSGD has nothing to guess."""
    if fl.fl != "fedavg" or (fl.attacker_local_lr is None and fl.attacker_local_steps is None):
        return fl
    lr, steps = fl.attacker_local_lr, fl.attacker_local_steps
    return dataclasses.replace(
        fl, local_lr=fl.local_lr if lr is None else lr, local_steps=fl.local_steps if steps is None else steps
    )


def _attacker_training(settings: DefenceSettings, sent: ClientUpdate, fl: ClientSettings, schedule, client: int):
    """One client's local training as the attacker unrolls it (``fl``: :func:`attacker_recipe`), ``(model,
    params, buffers, images, labels) -> update``: with ``dp_aware``, DP-SGD's per-example clip over the
    batches that client drew (without the noise, which it cannot know; a guessed step count takes the
    first of them, or repeats them in turn); otherwise plain training over ``schedule`` (a naive attacker
    ignores the clip and the sampling)."""
    if not (settings.dp_aware and sent.private is not None):
        return lambda model, params, buffers, x, y: parameter_update(model, params, buffers, x, y, fl, schedule)
    from .dp_training import clipped_update

    private, batches = sent.private, sent.batches[client]
    if fl.local_steps != sent.fl.local_steps:
        batches = [batches[step % len(batches)] for step in range(fl.local_steps)]
    return functools.partial(clipped_update, fl=fl, clip=private.clip, batches=batches, sample_rate=private.sample_rate)
