"""The attack families: each registers its name, the parts of the trial it reads, whether its trials
pack into lanes, and its run. A new family is one module with a ``run(job) -> AttackResult`` plus one
line in :data:`FAMILIES`.

Light on purpose (no torch): the declarations ask it which settings apply to which attack, and the
commands that only read results import it. The runs are imported when a trial runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..parameters import InvertingSettings, OptimiserSettings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..fl import ClientUpdate
    from .inverting import AttackResult


@dataclass(frozen=True)
class Requirement:
    """A condition the family puts on the rest of the trial, and the one-line error when it fails."""

    field: str  # the setting the error names
    value: Callable[[Any], Any]  # the trial -> the value shown
    holds: Callable[[Any], bool]  # on the trial
    fix: str

    def check(self, trial) -> None:
        from ..errors import require

        require(self.holds(trial), self.field, self.value(trial), self.fix)


@dataclass(frozen=True)
class Family:
    name: str
    reads: tuple[type, ...]  # the attack-setting parts it reads; the others do not apply to its trials
    seeded: bool  # starts from random images drawn from the trial's attack_seed
    lanes: bool  # False: every trial runs alone (a pack of one)
    run: str  # "module:function", the function taking an AttackJob and returning an AttackResult
    requires: tuple[Requirement, ...] = ()  # what it needs of the victim and the data

    def runner(self) -> Callable[["AttackJob"], "AttackResult"]:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


@dataclass
class AttackJob:
    """What every attack receives: the lanes' client updates and what the attacker knows of them."""

    model: "nn.Module"
    specs: Sequence[Any]  # the lanes' TrialSpecs (lane-compatible)
    updates: Sequence["ClientUpdate"]
    labels: "torch.Tensor"  # [L, B] the labels the attacker has (known, or recovered from the update)
    labels_known: Sequence[bool]
    image_shape: tuple[int, ...]  # [B, C, H, W]
    num_classes: int
    box: tuple["torch.Tensor", "torch.Tensor"]  # the valid pixels, normalised, [C, 1, 1]
    on_progress: Callable[[int], None] | None = None  # iterations done
    on_checkpoint: Callable[[int, list[float]], None] | None = None  # (iteration, best cost per lane)
    on_images: Callable[[int, "torch.Tensor"], None] | None = None  # (iteration, best images per lane)
    deadline: float | None = None  # time.monotonic() past which the attack stops

    @property
    def seeds(self) -> list[int]:
        return [spec.attack_seed for spec in self.specs]


ONE_IMAGE = Requirement("images_per_client", lambda t: len(t.images), lambda t: len(t.images) == 1,
                        "the analytic attack recovers one image per client")  # fmt: skip
FULLY_CONNECTED = Requirement("model", lambda t: t.model, lambda t: t.model == "mlp",
                              "the analytic attack needs the 'mlp' model (a fully connected first layer)")  # fmt: skip

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("ig", (OptimiserSettings, InvertingSettings), seeded=True, lanes=True, run="gradinv.attacks.inverting:run"),
        Family("dlg", (OptimiserSettings,), seeded=True, lanes=True, run="gradinv.attacks.dlg:run"),
        Family("analytic", (), seeded=False, lanes=True, run="gradinv.attacks.analytic:run",
               requires=(ONE_IMAGE, FULLY_CONNECTED)),
    )
}


def settings_parts() -> set[type]:
    """The parts that only some families read."""
    return {part for family in FAMILIES.values() for part in family.reads}
