"""Every trial parameter, declared once, in the parts a trial is made of.

A part is a frozen dataclass whose fields are declared with :func:`knob`: default, kind, help text,
validation and its one-line fix, when the field applies, whether trials packed into lanes share it,
its Arrow column type, its search range for ``tune``, and what it is to the rest: a repetition (a seed),
a defence, a field of the zoo's or the federation's recipe. :class:`gradinv.trial.TrialSpec` is the
registered parts combined; the command-line flags (`attack`, `zoo train`, `federation train`), study-file
coercion, the results columns, the inapplicable fields, the lane signature, the tune space, the federation
recipe, the training defences and the report's defence and victim columns are all read from these
declarations.
Adding a knob is one :func:`knob` line here plus the code that uses it.

This module imports neither torch nor pyarrow: commands that only read results stay light.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import require

KNOB = "gradinv.knob"  # the field-metadata key of a declaration
KINDS = ("int", "float", "str", "bool", "ints")
ARROW = {"int": "int32", "float": "float64", "str": "string", "bool": "bool", "ints": "list<int32>"}
INTEGER_BITS = {"int32": 32, "int64": 64, "list<int32>": 32}  # the integer columns (or list items) a knob may declare
Rule = tuple[Callable[[Any], bool], str]  # a value passes when the predicate holds; else the fix is shown


@dataclass(frozen=True)
class Knob:
    """One parameter's declaration (the field's metadata)."""

    kind: str
    help: str
    choices: tuple | None  # allowed values
    rules: tuple[Rule, ...]
    # On the trial's fields and two facts the trial looks up above this module (gradinv.trial): its
    # ``family`` (gradinv.attacks.base.Family) and its model's ``default_width``. None: always.
    applies: Callable[[Any], bool] | None
    lane_shared: bool | Callable[[Any], Any]  # True: lanes share the value; a callable: they share its result
    arrow: str
    search: str | tuple | None  # "log": a log-uniform range; "choices": the choices; a tuple: those choices
    optional: bool  # None is a value (the default's meaning is in the help)
    names: tuple = ()  # kind "ints" only: a name that may stand in for the list
    repeat_flag: str | None = None  # on the command line: a singular flag given once per item
    repetition: bool = False  # tells repetitions of one setting apart (which images, which seed): compared across
    defence: bool = False  # what the client does to its update: the privacy section groups by defence, not by it
    recipes: tuple[str, ...] = ()  # the victim recipes (ZOO, FEDERATION) whose weights it determines

    def allowed(self) -> tuple | None:
        return self.choices

    def integer_range(self) -> tuple[int, int]:
        """The integers the knob's results column (or its list items) holds: more would overflow on writing."""
        half = 1 << (INTEGER_BITS[self.arrow] - 1)
        return -half, half - 1

    def validate(self, name: str, value) -> None:
        """Raises ConfigError (one line naming the field, the value and the fix) unless ``value`` fits."""
        if value is None and self.optional:
            return
        if self.names and isinstance(value, str):  # a name standing in for the list
            require(value in self.names, name, value, f"give a list of indices or one of {', '.join(self.names)}")
            return
        for holds, fix in self.rules:
            require(holds(value), name, _shown(value), fix)
        self._check_representable(name, value)
        allowed = self.allowed()
        if allowed is not None:
            require(value in allowed, name, value, f"choose one of {', '.join(map(str, allowed))}")

    def _check_representable(self, name: str, value) -> None:
        """Every float finite and every integer within its results column, whatever the knob's own rules
        allow: one rule for study files and flags alike (the rules' messages, more specific, come first)."""
        if self.kind == "float":
            require(math.isfinite(value), name, value, "use a finite number")
        elif self.kind in ("int", "ints") and not isinstance(value, str):
            low, high = self.integer_range()
            for item in value if self.kind == "ints" else (value,):
                bound = f"at most {high}" if item > high else f"at least {low}"
                require(low <= item <= high, name, _shown(value), f"use {bound}, what its {self.arrow} column holds")


