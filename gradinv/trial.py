"""A trial: one client's update, attacked once. Its settings, and running trials packed into lanes.

:class:`TrialSpec` holds every parameter that affects a trial's numbers. :func:`run_trials` runs a
group of lane-compatible trials (see :func:`lane_signature`) as one computation and scores each.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import data, metrics, models, zoo
from .baselines import BaselinePool, score_baselines
from .attacks.analytic import first_linear_input
from .attacks.dlg import deep_leakage
from .attacks.inverting import LAYER_SETS, AttackResult, IGConfig, invert_gradients, layer_indices
from .attacks.labels import recover_labels
from .errors import require
from .fl import FL_MODES, FLConfig, client_update

ATTACKS = ("ig", "dlg", "analytic")
LABELS = ("known", "recovered")
FEDAVG_FIELDS = ("local_steps", "local_lr", "local_batch_size", "data_order_seed", "batch_order")
OPTIMISER_FIELDS = ("iterations", "restarts", "tv", "lr", "cost", "decay", "init", "layer_weighting", "layers", "attack_seed")
IG_FIELDS = ("clamp_init", "layer_set", "signed", "boxed", "median_filter", "optimizer", "scoring", "tol")


@dataclass(frozen=True)
class TrialSpec:
    """Everything that determines a trial's result. Defaults never change (keys depend on them)."""

    dataset: str = "fashion-mnist"
    images: tuple[int, ...] = (0,)  # indices into the test split: the client's images
    image_size: int | None = None  # None: the dataset's own size
    labels: str = "known"  # known to the attacker, or recovered from the update
    model: str = "convnet"
    width: int | None = None  # None: the model's default width
    model_seed: int = 0
    trained_epochs: int = 0  # 0: the seeded untrained model; else a checkpoint from gradinv.zoo
    train_subset: int | None = None  # trained victims: the first N training images; None: all
    fl: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 1e-4
    local_batch_size: int = 0
    data_order_seed: int = 0
    batch_order: str = "shuffled"  # FedAvg mini-batches: reshuffled each epoch, or the reference's fixed slices
    attack: str = "ig"
    iterations: int = 24_000
    restarts: int = 1
    tv: float = 1e-4
    lr: float = 0.1
    cost: str = "cosine"
    decay: str = "step"
    init: str = "randn"
    layer_weighting: str = "equal"
    layers: tuple[int, ...] | None = None  # also accepts a named set (LAYER_SETS), kept as layer_set
    attack_seed: int = 0
    clamp_init: bool = False
    layer_set: str = "all"
    signed: bool = True
    boxed: bool = True
    median_filter: bool = False
    optimizer: str = "adam"
    scoring: str = "loss"
    tol: float | None = None

    def __post_init__(self):
        if isinstance(self.layers, str):  # a named set where indices go (study files, --layers)
            require(self.layers in LAYER_SETS, "layers", self.layers,
                    f"give parameter indices or one of the named sets {', '.join(LAYER_SETS)}")  # fmt: skip
            require(self.layer_set == "all", "layers", self.layers, f"the named set is already {self.layer_set!r}")
            object.__setattr__(self, "layer_set", self.layers)
            object.__setattr__(self, "layers", None)
        spec = data.dataset_spec(self.dataset)
        require(len(self.images) >= 1, "images", list(self.images), "give at least one image index")
        require(len(set(self.images)) == len(self.images), "images", list(self.images), "list each image once")
        for index in self.images:
            require(0 <= index < spec.test_images, "image", index, f"use 0 to {spec.test_images - 1} for {self.dataset}")
        require(self.image_size is None or self.image_size >= 4, "image_size", self.image_size, "use 4 or more")
        require(self.labels in LABELS, "labels", self.labels, "use 'known' or 'recovered'")
        models.default_width(self.model)  # validates the name
        require(self.width is None or self.width >= 1, "width", self.width, "use a whole number of at least 1")
        require(self.trained_epochs >= 0, "trained_epochs", self.trained_epochs, "use 0 (untrained) or more")
        require(self.trained_epochs == 0 or spec.trainable, "trained_epochs", self.trained_epochs,
                f"{self.dataset} keeps no images to train on (every image is attacked); use 0")  # fmt: skip
        require(self.train_subset is None or self.train_subset >= 1, "train_subset", self.train_subset, "use 1 or more")
        require(self.attack in ATTACKS, "attack", self.attack, f"choose one of {', '.join(ATTACKS)}")
        require(
            self.attack != "analytic" or len(self.images) == 1,
            "images_per_client", len(self.images), "the analytic attack recovers one image per client",
        )  # fmt: skip
        require(
            self.attack != "analytic" or self.model == "mlp",
            "model", self.model, "the analytic attack needs the 'mlp' model (a fully connected first layer)",
        )  # fmt: skip
        require(self.fl in FL_MODES, "fl", self.fl, f"choose one of {', '.join(FL_MODES)}")
        self.fl_config()
        self.ig_config()
        if self.layers is not None:
            count = parameter_tensors(self.model, spec.channels, spec.num_classes, self.side, self.width)
            layer_indices(count, self.layers)

    @property
    def data_spec(self) -> data.DatasetSpec:
        return data.dataset_spec(self.dataset)

    @property
    def side(self) -> int:
        return self.image_size or self.data_spec.size

    def fl_config(self) -> FLConfig:
        return FLConfig(self.fl, self.local_steps, self.local_lr, self.local_batch_size, self.data_order_seed,
                        self.batch_order)  # fmt: skip

    def ig_config(self) -> IGConfig:
        return IGConfig(
            iterations=self.iterations, restarts=self.restarts, tv=self.tv, lr=self.lr, cost=self.cost,
            decay=self.decay, init=self.init, clamp_init=self.clamp_init, layer_weighting=self.layer_weighting,
            layers=self.layers, layer_set=self.layer_set, signed=self.signed, boxed=self.boxed,
            median_filter=self.median_filter, optimizer=self.optimizer, scoring=self.scoring, tol=self.tol,
        )  # fmt: skip

    def not_applicable(self) -> set[str]:
        """Fields that cannot affect this trial (local steps under FedSGD, say)."""
        names = set()
        if self.fl == "fedsgd":
            names.update(FEDAVG_FIELDS)
        elif self.batch_order == "sequential":
            names.add("data_order_seed")
        if self.attack == "analytic":
            names.update(OPTIMISER_FIELDS)
        if self.attack != "ig":
            names.update(IG_FIELDS)
        elif self.optimizer != "adam":
            names.add("lr")  # SGD and L-BFGS take the reference's fixed step sizes
        if self.restarts == 1:
            names.update(("scoring", "tol"))  # they only choose among restarts
        if models.default_width(self.model) is None:
            names.add("width")
        if self.trained_epochs == 0:
            names.add("train_subset")
        return names

    def recipe(self) -> zoo.Recipe:
        """The checkpoint a trained victim comes from."""
        return zoo.Recipe(self.dataset, self.model, self.width or models.default_width(self.model),
                          self.trained_epochs, self.model_seed, self.train_subset, self.image_size)  # fmt: skip

    def resolved(self) -> "TrialSpec":
        """The same trial with inapplicable fields at their defaults, so that duplicates collapse."""
        reset = {name: DEFAULTS[name] for name in self.not_applicable()}
        if self.width == models.default_width(self.model):
            reset["width"] = None
        return dataclasses.replace(self, **reset)

    def key_fields(self) -> dict:
        """What a trial's key hashes: the non-default fields, and the version of a dataset's own
        train/test split (a changed split attacks other images under the same indices)."""
        split = self.data_spec.split_version
        return {**self.non_default(), **({"split_version": split} if split else {})}

    def non_default(self) -> dict:
        """The resolved fields that differ from the defaults, as plain JSON-ready values."""
        resolved = self.resolved()
        return {
            name: _plain(value)
            for name, value in dataclasses.asdict(resolved).items()
            if value != DEFAULTS[name]
        }


DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrialSpec)}


@functools.lru_cache(maxsize=None)
def parameter_tensors(model: str, channels: int, num_classes: int, side: int, width: int | None) -> int:
    """How many parameter tensors the model has (built on the meta device: no memory, no numbers)."""
    with torch.device("meta"):
        victim = models.build_model(model, channels=channels, num_classes=num_classes, image_size=side, width=width)
    return len(list(victim.parameters()))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def lane_signature(spec: TrialSpec) -> tuple:
    """Trials with equal signatures share model, shape, client recipe and optimiser schedule."""
    return (
        spec.attack, spec.dataset, spec.image_size, spec.model, spec.width, spec.model_seed, spec.trained_epochs,
        spec.train_subset, len(spec.images), spec.fl_config(), spec.ig_config().shared(),
    )  # fmt: skip


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
    seconds: float = 0.0
    lanes: int = 1


VictimLoader = Callable[[TrialSpec], torch.nn.Module]


def cached_victim(spec: TrialSpec) -> torch.nn.Module:
    """The untrained model, or the trained checkpoint from this machine's zoo (trained here if missing)."""
    if spec.trained_epochs == 0:
        return build_victim(spec)
    checkpoint, _ = zoo.ensure(spec.recipe())
    return checkpoint.model()


def build_victim(spec: TrialSpec) -> torch.nn.Module:
    info = spec.data_spec
    return models.build_model(
        spec.model, channels=info.channels, num_classes=info.num_classes, image_size=spec.side,
        width=spec.width, seed=spec.model_seed,
    )  # fmt: skip


