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

from ..parameters import MIN_IMPRINT_SAMPLE, ImprintSettings, InvertingSettings, OptimiserSettings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..client.update import ClientUpdate
    from .inverting import AttackResult


@dataclass(frozen=True)
class Requirement:
    """A condition the family puts on the rest of the trial, and the one-line error when it fails."""

    field: str  # the setting the error names
    value: Callable[[Any], Any]  # the trial -> the value shown
    holds: Callable[[Any], bool]  # on the trial
    fix: str | Callable[[Any], str]  # or the trial -> the fix

    def check(self, trial) -> None:
        from ..errors import require

        if not self.holds(trial):
            require(False, self.field, self.value(trial), self.fix(trial) if callable(self.fix) else self.fix)


@dataclass(frozen=True)
class Family:
    name: str
    reads: tuple[type, ...]  # the attack-setting parts it reads; the others do not apply to its trials
    seeded: bool  # starts from random images drawn from the trial's attack_seed
    lanes: bool  # False: every trial runs alone (a pack of one)
    run: str  # "module:function", the function taking an AttackJob and returning an AttackResult
    requires: tuple[Requirement, ...] = ()  # what it needs of the victim and the data
    ordered: bool = True  # reconstruction b is made for image b's label (False: matched to the truth by pixels only)
    ships: str | None = None  # malicious server: "module:function" (victim, trial, data_root) -> the model it ships

    def runner(self) -> Callable[["AttackJob"], "AttackResult"]:
        return _function(self.run)

    def shipped(self, victim: "nn.Module", trial, data_root=None) -> "nn.Module":
        """The model the client computes its update on: the victim, or the malicious server's version of it."""
        return victim if self.ships is None else _function(self.ships)(victim, trial, data_root)


def _function(path: str) -> Callable:
    module, function = path.split(":")
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
    on_images: Callable[[int, "torch.Tensor"], None] | None = None  # (iteration, best images per lane), called first
    deadline: float | None = None  # time.monotonic() past which the attack stops

    @property
    def seeds(self) -> list[int]:
        return [spec.attack_seed for spec in self.specs]


ONE_IMAGE = Requirement("images_per_client", lambda t: len(t.images), lambda t: len(t.images) == 1,
                        "the analytic attack recovers one image per client")  # fmt: skip
FULLY_CONNECTED = Requirement("model", lambda t: t.model, lambda t: t.model == "mlp",
                              "the analytic attack needs the 'mlp' model (a fully connected first layer)")  # fmt: skip

MALICIOUS = Requirement("threat_model", lambda t: t.threat_model, lambda t: t.threat_model == "malicious",
                        "the imprint attack ships a modified model: declare threat_model malicious")  # fmt: skip
ONE_GRADIENT = Requirement("fl", lambda t: t.fl, lambda t: t.fl == "fedsgd" or (t.local_steps == 1 and t.round is None),
                           "the imprint read-off is exact for one gradient: use fedsgd, or fedavg with local_steps 1")  # fmt: skip
TRAINING_SAMPLE = Requirement(
    "imprint_sample", lambda t: t.imprint_sample, lambda t: t.imprint_sample <= _training_images(t.data_spec),
    lambda t: f"the bins come from the training split of {t.dataset}; use {MIN_IMPRINT_SAMPLE} to "
              f"{_training_images(t.data_spec)} images",
)


def _training_images(spec) -> int:
    """How many training images a dataset keeps."""
    return spec.train_images

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("ig", (OptimiserSettings, InvertingSettings), seeded=True, lanes=True, run="gradinv.attacks.inverting:run"),
        Family("dlg", (OptimiserSettings,), seeded=True, lanes=True, run="gradinv.attacks.dlg:run"),
        Family("analytic", (), seeded=False, lanes=True, run="gradinv.attacks.analytic:run",
               requires=(ONE_IMAGE, FULLY_CONNECTED)),
        Family("imprint", (ImprintSettings,), seeded=False, lanes=True, run="gradinv.attacks.imprint:run",
               requires=(MALICIOUS, ONE_GRADIENT, TRAINING_SAMPLE), ordered=False,
               ships="gradinv.attacks.imprint:shipped_model"),
    )
}


def settings_parts() -> set[type]:
    """The parts that only some families read."""
    return {part for family in FAMILIES.values() for part in family.reads}