def knob(
    default,
    *,
    kind: str,
    help: str,
    choices: tuple | None = None,
    check: Callable[[Any], bool] | None = None,
    fix: str = "",
    rules: Sequence[Rule] = (),
    applies: Callable[[Any], bool] | None = None,
    lane_shared: bool | Callable[[Any], Any] = True,
    arrow: str | None = None,
    search: str | tuple | None = None,
    names: tuple = (),
    repeat_flag: str | None = None,
    repetition: bool = False,
    defence: bool = False,
    recipes: tuple[str, ...] = (),
):
    """A declared trial parameter: a dataclass field whose metadata is its :class:`Knob`."""
    assert kind in KINDS, kind
    declared = Knob(
        kind=kind,
        help=help,
        choices=choices,
        rules=(*rules, *([(check, fix)] if check else [])),
        applies=applies,
        lane_shared=lane_shared,
        arrow=arrow or ARROW[kind],
        search=search,
        optional=default is None,
        names=names,
        repeat_flag=repeat_flag,
        repetition=repetition,
        defence=defence,
        recipes=recipes,
    )
    return dataclasses.field(default=default, metadata={KNOB: declared})


class Part:
    """Base of the parts: a part validates its own declared fields when built."""

    def __post_init__(self):
        validate(self)


def declarations(cls_or_spec) -> dict[str, Knob]:
    """Name -> declaration of every declared field of a part, a spec class or an instance, in order."""
    return {f.name: f.metadata[KNOB] for f in dataclasses.fields(cls_or_spec) if KNOB in f.metadata}


def defaults(cls_or_spec) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls_or_spec) if KNOB in f.metadata}


def validate(instance) -> None:
    for name, declared in declarations(instance).items():
        declared.validate(name, getattr(instance, name))


def extract(part: type, source):
    """The ``part`` built from the same-named fields of ``source`` (a trial, or a larger part)."""
    return part(**{name: getattr(source, name) for name in declarations(part)})


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def _positive(value) -> bool:
    return value > 0


def _momentum(value) -> bool:
    return 0 <= value < 1


MOMENTUM_FIX = "use a momentum from 0 (plain SGD) to below 1"
SEED_FIX = "use a seed of 0 or more (the federation and DP-SGD draw from numpy seed sequences, which take no sign)"


def _at_least(low) -> Callable[[Any], bool]:
    return lambda value: value >= low


def trained_victim(trial) -> bool:
    """Whether the victim is a checkpoint from the model zoo rather than the seeded untrained model."""
    return trial.trained_epochs > 0


def defended(trial) -> bool:
    """Whether the client applies a defence (DP-SGD, or one on its update) that a victim can train under: one
    of :func:`defence_switches` is off its default."""
    return any(getattr(trial, name) != default for name, default in defence_switches(tuple(PARTS)))


@functools.cache
def defence_switches(parts: tuple[type, ...]) -> tuple[tuple[str, Any], ...]:
    """(name, default) of the defences a training step can apply that apply on their own: each turns one
    on (the others, such as dp_noise or prune_scope, refine one that is on)."""
    return tuple(
        (name, defaults(part)[name])
        for part in parts
        for name in training_defences(part)
        if declarations(part)[name].applies is None
    )


def training_defences(cls_or_spec) -> list[str]:
    """The defences a victim's training applies under ``defended_training`` (its zoo recipe's ``defence``)."""
    return [
        name for name, declared in declarations(cls_or_spec).items() if declared.defence and ZOO in declared.recipes
    ]


def federated(trial) -> bool:
    """Whether the victim is the global model of a simulated federation after ``round`` rounds."""
    return trial.round is not None


def _dirichlet(trial) -> bool:
    return federated(trial) and trial.partition == "dirichlet"


def _has_width(trial) -> bool:
    return trial.default_width is not None


ZOO, FEDERATION = "zoo", "federation"  # the victim recipes (gradinv.zoo, gradinv.federation) a knob may determine
LABELS = ("known", "recovered")
LABEL_METHODS = ("bias_counts", "ilrg")  # gradinv.attacks.labels
THREAT_MODELS = ("honest", "malicious")
CLIENT_NORMS = ("eval", "train")
BN_STATS = ("running", "batch")
FL_MODES = ("fedsgd", "fedavg")
BATCH_ORDERS = ("shuffled", "sequential")
COSTS = ("cosine", "l2", "l1", "max", "simlocal")
DECAYS = ("step", "step-eighths", "cosine", "none")
INITS = ("randn", "rand", "zeros")
LAYER_WEIGHTINGS = ("equal", "linear", "exp")
# Named tensor sets: the first / last K parameter tensors (fewer when the model has fewer), the K of
# largest target norm, or `batch`: 8 tensors drawn afresh at every evaluation.
LAYER_SETS = ("all", "first4", "first5", "first10", "first50", "last5", "last10", "last50", "top10", "top50", "batch")
OPTIMIZERS = ("adam", "sgd", "lbfgs")
NORMS = ("batch", "group")
PARTITIONS = ("iid", "dirichlet")
SCORINGS = ("loss", "tv", "pixelmean", "pixelmedian")


