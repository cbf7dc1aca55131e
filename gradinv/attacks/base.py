"""What every attack family shares: the job it receives, the result it returns, the timeout that stops
it, and the :class:`Family` declaration of its traits (gradinv.attacks.registry lists the families).

A new family is a module with a ``run(job: AttackJob) -> AttackResult`` and one :class:`Family` in the
registry; callers read its traits, never its name.

Light on purpose (no torch): the declarations are read by commands that never run an attack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import require

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..client.update import ClientUpdate


@dataclass
class AttackJob:
    """What every attack receives: the lanes' client updates and what the attacker knows of them."""

    model: nn.Module
    specs: Sequence[Any]  # the lanes' TrialSpecs (lane-compatible)
    updates: Sequence[ClientUpdate]
    labels: torch.Tensor  # [L, B] the labels the attacker has (known, or recovered from the update)
    labels_known: Sequence[bool]
    image_shape: tuple[int, ...]  # [B, C, H, W]
    num_classes: int
    box: tuple[torch.Tensor, torch.Tensor]  # the valid pixels, normalised, [C, 1, 1]
    on_progress: Callable[[int], None] | None = None  # iterations done
    on_checkpoint: Callable[[int, list[float]], None] | None = None  # (iteration, best cost per lane)
    on_images: Callable[[int, torch.Tensor], None] | None = None  # (iteration, best images per lane), called first
    deadline: float | None = None  # time.monotonic() past which the attack stops (raising TrialTimeout)

    @property
    def seeds(self) -> list[int]:
        return [spec.attack_seed for spec in self.specs]


# A trial's attack has settled when its best gradient cost fell by less than this share over the last quarter
# of its run: the budget stops extending it (gradinv.attacks.inverting), the report calls it converged.
SETTLED_FROM = 0.75
SETTLED_COST_FALL = 0.05


@dataclass
class AttackResult:
    images: torch.Tensor  # [L, B, C, H, W] in normalised coordinates, each lane's reconstruction
    restart_scores: torch.Tensor  # [L, R] final gradient cost without TV (inf for NaN)
    curve: list[tuple[int, list[float]]] = field(default_factory=list)  # (iteration, best cost per lane)
    seconds: float = 0.0
    labels: torch.Tensor | None = None  # [L, B] labels the attack settled on; None: the ones it was given
    iterations_run: list[int] | None = None  # per lane, where the budget stops lanes apart (max_iterations)


class TrialTimeout(RuntimeError):
    """An attack ran past its job's deadline: every lane of the pack stops."""


@dataclass(frozen=True)
class Requirement:
    """A condition the family puts on the rest of the trial, and the one-line error when it fails."""

    field: str  # the setting the error names
    value: Callable[[Any], Any]  # the trial -> the value shown
    holds: Callable[[Any], bool]  # on the trial
    fix: str | Callable[[Any], str]  # or the trial -> the fix

    def check(self, trial) -> None:
        if not self.holds(trial):
            require(False, self.field, self.value(trial), self.fix(trial) if callable(self.fix) else self.fix)


@dataclass(frozen=True, kw_only=True)
class Family:
    """An attack family's traits: what it reads of a trial, what it needs of the rest, how it runs."""

    name: str
    reads: tuple[type, ...]  # the attack-setting parts it reads; the others do not apply to its trials
    run: Callable[[AttackJob], AttackResult]  # the attack on a pack of lanes
    seeded: bool = False  # starts from random images drawn from the trial's attack_seed
    mirrors_defences: bool = False  # its cost can mirror the client's defences (the *_aware settings apply)
    budget: tuple[str, ...] = ()  # the fields `tune`'s budget of steps sets: with restarts, restarts x iterations
    paper_defaults: bool = False  # its declared defaults are the paper's attack, `tune`'s yardstick
    requires: tuple[Requirement, ...] = ()  # what it needs of the victim and the data
    ordered: bool = True  # reconstruction b is made for image b's label (False: matched to the truth by pixels)
    lbfgs_history: bool = False  # optimises images and label logits by L-BFGS, whose history the memory estimate counts
    # a malicious server's: (victim, trial, data_root) -> the model it ships to the client instead
    ships: Callable[[nn.Module, Any, Any], nn.Module] | None = None

    def shipped(self, victim: nn.Module, trial, data_root=None) -> nn.Module:
        """The model the client computes its update on: the victim, or the malicious server's version of it."""
        return victim if self.ships is None else self.ships(victim, trial, data_root)
