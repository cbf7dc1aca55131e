"""How much memory a trial needs, estimated from its settings before anything is allocated.

The estimate is arithmetic over the shapes a trial works with: the victim's parameter count and the
numbers one image's forward pass produces (both from the model built on torch's ``meta`` device, which
holds shapes and no numbers), the images, and how many copies of each the attack keeps alive at once:

- inverting gradients and DLG differentiate the client's update with respect to the images, so every
  run (lanes x restarts) keeps a forward pass and its backward pass for the second backward, for each
  local step the client's FedAvg unrolls, and the update's tensors several times over (targets,
  candidate, the cost's products); the images with Adam's moments and their gradient;
- the imprint attack's block is ``bins x pixels`` numbers twice, read off in float64;
- a FedAvg schedule holds one entry per local step; the data-only baseline holds 100 training images.

Each factor was calibrated against the peak resident memory of real trials
(``benchmarks/memory_estimate.py`` prints estimate against measurement) to be an upper estimate
within about a factor of two. A run refuses a trial whose estimate exceeds what the machine (or the
largest node of a cluster) has, and asks Ray for the estimate as each task's ``memory``, so that Ray
never packs more trials onto a node than it holds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .parameters import ImprintSettings, parameter_defaults

FLOAT = 4  # bytes of a float32, the dtype every trial computes in
PROCESS = 900 * 2**20  # a worker with torch, torchvision and gradinv imported (measured: 0.79 GB peak RSS)
WORKING = 200 * 2**20  # what any trial allocates besides its tensors: lazy imports, a dataset's arrays, arenas
# Copies alive while a run's gradient-matching cost is differentiated, in units of one image's forward
# activations and of the parameters: each unrolled local step keeps its forward pass and its new
# parameters for the second backward; the last step's double backward adds its transients once; the
# cost holds the target update (repeated per run), the candidate, their products and gradients.
STEP_ACTIVATIONS, STEP_PARAMETERS = 2.5, 1.5
PEAK_ACTIVATIONS, PEAK_PARAMETERS = 1.5, 1.5
COST_PARAMETERS = 2.0
IMAGE_COPIES = 12  # images, their gradient and its sign, Adam's two moments and their corrections, the box
GRAPH_NODE = 512  # bytes of autograd bookkeeping per recorded operation (a node and its saved-tensor slots)
SCHEDULE_ENTRY, MINIBATCH = 8, 400  # a FedAvg schedule's list slot; an index tensor of a mini-batch (+8/image)
LBFGS_HISTORY = 100  # torch's L-BFGS keeps this many pairs of directions (DLG)
BASELINE_POOL = 100  # training images the data-only baseline averages (gradinv.baselines)
IMPRINT_READ_OFF = 36  # bytes per measuring weight: its gradient, in float64 twice, divided, cast back


@dataclass(frozen=True)
class ModelSize:
    """What the memory of a model's use scales with."""

    parameters: int  # numbers
    tensors: int  # parameter tensors
    modules: int  # leaf modules: each records a few operations per forward
    activations: int  # numbers one image's forward pass produces (every leaf module's output)


@functools.lru_cache(maxsize=256)
def model_size(model: str, channels: int, num_classes: int, side: int, width: int | None, norm: str) -> ModelSize:
    """The victim's size, from the model built and run on torch's meta device (shapes, no numbers)."""
    import torch

    from . import model_factories, models
    from .errors import ConfigError

    shape = dict(channels=channels, num_classes=num_classes, image_size=side, width=width, norm=norm)
    try:
        with torch.device("meta"):
            victim = models.build_model(model, **shape)
    except ConfigError:
        if not model_factories.is_factory(model):
            raise
        victim = models.build_model(model, **shape)  # the user's function needs real numbers
    leaves = [module for module in victim.modules() if not list(module.children())]
    produced = [0]

    def count(_, __, output):
        if isinstance(output, torch.Tensor):
            produced[0] += output.numel()

    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        with torch.no_grad():
            victim(torch.empty(1, channels, side, side, device="meta"))
    except (RuntimeError, ValueError, NotImplementedError):
        pass  # too small an image for the model: the trial fails early; what was counted so far stands
    finally:
        for handle in handles:
            handle.remove()
    params = list(victim.parameters())
    return ModelSize(sum(p.numel() for p in params), len(params), len(leaves), produced[0])