# ------------------------------------------------------------------------------------------------
# The parts. Field order is column order; defaults never change (trial keys leave defaults out).


@dataclass(frozen=True, kw_only=True)
class DataSettings(Part):
    """Whose images the client holds."""

    dataset: str = knob(
        "fashion-mnist",
        kind="str",
        recipes=(ZOO, FEDERATION),
        help="fashion-mnist, faces, photos, mnist, cifar10, cifar100 or imagenet",
    )
    images: tuple[int, ...] = knob(
        (0,),
        kind="ints",
        help="the client's images: indices into the test split",
        lane_shared=len,
        repetition=True,
        rules=[
            (lambda v: len(v) >= 1, "give at least one image index"),
            (lambda v: len(set(v)) == len(v), "list each image once"),
        ],
        repeat_flag="image",
    )
    image_size: int | None = knob(
        None,
        kind="int",
        help="resize images to this side (default: the dataset's own)",
        recipes=(ZOO, FEDERATION),
        check=_at_least(4),
        fix="use 4 or more",
    )
    labels: str = knob(
        "known",
        kind="str",
        help="known to the attacker, or recovered from the update",
        choices=LABELS,
        lane_shared=False,
    )


@dataclass(frozen=True, kw_only=True)
class VictimSettings(Part):
    """The model the client trains: seeded and untrained, or a checkpoint of the model zoo."""

    model: str = knob(
        "convnet",
        kind="str",
        recipes=(ZOO, FEDERATION),
        help="convnet, lenet, resnet20, resnet18, mlp, ... (gradinv.models)",
    )
    width: int | None = knob(
        None,
        kind="int",
        recipes=(ZOO, FEDERATION),
        help="the model's width (default: the model's own)",
        check=_at_least(1),
        fix="use a whole number of at least 1",
        applies=_has_width,
    )
    norm: str = knob(
        "batch",
        kind="str",
        recipes=(ZOO, FEDERATION),
        choices=NORMS,
        help="BatchNorm, or GroupNorm (Opacus' replacement, which DP-SGD training needs)",
    )
    model_seed: int = knob(
        0,
        kind="int",
        recipes=(ZOO, FEDERATION),
        repetition=True,
        help="seeds the untrained weights (and a checkpoint's training)",
        arrow="int64",
        check=_at_least(0),
        fix=SEED_FIX,
    )
    trained_epochs: int = knob(
        0,
        kind="int",
        recipes=(ZOO,),
        help="0: the seeded untrained model; else a checkpoint from the zoo",
        check=_at_least(0),
        fix="use 0 (untrained) or more",
    )
    train_subset: int | None = knob(
        None,
        kind="int",
        recipes=(ZOO, FEDERATION),
        check=_at_least(1),
        fix="use 1 or more",
        help="trained and federation victims: the first N training images (default all)",
        applies=lambda t: trained_victim(t) or federated(t),
    )
    defended_training: bool = knob(
        False,
        kind="bool",
        defence=True,
        applies=lambda t: trained_victim(t) and defended(t),
        help="trained victims: train under the trial's defences (each step's gradient)",
    )


def _fedavg(trial) -> bool:
    """FedAvg with the local training set here (a federation's clients train by its recipe instead)."""
    return trial.fl == "fedavg" and not federated(trial)


