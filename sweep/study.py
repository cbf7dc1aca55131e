"""Study files: plain YAML, safe-loaded and validated once into frozen objects.

Every mistake becomes a :class:`StudyError` naming the file, the line and the field. Loading is
bounded: the file's size, what its aliases expand to, and the trials a grid may make are capped
before anything large is built.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from gradinv.data import dataset_spec
from gradinv.errors import ConfigError
from gradinv.parameters import DataSettings, declarations, parameters
from gradinv.results.schema import SCHEMA
from gradinv.trial import DEFAULTS, TrialSpec

from .study_yaml import StudyError, read_yaml

TOP_LEVEL = ("name", "data", "fixed", "grid", "zip", "resources", "max_retries", "timeout", "lanes", "tune")
DATA_KEYS = tuple(declarations(DataSettings))  # the data: section
# Parameters a study may set in fixed/grid/zip: every trial field but the data's, plus the dealing.
TRIAL_PARAMETERS = tuple(name for name in DEFAULTS if name not in DATA_KEYS)
SWEEPABLE = TRIAL_PARAMETERS + ("images_per_client",)
TRIAL_SIZE = ("images_per_client", "aggregated_clients")  # a trial deals images_per_client x clients images
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LENGTH = 100  # the name is the default results directory: keep it well inside a file name's limit
MAX_TRIALS = 1_000_000  # trials (grid points x clients) a study may expand to unless raised


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class Study:
    name: str
    path: str
    trials: tuple[TrialSpec, ...] | None  # resolved and de-duplicated, in sweep order; None: over the cap
    collapsed: int | None  # grid points that resolved to an earlier trial; None: not expanded
    axes: dict  # axis name -> values, for the dry run
    points: int  # trials before collapsing: datasets x grid points x zip rows x clients
    resources: Resources = Resources()
    max_retries: int = 3
    timeout: float | None = None  # seconds per trial
    lanes: int | None = None  # trials per computation; None: the device's default
    tune: dict | None = None  # the raw tune: section, validated by sweep.cli.tune
    lines: dict = field(default_factory=dict, compare=False, repr=False)  # field path -> line
    fixed: dict = field(default_factory=dict)  # the fixed: settings as given (trials drop those that do not apply)


# ---------------------------------------------------------------------------------------------
# Validation


class _Checker:
    def __init__(self, path: Path, lines: dict):
        self.path, self.lines = path, lines

    def fail(self, where: tuple, message: str):
        line = None
        for cut in range(len(where), -1, -1):
            line = self.lines.get(where[:cut])
            if line:
                break
        raise StudyError(self.path, line, ".".join(str(p) for p in where), message)

    def mapping(self, value, where: tuple, allowed: tuple) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                self.fail(where + (key,), f"unknown key; allowed: {', '.join(allowed)}")
        return value

    def number(self, value, where: tuple, *, integer=False, minimum=None, maximum=None, positive=False):
        """A finite number; with ``maximum``, one in [minimum, maximum]."""
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.fail(where, f"expected {'a whole number' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            self.fail(where, f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            self.fail(where, f"must be greater than 0, got {value!r}")
        if maximum is not None and not minimum <= value <= maximum:
            self.fail(where, f"{value!r} is out of range; use {minimum} to {maximum}")
        if minimum is not None and value < minimum:
            self.fail(where, f"must be at least {minimum}, got {value!r}")
        return value


def _column_range(column: str) -> tuple[int, int]:
    """The integers the results column (or its list items) can hold: writing more would overflow. A trial
    parameter's range is its declaration's, the one `gradinv attack` flags are held to too."""
    knob = parameters().get(column)
    if knob is not None:
        return knob.integer_range()
    kind = SCHEMA.field(column).type
    if pa.types.is_list(kind):
        kind = kind.value_type
    half = 1 << (kind.bit_width - 1)
    return -half, half - 1


def _coerce(checker: _Checker, name: str, value, where: tuple):
    """A YAML value as the parameter's declared kind (ints stay ints and fit their column, floats accept ints)."""
    knob = parameters().get(name)
    kind = knob.kind if knob else "int"  # images_per_client
    if knob is not None and knob.optional and value is None:
        return None
    if kind == "ints":
        if knob.names and isinstance(value, str):  # a named set, checked by TrialSpec
            return value
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            named = " or a named set" if knob.names else ""
            checker.fail(where, f"expected a list of whole numbers{named}, got {value!r}")
        low, high = _column_range(name)
        return tuple(checker.number(v, where, integer=True, minimum=low, maximum=high) for v in value)
    if kind == "bool":
        if not isinstance(value, bool):
            checker.fail(where, f"expected true or false, got {value!r}")
        return value
    if kind == "int":
        low, high = _column_range(name)
        return checker.number(value, where, integer=True, minimum=low, maximum=high)
    if kind == "float":
        return float(checker.number(value, where))
    if not isinstance(value, str):
        checker.fail(where, f"expected text, got {value!r}")
    return value


def load_study(path: str | Path, max_trials: int = MAX_TRIALS) -> Study:
    """The validated study with its trials; refused when it makes more than ``max_trials`` trials."""
    study = read_study(path, max_trials)
    if study.trials is None:
        line = study.lines.get(("grid",)) or study.lines.get(("zip",))
        raise StudyError(
            study.path,
            line,
            "grid",
            f"{study.points} trials exceed the cap of {max_trials}; sweep "
            f"fewer values, or raise the cap (gradinv run --max-trials {study.points})",
        )
    return study