def trial_bytes(spec, lanes: int = 1, device: str = "cpu") -> int:
    """An upper estimate of the peak (host) memory of a worker running ``spec`` packed with ``lanes - 1``
    others like it (one computation) on ``device``, the worker process itself included."""
    return PROCESS + WORKING + sum(terms(spec, lanes, device).values())


def terms(spec, lanes: int = 1, device: str = "cpu") -> dict[str, int]:
    """The estimate's parts in bytes of host memory, by what they hold. The client computes its update
    before the attack starts, so the larger of the two phases counts, not both. On a GPU the model and
    both phases live in its memory (where running out is an error, a failed row, not a killed process):
    the host keeps the data and the schedules."""
    info, images = spec.data_spec, len(spec.images)
    pixels, parameters, activations, operations = _victim(spec)
    steps, batch = _local_steps(spec)
    per_example = batch if spec.dp_clip is not None else 1  # DP-SGD's per-example gradients
    forward, update = FLOAT * activations * batch, FLOAT * parameters * per_example
    schedule = steps * (SCHEDULE_ENTRY + (MINIBATCH + 8 * batch if batch < images else 0))
    phases = {"client": PEAK_ACTIVATIONS * forward + PEAK_PARAMETERS * update}  # one step at a time
    family = spec.family  # its declared traits (gradinv.attacks.registry), never its name
    if family.budget:  # it spends steps optimising images: each differentiates the client's update
        runs = lanes * (spec.restarts if "restarts" in family.budget else 1)
        unrolled = steps * (STEP_ACTIVATIONS * forward + STEP_PARAMETERS * update + GRAPH_NODE * operations)
        kept = unrolled + phases["client"] + COST_PARAMETERS * FLOAT * parameters
        history = 2 * LBFGS_HISTORY * images * (pixels + info.num_classes) if family.lbfgs_history else 0
        phases["attack"] = runs * (kept + FLOAT * images * pixels * IMAGE_COPIES) + FLOAT * lanes * history
    if _imprints(spec):
        phases["attack"] = spec.imprint_bins * pixels * IMPRINT_READ_OFF
    phase = max(phases, key=phases.get)
    host = {
        "data": FLOAT
        * pixels
        * (
            4 * images * lanes
            + (2 * BASELINE_POOL if info.trainable else 0)
            + (2 * spec.imprint_sample if _imprints(spec) else 0)
        ),
        "schedules": 2 * schedule,  # the client's and the attacker's, one entry per local step
    }
    if str(device).split(":")[0] != "cpu":
        return host
    return {"model": FLOAT * parameters * (2 + lanes), **host, phase: int(phases[phase])}  # victim, weights, updates


def _victim(spec) -> tuple[int, int, int, int]:
    """(pixels per image, parameters, activations per image, operations per forward) of the model the
    client computes on: the victim, behind the imprint block when the server ships one."""
    info = spec.data_spec
    pixels = info.channels * spec.side**2
    size = model_size(spec.model, info.channels, info.num_classes, spec.side, spec.width, spec.norm)
    parameters, activations, operations = size.parameters, size.activations, 4 * (size.modules + size.tensors)
    if _imprints(spec):  # pixels -> bins -> pixels
        parameters += 2 * spec.imprint_bins * pixels + spec.imprint_bins + pixels
        activations += spec.imprint_bins + 2 * pixels
    return pixels, parameters, activations, operations


def _imprints(spec) -> bool:
    """Whether the family reads the imprint settings: the server's imprint block of ``imprint_bins``, its
    bins drawn from ``imprint_sample`` training images."""
    return ImprintSettings in spec.family.reads


def _local_steps(spec) -> tuple[int, int]:
    """The client's local steps (1 under FedSGD) and the images of each."""
    images, fl = len(spec.images), spec.fl_config()
    if fl.fl != "fedavg":
        return 1, images
    return fl.local_steps, min(fl.local_batch_size or images, images)


# ------------------------------------------------------------------------------------------------
# Which setting makes a trial large, and the refusal


# Settings a trial's memory grows with, and the value that shrinks each back (the default, or 1).
SIZE_SETTINGS = (
    "image_size",
    "width",
    "images",
    "restarts",
    "local_steps",
    "fed_epochs",
    "imprint_bins",
    "imprint_sample",
)


def _shrunk(spec, name: str):
    if name == "images":
        return dataclasses.replace(spec, images=spec.images[:1], aggregated_clients=1)
    return dataclasses.replace(spec, **{name: parameter_defaults()[name]})


