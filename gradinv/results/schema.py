"""The results schema: every column's Arrow type and role, and what a row and a file must hold.

Also the trial key (which rows are the same trial) and the results format a file's keys were made with;
gradinv.results.store keeps the directory that holds the rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from gradinv.parameters import LAYER_SET_COLUMN, layers_columns, parameters

if TYPE_CHECKING:  # gradinv.trial imports torch: readers of results (status, report, export) do without
    from gradinv.trial import TrialSpec

SCHEMA_VERSION = 6  # 2: baselines, gains, quality curves, pack ids
# 3: each column's role (ROLE_KEY) in its field metadata
# 4: the defences' settings and their privacy (epsilon, accountant, update_epsilon, training_epsilon)
# 5: federation victims (their settings; federation_key, train_images, client_label_histogram, client_rounds)
# 6: threat models and attack families (threat_model, label_method, imprint_*, client_bn, bn_prior, ...)
RESULTS_FORMAT = 3  # part of every trial key: bump only when old results can no longer be compared
# 2: the step decay's milestones are the reference's, the first images are no longer clamped into the
#    pixel box, `exp` layer weights are e^-i and `rand` starts are uniform in [-1, 1)
# 3: a family's rows and keys carry only the settings it reads (DLG: no inverting-gradients settings)


def parameter_types() -> dict[str, pa.DataType]:
    """Each declared trial parameter's column type (gradinv.parameters), in declaration order."""
    return {name: _ARROW_TYPES[knob.arrow] for name, knob in parameters().items()}


def repetition_columns() -> tuple[str, ...]:
    """The parameters declared to tell repetitions of a setting apart (which client's images, which seed)."""
    return tuple(name for name, knob in parameters().items() if knob.repetition)


_ARROW_TYPES = {
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "list<int32>": pa.list_(pa.int32()),
}
_PARAMETER_TYPES = parameter_types()

# Every column has one role, written into its field metadata so that readers (analysis) take it from
# the files: identity names the row, settings define the trial (the parameters and the client's image
# count), outcomes are what the trial measured (per-image lists too: a few numbers a row), provenance is
# where, when and how it ran, heavy columns (images, curves, restart scores) are read only for the
# trials a view needs. A file without roles (schema 1 and 2) takes these by column name.
ROLE_KEY = b"gradinv.role"
ROLES = IDENTITY, SETTING, OUTCOME, PROVENANCE, HEAVY = ("identity", "setting", "outcome", "provenance", "heavy")
# Settings that tell repetitions of a setting apart (which client's images, which seed), flagged in the
# field metadata too: analysis compares settings across them, never by them.
REPETITION_KEY = b"gradinv.repetition"
REPETITION = repetition_columns()

METRICS = ("psnr", "ssim", "mse", "feature_mse")
BASELINES = (
    "baseline_psnr",
    "baseline_psnr_mean_image",
    "baseline_psnr_flat",
    "baseline_psnr_class_mean",
    "baseline_ssim_mean_image",
    "baseline_ssim_flat",
    "baseline_ssim_class_mean",
)
_floats = pa.list_(pa.float64())
_ints = pa.list_(pa.int32())


def _with_role(role: str, *fields: pa.Field) -> list[pa.Field]:
    """``fields`` with ``role`` in their metadata, repetition settings flagged as such."""
    flag = {REPETITION_KEY: b"true"}
    return [
        field.with_metadata({ROLE_KEY: role.encode(), **(flag if field.name in REPETITION else {})}) for field in fields
    ]