def read_study(path: str | Path, max_trials: int = MAX_TRIALS) -> Study:
    """The validated study, its trials counted from the axes and expanded only within ``max_trials``."""
    path = Path(path)
    document, lines = read_yaml(path)
    check = _Checker(path, lines)
    check.mapping(document, (), TOP_LEVEL)
    for required in ("name", "data"):
        if required not in document:
            check.fail((), f"missing required key '{required}'")
    name = _name(check, document["name"])
    data = check.mapping(document["data"], ("data",), DATA_KEYS)
    if "dataset" not in data:
        check.fail(("data",), "missing required key 'dataset'")
    fixed = check.mapping(document.get("fixed") or {}, ("fixed",), SWEEPABLE)
    grid = check.mapping(document.get("grid") or {}, ("grid",), SWEEPABLE)
    zipped = check.mapping(document.get("zip") or {}, ("zip",), SWEEPABLE)
    for section, axes in (("grid", grid), ("zip", zipped)):
        for axis, values in axes.items():
            if not isinstance(values, list) or not values:
                check.fail((section, axis), "expected a non-empty list of values")
            if axis in fixed:
                check.fail((section, axis), "is also in 'fixed'; set it in one place")
    if set(grid) & set(zipped):
        both = sorted(set(grid) & set(zipped))[0]
        check.fail(("zip", both), "is also a grid axis; sweep it in one place")
    if len({len(v) for v in zipped.values()}) > 1:
        check.fail(("zip",), "all zip axes must have the same length")
    resources = _resources(check, document.get("resources") or {})
    last_attempt = _column_range("attempt")[1]  # a trial's last attempt is max_retries + 1
    max_retries = check.number(
        document.get("max_retries", 3), ("max_retries",), integer=True, minimum=0, maximum=last_attempt - 1
    )
    timeout = document.get("timeout")
    if timeout is not None:
        timeout = float(check.number(timeout, ("timeout",), positive=True))
    lanes = document.get("lanes")
    if lanes is not None:
        lanes = check.number(lanes, ("lanes",), integer=True, minimum=1, maximum=_column_range("lanes")[1])
    tune = document.get("tune")
    if tune is not None and not isinstance(tune, dict):
        check.fail(("tune",), "expected a mapping")
    sweep = _Sweep.validated(check, data, fixed, grid, zipped)
    points = sweep.count()
    trials, collapsed = sweep.expand(check) if points <= max_trials else (None, None)
    axes = {**grid, **{f"zip:{k}": v for k, v in zipped.items()}}
    if isinstance(data["dataset"], list):
        axes = {"dataset": data["dataset"], **axes}
    return Study(
        name,
        str(path),
        trials,
        collapsed,
        axes,
        points,
        resources,
        max_retries,
        timeout,
        lanes,
        tune,
        lines,
        sweep.fixed,
    )


def _name(check: _Checker, name) -> str:
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        check.fail(
            ("name",), f"{name[:MAX_NAME_LENGTH] + '...'!r} is {len(name)} characters; use at most {MAX_NAME_LENGTH}"
        )
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        check.fail(("name",), f"{name!r}: use letters, digits, '.', '_' and '-'")
    return name


RAY_RESOURCE_UNIT = 0.0001  # Ray counts resources in ten-thousandths (ray_constants.MIN_RESOURCE_GRANULARITY)


def _resources(check: _Checker, value) -> Resources:
    resources = check.mapping(value, ("resources",), ("num_cpus", "num_gpus"))
    num_cpus = check.number(resources.get("num_cpus", 1), ("resources", "num_cpus"), positive=True)
    num_gpus = check.number(resources.get("num_gpus", 0), ("resources", "num_gpus"), minimum=0)
    if num_gpus > 1 and num_gpus != int(num_gpus):
        check.fail(("resources", "num_gpus"), f"{num_gpus}: above 1 a trial takes whole GPUs")
    for name, amount in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        units = amount / RAY_RESOURCE_UNIT
        if not math.isclose(units, round(units), rel_tol=1e-9, abs_tol=1e-6) or 0 < units < 1:
            check.fail(
                ("resources", name),
                f"{amount!r}: Ray counts resources in steps of {RAY_RESOURCE_UNIT}; use a "
                f"multiple of {RAY_RESOURCE_UNIT}",
            )
    return Resources(float(num_cpus), float(num_gpus))


def _datasets(check: _Checker, data: dict) -> list[str]:
    """``data.dataset``: one name, or a list of names that acts as the outermost axis."""
    names = data["dataset"] if isinstance(data["dataset"], list) else [data["dataset"]]
    if not names:
        check.fail(("data", "dataset"), "expected a dataset name or a non-empty list of them")
    for name in names:
        try:
            dataset_spec(_coerce(check, "dataset", name, ("data", "dataset")))
        except ConfigError as error:
            check.fail(("data", "dataset"), f"{error.value!r}: {error.fix}")
    return names


def _image_indices(check: _Checker, data: dict, datasets: list[str]) -> list[int]:
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


def _axes(check: _Checker, section: str, axes: dict) -> dict:
    return {name: [_coerce(check, name, value, (section, name)) for value in values] for name, values in axes.items()}


@dataclass
class _Sweep:
    """A study's settings, each value validated once: what the grid is made of before it is expanded."""

    datasets: list[str]
    indices: list[int]
    base: dict  # data settings every trial shares
    fixed: dict
    grid: dict
    zipped: dict

    @classmethod
    def validated(cls, check: _Checker, data: dict, fixed: dict, grid: dict, zipped: dict) -> _Sweep:
        datasets = _datasets(check, data)
        indices = _image_indices(check, data, datasets)
        base = {
            "labels": _coerce(check, "labels", data.get("labels", "known"), ("data", "labels")),
            "image_size": _coerce(check, "image_size", data.get("image_size"), ("data", "image_size")),
        }
        fixed = {name: _coerce(check, name, value, ("fixed", name)) for name, value in fixed.items()}
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

    def expand(self, check: _Checker) -> tuple[tuple[TrialSpec, ...], int]:
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