def culprit(spec, lanes: int = 1, device: str = "cpu") -> tuple[str, object]:
    """The setting whose reset (to its default, one image, one lane) shrinks the estimate most, and its value."""
    candidates = {}
    if lanes > 1:
        candidates["lanes"] = (lanes, trial_bytes(spec, 1, device))
    defaults = parameter_defaults()
    for name in SIZE_SETTINGS:
        value = getattr(spec, name)
        if (name == "images" and len(value) > 1) or (name != "images" and value != defaults[name]):
            try:
                shrunk = trial_bytes(_shrunk(spec, name), lanes, device)
                candidates[name] = (len(value) if name == "images" else value, shrunk)
            except ConfigError:  # the smaller value breaks another rule of the trial: not the one to name
                continue
    if not candidates:
        return "model", spec.model
    name = min(candidates, key=lambda n: candidates[n][1])
    return name, candidates[name][0]


def human(size: float) -> str:
    """Bytes as GiB, or TiB past 1024 GiB: three significant figures, whole numbers past 1000."""
    value, unit = size / 2**30, "GiB"
    if value >= 1024:
        value, unit = value / 1024, "TiB"
    return f"{value:,.0f} {unit}" if value >= 1000 else f"{value:.3g} {unit}"


def refuse_unfit(
    specs: Sequence, lanes: int, limit: int, holder: str, *, device: str = "cpu", locate: Callable[[str], str] = str
) -> None:
    """Raise ConfigError, one line naming the setting, the estimate and the limit, for the first trial
    whose pack (up to ``lanes`` lane-compatible trials) is estimated to need more than ``limit`` bytes,
    what ``holder`` has. ``locate`` turns a setting's name into how the error shows it (a study file's
    path, line and section)."""
    for spec, packed in lane_packs(specs, lanes):
        need = trial_bytes(spec, packed, device)
        if need > limit:
            name, value = culprit(spec, packed, device)
            fewer = "fewer" if name in ("lanes", "restarts", "images", "local_steps", "fed_epochs") else "a smaller"
            raise ConfigError(
                locate(name),
                value,
                f"a trial needs about {human(need)} of memory (estimated from "
                f"its settings), more than the {human(limit)} {holder} has; use {fewer} {name}",
            )


def check_study(study, lanes: int, device: str, limit: int, holder: str) -> None:
    """:func:`refuse_unfit` over a study's trials, the error located in its file (``path:line: section.name``)."""
    refuse_unfit(study.trials, lanes, limit, holder, device=device, locate=study_locator(study))


def lane_packs(specs: Sequence, lanes: int) -> list[tuple[object, int]]:
    """One ``(spec, lanes in its pack)`` per group of lane-compatible trials: the largest pack each makes."""
    from .trial import lane_signature

    groups: dict = {}
    for spec in specs:
        groups.setdefault(lane_signature(spec), []).append(spec)
    return [(group[0], min(lanes, len(group))) for group in groups.values()]


def study_locator(study) -> Callable[[str], str]:
    """A setting's name as a study file's errors show it: ``path:line: section.name``."""

    def locate(name: str) -> str:
        for section in ("data", "fixed", "grid", "zip", ""):
            where = (section, name) if section else (name,)
            line = study.lines.get(where)
            if line:  # a line number, or the --set flag that gave the value (text)
                place = f"{study.path} ({line})" if isinstance(line, str) else f"{study.path}:{line}"
                return f"{place}: {'.'.join(where)}"
        if name == "images" and study.lines.get(("fixed", "images_per_client")):
            return locate("images_per_client")
        return f"{study.path}: {name}"

    return locate


# ------------------------------------------------------------------------------------------------
# What a machine or a cluster holds


def machine_memory() -> int:
    """This machine's memory in bytes, or its container's (cgroup) limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def largest_node_memory(ray) -> int:
    """The ``memory`` resource of the largest live node of a connected Ray cluster (what Ray lets its tasks reserve)."""
    return int(max((node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")), default=0))


def request(spec, lanes: int, largest: int, device: str = "cpu") -> int:
    """The ``memory`` a task asks Ray for: the estimate, at most what the largest node offers (a larger
    trial that the machine still holds then runs alone on it rather than never)."""
    return min(trial_bytes(spec, lanes, device), largest)
