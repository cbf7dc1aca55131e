"""A trial's settings: :class:`TrialSpec` holds every parameter that affects a trial's numbers, checks
the rules they keep with each other, and gives the key; :func:`lane_signature` says which trials can run
as one computation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace

import torch

from .. import data, model_factories, models, parameters, weights
from ..attacks.base import Family
from ..attacks.costs import layer_indices
from ..attacks.labels import applicable
from ..attacks.objective import IGConfig
from ..attacks.registry import FAMILIES, settings_parts
from ..errors import ConfigError, require
from ..federation import Federation
from ..image_folders import is_folder
from ..parameters import LAYER_SET_COLUMN, ClientSettings, extract, federated, trained_victim
from ..victims import recipe_of


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
        if model_factories.is_factory(self.model):
            self._check_factory()
        if self.weights is not None:
            self._check_weights()
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
        if getattr(self, "output_gradient", "computed") == "read":
            self._check_output_gradient()
        if getattr(self, "epoch_prior", 0) > 0:
            self._check_epoch_prior()
        self.ig_config()  # the settings that constrain each other
        if not isinstance(self.layers, str):  # indices, not a set's name
            source = getattr(self, "model_source_sha256", None)
            count = parameter_tensors(self.model, spec.channels, spec.num_classes, self.side, self.width, source)
            layer_indices(count, self.layers)

    def _check_output_gradient(self) -> None:
        """The output bias gradient is the client's loss gradient at the logits only for one step on one image:
        several images or clients sum theirs into it. A FedAvg client's several steps sum theirs too, which an
        attacker that models them as one step (``attacker_local_steps: 1``) reads as its one step's."""
        fix = "use computed, or read with one image, one step as the attacker sees it, and no aggregation or DP-SGD"
        one_step = self.fl == "fedsgd" or (self.attacker_local_steps or self.local_steps) == 1
        require(one_step, "output_gradient", "read", f"fl is {self.fl} with {self.local_steps} local steps; {fix}")
        require(len(self.images) == 1, "output_gradient", "read", f"the client holds {len(self.images)} images; {fix}")
        for name, off in (("aggregated_clients", 1), ("dp_clip", None)):
            require(getattr(self, name) == off, "output_gradient", "read", f"{name} is {getattr(self, name)}; {fix}")

    def _check_epoch_prior(self) -> None:
        """Each epoch's own candidates are unrolled by plain local SGD and scored by the gradient and image
        priors; the priors that read a candidate batch's features would see every epoch's images at once."""
        fix = "use 0 (one candidate per image, shared by the epochs), or turn the other off"
        for name, off in (("bn_prior", 0), ("feature_prior", 0), ("dp_aware", False)):
            require(
                getattr(self, name) == off, "epoch_prior", self.epoch_prior, f"{name} is {getattr(self, name)}; {fix}"
            )

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
        require(
            not is_folder(self.dataset),
            "round",
            self.round,
            "leave it out: a federation is simulated on the built-in datasets only, not on an image folder",
        )
        # the recipe's own rules (training images, an image per client, room for the partition sizes), the
        # round within fed_rounds, the attacked client among the clients and its share
        federation = Federation.of_trial(self)
        federation.check_round(self.round)
        federation.check_positions(self.attacked_client, self.images)

    def _check_factory(self) -> None:
        """The user's ``package.module:function`` against the trial: importable, returning an nn.Module (built
        once on the meta device), untrained or from a weights file. Its source's digest is kept for the key."""
        require(
            not trained_victim(self),
            "trained_epochs",
            self.trained_epochs,
            "use 0 with a model from your code (zoo checkpoints are of registry models); or give its weights",
        )
        require(not federated(self), "round", self.round, "leave it out: federations train registry models only")
        object.__setattr__(self, "model_source_sha256", model_factories.source_sha256(self.model))
        info = self.data_spec
        parameter_tensors(self.model, info.channels, info.num_classes, self.side, self.width, self.model_source_sha256)

    def _check_weights(self) -> None:
        """The file against the trial: no other source of weights, readable, fitting the model. The path is
        made absolute (workers may start elsewhere) and the content's digest kept for the key."""
        require(
            not trained_victim(self),
            "trained_epochs",
            self.trained_epochs,
            "use 0 with weights: the weights file is the victim, not a zoo checkpoint",
        )
        require(not federated(self), "round", self.round, "leave it out with weights: a federation trains its own")
        path = weights.absolute(self.weights)
        object.__setattr__(self, "weights", path)  # frozen: set once, while the trial is built
        object.__setattr__(self, "weights_sha256", weights.digest(path))
        weights.check_fits(self, path)

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
        ``layers`` set is hashed under LAYER_SET_COLUMN, as before the two knobs merged. A ``weights`` file
        is hashed by its content (``weights_sha256``), not its path: a copy elsewhere keeps the keys. A model
        from the user's code adds its module's source digest (``model_source_sha256``): edited code, new keys."""
        fields, split = self.non_default(), self.data_spec.split_version
        if model_factories.is_factory(self.model):
            fields["model_source_sha256"] = self.model_source_sha256
        if "weights" in fields:
            del fields["weights"]
            fields["weights_sha256"] = self.weights_sha256
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
def parameter_tensors(
    model: str, channels: int, num_classes: int, side: int, width: int | None, source: str | None = None
) -> int:
    """How many parameter tensors the model has (built on the meta device: no memory, no numbers). ``source``:
    a factory's source digest, so that edited code is built again."""
    shape = dict(channels=channels, num_classes=num_classes, image_size=side, width=width)
    try:
        with torch.device("meta"):
            victim = models.build_model(model, **shape)
    except ConfigError:
        if not model_factories.is_factory(model):
            raise
        victim = models.build_model(model, **shape)  # a factory that needs real numbers; its own error stands
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
