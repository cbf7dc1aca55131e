"""Running trials: :func:`run_trials` runs a group of lane-compatible trials (see
:func:`gradinv.trial.spec.lane_signature`) as one computation, from the client's update to the attack, and
scores each against its truth and the no-information baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import data, metrics
from ..attacks.base import AttackJob, AttackResult
from ..attacks.labels import recover_labels_with
from ..baselines import BaselinePool, score_baselines
from ..client.defences import sent_update
from ..errors import require
from ..victims import victim_source
from .spec import TrialSpec, lane_signature


@dataclass
class TrialOutcome:
    """One trial's scored result. Images are ``[B, C, H, W]`` in [0, 1], matched to the truth's order."""

    spec: TrialSpec
    status: str  # ok or failed
    error: str = ""
    metrics: dict = field(default_factory=dict)  # scalar means
    per_image: dict = field(default_factory=dict)  # lists, one entry per image
    truth: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    restart_scores: list[float] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)
    quality_curve: list[tuple[float, float]] = field(default_factory=list)  # (PSNR, SSIM) at each curve point
    image_columns: dict = field(default_factory=dict)  # which images the victim's source dealt (train_images)
    seconds: float = 0.0
    lanes: int = 1


NO_FINITE_RESTART = (
    "every restart ended in NaN: the attack diverged, or the victim's update for the attacker's "
    "guesses is exactly zero (saturated predictions: try init rand or zeros)"
)

VictimLoader = Callable[[TrialSpec], torch.nn.Module]
ImageLoader = Callable[[TrialSpec], tuple[torch.Tensor, torch.Tensor, dict]]  # images in [0, 1], labels, columns


def cached_victim(spec: TrialSpec) -> torch.nn.Module:
    """The untrained model, or the trained checkpoint from this machine's zoo (trained here if missing)."""
    return victim_source(spec).model()


def run_trials(
    specs: Sequence[TrialSpec],
    *,
    data_root=None,
    device: str | torch.device = "cpu",
    victim: VictimLoader = cached_victim,
    images: ImageLoader | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[int, list[float], list[tuple[float, float]]], None] | None = None,
    deadline: float | None = None,
) -> list[TrialOutcome]:
    """Run lane-compatible trials as one computation; one scored outcome per trial, in order.

    ``on_checkpoint(iteration, costs, quality)``: at each checkpoint of an optimising attack, every
    lane's best gradient cost and its best images' (PSNR, SSIM) against the truth (may raise to stop)."""
    require(len({lane_signature(s) for s in specs}) == 1, "lanes", len(specs), "pack only lane-compatible trials")
    first = specs[0]
    info = first.data_spec
    family = first.family
    model = family.shipped(victim(first).to(device).eval(), first, data_root)
    images = images or (lambda spec: victim_source(spec).client_images(data_root))
    truths, updates, attacker_labels, true_labels, image_columns = [], [], [], [], []
    for spec in specs:
        images01, labels, columns = images(spec)
        images01, labels = images01.to(device), labels.to(device)
        image_columns.append(columns)
        update = sent_update(model, data.normalise(images01, info), labels, spec)
        truths.append(images01)
        true_labels.append(labels)
        updates.append(update)
        known = spec.labels == "known"
        attacker_labels.append(
            labels if known else recover_labels_with(spec.label_method, update, info.num_classes, model).to(device)
        )
    shape = tuple(truths[0].shape)
    labels = torch.stack(attacker_labels)
    labels_known = [s.labels == "known" for s in specs]
    ordered = [known and family.ordered for known in labels_known]  # position b was made for image b's label
    quality: list[list[tuple[float, float]]] = [[] for _ in specs]

    def score_checkpoint(_, images):  # the best restart's quality along the way, per lane
        for lane, (recon, truth) in enumerate(zip(images, truths)):
            recon01 = _matched(
                data.denormalise(recon, info).clamp(0, 1), truth, true_labels[lane] if ordered[lane] else None
            )
            quality[lane].append(
                (float(metrics.psnr(recon01, truth).mean()), float(metrics.ssim(recon01, truth).mean()))
            )

    def checkpoint(iteration, costs):  # the attack hands on_images the same checkpoint's images first
        on_checkpoint(iteration, costs, [lane[-1] for lane in quality])

    job = AttackJob(
        model,
        specs,
        updates,
        labels,
        labels_known,
        shape,
        info.num_classes,
        data.pixel_box(info, truths[0]),
        on_progress=on_progress,
        on_checkpoint=on_checkpoint and checkpoint,
        on_images=score_checkpoint,
        deadline=deadline,
    )
    result = family.run(job)
    if result.labels is not None:  # the attack settled on labels of its own
        labels = result.labels
    pool = _baseline_pool(first, data_root)
    return [
        dataclasses.replace(
            _score(spec, model, info, truth, result, lane, labels[lane], truth_labels, pool, quality[lane]),
            image_columns=image_columns[lane],
        )
        for lane, (spec, truth, truth_labels) in enumerate(zip(specs, truths, true_labels))
    ]


