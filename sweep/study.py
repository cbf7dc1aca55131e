"""Study files: plain YAML, safe-loaded and validated once into frozen objects.

Every mistake becomes a :class:`StudyError` naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradinv.errors import ConfigError
from gradinv.trial import DEFAULTS, TrialSpec

TOP_LEVEL = ("name", "data", "fixed", "grid", "zip", "resources", "max_retries", "timeout", "lanes", "tune")
DATA_KEYS = ("dataset", "images", "labels", "image_size")
# Parameters a study may set in fixed/grid/zip: every trial field but the data's, plus the dealing.
TRIAL_PARAMETERS = tuple(name for name in DEFAULTS if name not in ("dataset", "images", "labels", "image_size"))
SWEEPABLE = TRIAL_PARAMETERS + ("images_per_client",)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StudyError(ConfigError):
    """A mistake in a study file, located by file and line."""

    def __init__(self, path: Path | str, line: int | None, field_name: str, message: str):
        where = f"{path}:{line}" if line else str(path)
        self.field, self.value, self.fix = field_name, None, message
        ValueError.__init__(self, f"{where}: {field_name}: {message}")


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class Study:
    name: str
    path: str
    trials: tuple[TrialSpec, ...]  # resolved and de-duplicated, in sweep order
    collapsed: int  # grid points that resolved to an earlier trial
    axes: dict  # axis name -> values, for the dry run
    resources: Resources = Resources()
    max_retries: int = 3
    timeout: float | None = None  # seconds per trial
    lanes: int | None = None  # trials per computation; None: the device's default
    tune: dict | None = None  # the raw tune: section, validated by sweep.tuning
    lines: dict = field(default_factory=dict, compare=False, repr=False)  # field path -> line


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


def _plain(node: yaml.Node, path: tuple, lines: dict) -> Any:
    """A composed YAML node as plain Python data, recording the line of every mapping key."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result = {}
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            result[key] = _plain(value_node, path + (key,), lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_plain(item, path + (i,), lines) for i, item in enumerate(node.value)]
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


