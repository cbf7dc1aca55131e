"""Column roles: every results column declares one (identity, setting, outcome, provenance, heavy) in
the Parquet field metadata, and `report` and `export` take settings and outcomes from the files, with
files written before roles were recorded read by column name."""

import io
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import gradinv.results.schema as schema_module
from analysis import load
from analysis.export import export
from analysis.report import build_report
from analysis.roles import Roles
from gradinv.errors import ConfigError
from gradinv.results.schema import _PARAMETER_TYPES, REPETITION_KEY, ROLE_KEY, ROLES, SCHEMA, SCHEMA_VERSION, to_table
from gradinv.results.store import ResultsDir

HEAVY = {
    "truth_png",
    "reconstruction_png",
    "restart_scores",
    "curve_iterations",
    "curve_costs",
    "curve_psnr",
    "curve_ssim",
    "curve_gain",
}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def trial(n: int, **extra) -> dict:
    """One finished one-image trial; two datasets, six clients each."""
    dataset = ("faces", "fashion-mnist")[n % 2]
    return {
        "study": "roles",
        "key": f"{n:020d}",
        "dataset": dataset,
        "fl": "fedsgd",
        "model": "convnet",
        "iterations": 10,
        "images": [n],
        "images_per_client": 1,
        "model_seed": 0,
        "attack_seed": n,
        "status": "ok",
        "psnr": 12.0 + n,
        "psnr_per_image": [12.0 + n],
        "psnr_gain": 1.0 + n,
        "psnr_gain_per_image": [1.0 + n],
        "baseline_psnr": 11.0,
        "ssim": 0.5,
        "label_accuracy": 1.0,
        "truth_png": [png()],
        "reconstruction_png": [png()],
        "attempt": 1,
        "lanes": 1,
        "task_seconds": 1.0,
        **extra,
    }


def roles_in(file) -> dict[str, bytes | None]:
    return {field.name: (field.metadata or {}).get(ROLE_KEY) for field in pq.read_schema(file)}


def leakage_columns(page: str) -> list[str]:
    """The header of the report's leakage table, names as in the data ("baseline psnr" -> "baseline_psnr")."""
    head = re.search(r"<table id=leakage><thead><tr>(.*?)</tr></thead>", page).group(1)
    return [name.replace(" ", "_") for name in re.findall(r"<th[^>]*>(.*?)</th>", head)]


def test_every_schema_column_has_one_declared_role():
    declared = {field.name: field.metadata[ROLE_KEY].decode() for field in SCHEMA}
    assert set(declared.values()) == set(ROLES) and len(declared) == len(SCHEMA)
    by_role = {role: {name for name, r in declared.items() if r == role} for role in ROLES}
    assert by_role["identity"] == {"study", "key", "candidate"}
    assert by_role["setting"] == {*_PARAMETER_TYPES, "layer_set", "images_per_client"}  # layer_set: a named `layers`
    assert by_role["heavy"] == HEAVY
    assert {"psnr", "psnr_gain", "baseline_psnr", "psnr_per_image", "status", "model_accuracy"} <= by_role["outcome"]
    assert {"host", "torch_version", "task_seconds", "pack_id", "attempt", "checkpoint_key"} <= by_role["provenance"]
    repetition = {field.name for field in SCHEMA if (field.metadata or {}).get(REPETITION_KEY) == b"true"}
    assert (
        repetition
        == {"images", "model_seed", "data_order_seed", "attack_seed", "attacked_client"}
        <= by_role["setting"]
    )
    assert SCHEMA_VERSION == 6 and SCHEMA.metadata[b"gradinv.schema_version"] == b"6"


def test_files_written_by_results_dir_carry_the_roles(tmp_path):
    expected = {field.name: field.metadata[ROLE_KEY] for field in SCHEMA}
    with ResultsDir(tmp_path / "results") as results:
        results.write([trial(n) for n in range(4)])
        results.write([trial(0, psnr=30.0)])  # replaces a row: the older file is rewritten without it
        results.journal().append(to_table([trial(9)]))  # left behind, folded in by the next writer
    with ResultsDir(tmp_path / "results"):
        pass
    files = ResultsDir(tmp_path / "results").files()
    assert len(files) == 3 and pq.read_table(files[0]).num_rows == 3
    assert all(roles_in(file) == expected for file in files)
    assert load.column_roles(tmp_path / "results").of == {name: role.decode() for name, role in expected.items()}


def without_roles(table: pa.Table, version: str) -> pa.Table:
    """``table`` as gradinv wrote it before roles were recorded: no field metadata."""
    schema = pa.schema(
        [field.remove_metadata() for field in table.schema], metadata={"gradinv.schema_version": version}
    )
    return table.cast(schema)


def test_a_schema_2_file_without_roles_reads_and_reports(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    pq.write_table(without_roles(to_table([trial(n) for n in range(12)]), "2"), path / "part-1.parquet")
    assert set(roles_in(path / "part-1.parquet").values()) == {None}
    roles = load.column_roles(path)
    assert roles == Roles.of_schema(SCHEMA)  # the fallback: the current schema's roles by column name
    assert roles.varying_settings(load.load_trials(path)) == ["dataset"]  # attack_seed is a repetition
    page = build_report(path)
    assert leakage_columns(page)[:2] == ["dataset", "trials"]
    index = export(path, tmp_path / "export")
    assert (
        len(index) == 12 and index["dataset"].nunique() == 2 and index["psnr"].tolist() == [12.0 + n for n in range(12)]
    )
    # a directory holding files of both kinds reads as one (`run` would refuse to add to it: another format)
    pq.write_table(to_table([trial(n, key=f"{n:019d}x") for n in range(12, 14)]), path / "part-2.parquet")
    assert len(load.load_trials(path)) == 14 and load.column_roles(path) == roles


def test_a_new_column_takes_the_role_its_file_declares(tmp_path, monkeypatch):
    """An outcome the schema gains later is read as an outcome, never grouped by; a setting is grouped
    by; a column a file carries without a role is an outcome too."""
    new = [
        pa.field("lpips", pa.float64(), metadata={ROLE_KEY: b"outcome"}),
        pa.field("defence", pa.string(), metadata={ROLE_KEY: b"setting"}),
        pa.field("unmarked", pa.float64()),
    ]
    monkeypatch.setattr(schema_module, "SCHEMA", pa.schema([*SCHEMA, *new], metadata=SCHEMA.metadata))
    path = tmp_path / "results"
    rows = [trial(n, lpips=0.1 * n, defence=("none", "clip")[n // 12], unmarked=float(n)) for n in range(24)]
    with ResultsDir(path) as results:
        results.write(rows)
    roles = load.column_roles(path)
    assert (roles.of["lpips"], roles.of["defence"], roles.of["unmarked"]) == ("outcome", "setting", "outcome")
    frame = load.load_trials(path)
    assert frame["lpips"].tolist() == pytest.approx([0.1 * n for n in range(24)])
    assert roles.varying_settings(frame) == ["dataset", "defence"]
    page = build_report(path)
    assert leakage_columns(page)[:3] == ["dataset", "defence", "trials"]
    assert "lpips" not in leakage_columns(page) and "unmarked" not in leakage_columns(page)
    for outcome in ("lpips", "unmarked"):
        with pytest.raises(ConfigError, match="name a setting column"):
            build_report(path, by=[outcome])
    index = export(path, tmp_path / "export")
    assert set(index["defence"]) == {"none", "clip"} and not {"lpips", "unmarked"} & set(index.columns)