def _baseline_pool(spec: TrialSpec, data_root) -> BaselinePool | None:
    """The training images a data-only attacker guesses from; None where a dataset keeps none."""
    if not spec.data_spec.trainable:
        return None
    return BaselinePool.for_dataset(spec.dataset, spec.image_size, data_root=data_root)


def _matched(recon01: torch.Tensor, truth01: torch.Tensor, known_labels: torch.Tensor | None) -> torch.Tensor:
    """Reconstructions in the truth's order; with known labels, each only among its own label's images."""
    return recon01[metrics.match_to_truth(recon01, truth01, known_labels)]


def _score(
    spec,
    model,
    info,
    truth01,
    result: AttackResult,
    lane,
    predicted_labels,
    truth_labels,
    pool: BaselinePool | None,
    quality: list[tuple[float, float]],
) -> TrialOutcome:
    common = dict(
        spec=spec,
        restart_scores=result.restart_scores[lane].tolist(),
        seconds=result.seconds,
        curve=[(iteration, costs[lane]) for iteration, costs in result.curve],
        quality_curve=quality,
        lanes=len(result.images),
    )
    recon = result.images[lane]
    if not torch.isfinite(recon).all() or not math.isfinite(min(common["restart_scores"])):
        return TrialOutcome(status="failed", error=NO_FINITE_RESTART, **common)
    recon01 = data.denormalise(recon, info).clamp(0, 1)
    unmatched_psnr = metrics.psnr(recon01, truth01)  # position b against image b, as the reference scores
    ordered = spec.labels == "known" and spec.family.ordered  # position b was made for image b's label
    known = truth_labels if ordered else None
    recon01 = _matched(recon01, truth01, known)
    per_image = {
        "psnr": metrics.psnr(recon01, truth01),
        "ssim": metrics.ssim(recon01, truth01),
        "mse": metrics.mse(recon01, truth01),
        "feature_mse": metrics.feature_mse(model, data.normalise(recon01, info), data.normalise(truth01, info)),
        "psnr_unmatched": unmatched_psnr,
    }
    baselines = {}
    if pool is not None:  # what the attacker would score from the data alone, with the labels it has
        baselines, best_guess = score_baselines(pool.guesses(predicted_labels.cpu()), truth01.cpu())
        per_image["psnr_gain"] = per_image["psnr"].cpu() - best_guess
    summary = {name: float(values.mean()) for name, values in per_image.items()}
    summary["label_accuracy"] = metrics.label_accuracy(predicted_labels.cpu(), truth_labels.cpu())
    summary.update(baselines)
    return TrialOutcome(
        status="ok",
        metrics=summary,
        per_image={k: v.tolist() for k, v in per_image.items()},
        truth=truth01.cpu(),
        reconstruction=recon01.cpu(),
        **common,
    )