def read_yaml(path: Path) -> tuple[dict, dict]:
    try:
        text = path.read_text()
    except OSError as error:
        raise StudyError(path, None, "file", f"cannot read it ({error.strerror}); check the path") from None
    try:
        yaml.safe_load(text)  # rejects every tag a safe loader cannot construct (!!python/..., ...)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict = {}
        document = _plain(node, (), lines) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = (error.problem or error.context or "invalid YAML").replace("\n", " ")
        raise StudyError(path, mark.line + 1 if mark else None, "yaml", f"{problem}; fix the YAML syntax") from None
    except yaml.YAMLError as error:
        raise StudyError(path, None, "yaml", f"{str(error).splitlines()[0]}; fix the YAML syntax") from None
    if not isinstance(document, dict):
        raise StudyError(path, 1, "study", "the file must be a mapping with at least 'name' and 'data'")
    return document, lines


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

    def number(self, value, where: tuple, *, integer=False, minimum=None, positive=False):
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.fail(where, f"expected {'a whole number' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            self.fail(where, f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            self.fail(where, f"must be greater than 0, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(where, f"must be at least {minimum}, got {value!r}")
        return value


_TYPES = {f.name: f.type for f in dataclasses.fields(TrialSpec)}


def _coerce(checker: _Checker, name: str, value, where: tuple):
    """A YAML value as the trial field's type (ints stay ints, floats accept ints)."""
    kind = _TYPES.get(name, "int")
    if name == "layers":
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            checker.fail(where, f"expected a list of parameter indices, got {value!r}")
        return tuple(value)
    if "None" in kind and value is None:
        return None
    if kind.startswith("int") or name == "images_per_client":
        return checker.number(value, where, integer=True)
    if kind.startswith("float"):
        return float(checker.number(value, where))
    if kind.startswith("str"):
        if not isinstance(value, str):
            checker.fail(where, f"expected text, got {value!r}")
        return value
    checker.fail(where, f"cannot be set here ({value!r})")


def load_study(path: str | Path) -> Study:
    path = Path(path)
    document, lines = read_yaml(path)
    check = _Checker(path, lines)
    check.mapping(document, (), TOP_LEVEL)
    for required in ("name", "data"):
        if required not in document:
            check.fail((), f"missing required key '{required}'")
    name = document["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        check.fail(("name",), f"{name!r}: use letters, digits, '.', '_' and '-'")
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
    max_retries = check.number(document.get("max_retries", 3), ("max_retries",), integer=True, minimum=0)
    timeout = document.get("timeout")
    if timeout is not None:
        timeout = float(check.number(timeout, ("timeout",), positive=True))
    lanes = document.get("lanes")
    if lanes is not None:
        lanes = check.number(lanes, ("lanes",), integer=True, minimum=1)
    tune = document.get("tune")
    if tune is not None and not isinstance(tune, dict):
        check.fail(("tune",), "expected a mapping")
    trials, collapsed = _expand(check, data, fixed, grid, zipped)
    axes = {**grid, **{f"zip:{k}": v for k, v in zipped.items()}}
    if isinstance(data["dataset"], list):
        axes = {"dataset": data["dataset"], **axes}
    return Study(name, str(path), tuple(trials), collapsed, axes, resources, max_retries, timeout, lanes, tune, lines)


def _resources(check: _Checker, value) -> Resources:
    resources = check.mapping(value, ("resources",), ("num_cpus", "num_gpus"))
    num_cpus = check.number(resources.get("num_cpus", 1), ("resources", "num_cpus"), positive=True)
    num_gpus = check.number(resources.get("num_gpus", 0), ("resources", "num_gpus"), minimum=0)
    if num_gpus > 1 and num_gpus != int(num_gpus):
        check.fail(("resources", "num_gpus"), f"{num_gpus}: above 1 a trial takes whole GPUs")
    return Resources(float(num_cpus), float(num_gpus))


def _image_indices(check: _Checker, data: dict) -> list[int]:
    images = data.get("images", 1)
    if isinstance(images, list):
        for i, index in enumerate(images):
            check.number(index, ("data", "images", i), integer=True, minimum=0)
        if len(set(images)) != len(images):
            check.fail(("data", "images"), "lists an image twice")
        return list(images)
    count = check.number(images, ("data", "images"), integer=True, minimum=1)
    return list(range(count))


def _points(grid: dict, zipped: dict):
    """Every combination: the cartesian product of grid axes times the paired zip axes."""
    grid_names, zip_names = list(grid), list(zipped)
    zip_rows = list(zip(*zipped.values())) if zipped else [()]
    for combination in itertools.product(*grid.values()):
        for row in zip_rows:
            yield {**dict(zip(grid_names, combination)), **dict(zip(zip_names, row))}


def _datasets(check: _Checker, data: dict) -> list[str]:
    """``data.dataset``: one name, or a list of names that acts as the outermost axis."""
    names = data["dataset"] if isinstance(data["dataset"], list) else [data["dataset"]]
    if not names:
        check.fail(("data", "dataset"), "expected a dataset name or a non-empty list of them")
    return [_coerce(check, "dataset", name, ("data", "dataset")) for name in names]


def _expand(check: _Checker, data: dict, fixed: dict, grid: dict, zipped: dict) -> tuple[list[TrialSpec], int]:
    indices = _image_indices(check, data)
    base = {
        "labels": _coerce(check, "labels", data.get("labels", "known"), ("data", "labels")),
        "image_size": _coerce(check, "image_size", data.get("image_size"), ("data", "image_size")),
    }
    trials, seen = [], set()
    points = 0
    for dataset, point in itertools.product(_datasets(check, data), list(_points(grid, zipped))):
        base["dataset"] = dataset
        settings = {**fixed, **point}
        where = {name: ("grid" if name in grid else "zip" if name in zipped else "fixed", name) for name in settings}
        values = {}
        for name, value in settings.items():
            values[name] = _coerce(check, name, value, where.get(name, ("fixed", name)))
        per_client = values.pop("images_per_client", 1)
        if per_client < 1 or per_client > len(indices):
            check.fail(where.get("images_per_client", ("fixed", "images_per_client")),
                       f"{per_client}: use 1 to {len(indices)} (the study's images)")  # fmt: skip
        for start in range(0, len(indices) - per_client + 1, per_client):
            points += 1
            images = tuple(indices[start : start + per_client])
            try:
                spec = TrialSpec(**base, images=images, **values).resolved()
            except ConfigError as error:
                check.fail(_location(error.field, where), f"{error.value!r}: {error.fix}")
            if spec not in seen:
                seen.add(spec)
                trials.append(spec)
    return trials, points - len(trials)


_DATA_FIELDS = {"dataset": "dataset", "image": "images", "images": "images", "labels": "labels", "image_size": "image_size"}


def _location(field_name: str, where: dict) -> tuple:
    """Where in the file a trial-level error belongs."""
    if field_name in _DATA_FIELDS:
        return ("data", _DATA_FIELDS[field_name])
    return where.get(field_name, ("fixed", field_name))
