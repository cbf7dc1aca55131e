"""Study files: plain YAML, safe-loaded and validated once into frozen objects.

Every mistake becomes a :class:`StudyError` naming the file, the line and the field. Loading is
bounded: the file's size, what its aliases expand to, and the trials a grid may make are capped
before anything large is built. The file is read by study_yaml.py (with the command line's
``--set KEY=VALUE`` overrides applied before anything is checked), its values checked by
study_checks.py, and its grid expanded into trials by study_grid.py.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradinv.model_factories import is_factory
from gradinv.parameters import DataSettings, declarations
from gradinv.trial import DEFAULTS, TrialSpec

from .study_checks import Checker, column_range
from .study_grid import Grid
from .study_yaml import StudyError, apply_overrides, parse_override, read_yaml

TOP_LEVEL = ("name", "data", "fixed", "grid", "zip", "resources", "max_retries", "timeout", "lanes", "tune")
DATA_KEYS = tuple(declarations(DataSettings))  # the data: section
# Parameters a study may set in fixed/grid/zip: every trial field but the data's, plus the dealing.
TRIAL_PARAMETERS = tuple(name for name in DEFAULTS if name not in DATA_KEYS)
SWEEPABLE = TRIAL_PARAMETERS + ("images_per_client",)
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
    overrides: tuple[str, ...] = ()  # the --set KEY=VALUE flags applied to the file, in order


def load_study(path: str | Path, max_trials: int = MAX_TRIALS, overrides: Sequence[str] = ()) -> Study:
    """The validated study with its trials; refused when it makes more than ``max_trials`` trials."""
    study = read_study(path, max_trials, overrides)
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


def read_study(path: str | Path, max_trials: int = MAX_TRIALS, overrides: Sequence[str] = ()) -> Study:
    """The validated study, its trials counted from the axes and expanded only within ``max_trials``.

    ``overrides`` are ``--set KEY=VALUE`` texts (KEY a dotted path, VALUE YAML), applied in order to the
    file's document before it is checked, so the study is the file as if edited: every check holds, and
    an error in a value an override gave names the flag in place of a line."""
    path = Path(path)
    parsed = [parse_override(text, TOP_LEVEL) for text in overrides]  # a malformed flag before the file
    document, lines = read_yaml(path)
    apply_overrides(path, document, lines, parsed, exclusive=("fixed", "grid", "zip"))
    if any(is_factory(value) for value in _model_values(document)):
        beside_on_path(path)
    check = Checker(path, lines)
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
    last_attempt = column_range("attempt")[1]  # a trial's last attempt is max_retries + 1
    max_retries = check.number(
        document.get("max_retries", 3), ("max_retries",), integer=True, minimum=0, maximum=last_attempt - 1
    )
    timeout = document.get("timeout")
    if timeout is not None:
        timeout = float(check.number(timeout, ("timeout",), positive=True))
    lanes = document.get("lanes")
    if lanes is not None:
        lanes = check.number(lanes, ("lanes",), integer=True, minimum=1, maximum=column_range("lanes")[1])
    tune = document.get("tune")
    if tune is not None and not isinstance(tune, dict):
        check.fail(("tune",), "expected a mapping")
    settings = Grid.validated(check, data, fixed, grid, zipped)
    points = settings.count()
    trials, collapsed = settings.expand(check) if points <= max_trials else (None, None)
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
        settings.fixed,
        tuple(overrides),
    )


def _model_values(document) -> list:
    """The ``model`` values the raw document sets in fixed:, grid: and zip: (unchecked)."""
    if not isinstance(document, dict):
        return []
    values = []
    for section in ("fixed", "grid", "zip"):
        value = document.get(section)
        value = value.get("model") if isinstance(value, dict) else None
        values += value if isinstance(value, list) else [value]
    return values


def beside_on_path(path: Path) -> None:
    """The study file's directory joins the end of sys.path, so that a model named ``package.module:function``
    is found on the Python path first, then beside the study (gradinv.model_factories). Ray workers receive
    the module through the runtime environment's py_modules (sweep.runner.runtime_environment), not this path."""
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.append(directory)


def _name(check: Checker, name) -> str:
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        check.fail(
            ("name",), f"{name[:MAX_NAME_LENGTH] + '...'!r} is {len(name)} characters; use at most {MAX_NAME_LENGTH}"
        )
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        check.fail(("name",), f"{name!r}: use letters, digits, '.', '_' and '-'")
    return name


RAY_RESOURCE_UNIT = 0.0001  # Ray counts resources in ten-thousandths (ray_constants.MIN_RESOURCE_GRANULARITY)


def _resources(check: Checker, value) -> Resources:
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
