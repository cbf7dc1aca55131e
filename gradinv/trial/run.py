"""Running trials: :func:`run_trials` runs a group of lane-compatible trials (see
:func:`gradinv.trial.spec.lane_signature`) as one computation, from the client's update to the attack, and
scores each against its truth and the no-information baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import data, metrics
from ..attacks.base import AttackJob
from ..attacks.labels import recover_labels_with
from ..baselines import BaselinePool, score_baselines
from ..client.defences import sent_update
from ..client.update import ClientUpdate
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
    precision: str | None = None  # the attack's arithmetic (float32, or float64 where float32 underflowed)
    zero_update: bool = False  # the client's update was exactly zero: nothing to attack


@dataclass
class LaneResult:
    """One lane's share of an attack: its reconstruction (normalised) and how the attack got there."""

    images: torch.Tensor  # [B, C, H, W]
    restart_scores: list[float]
    curve: list[tuple[int, float]]  # (iteration, best cost)
    seconds: float
    lanes: int
    precision: str | None
    labels: torch.Tensor | None  # the labels the attack settled on; None: the ones it was given

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.images).all()) and math.isfinite(min(self.restart_scores, default=math.inf))


NO_FINITE_RESTART = (
    "every restart ended in NaN, in float32 and again in float64: the attack diverged (try a smaller lr), "
    "or the victim is so sure of the attacker's guesses that their update vanishes (try init rand or zeros)"
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

    def score_checkpoint(_, images, lanes):  # the best restart's quality along the way, per lane
        for lane, recon in zip(lanes, images):
            truth = truths[lane]
            recon01 = matched_to_truth(
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
    results = attack_lanes(job, quality)
    pool = baseline_pool(first, data_root)
    outcomes = []
    for lane, (spec, truth, truth_labels) in enumerate(zip(specs, truths, true_labels)):
        found = results.get(lane)
        if found is not None and found.labels is not None:  # the attack settled on labels of its own
            labels[lane] = found.labels
        outcome = score_lane(spec, model, info, truth, found, labels[lane], truth_labels, pool, quality[lane])
        outcomes.append(dataclasses.replace(outcome, image_columns=image_columns[lane]))
    return outcomes


def attack_lanes(job: AttackJob, quality: list[list]) -> dict[int, LaneResult]:
    """Each lane's result, leaving out lanes whose update is exactly zero (nothing to match: a victim so sure
    of its images that its float32 update underflowed). A lane that ends in NaN in float32 (the victim's
    update for the attacker's guesses underflows) is attacked again, alone, in float64."""
    family = job.specs[0].family
    attacked = [lane for lane, update in enumerate(job.updates) if any(t.count_nonzero() for t in update.tensors)]
    if not attacked:
        return {}
    results = _run_lanes(job, attacked, quality, full=len(attacked) == len(job.specs))
    underflowed = [lane for lane in attacked if not results[lane].finite]
    native = job.updates[0].tensors[0].dtype
    if underflowed and family.budget and native != torch.float64:
        for lane in underflowed:
            quality[lane].clear()
        retried = _run_lanes(job, underflowed, quality, full=False, dtype=torch.float64)
        results |= {
            lane: dataclasses.replace(r, seconds=r.seconds + results[lane].seconds) for lane, r in retried.items()
        }
    return results


def _run_lanes(job: AttackJob, lanes: list[int], quality, *, full: bool, dtype=None) -> dict[int, LaneResult]:
    """Run the attack on ``lanes`` of ``job`` (in ``dtype``: the updates' own when None). Only a run of every
    lane streams its checkpoints (``job.on_checkpoint``): a part of the pack has no costs for the rest."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    model = copy.deepcopy(job.model).to(dtype) if dtype is not None else job.model
    sub = dataclasses.replace(
        job,
        model=model,
        specs=[job.specs[lane] for lane in lanes],
        updates=[_cast_update(job.updates[lane], cast) for lane in lanes],
        labels=job.labels[lanes],
        labels_known=[job.labels_known[lane] for lane in lanes],
        box=tuple(cast(bound) for bound in job.box),
        on_checkpoint=job.on_checkpoint if full else None,
        on_images=lambda iteration, images: job.on_images(iteration, images, lanes),
    )
    result = sub.specs[0].family.run(sub)
    precision = (
        str(dtype or job.updates[0].tensors[0].dtype).removeprefix("torch.") if sub.specs[0].family.budget else None
    )
    found = {}
    for i, lane in enumerate(lanes):
        stop = result.iterations_run[i] if result.iterations_run else None
        curve = [(iteration, costs[i]) for iteration, costs in result.curve if stop is None or iteration <= stop]
        if stop is not None:  # checkpoints after the lane stopped (others ran on) are not its own
            del quality[lane][len(curve) :]
        found[lane] = LaneResult(
            images=result.images[i].float(),
            restart_scores=result.restart_scores[i].tolist(),
            curve=curve,
            seconds=result.seconds,
            lanes=len(lanes),
            precision=precision,
            labels=None if result.labels is None else result.labels[i],
        )
    return found


def _cast_update(update: ClientUpdate, cast) -> ClientUpdate:
    stats = update.bn_batch_stats
    if stats is not None:
        stats = tuple(tuple((cast(mean), cast(var)) for mean, var in layers) for layers in stats)
    return dataclasses.replace(update, tensors=tuple(cast(t) for t in update.tensors), bn_batch_stats=stats)


def _data_mean(pool: BaselinePool | None, labels: torch.Tensor, truth01: torch.Tensor, info) -> torch.Tensor:
    """A flat image at the data's per-channel mean, in [0, 1] pixels: the pool's, else the dataset's."""
    if pool is not None:
        return pool.guesses(labels.cpu())["flat"].to(truth01.device, truth01.dtype)
    return data.denormalise(torch.zeros_like(truth01), info).clamp(0, 1)


def baseline_pool(spec: TrialSpec, data_root) -> BaselinePool | None:
    """The training images a data-only attacker guesses from; None where a dataset keeps none."""
    if not spec.data_spec.trainable:
        return None
    return BaselinePool.for_dataset(spec.dataset, spec.image_size, data_root=data_root)


def matched_to_truth(recon01: torch.Tensor, truth01: torch.Tensor, known_labels: torch.Tensor | None) -> torch.Tensor:
    """Reconstructions in the truth's order; with known labels, each only among its own label's images."""
    return recon01[metrics.match_to_truth(recon01, truth01, known_labels)]


def score_lane(
    spec,
    model,
    info,
    truth01,
    result: LaneResult | None,
    predicted_labels,
    truth_labels,
    pool: BaselinePool | None,
    quality: list[tuple[float, float]],
) -> TrialOutcome:
    """``result`` None: the client's update was exactly zero, and the attacker's best answer is the data
    mean (an ok row that says so: this client leaks nothing through this update)."""
    if result is None:
        common = dict(spec=spec, zero_update=True)
        recon = data.normalise(_data_mean(pool, predicted_labels, truth01, info), info)
    else:
        common = dict(
            spec=spec,
            restart_scores=result.restart_scores,
            seconds=result.seconds,
            curve=result.curve,
            quality_curve=quality,
            lanes=result.lanes,
            precision=result.precision,
        )
        recon = result.images
        if not result.finite:
            return TrialOutcome(status="failed", error=NO_FINITE_RESTART, **common)
    recon01 = data.denormalise(recon, info).clamp(0, 1)
    unmatched_psnr = metrics.psnr(recon01, truth01)  # position b against image b, as the reference scores
    ordered = spec.labels == "known" and spec.family.ordered  # position b was made for image b's label
    known = truth_labels if ordered else None
    recon01 = matched_to_truth(recon01, truth01, known)
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
