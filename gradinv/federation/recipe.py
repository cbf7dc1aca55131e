"""A federation's recipe: the :class:`Federation` built from the knobs gradinv.parameters declares for
the FEDERATION recipe, the rules they keep, and its key.

A recipe fixes everything that determines the rounds' weights. Its key leaves out how many rounds to
train and how often to keep one: training further extends the same federation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import data, models, parameters
from ..errors import require
from ..parameters import FEDERATION, knob

FEDERATION_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class RecipeSettings:
    """The recipe's own fields, not trial parameters: :func:`recipe_class` puts them after the knobs
    gradinv.parameters declares for the FEDERATION recipe."""

    self_balancing: bool = knob(
        False, kind="bool", help="dirichlet: a client past len/clients images takes no more classes"
    )
    checkpoint_every: int = knob(
        1,
        kind="int",
        check=lambda v: v >= 1,
        fix="use 1 or more",
        help="keep every k-th round as a resume point (not in the key)",
    )
    accuracy_images: int = knob(
        1000,
        kind="int",
        check=lambda v: v >= 1,
        fix="use 1 or more",
        help="the first N test images score each round's global model",
    )
    version: int = FEDERATION_VERSION


DIRICHLET_ONLY = ("alpha", "min_partition_size")  # None under iid
NOT_KEYED = ("fed_rounds", "checkpoint_every")  # how far to train, how often to keep: training further extends it
# The fields every key has held: a field added since is keyed only off its default, so existing keys stay.
ALWAYS_KEYED = frozenset(
    {
        "dataset",
        "model",
        "width",
        "norm",
        "model_seed",
        "image_size",
        "train_subset",
        "fed_clients",
        "partition",
        "alpha",
        "min_partition_size",
        "clients_per_round",
        "fed_epochs",
        "fed_batch_size",
        "fed_lr",
        "self_balancing",
        "accuracy_images",
        "version",
    }
)


class FederationRules:
    """Everything that determines a federation's round checkpoints (and, outside the key, how far to
    train and how often to keep a round). Fields named like trial parameters mean what those mean;
    ``model_seed`` seeds the initial model, the partition, who takes part and the batches."""

    def __post_init__(self):
        dirichlet = self.partition == "dirichlet"
        for name, declared in parameters.declarations(self).items():
            if name not in DIRICHLET_ONLY or dirichlet:
                declared.validate(name, getattr(self, name))
        require(
            data.dataset_spec(self.dataset).trainable,
            "dataset",
            self.dataset,
            "it keeps no images to train on (every image is attacked)",
        )
        if self.width is None:  # the model's default width: the key is the same either way
            object.__setattr__(self, "width", models.default_width(self.model))
        if not dirichlet:  # no concentration: one key whatever the unused settings say
            for name in DIRICHLET_ONLY:
                object.__setattr__(self, name, None)
            object.__setattr__(self, "self_balancing", False)
        self._check_partition()
        if self.clients_per_round is None:
            object.__setattr__(self, "clients_per_round", self.fed_clients)  # one key for "all" and its count
        require(
            self.clients_per_round <= self.fed_clients,
            "clients_per_round",
            self.clients_per_round,
            f"use 1 to {self.fed_clients} (the federation's clients)",
        )

    def _check_partition(self) -> None:
        """What any partition of the training images needs: an image per client, and under dirichlet
        room for ``min_partition_size`` images per client (else every draw is refused)."""
        available, clients = self.training_images, self.fed_clients
        require(clients <= available, "fed_clients", clients, f"use at most {available} clients ({self._images()})")
        if self.partition == "dirichlet":
            most = available // clients
            require(
                self.min_partition_size <= most,
                "min_partition_size",
                self.min_partition_size,
                f"no partition gives each of {clients} clients that many of {self._images()}; use 0 to {most}, "
                "or fewer clients",
            )

    @property
    def training_images(self) -> int:
        """How many training images the clients share: the train_subset's, or all the dataset keeps."""
        available = data.dataset_spec(self.dataset).train_images
        return available if self.train_subset is None else min(self.train_subset, available)

    def _images(self) -> str:
        if self.train_subset is not None and self.train_subset <= self.training_images:
            return f"the train_subset's {self.train_subset} images"
        return f"the {self.training_images} training images of {self.dataset}"

    def share_size(self, client: int) -> tuple[int, int]:
        """The fewest and the most images ``client`` can hold: exact under iid (near-equal parts), and
        under dirichlet bounded by ``min_partition_size`` for it and for each other client."""
        available, clients = self.training_images, self.fed_clients
        if self.partition == "iid":
            size = available // clients + (client < available % clients)  # np.array_split's part sizes
            return size, size
        return self.min_partition_size, available - (clients - 1) * self.min_partition_size

    def check_positions(self, client: int, positions: Sequence[int]) -> None:
        """Refuses a client the federation lacks, and attacked-image positions beyond any share ``client``
        can hold (the share drawn is checked again when its partition is known:
        :func:`gradinv.federation.rounds.attacked_images`)."""
        require(
            0 <= client < self.fed_clients,
            "attacked_client",
            client,
            f"use 0 to {self.fed_clients - 1} (the federation's clients)",
        )
        fewest, most = self.share_size(client)
        holds = f"holds {most}" if fewest == most else f"holds at most {most}"
        for position in positions:
            require(
                position < most, "images", position, f"client {client} {holds} images; use positions 0 to {most - 1}"
            )

    @classmethod
    def of_trial(cls, trial) -> Federation:
        """The federation a trial's victim comes from."""
        own = parameters.declarations(RecipeSettings)
        return cls(**{name: getattr(trial, name) for name in parameters.declarations(cls) if name not in own})

    @property
    def key(self) -> str:
        plain = parameters.defaults(self)
        fields = {
            name: value
            for name, value in dataclasses.asdict(self).items()
            if name not in NOT_KEYED and (name in ALWAYS_KEYED or value != plain[name])
        }
        if split := data.dataset_spec(self.dataset).split_version:
            fields["split_version"] = split
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        return f"{self.model}-{self.dataset}-{self.partition}-c{self.fed_clients}-{digest}"

    def initial_model(self) -> torch.nn.Module:
        return models.initial_model(self).eval()

    def check_round(self, round_: int) -> None:
        require(
            0 <= round_ <= self.fed_rounds,
            "round",
            round_,
            f"use 0 to {self.fed_rounds} (fed_rounds), or raise fed_rounds",
        )


def recipe_class(parts: Sequence[type]) -> type:
    """The federation recipe: the knobs of ``parts`` declared for the FEDERATION recipe, and RecipeSettings."""
    fields = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in (*parameters.recipe_fields(FEDERATION, parts), *dataclasses.fields(RecipeSettings))
    ]
    cls = dataclasses.make_dataclass("Federation", fields, bases=(FederationRules,), frozen=True, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = FederationRules.__doc__
    return cls


Federation = recipe_class(parameters.PARTS)