@dataclass(frozen=True, kw_only=True)
class ClientSettings(Part):
    """How the client computes its update (FedSGD or FedAvg); the attacker knows all of it.

    Local training, one vocabulary: ``local_*`` is the attacked client's FedAvg here, ``fed_*``
    (FederationSettings) a simulated federation's clients'. In a federation the attacked client trains by
    the federation's recipe, converted in one place (gradinv.trial.TrialRules.fl_config): ``fed_lr`` is
    ``local_lr``, ``fed_momentum`` ``local_momentum``, ``fed_batch_size`` ``local_batch_size`` (0 where it
    holds every image), ``fed_epochs`` ``local_steps`` (epochs x mini-batches per epoch). Both names stay:
    trial keys and results columns carry them."""

    fl: str = knob(
        "fedsgd",
        kind="str",
        help="fedsgd (one gradient) or fedavg (local SGD steps; in a federation, the federation's local training)",
        choices=FL_MODES,
    )
    local_steps: int = knob(
        1,
        kind="int",
        help="FedAvg: SGD steps on the client's images",
        applies=_fedavg,
        check=_at_least(1),
        fix="use at least 1 local step",
    )
    local_lr: float = knob(
        1e-4,
        kind="float",
        help="FedAvg: the local learning rate",
        applies=_fedavg,
        check=_positive,
        fix="use a positive local learning rate",
    )
    local_batch_size: int = knob(
        0,
        kind="int",
        help="FedAvg: images per local step; 0: all of them",
        applies=_fedavg,
        check=_at_least(0),
        fix="use 0 (all) or more",
    )
    data_order_seed: int = knob(
        0,
        kind="int",
        repetition=True,
        help="FedAvg: shuffles the mini-batches of each local epoch",
        arrow="int64",
        check=_at_least(0),
        fix=SEED_FIX,
        applies=lambda t: _fedavg(t) and t.batch_order != "sequential",
    )
    batch_order: str = knob(
        "shuffled",
        kind="str",
        choices=BATCH_ORDERS,
        applies=_fedavg,
        help="FedAvg mini-batches: reshuffled each epoch, or the reference's fixed slices",
    )
    client_bn: str = knob(
        "eval",
        kind="str",
        choices=CLIENT_NORMS,
        help="BatchNorm in the client's forward pass: eval (the model's running statistics) or "
        "train (each batch's own, as in GradInversion's threat model)",
    )
    local_momentum: float = knob(
        0.0,
        kind="float",
        applies=_fedavg,
        check=_momentum,
        fix=MOMENTUM_FIX,
        help="FedAvg: SGD momentum of the local steps (PyTorch's: v = m v + g, step lr v); 0: plain SGD",
    )


def _seeded_attack(trial) -> bool:
    return trial.family.seeded


@dataclass(frozen=True, kw_only=True)
class AttackSettings(Part):
    """Which attack family runs, and the seed of its random start."""

    # the family's name is checked by the trial (gradinv.trial), which imports the registry
    attack: str = knob("ig", kind="str", help="the attack family (gradinv.attacks.registry)")
    attack_seed: int = knob(
        0,
        kind="int",
        repetition=True,
        help="seeds the attack's starting images",
        arrow="int64",
        lane_shared=False,
        applies=_seeded_attack,
        check=_at_least(0),
        fix=SEED_FIX,
    )
    label_method: str = knob(
        "bias_counts",
        kind="str",
        choices=LABEL_METHODS,
        lane_shared=False,
        applies=lambda t: t.labels == "recovered",
        help="how recovered labels are read off the update: the classifier's bias-gradient "
        "counts, or iLRG (Ma et al. 2023; FedSGD, fewer images than classes)",
    )
    threat_model: str = knob(
        "honest",
        kind="str",
        choices=THREAT_MODELS,
        help="honest (-but-curious): the server attacks updates of the model it trains; "
        "malicious: it may ship a modified model first (the imprint attack)",
    )


# An image darker or brighter than the whole sample falls outside every bin and is lost: of n sample images,
# 2/(n+1) of the client's images on average (two thirds at n = 2), under a tenth from 20 up.
MIN_IMPRINT_SAMPLE = 20
IMPRINT_SAMPLE_FIX = (
    f"use {MIN_IMPRINT_SAMPLE} or more training images: the bins span the sample's brightness, and "
    "with n images 2/(n+1) of the client's images fall outside them and are lost"
)


