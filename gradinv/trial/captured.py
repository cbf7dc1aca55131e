"""Attacking a captured update (gradinv.capture): the trial's settings give the model's architecture, the
dataset (shape, classes, normalisation) and the attack; the file gives the model's weights, the update and
the client's recipe. The attack is the family's own (``run(job)`` through :func:`attack_lanes`), and with
ground truth in the file the outcome is scored as :func:`run_trials` scores one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .. import data, metrics, models
from ..attacks.base import AttackJob
from ..attacks.labels import recover_labels_with
from ..capture import CapturedUpdate
from ..client.update import ClientUpdate
from ..errors import ConfigError, require
from ..parameters import federated, trained_victim
from .run import NO_FINITE_RESTART, TrialOutcome, attack_lanes, baseline_pool, matched_to_truth, score_lane
from .spec import DEFAULTS, TrialSpec


def captured_spec(capture: CapturedUpdate, spec: TrialSpec) -> TrialSpec:
    """``spec`` with the client's recipe, image count and labels of the capture. A setting of ``spec`` that
    differs from its default and from the capture is refused (the file says how the update was made)."""
    recipe = {
        "fl": capture.fl,
        "client_bn": capture.client_bn,
        "images": tuple(range(capture.num_images)),
        "local_steps": capture.local_steps,
        "local_batch_size": capture.local_batch_size if capture.fl == "fedavg" else DEFAULTS["local_batch_size"],
        "local_momentum": capture.local_momentum,
        **({"local_lr": capture.local_lr} if capture.fl == "fedavg" else {}),  # FedSGD's: no learning rate
    }
    for name, value in recipe.items():
        given = getattr(spec, name)
        if name == "images" and len(given) == len(value):  # the indices name nothing in a capture; the count does
            continue
        if given != DEFAULTS[name] and given != value:
            shown = len(value) if name == "images" else value
            what = f"{shown} images" if name == "images" else f"{name} {value}"
            raise ConfigError(name, given, f"the update file says {what}; leave it out with --update")
    require(not federated(spec), "round", spec.round, "leave it out: the update file holds the victim's weights")
    require(not trained_victim(spec), "trained_epochs", spec.trained_epochs, "use 0: the update file holds the weights")
    require(spec.weights is None, "weights", spec.weights, "leave it out: the update file holds the weights")
    require(spec.dp_clip is None, "dp_clip", spec.dp_clip, "leave it out: a captured update's DP-SGD is not modelled")
    require(spec.aggregated_clients == 1, "aggregated_clients", spec.aggregated_clients, "use 1 with --update")
    require(
        spec.family.ships is None,
        "attack",
        spec.attack,
        "a malicious server's attack ships its own model; a captured update was computed on the file's model",
    )
    labels = spec.labels if capture.labels is not None else "recovered"  # without labels in the file: recovered
    spec = dataclasses.replace(spec, **recipe, labels=labels)  # the trial's rules run again on the result
    shape = (capture.num_images, spec.data_spec.channels, spec.side, spec.side)
    if capture.images is not None:
        found = tuple(capture.images.shape)
        fix = f"the dataset {spec.dataset} at side {spec.side} gives {list(shape)}; set --dataset/--image-size"
        require(found == shape, "update file: images", found, fix)
    return spec


def captured_model(capture: CapturedUpdate, spec: TrialSpec) -> torch.nn.Module:
    """The trial's model (architecture from ``spec``) holding the capture's weights, in eval mode."""
    info = spec.data_spec
    model = models.build_model(
        spec.model,
        channels=info.channels,
        num_classes=info.num_classes,
        image_size=spec.side,
        width=spec.width,
        norm=spec.norm,
    )
    own = model.state_dict()
    fix = f"use the --model/--width/--dataset/--image-size the update was made with (model {spec.model})"
    for name, tensor in capture.state.items():
        require(name in own, f"update file: state[{name}]", tuple(tensor.shape), f"the model has no such entry; {fix}")
        shape = tuple(own[name].shape)
        require(
            tuple(tensor.shape) == shape,
            f"update file: state[{name}]",
            tuple(tensor.shape),
            f"the model's is {shape}; {fix}",
        )
    missing = [name for name in own if name not in capture.state]
    require(not missing, "update file: state", missing[:1], f"the file lacks the model's entry; {fix}")
    names = tuple(name for name, _ in model.named_parameters())
    require(capture.parameters == names, "update file: parameters", capture.parameters[:3], f"{fix} (order differs)")
    model.load_state_dict(capture.state)
    return model.eval()


def attack_captured(
    capture: CapturedUpdate,
    spec: TrialSpec,
    *,
    data_root=None,
    device: str | torch.device = "cpu",
    on_progress: Callable[[int], None] | None = None,
) -> TrialOutcome:
    """Attack the captured update with ``spec``'s settings (see :func:`captured_spec`). With images in the
    capture: scored as :func:`gradinv.trial.run_trials` scores a trial (``metrics['ground_truth']`` True).
    Without: the reconstruction (``[B, C, H, W]`` in [0, 1]), the attack's own costs
    (``metrics['gradient_cost']``: the best restart's) and the labels it used (``per_image['label']``)."""
    spec = captured_spec(capture, spec)
    info = spec.data_spec
    model = captured_model(capture, spec).to(device)
    shape = (capture.num_images, info.channels, spec.side, spec.side)
    truth = capture.images
    if truth is not None:
        truth = truth.to(device)
    tensors = tuple(t.to(device, p.dtype) for t, p in zip(capture.update, model.parameters()))
    update = ClientUpdate(tensors, spec.fl_config(), capture.num_images)
    known = spec.labels == "known"
    labels = (
        capture.labels.to(device)
        if known
        else recover_labels_with(spec.label_method, update, info.num_classes, model).to(device)
    )
    quality: list[list[tuple[float, float]]] = [[]]
    ordered = known and spec.family.ordered

    def score_checkpoint(_, images, lanes):  # as run_trials: the best restart's quality along the way
        if truth is None:
            return
        recon = matched_to_truth(data.denormalise(images[0], info).clamp(0, 1), truth, labels if ordered else None)
        quality[0].append((float(metrics.psnr(recon, truth).mean()), float(metrics.ssim(recon, truth).mean())))

    like = torch.zeros(1, device=device)
    job = AttackJob(
        model,
        [spec],
        [update],
        labels[None],
        [known],
        shape,
        info.num_classes,
        data.pixel_box(info, like),
        on_progress=on_progress,
        on_images=score_checkpoint,
    )
    found = attack_lanes(job, quality).get(0)
    if found is not None and found.labels is not None:  # the attack settled on labels of its own
        labels = found.labels
    if truth is not None:
        truth_labels = capture.labels if capture.labels is not None else labels
        pool = baseline_pool(spec, data_root)
        outcome = score_lane(spec, model, info, truth, found, labels, truth_labels.to(device), pool, quality[0])
        if capture.labels is None:  # nothing to score the recovered labels against
            outcome.metrics["label_accuracy"] = math.nan
        outcome.metrics["ground_truth"] = True
        outcome.per_image["label"] = labels.tolist()
        return outcome
    return _unscored(spec, info, found, labels)


def _unscored(spec: TrialSpec, info, found, labels: torch.Tensor) -> TrialOutcome:
    """An outcome with no ground truth: the reconstruction and what the attack itself measured."""
    common = dict(spec=spec, metrics={"ground_truth": False}, per_image={"label": labels.tolist()})
    if found is None:  # an exactly zero update: nothing to attack
        return TrialOutcome(status="ok", zero_update=True, **common)
    common |= dict(
        restart_scores=found.restart_scores,
        seconds=found.seconds,
        curve=found.curve,
        lanes=found.lanes,
        precision=found.precision,
    )
    if not found.finite:
        return TrialOutcome(status="failed", error=NO_FINITE_RESTART, **common)
    common["metrics"]["gradient_cost"] = min(found.restart_scores)
    recon = data.denormalise(found.images, info).clamp(0, 1).cpu()
    return TrialOutcome(status="ok", reconstruction=recon, **common)
