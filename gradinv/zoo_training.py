"""The defended training step of a victim's recipe (gradinv.zoo trains with it): plain SGD, or DP-SGD
and the update-level defences on every step's gradient. It receives the recipe's defences and learning
rate, not the recipe, so that it needs nothing of gradinv.zoo."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


class TrainingStep:
    """One SGD step at ``lr`` (Nesterov momentum 0.9, weight decay 5e-4) on a batch, with ``defence``
    (the recipe's (name, value) pairs of DefenceSettings) on its gradient: DP-SGD through Opacus
    (gradinv.client.dp_training; the recipe's model has GroupNorm, since BatchNorm mixes a batch's
    examples) and then the update-level defences (gradinv.client.defences), their random numbers drawn
    afresh at every step."""

    def __init__(
        self, model: torch.nn.Module, defence: tuple, lr: float, sample_rate: float, expected_batch_size: float
    ):
        from .parameters import DefenceSettings, defaults

        self.model, self.sample_rate = model, sample_rate
        self.settings = DefenceSettings(**{**defaults(DefenceSettings), **dict(defence)})
        self.private = self.module = None
        self.count = 0

        def sgd(parameters):
            return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

        if self.settings.dp_clip is None:
            self.optimiser = sgd(model.parameters())
            self.parameters = list(model.parameters())
            return
        from .client import dp_training as dp

        self.private = self.settings
        self.module, wrapped = dp.make_private(
            model,
            sgd,
            clip=self.settings.dp_clip,
            noise_seed=self.settings.defence_seed,
            noise_multiplier=self.settings.dp_noise,
            expected_batch_size=expected_batch_size,
        )
        self.dp_optimiser, self.optimiser = wrapped, wrapped.original_optimizer
        self.parameters = list(wrapped.params)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.private is not None:
            from .client import dp_training as dp

            logits = dp.noisy_gradient(self.module, self.dp_optimiser, images, labels)
            loss = float(F.cross_entropy(logits.detach(), labels)) if len(labels) else 0.0
        else:
            logits = self.model(images)
            loss_tensor = F.cross_entropy(logits, labels)
            self.optimiser.zero_grad(set_to_none=True)
            loss_tensor.backward()
            loss = loss_tensor.item()
        self._defend_gradient()
        self.optimiser.step()
        self.count += 1
        return logits.detach(), loss

    def _defend_gradient(self) -> None:
        from .client.defences import client_defences

        defences = client_defences(
            dataclasses.replace(self.settings, defence_seed=self.settings.defence_seed * 1_000_003 + self.count)
        )
        if not defences:
            return
        gradient = tuple(p.grad for p in self.parameters)
        for defence in defences:
            gradient = defence(gradient)
        for parameter, defended in zip(self.parameters, gradient):
            parameter.grad = defended

    def finish(self) -> None:
        """The trained weights back in the model (a DP copy's parameters carry the model's names)."""
        if self.module is not None:
            self.model.load_state_dict(self.module.to_standard_module().state_dict(), strict=False)

    def privacy(self, steps: int) -> dict:
        """The sidecar's privacy fields: DP-SGD's epsilon over the whole training, at the recipe's delta."""
        if self.private is None:
            return {}
        from .client.accounting import ACCOUNTANT, epsilon

        return {
            "training_epsilon": epsilon(self.settings.dp_noise, self.sample_rate, steps, self.settings.dp_delta),
            "accountant": ACCOUNTANT,
            "delta": self.settings.dp_delta,
        }