SCHEMA = pa.schema(
    [
        *_with_role(
            IDENTITY,
            pa.field("study", pa.string(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("candidate", pa.int32()),  # tuning candidate number; null for `run` studies
        ),
        *_with_role(
            SETTING,
            *[pa.field(name, kind) for name, kind in _PARAMETER_TYPES.items()],
            pa.field(LAYER_SET_COLUMN, pa.string()),  # a named `layers` set (the list column holds indices only)
            pa.field("images_per_client", pa.int32()),
        ),
        *_with_role(
            PROVENANCE,
            pa.field("checkpoint_key", pa.string()),  # the zoo checkpoint the settings named
            pa.field("study_overrides", pa.list_(pa.string())),  # the run's --set KEY=VALUE flags, in order
            # an image folder's normalisation, per channel (computed from its training split); null: built-in sets
            pa.field("data_mean", _floats),
            pa.field("data_std", _floats),
            # a captured update's row (`gradinv attack --update --results`): the file's content digest and name
            pa.field("update_sha256", pa.string()),
            pa.field("update_file", pa.string()),
            pa.field("federation_key", pa.string()),  # the federation whose round was the victim
            pa.field("train_images", _ints),  # a federation client's images: indices into the train_subset
        ),
        *_with_role(
            OUTCOME,
            # the victim's test accuracy (a federation round: its global model's)
            pa.field("model_accuracy", pa.float64()),
            pa.field("client_label_histogram", _ints),  # the attacked federation client's labels, per class
            pa.field("client_rounds", _ints),  # the rounds up to the attacked one in which that client trained
            pa.field("training_epsilon", pa.float64()),  # a victim trained with DP-SGD: its training's epsilon
            # The client's privacy for this one update (gradinv.client.accounting): DP-SGD's example-level epsilon,
            # the accountant, and the update-level Gaussian mechanism's epsilon (clip_update, noise_std)
            pa.field("epsilon", pa.float64()),
            pa.field("accountant", pa.string()),
            pa.field("update_epsilon", pa.float64()),
            *[pa.field(name, pa.float64()) for name in METRICS],
            pa.field("label_accuracy", pa.float64()),
            # What a data-only attacker scores without the update (gradinv.baselines), and the gain over the best
            *[pa.field(name, pa.float64()) for name in BASELINES],
            pa.field("psnr_gain", pa.float64()),
            pa.field("psnr_gain_per_image", _floats),
            *[pa.field(f"{name}_per_image", _floats) for name in METRICS],
            # PSNR of reconstruction b against image b, unpaired (the reference's fixed order)
            pa.field("psnr_unmatched", pa.float64()),
            pa.field("psnr_unmatched_per_image", _floats),
            # A captured update: whether its file held the client's images (false: the metrics above are null),
            # the best restart's gradient cost, and the labels the attack used (the file's, or recovered)
            pa.field("ground_truth", pa.bool_()),
            pa.field("gradient_cost", pa.float64()),
            pa.field("label_per_image", _ints),
        ),
        *_with_role(
            HEAVY,
            pa.field("truth_png", pa.list_(pa.binary())),
            pa.field("reconstruction_png", pa.list_(pa.binary())),
            pa.field("restart_scores", _floats),
            pa.field("curve_iterations", pa.list_(pa.int32())),
            pa.field("curve_costs", _floats),
            pa.field("curve_psnr", _floats),  # quality of the best restart at each checkpoint
            pa.field("curve_ssim", _floats),
            pa.field("curve_gain", _floats),  # curve_psnr over the trial's no-information baseline
        ),
        *_with_role(
            OUTCOME,
            pa.field("iterations_run", pa.int32()),
            # float32, or float64 where the float32 attack underflowed on a confident victim (every restart NaN)
            pa.field("attack_precision", pa.string()),
            pa.field("zero_update", pa.bool_()),  # the client's update was exactly zero: nothing to attack
            pa.field("status", pa.string(), nullable=False),  # ok, failed or pruned
            pa.field("error", pa.string()),
        ),
        *_with_role(
            PROVENANCE,
            pa.field("attempt", pa.int32()),
            pa.field("started_at", pa.timestamp("ms", tz="UTC")),
            pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
            pa.field("attack_seconds", pa.float64()),
            pa.field("task_seconds", pa.float64()),
            pa.field("lanes", pa.int32()),
            pa.field("pack_id", pa.string()),  # trials computed together share it
            pa.field("lane_index", pa.int32()),
            pa.field("trial_seconds", pa.float64()),  # this trial's share of its pack's task time
            pa.field("threads", pa.int32()),
            pa.field("host", pa.string()),
            pa.field("node_id", pa.string()),
            pa.field("worker_pid", pa.int32()),
            pa.field("device", pa.string()),
            pa.field("gradinv_version", pa.string()),
            pa.field("torch_version", pa.string()),
            pa.field("torchvision_version", pa.string()),
            pa.field("python_version", pa.string()),
            pa.field("commit", pa.string()),
        ),
    ],
    metadata={"gradinv.schema_version": str(SCHEMA_VERSION)},
)


def trial_key(spec: TrialSpec) -> str:
    """A hash of the resolved non-default parameters and the results format: stable as fields are added."""
    return _key({"format": RESULTS_FORMAT, **spec.key_fields()})


def captured_key(spec: TrialSpec, update_sha256: str) -> str:
    """A captured update's trial key: the attack's settings (as trial_key) and the capture file's content."""
    return _key({"format": RESULTS_FORMAT, "update_sha256": update_sha256, **spec.key_fields()})


def _key(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def parameter_columns(spec: TrialSpec) -> dict:
    """Every parameter as its own column; those that do not apply to the trial are null."""
    from gradinv import models

    values = dataclasses.asdict(spec.resolved())
    for name in spec.not_applicable():
        values[name] = None
    if values["width"] is None and "width" not in spec.not_applicable():
        values["width"] = models.default_width(spec.model)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values.update(layers_columns(values["layers"]))
    values["images_per_client"] = spec.images_per_client
    return values


def empty_row() -> dict:
    return {name: None for name in SCHEMA.names}


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**empty_row(), **row} for row in rows], schema=SCHEMA)


def file_problem(file: Path) -> str | None:
    """Why ``file`` cannot be read as results, judged from its footer alone; None when it can.

    A file may lack columns (written before they existed), but each column it has must be SCHEMA's,
    of the same type, and the columns every row needs must be there.
    """
    try:
        schema = pq.read_schema(file)
    except FileNotFoundError:  # replaced by nothing since it was listed: not a problem of the file
        return None
    except (OSError, pa.ArrowException) as error:
        return f"not a readable Parquet file ({str(error).splitlines()[0]})"
    return schema_problem(schema)


def schema_problem(schema: pa.Schema) -> str | None:
    """Why rows of ``schema`` (a file's, a journal's) are not results rows; None when they are."""
    foreign = [
        f"{field.name} ({field.type})"
        for field in schema
        if field.name not in SCHEMA.names or SCHEMA.field(field.name).type != field.type
    ]
    if foreign:
        return f"not a results file: columns outside the results schema: {', '.join(foreign[:3])}"
    missing = [field.name for field in SCHEMA if not field.nullable and field.name not in schema.names]
    return f"not a results file: no {', '.join(missing)} column" if missing else None


FORMAT_KEY = b"gradinv.results_format"
_FORMAT_OF_SCHEMA = {b"1": 1, b"2": 2}  # files written before the format was recorded in them


def results_format(file: Path) -> int | None:
    """The results format a file's keys were made with (from its footer); None when it does not say."""
    return format_of(pq.read_schema(file))


def format_of(written: pa.Schema) -> int | None:
    """The results format a file's footer schema records; None when it does not say."""
    metadata = written.metadata or {}
    if FORMAT_KEY in metadata:
        text = metadata[FORMAT_KEY]
        return int(text) if text.isdigit() else None
    return _FORMAT_OF_SCHEMA.get(metadata.get(b"gradinv.schema_version"))