@dataclass(frozen=True, kw_only=True)
class ImprintSettings(Part):
    """The malicious server's imprint block (gradinv.attacks.imprint, Fowl et al. 2022)."""

    imprint_bins: int = knob(
        256,
        kind="int",
        check=_at_least(2),
        fix="use 2 or more bins",
        search="choices",
        help="brightness bins of the imprint block; an image alone in its bin comes back exactly",
    )
    imprint_sample: int = knob(
        1000,
        kind="int",
        check=_at_least(MIN_IMPRINT_SAMPLE),
        fix=IMPRINT_SAMPLE_FIX,
        help="training images whose brightness quantiles set the bins (the attacker's prior)",
    )


@dataclass(frozen=True, kw_only=True)
class OptimiserSettings(Part):
    """What every optimising attack (inverting gradients, DLG) reads."""

    iterations: int = knob(
        24_000, kind="int", help="optimisation steps per restart", check=_at_least(1), fix="use at least 1 iteration"
    )
    lr: float = knob(
        0.1,
        kind="float",
        help="the step size (inverting gradients: Adam's only)",
        lane_shared=False,
        check=_positive,
        fix="use a positive step size",
        search="log",
        applies=lambda t: t.optimizer == "adam",
    )


def _restarts(trial) -> bool:
    return trial.restarts > 1


@dataclass(frozen=True, kw_only=True)
class InvertingSettings(Part):
    """Inverting gradients only: each of the reference implementation's choices, by name."""

    restarts: int = knob(
        1,
        kind="int",
        help="independent starts; the best one is kept",
        search="choices",
        check=_at_least(1),
        fix="use at least 1 restart",
    )
    tv: float = knob(
        1e-4,
        kind="float",
        help="the total-variation weight",
        lane_shared=False,
        search="log",
        check=_at_least(0),
        fix="use a TV weight of 0 or more",
    )
    # tune searches only the costs whose scales the pruner can compare across candidates
    cost: str = knob("cosine", kind="str", help="the gradient distance", choices=COSTS, search=("cosine", "l2"))
    decay: str = knob(
        "step",
        kind="str",
        choices=DECAYS,
        search="choices",
        help="step-size schedule (step: x0.1 at the reference's milestones)",
    )
    init: str = knob("randn", kind="str", help="the starting images", choices=INITS, search="choices")
    layer_weighting: str = knob(
        "equal",
        kind="str",
        choices=LAYER_WEIGHTINGS,
        search="choices",
        help="the weight of each parameter tensor (linear/exp: earlier ones weigh more)",
    )
    layers: tuple[int, ...] | str = knob(
        "all",
        kind="ints",
        names=LAYER_SETS,
        check=lambda v: len(v) >= 1,
        fix="list at least one index",
        help="the parameter tensors to match: indices (negative from the end), or a named set",
    )
    clamp_init: bool = knob(False, kind="bool", help="project the first images into the pixel box")
    signed: bool = knob(True, kind="bool", help="step on the sign of the image gradient")
    boxed: bool = knob(True, kind="bool", help="keep pixels in the valid box after every step")
    median_filter: bool = knob(False, kind="bool", help="a 3x3 median filter every 500 iterations")
    optimizer: str = knob("adam", kind="str", help="adam, or the reference's sgd or lbfgs", choices=OPTIMIZERS)
    scoring: str = knob(
        "loss",
        kind="str",
        help="how restarts become one reconstruction",
        choices=SCORINGS,
        applies=_restarts,
        check=lambda v: v != "inception",
        fix="it needs Inception weights that gradinv does not ship; use loss, tv, pixelmean or pixelmedian",
    )
    bn_prior: float = knob(
        0.0,
        kind="float",
        check=_at_least(0),
        fix="use 0 (off) or a positive weight",
        search="log",
        help="weight of the BatchNorm prior (GradInversion, Yin et al. 2021): the candidate batch's "
        "feature mean and variance at each BatchNorm layer against bn_stats; 0: off",
    )
    bn_stats: str = knob(
        "running",
        kind="str",
        choices=BN_STATS,
        applies=lambda t: t.bn_prior > 0,
        help="the statistics the attacker knows: the model's running ones (realistic; 0 and 1 in an "
        "untrained model), or the client batch's own (optimistic; needs client_bn train)",
    )
    group_consistency: float = knob(
        0.0,
        kind="float",
        applies=_restarts,
        check=_at_least(0),
        search="log",
        fix="use 0 (off) or a positive weight",
        help="weight pulling each restart toward the restarts' aligned mean (GradInversion)",
    )
    tol: float | None = knob(
        None,
        kind="float",
        help="drop the restarts after one that scores at most this",
        applies=_restarts,
        check=math.isfinite,
        fix="use a finite number",
    )


