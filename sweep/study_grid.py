"""A study's grid: its data, fixed, grid and zip settings validated value by value, counted from the axes'
lengths, and expanded into resolved trials (datasets x grid points x zip rows x clients)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from gradinv.data import dataset_spec
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec

from .study_checks import Checker, coerce

TRIAL_SIZE = ("images_per_client", "aggregated_clients")  # a trial deals images_per_client x clients images


def _datasets(check: Checker, data: dict) -> list[str]:
    """``data.dataset``: one name, or a list of names that acts as the outermost axis."""
    names = data["dataset"] if isinstance(data["dataset"], list) else [data["dataset"]]
    if not names:
        check.fail(("data", "dataset"), "expected a dataset name or a non-empty list of them")
    for name in names:
        try:
            dataset_spec(coerce(check, "dataset", name, ("data", "dataset")))
        except ConfigError as error:
            check.fail(("data", "dataset"), f"{error.value!r}: {error.fix}")
    return names


def _image_indices(check: Checker, data: dict, datasets: list[str]) -> list[int]:
    """``data.images``: a count or a list of test-split indices, checked against the smallest split first."""
    smallest = min(datasets, key=lambda name: dataset_spec(name).test_images)
    available = dataset_spec(smallest).test_images
    images = data.get("images", 1)
    if isinstance(images, list):
        if not images:
            check.fail(("data", "images"), "expected a count or a non-empty list of test-split indices")
        for i, index in enumerate(images):
            check.number(index, ("data", "images", i), integer=True, minimum=0)
            if index >= available:
                check.fail(("data", "images", i), f"{index}: use 0 to {available - 1} for {smallest}")
        if len(set(images)) != len(images):
            check.fail(("data", "images"), "lists an image twice")
        return list(images)
    count = check.number(images, ("data", "images"), integer=True, minimum=1)
    if count > available:
        check.fail(("data", "images"), f"{count}: {smallest} has {available} test images; use 1 to {available}")
    return list(range(count))


def _axes(check: Checker, section: str, axes: dict) -> dict:
    return {name: [coerce(check, name, value, (section, name)) for value in values] for name, values in axes.items()}


@dataclass
class Grid:
    """A study's settings, each value validated once: what the grid is made of before it is expanded."""

    datasets: list[str]
    indices: list[int]
    base: dict  # data settings every trial shares
    fixed: dict
    grid: dict
    zipped: dict

    @classmethod
    def validated(cls, check: Checker, data: dict, fixed: dict, grid: dict, zipped: dict) -> Grid:
        datasets = _datasets(check, data)
        indices = _image_indices(check, data, datasets)
        base = {
            "labels": coerce(check, "labels", data.get("labels", "known"), ("data", "labels")),
            "image_size": coerce(check, "image_size", data.get("image_size"), ("data", "image_size")),
        }
        fixed = {name: coerce(check, name, value, ("fixed", name)) for name, value in fixed.items()}
        sweep = cls(datasets, indices, base, fixed, _axes(check, "grid", grid), _axes(check, "zip", zipped))
        for per_client, clients in sweep.client_shares():
            if clients < 1:
                check.fail(sweep.where("aggregated_clients"), f"{clients}: use 1 (no aggregation) or more clients")
            if not 1 <= per_client * clients <= len(indices):
                most = len(indices) // clients
                dealt = f" x {clients} clients = {per_client * clients}" if clients > 1 else ""
                check.fail(
                    sweep.where("images_per_client"),
                    f"{per_client}{dealt}: use 1 to {most} images per client (the study has {len(indices)} images)"
                    if most
                    else f"{per_client}{dealt}: the study has {len(indices)} images, fewer than {clients} clients",
                )
        return sweep

    def where(self, name: str) -> tuple:
        return ("grid" if name in self.grid else "zip" if name in self.zipped else "fixed", name)

    def client_shares(self) -> list[tuple[int, int]]:
        """(``images_per_client``, ``aggregated_clients``) for each combination of the axes that set them:
        a trial holds ``images_per_client`` images for each of its clients."""
        shares = [name for name in TRIAL_SIZE if name in self.grid]
        zip_rows = list(zip(*self.zipped.values())) if any(name in self.zipped for name in TRIAL_SIZE) else [()]
        result = []
        for combination in itertools.product(*(self.grid[name] for name in shares)):
            for row in zip_rows:
                values = {**self.fixed, **dict(zip(shares, combination)), **dict(zip(self.zipped, row))}
                result.append((values.get("images_per_client", 1), values.get("aggregated_clients", 1)))
        return result

    def count(self) -> int:
        """Trials before collapsing, from the axes' lengths: nothing is built."""
        others = [len(v) for name, v in self.grid.items() if name not in TRIAL_SIZE]
        if not any(name in self.zipped for name in TRIAL_SIZE):
            others.append(len(next(iter(self.zipped.values()), [None])))
        trials = sum(len(self.indices) // (per_client * clients) for per_client, clients in self.client_shares())
        return len(self.datasets) * math.prod(others) * trials

    def points(self):
        """Every combination: the cartesian product of grid axes times the paired zip axes."""
        grid_names, zip_names = list(self.grid), list(self.zipped)
        zip_rows = list(zip(*self.zipped.values())) if self.zipped else [()]
        for combination in itertools.product(*self.grid.values()):
            for row in zip_rows:
                yield {**self.fixed, **dict(zip(grid_names, combination)), **dict(zip(zip_names, row))}

    def expand(self, check: Checker) -> tuple[tuple[TrialSpec, ...], int]:
        indices, trials, seen, points = self.indices, [], set(), 0
        for dataset in self.datasets:
            for values in self.points():
                size = values.pop("images_per_client", 1) * values.get("aggregated_clients", 1)
                for start in range(0, len(indices) - size + 1, size):
                    points += 1
                    images = tuple(indices[start : start + size])
                    try:
                        spec = TrialSpec(**self.base, dataset=dataset, images=images, **values).resolved()
                    except ConfigError as error:
                        check.fail(_location(error.field, self.where), f"{error.value!r}: {error.fix}")
                    if spec not in seen:
                        seen.add(spec)
                        trials.append(spec)
        return tuple(trials), points - len(trials)


_DATA_FIELDS = {
    "dataset": "dataset",
    "image": "images",
    "images": "images",
    "labels": "labels",
    "image_size": "image_size",
}


def _location(field_name: str, where) -> tuple:
    """Where in the file a trial-level error belongs."""
    if field_name in _DATA_FIELDS:
        return ("data", _DATA_FIELDS[field_name])
    return where(field_name)