def run_trials(
    specs: Sequence[TrialSpec],
    *,
    data_root=None,
    device: str | torch.device = "cpu",
    victim: VictimLoader = cached_victim,
    on_progress: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[int, list[float]], None] | None = None,
    deadline: float | None = None,
) -> list[TrialOutcome]:
    """Run lane-compatible trials as one computation; one scored outcome per trial, in order."""
    require(len({lane_signature(s) for s in specs}) == 1, "lanes", len(specs), "pack only lane-compatible trials")
    first = specs[0]
    info = first.data_spec
    model = victim(first).to(device).eval()
    truths, updates, attacker_labels, true_labels = [], [], [], []
    for spec in specs:
        images01, labels = data.load_images(spec.dataset, spec.images, data_root, image_size=spec.image_size)
        images01, labels = images01.to(device), labels.to(device)
        update = client_update(model, data.normalise(images01, info), labels, spec.fl_config())
        truths.append(images01)
        true_labels.append(labels)
        updates.append(update)
        known = spec.labels == "known"
        attacker_labels.append(labels if known else recover_labels(update, info.num_classes).to(device))
    shape = tuple(truths[0].shape)
    seeds = [s.attack_seed for s in specs]
    configs = [s.ig_config() for s in specs]
    labels = torch.stack(attacker_labels)
    labels_known = [s.labels == "known" for s in specs]
    quality: list[list[tuple[float, float]]] = [[] for _ in specs]

    def score_checkpoint(_, images):  # the best restart's quality along the way, per lane
        for lane, (recon, truth) in enumerate(zip(images, truths)):
            recon01 = _matched(data.denormalise(recon, info).clamp(0, 1), truth, true_labels[lane] if labels_known[lane] else None)
            quality[lane].append((float(metrics.psnr(recon01, truth).mean()), float(metrics.ssim(recon01, truth).mean())))

    if first.attack == "ig":
        box = data.pixel_box(info, truths[0])
        result = invert_gradients(model, updates, labels, configs, seeds, box, shape, on_checkpoint=on_checkpoint,
                                  on_images=score_checkpoint, on_progress=on_progress, deadline=deadline)  # fmt: skip
    elif first.attack == "dlg":
        result, labels = deep_leakage(model, updates, labels if all(labels_known) else None, configs, seeds, shape,
                                      info.num_classes, on_progress=on_progress, deadline=deadline)  # fmt: skip
    else:
        start = time.perf_counter()
        flat = torch.stack([first_linear_input(model, u) for u in updates])
        result = AttackResult(flat.view(len(specs), *shape), torch.zeros(len(specs), 1), [], time.perf_counter() - start)
    pool = _baseline_pool(first, data_root)
    return [
        _score(spec, model, info, truth, result, lane, labels[lane], truth_labels, pool, quality[lane])
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


def _score(spec, model, info, truth01, result: AttackResult, lane, predicted_labels, truth_labels,
           pool: BaselinePool | None, quality: list[tuple[float, float]]) -> TrialOutcome:  # fmt: skip
    common = dict(
        spec=spec, restart_scores=result.restart_scores[lane].tolist(), seconds=result.seconds,
        curve=[(iteration, costs[lane]) for iteration, costs in result.curve], quality_curve=quality,
        lanes=len(result.images),
    )  # fmt: skip
    recon = result.images[lane]
    if not torch.isfinite(recon).all() or not math.isfinite(min(common["restart_scores"])):
        return TrialOutcome(status="failed", error="the attack diverged: every restart ended in NaN", **common)
    recon01 = data.denormalise(recon, info).clamp(0, 1)
    unmatched_psnr = metrics.psnr(recon01, truth01)  # position b against image b, as the reference scores
    known = truth_labels if spec.labels == "known" else None  # position b was optimised for image b's label
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
        status="ok", metrics=summary, per_image={k: v.tolist() for k, v in per_image.items()},
        truth=truth01.cpu(), reconstruction=recon01.cpu(), **common,
    )  # fmt: skip