# `layers` is one parameter, indices or a set's name, but a list column cannot hold a name: a name is stored,
# and keyed, under `layer_set` (a knob of its own until the two merged), so that keys and files stay valid.
LAYER_SET_COLUMN = "layer_set"


def layers_columns(layers) -> dict:
    """``layers`` as its two results columns: the indices (None for a name) and the set's name ("all" beside
    indices, as before the merge); both None where the parameter does not apply."""
    if layers is None:
        return {"layers": None, LAYER_SET_COLUMN: None}
    named = isinstance(layers, str)
    return {"layers": None if named else list(layers), LAYER_SET_COLUMN: layers if named else "all"}


def layers_of_columns(row: dict) -> tuple[int, ...] | str | None:
    """The ``layers`` a row's two columns hold (None: it did not apply); rows from before the merge too."""
    return tuple(row["layers"]) if row.get("layers") is not None else row.get(LAYER_SET_COLUMN)


PRUNE_SCOPES = ("layer", "global")
ROUNDINGS = ("stochastic", "nearest")


def _pruned(trial) -> bool:
    return trial.keep_fraction < 1


def _quantised(trial) -> bool:
    return trial.quant_bits is not None


def _dp_sgd(trial) -> bool:
    return trial.dp_clip is not None


def _randomised(trial) -> bool:
    """Whether a defence draws random numbers (from ``defence_seed``)."""
    return (
        trial.noise_std > 0
        or (_quantised(trial) and trial.quant_rounding == "stochastic")
        or (_dp_sgd(trial) and (trial.dp_noise > 0 or trial.dp_sample_rate < 1))
    )


def _dp_mechanism(trial) -> bool:
    """Whether a differentially private mechanism runs, so that ``dp_delta`` sets its (epsilon, delta).
    The update-level Gaussian mechanism (the clip bounds the sensitivity, the noise hides it), and
    DP-SGD in the local training (per-example clip and noise)."""
    return (trial.clip_update is not None and trial.noise_std > 0) or (_dp_sgd(trial) and trial.dp_noise > 0)


def _unrolls_defences(trial) -> bool:
    """Whether the attack can mirror the defences in its cost (inverting gradients' LaneObjective)."""
    return trial.family.mirrors_defences


def _fraction(value) -> bool:
    return 0 < value <= 1


# The quantiser (gradinv.client.defences) rounds to 2**bits levels in the update's float32: past its 24-bit
# significand finer levels change nothing, and a level count past 64 bits overflows (OverflowError).
MAX_QUANT_BITS = 32
QUANT_BITS_FIX = (
    f"use 1 to {MAX_QUANT_BITS} bits (finer levels than a float32 update's 24-bit precision change "
    "nothing), or leave it out for no quantisation"
)
# Delta is the chance that the guarantee fails outright; sound choices lie below 1/n for the n images
# protected (1/n > 7e-7 for every training set here). Below 1e-12 a smaller delta protects nothing more
# in practice and only inflates epsilon through ln(1/delta) (a subnormal such as 1e-320 is not even the
# number written: it is stored as 9.99989e-321).
MIN_DP_DELTA = 1e-12
DP_DELTA_FIX = (
    f"use a delta from {MIN_DP_DELTA:g} to below 1 (1e-5 is usual): a smaller chance of failure than "
    f"{MIN_DP_DELTA:g} protects nothing more and only inflates epsilon"
)


