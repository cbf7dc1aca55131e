"""A trial: one client's update, attacked once. Its settings, and running trials packed into lanes.

:class:`TrialSpec` holds every parameter that affects a trial's numbers. :func:`run_trials` runs a
group of lane-compatible trials (see :func:`lane_signature`) as one computation and scores each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from . import data, metrics, models, parameters
from .attacks.base import AttackJob, AttackResult, Family
from .attacks.costs import layer_indices
from .attacks.inverting import IGConfig
from .attacks.labels import applicable, recover_labels_with
from .attacks.registry import FAMILIES, settings_parts
from .baselines import BaselinePool, score_baselines
from .client.defences import sent_update
from .errors import require
from .federation import Federation
from .parameters import LAYER_SET_COLUMN, ClientSettings, extract, federated, trained_victim
from .victims import recipe_of, victim_source


class TrialRules:
    """What a trial does with its fields, whatever parts (gradinv.parameters) it is made of."""

    def __post_init__(self):
        parameters.validate(self)
        require(self.attack in FAMILIES, "attack", self.attack, f"choose one of {', '.join(FAMILIES)}")
        spec = data.dataset_spec(self.dataset)
        if federated(self):
            self._check_federation()
        for index in self.images:  # in a federation: positions in the attacked client's draw (checked when run)
            require(
                0 <= index and (federated(self) or index < spec.test_images),
                "image",
                index,
                f"use 0 to {spec.test_images - 1} for {self.dataset}",
            )
        models.default_width(self.model)  # validates the name
        if trained_victim(self):  # the checkpoint's own rules (training images, GroupNorm under DP-SGD)
            self.recipe()
        for requirement in self.family.requires:
            requirement.check(self)
        require(
            self.dp_clip is None or self.local_momentum == 0,
            "local_momentum",
            self.local_momentum,
            "DP-SGD's local steps are plain SGD; use 0",
        )
        require(
            self.dp_clip is None or self.client_bn == "eval",
            "client_bn",
            self.client_bn,
            "DP-SGD here runs BatchNorm in eval mode (Opacus' per-example gradients); use eval",
        )
        require(
            self.bn_prior == 0 or self.bn_stats == "running" or self.client_bn == "train",
            "bn_stats",
            self.bn_stats,
            "a client batch's own statistics exist only when it runs BatchNorm in train mode: set client_bn train",
        )
        if self.labels == "recovered":
            reason = applicable(self.label_method, len(self.images), spec.num_classes, fl=self.fl)
            require(reason is None, "label_method", self.label_method, f"{reason}; use bias_counts")
        require(
            len(self.images) % self.aggregated_clients == 0,
            "aggregated_clients",
            self.aggregated_clients,
            f"use a number of clients that divides the trial's {len(self.images)} images (1: no aggregation)",
        )
        self._check_dp_batches()
        self.ig_config()  # the settings that constrain each other
        if not isinstance(self.layers, str):  # indices, not a set's name
            count = parameter_tensors(self.model, spec.channels, spec.num_classes, self.side, self.width)
            layer_indices(count, self.layers)

    def _check_federation(self) -> None:
        require(
            not trained_victim(self),
            "trained_epochs",
            self.trained_epochs,
            "use 0: a federation round is the victim (round), not a zoo checkpoint",
        )
        require(
            self.aggregated_clients == 1,
            "aggregated_clients",
            self.aggregated_clients,
            "use 1: a federation round attacks one client's update",
        )
        # the recipe's own rules (training images, an image per client, room for the partition sizes), the
        # round within fed_rounds, the attacked client among the clients and its share
        federation = Federation.of_trial(self)
        federation.check_round(self.round)
        federation.check_positions(self.attacked_client, self.images)

    def _check_dp_batches(self) -> None:
        """DP-SGD draws its own batches (Poisson, at dp_sample_rate): the client's recipe may not fix smaller
        ones, whether local_batch_size sets them or, in a federation, fed_batch_size."""
        recipe, count = self.fl_config(), self.images_per_client
        if self.dp_clip is None or recipe.fl != "fedavg" or not 0 < recipe.local_batch_size < count:
            return
        name, use = ("fed_batch_size", f"{count} or more") if federated(self) else ("local_batch_size", "0")
        require(False, name, getattr(self, name), f"DP-SGD draws its own batches at dp_sample_rate; use {use}")

    @property
    def data_spec(self) -> data.DatasetSpec:
        return data.dataset_spec(self.dataset)

    @property
    def family(self) -> Family:
        """The attack family's declaration (gradinv.attacks.registry)."""
        return FAMILIES[self.attack]

    @property
    def default_width(self) -> int | None:
        """The model's own width (gradinv.models); None: the model has no width parameter."""
        return models.default_width(self.model)

    @property
    def images_per_client(self) -> int:
        """Each client's images: the trial's, split equally among the ``aggregated_clients``."""
        return len(self.images) // self.aggregated_clients

    @property
    def side(self) -> int:
        return self.image_size or self.data_spec.size

    def fl_config(self) -> ClientSettings:
        """How the client computes its update. In a federation, FedAvg is the federation's local training:
        ``fed_epochs`` passes over the client's images in mini-batches of ``fed_batch_size`` at ``fed_lr``.
        The one place ``fed_*`` knobs become ``local_*`` ones (the vocabulary: parameters.ClientSettings)."""
        if not federated(self) or self.fl == "fedsgd":
            return extract(ClientSettings, self)
        count = self.images_per_client
        batch = self.fed_batch_size if self.fed_batch_size < count else 0
        return ClientSettings(
            fl="fedavg",
            local_steps=self.fed_epochs * math.ceil(count / self.fed_batch_size),
            local_lr=self.fed_lr,
            local_momentum=self.fed_momentum,
            local_batch_size=batch,
            data_order_seed=self.data_order_seed,
            client_bn=self.client_bn,
        )

    def ig_config(self) -> IGConfig:
        return extract(IGConfig, self)

    def not_applicable(self) -> set[str]:
        """Fields that cannot affect this trial: another family's settings, and each field whose
        declared condition fails (local steps under FedSGD, say) once the others are at their defaults.
        The conditions see the fields, the ``family`` and the ``default_width`` (gradinv.parameters.Knob)."""
        declared, defaults = parameters.declarations(self), parameters.defaults(self)
        names = {name for part in settings_parts() - set(self.family.reads) for name in parameters.declarations(part)}
        while True:
            fields = {name: defaults[name] if name in names else getattr(self, name) for name in declared}
            view = SimpleNamespace(**fields, family=self.family, default_width=self.default_width)
            failing = {name for name, knob in declared.items() if knob.applies is not None and not knob.applies(view)}
            if failing <= names:
                return names
            names |= failing

    def recipe(self):
        """The checkpoint a trained victim comes from."""
        return recipe_of(self)

    def resolved(self):
        """The same trial with inapplicable fields at their defaults, so that duplicates collapse."""
        defaults = parameters.defaults(self)
        reset = {name: defaults[name] for name in self.not_applicable()}
        if self.width == self.default_width:
            reset["width"] = None
        return dataclasses.replace(self, **reset)

    def key_fields(self) -> dict:
        """What a trial's key hashes: the non-default fields, and the version of a dataset's own
        train/test split (a changed split attacks other images under the same indices). A named
        ``layers`` set is hashed under LAYER_SET_COLUMN, as before the two knobs merged."""
        fields, split = self.non_default(), self.data_spec.split_version
        if isinstance(fields.get("layers"), str):
            fields[LAYER_SET_COLUMN] = fields.pop("layers")
        return {**fields, **({"split_version": split} if split else {})}

    def non_default(self) -> dict:
        """The resolved fields that differ from the defaults, as plain JSON-ready values."""
        defaults = parameters.defaults(self)
        resolved = self.resolved()
        return {name: _plain(getattr(resolved, name)) for name in defaults if getattr(resolved, name) != defaults[name]}


def spec_class(parts, name: str = "TrialSpec") -> type:
    """A flat, frozen, keyword-constructed trial class made of ``parts``, fields in the parts' order."""
    cls = dataclasses.make_dataclass(name, [], bases=(TrialRules, *reversed(parts)), frozen=True, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = "Everything that determines a trial's result. Defaults never change (keys depend on them)."
    return cls


TrialSpec = spec_class(parameters.PARTS)
DEFAULTS = parameters.defaults(TrialSpec)


@functools.cache
def parameter_tensors(model: str, channels: int, num_classes: int, side: int, width: int | None) -> int:
    """How many parameter tensors the model has (built on the meta device: no memory, no numbers)."""
    with torch.device("meta"):
        victim = models.build_model(model, channels=channels, num_classes=num_classes, image_size=side, width=width)
    return len(list(victim.parameters()))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def lane_signature(spec) -> tuple:
    """Trials with equal signatures can run as one computation: they share every field declared
    lane-shared (model, shape, client recipe, optimiser schedule, ...)."""
    return tuple(
        (name, knob.lane_shared(getattr(spec, name)) if callable(knob.lane_shared) else getattr(spec, name))
        for name, knob in parameters.declarations(spec).items()
        if knob.lane_shared is not False
    )


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
