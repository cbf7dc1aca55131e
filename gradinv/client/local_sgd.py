"""The client's local SGD, given how to take a gradient: shared by its plain training
(gradinv.client.update) and by the attacker's noise-free DP-SGD twin (gradinv.client.dp_training), so that
both unroll the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..parameters import ClientSettings

Gradient = Callable[[dict[str, torch.Tensor], torch.Tensor | None], dict[str, torch.Tensor]]  # (params, batch) -> grads


def local_sgd(
    params: dict[str, torch.Tensor],
    gradient: Gradient,
    fl: ClientSettings,
    schedule: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, ...]:
    """The client's local SGD, given ``gradient(params, batch indices)``: FedSGD sends the gradient at
    ``params`` on the first batch, FedAvg theta_K - theta_0 after one SGD step per batch (with
    ``local_momentum``, torch.optim.SGD's: the first step's buffer is its gradient, then m v + g)."""
    if fl.fl == "fedsgd":
        return tuple(gradient(params, schedule[0]).values())
    current, velocity = params, None
    for indices in schedule:
        step = gradient(current, indices)
        if fl.local_momentum:
            velocity = step if velocity is None else {n: fl.local_momentum * velocity[n] + step[n] for n in step}
            step = velocity
        current = {name: value - fl.local_lr * step[name] for name, value in current.items()}
    return tuple(current[name] - params[name] for name in params)