@dataclass(frozen=True, kw_only=True)
class DefenceSettings(Part):
    """What the client does to its update before sending it (gradinv.client.defences, applied in this order:
    clip, noise, pruning, quantisation), DP-SGD in its local training (gradinv.client.dp_training), how much of it the
    attacker mirrors, and secure aggregation over several clients. Defaults: no defence."""

    dp_clip: float | None = knob(
        None,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="DP-SGD in local training: the per-example clipping norm (default: no DP-SGD)",
        rules=[(math.isfinite, "use a finite norm")],
        check=_positive,
        fix="use a positive clipping norm, or leave it out for no DP-SGD",
    )
    dp_noise: float = knob(
        0.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="DP-SGD: the noise multiplier (noise std over dp_clip); 0: none",
        applies=_dp_sgd,
        rules=[(math.isfinite, "use a finite multiplier")],
        check=_at_least(0),
        fix="use 0 (no noise) or more",
    )
    dp_sample_rate: float = knob(
        1.0,
        kind="float",
        defence=True,
        applies=_dp_sgd,
        check=_fraction,
        help="DP-SGD: each image's chance to be in a step's batch (Poisson); 1: every image",
        fix="use a rate above 0 and at most 1 (1: every image in every step)",
    )
    dp_aware: bool = knob(
        False,
        kind="bool",
        defence=True,
        help="the attacker unrolls DP-SGD's per-example clip and batches",
        applies=lambda t: _dp_sgd(t) and _unrolls_defences(t),
    )

    clip_update: float | None = knob(
        None,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="clip the whole update to this L2 norm (default: no clip)",
        rules=[(math.isfinite, "use a finite norm")],
        check=_positive,
        fix="use a positive norm, or leave it out for no clip",
    )
    noise_std: float = knob(
        0.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="std of the Gaussian noise added to the update; 0: none",
        rules=[(math.isfinite, "use a finite std")],
        check=_at_least(0),
        fix="use 0 (no noise) or more",
    )
    keep_fraction: float = knob(
        1.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="keep this fraction of largest-magnitude coordinates; 1: all",
        check=_fraction,
        fix="use a fraction above 0 and at most 1 (1: no pruning)",
    )
    prune_scope: str = knob(
        "layer",
        kind="str",
        defence=True,
        recipes=(ZOO,),
        choices=PRUNE_SCOPES,
        applies=_pruned,
        help="prune within each parameter tensor, or over the whole update",
    )
    quant_bits: int | None = knob(
        None,
        kind="int",
        defence=True,
        recipes=(ZOO,),
        help="quantise each tensor to this many bits (default: none)",
        rules=[(lambda v: v <= MAX_QUANT_BITS, QUANT_BITS_FIX)],
        check=_at_least(1),
        fix="use 1 bit or more, or leave it out for no quantisation",
    )
    quant_rounding: str = knob(
        "stochastic",
        kind="str",
        defence=True,
        recipes=(ZOO,),
        choices=ROUNDINGS,
        applies=_quantised,
        help="stochastic (unbiased, QSGD-style) or nearest (1 bit: scaled signSGD)",
    )
    defence_seed: int = knob(
        0,
        kind="int",
        defence=True,
        recipes=(ZOO,),
        help="seeds the noise and the stochastic rounding",
        arrow="int64",
        applies=_randomised,
        check=_at_least(0),
        fix=SEED_FIX,
    )
    prune_aware: bool = knob(
        False,
        kind="bool",
        defence=True,
        help="the attacker compares only the coordinates the update kept",
        applies=lambda t: _pruned(t) and _unrolls_defences(t),
    )
    clip_aware: bool = knob(
        False,
        kind="bool",
        defence=True,
        help="the attacker clips its candidate update the same way",
        applies=lambda t: t.clip_update is not None and _unrolls_defences(t),
    )
    dp_delta: float = knob(
        1e-5,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        help="the delta of the reported (epsilon, delta) privacy",
        applies=_dp_mechanism,
        rules=[(lambda v: not 0 < v < MIN_DP_DELTA, DP_DELTA_FIX)],
        check=lambda v: 0 < v < 1,
        fix="use a delta between 0 and 1",
    )
    aggregated_clients: int = knob(
        1,
        kind="int",
        defence=True,
        check=_at_least(1),
        fix="use 1 (no aggregation) or more clients",
        help="secure aggregation: the server sees only the mean update of this many clients; "
        "the trial's images are split in order into equal groups, one per client; 1: none",
    )


