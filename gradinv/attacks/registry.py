"""The attack families, each declared once by its traits (gradinv.attacks.base.Family). A new family is
one module with a ``run(job) -> AttackResult`` plus one entry in :data:`FAMILIES`.

Light on purpose (no torch): the declarations ask it which settings apply to which attack, and the
commands that only read results import it. Each family's module is imported when its trials run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..parameters import MIN_IMPRINT_SAMPLE, ImprintSettings, InvertingSettings, OptimiserSettings
from .base import AttackJob, AttackResult, Family, Requirement

if TYPE_CHECKING:
    from torch import nn


# The runs: each family's module loads torch, so it is imported when a trial of the family runs.
def _inverting(job: AttackJob) -> AttackResult:
    from . import inverting

    return inverting.run(job)


def _dlg(job: AttackJob) -> AttackResult:
    from . import dlg

    return dlg.run(job)


def _analytic(job: AttackJob) -> AttackResult:
    from . import analytic

    return analytic.run(job)


def _imprint(job: AttackJob) -> AttackResult:
    from . import imprint

    return imprint.run(job)


def _imprinted_model(victim: nn.Module, trial, data_root) -> nn.Module:
    from . import imprint

    return imprint.shipped_model(victim, trial, data_root)


ONE_IMAGE = Requirement(
    "images_per_client",
    lambda t: len(t.images),
    lambda t: len(t.images) == 1,
    "the analytic attack recovers one image per client",
)
FULLY_CONNECTED = Requirement(
    "model",
    lambda t: t.model,
    lambda t: t.model == "mlp",
    "the analytic attack needs the 'mlp' model (a fully connected first layer)",
)

MALICIOUS = Requirement(
    "threat_model",
    lambda t: t.threat_model,
    lambda t: t.threat_model == "malicious",
    "the imprint attack ships a modified model: declare threat_model malicious",
)
ONE_GRADIENT = Requirement(
    "fl",
    lambda t: t.fl,
    lambda t: t.fl == "fedsgd" or (t.local_steps == 1 and t.round is None),
    "the imprint read-off is exact for one gradient: use fedsgd, or fedavg with local_steps 1",
)
TRAINING_SAMPLE = Requirement(
    "imprint_sample",
    lambda t: t.imprint_sample,
    lambda t: t.imprint_sample <= _training_images(t.data_spec),
    lambda t: (
        f"the bins come from the training split of {t.dataset}; use {MIN_IMPRINT_SAMPLE} to "
        f"{_training_images(t.data_spec)} images"
    ),
)


def _training_images(spec) -> int:
    """How many training images a dataset keeps."""
    return spec.train_images


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="ig",
            reads=(OptimiserSettings, InvertingSettings),
            run=_inverting,
            seeded=True,
            mirrors_defences=True,
            budget=("restarts", "iterations"),
            paper_defaults=True,
        ),
        Family(
            name="dlg", reads=(OptimiserSettings,), run=_dlg, seeded=True, budget=("iterations",), lbfgs_history=True
        ),
        Family(name="analytic", reads=(), run=_analytic, requires=(ONE_IMAGE, FULLY_CONNECTED)),
        Family(
            name="imprint",
            reads=(ImprintSettings,),
            run=_imprint,
            ships=_imprinted_model,
            ordered=False,
            requires=(MALICIOUS, ONE_GRADIENT, TRAINING_SAMPLE),
        ),
    )
}


def settings_parts() -> set[type]:
    """The parts that only some families read."""
    return {part for family in FAMILIES.values() for part in family.reads}