@dataclass(frozen=True, kw_only=True)
class FederationSettings(Part):
    """The victim as the global model after ``round`` rounds of a simulated federation (gradinv.federation),
    and which of its clients sends the attacked update. Default: no federation. The ``fed_*`` knobs are its
    clients' local training: ClientSettings says which ``local_*`` knob each one is."""

    round: int | None = knob(
        None,
        kind="int",
        check=_at_least(0),
        fix="use 0 (the initial model) or a later round",
        help="the victim: a federation's global model after this many rounds (default: none)",
    )
    fed_rounds: int = knob(
        20,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=_at_least(0),
        fix="use 0 or more rounds",
        help="rounds the federation runs to; round may not exceed it",
    )
    fed_clients: int = knob(
        10,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=_at_least(1),
        fix="use 1 or more clients",
        help="clients in the federation, each holding a part of the train_subset",
    )
    partition: str = knob(
        "iid",
        kind="str",
        recipes=(FEDERATION,),
        choices=PARTITIONS,
        applies=federated,
        help="how the clients' images are split: iid, or dirichlet (label-skewed)",
    )
    alpha: float = knob(
        1.0,
        kind="float",
        recipes=(FEDERATION,),
        applies=_dirichlet,
        check=lambda v: math.isfinite(v) and v > 0,
        fix="use a concentration above 0 (0.1: skewed labels, 100: near-uniform)",
        help="dirichlet: the concentration over labels",
    )
    min_partition_size: int = knob(
        10,
        kind="int",
        recipes=(FEDERATION,),
        applies=_dirichlet,
        check=_at_least(0),
        fix="use 0 or more",
        help="dirichlet: redraw until every client holds at least this many images",
    )
    clients_per_round: int | None = knob(
        None,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=_at_least(1),
        fix="use 1 or more",
        help="clients drawn to train in each round (default: all)",
    )
    fed_epochs: int = knob(
        1,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=_at_least(1),
        fix="use 1 or more",
        help="local epochs per round, the attacked client's under fedavg too",
    )
    fed_batch_size: int = knob(
        16,
        kind="int",
        recipes=(FEDERATION,),
        applies=federated,
        check=_at_least(1),
        fix="use 1 or more",
        help="images per local SGD step in the federation",
    )
    fed_lr: float = knob(
        0.01,
        kind="float",
        recipes=(FEDERATION,),
        applies=federated,
        check=_positive,
        fix="use a positive step size",
        help="the federation's local SGD step size",
    )
    fed_momentum: float = knob(
        0.0,
        kind="float",
        recipes=(FEDERATION,),
        applies=federated,
        check=_momentum,
        fix=MOMENTUM_FIX,
        help="the federation's local SGD momentum (as local_momentum); 0: plain SGD",
    )
    attacked_client: int = knob(
        0,
        kind="int",
        repetition=True,
        applies=federated,
        check=_at_least(0),
        fix="use 0 or a later client",
        help="the client whose update is attacked (its own images, drawn from its partition)",
    )


PARTS: list[type] = [
    DataSettings,
    VictimSettings,
    ClientSettings,
    AttackSettings,
    OptimiserSettings,
    InvertingSettings,
    ImprintSettings,
    DefenceSettings,
    FederationSettings,
]


def parameters() -> dict[str, Knob]:
    """Every declared trial parameter, in column order."""
    return {name: declared for part in PARTS for name, declared in declarations(part).items()}


def parameter_defaults() -> dict:
    return {name: value for part in PARTS for name, value in defaults(part).items()}


def recipe_fields(recipe: str, parts: Sequence[type] | None = None) -> list[dataclasses.Field]:
    """The declared fields of ``parts`` (default: every part) that determine a victim ``recipe``'s weights."""
    return [
        f
        for part in (PARTS if parts is None else parts)
        for f in dataclasses.fields(part)
        if KNOB in f.metadata and recipe in f.metadata[KNOB].recipes
    ]


def checkpoint_identity() -> list[str]:
    """The parameters that name a trained victim's checkpoint: its zoo recipe, the defences it trained under aside."""
    return [name for name, declared in parameters().items() if ZOO in declared.recipes and not declared.defence]


def search_space() -> tuple[tuple[str, ...], dict[str, tuple | None]]:
    """What ``tune`` may search: the log-uniform names, and name -> choices (None: any count of 1 or more)."""
    declared = parameters()
    log_uniform = tuple(name for name, d in declared.items() if d.search == "log")
    choices = {
        name: (d.allowed() if d.search == "choices" else d.search)
        for name, d in declared.items()
        if d.search not in (None, "log")
    }
    return log_uniform, choices


def paper_defaults() -> dict:
    """The declared defaults (the paper's settings) of every searchable parameter."""
    log_uniform, choices = search_space()
    every = parameter_defaults()
    return {name: every[name] for name in (*log_uniform, *choices)}
