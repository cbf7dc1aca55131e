"""`gradinv export --format hf`: a dataset that Hugging Face `datasets` loads as is, its Image features the
results' PNGs byte for byte, every column of the PNG export's index beside them, and a dataset card whose
front matter the Hub reads; shards that replace an earlier export's whole; refusals in one line."""

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from analysis import export_hf as hf
from analysis.export import export
from analysis.load import column_roles
from gradinv.results.store import ResultsDir
from sweep.cli.main import main

REPO = Path(__file__).resolve().parent.parent
SHARDS = "data/train-*.parquet"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def trial(study: str, key: str, dataset: str, images: list[int], rng, **columns) -> dict:
    """A finished trial as `gradinv run` writes it, with its provenance, one image per index in ``images``."""
    truth = [rng.random((8, 8)) for _ in images]
    psnrs = [20.0 + 2 * index for index in images]
    return {
        "study": study,
        "key": key,
        "dataset": dataset,
        "images": images,
        "images_per_client": len(images),
        "model": "convnet",
        "width": 4,
        "attack": "ig",
        "iterations": 8,
        "fl": "fedavg" if len(images) > 1 else "fedsgd",
        "local_steps": 3 if len(images) > 1 else None,
        "layers": [0, 2],
        "status": "ok",
        "psnr": float(np.mean(psnrs)),
        "psnr_per_image": psnrs,
        "psnr_gain": float(np.mean(psnrs)) - 15.0,
        "psnr_gain_per_image": [p - 15.0 for p in psnrs],
        "ssim": 0.5,
        "ssim_per_image": [0.5] * len(images),
        "label_accuracy": 1.0,
        "baseline_psnr": 15.0,
        "truth_png": [png(t) for t in truth],
        "reconstruction_png": [png(t[::-1]) for t in truth],
        "gradinv_version": "0.1.0",
        "commit": "c0ffee1234",
        **columns,
    }


def failed(study: str, key: str) -> dict:
    return {"study": study, "key": key, "dataset": "fashion-mnist", "images": [9], "status": "failed", "error": "x"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Fashion-MNIST trials of one study in two files: one-image and two-image clients, one failure."""
    path = tmp_path_factory.mktemp("hf") / "results"
    rng = np.random.default_rng(0)
    with ResultsDir(path) as written:
        written.write([trial("fmnist-leak", f"{i:020d}", "fashion-mnist", [i], rng) for i in range(3)])
        written.write(
            [trial("fmnist-leak", f"{9:020d}", "fashion-mnist", [4, 5], rng), failed("fmnist-leak", "f" * 20)]
        )
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """`datasets` without the network, its cache in the test's directory."""
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


def load(out: Path, cache: Path, **kwargs):
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(out / SHARDS), split="train", cache_dir=str(cache), **kwargs)


def finished(results: Path) -> pd.DataFrame:
    frame = pd.read_parquet(results)
    return frame[frame["status"] == "ok"].set_index("key")


def front_matter(card: str) -> dict:
    match = re.fullmatch(r"---\n(.*?\n)---\n(.*)", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match[1])


def test_the_dataset_loads_with_images_equal_to_the_rows_and_every_index_column(results, tmp_path, offline, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(results), "--to", str(out), "--format", "hf"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"5 reconstructions and their ground truth from 4 trials -> {out} (1 Parquet file under data/, README.md)"
    )
    data = load(out, offline)
    rows = finished(results)
    assert len(data) == sum(len(pngs) for pngs in rows["reconstruction_png"]) == 5
    assert type(data.features["truth"]).__name__ == type(data.features["reconstruction"]).__name__ == "Image"
    index = export(results, tmp_path / "png")
    assert set(index.columns) - {"truth_file", "reconstruction_file"} <= set(data.column_names)
    assert set(column_roles(results).settings) <= set(data.column_names)
    raw = data.cast_column("truth", type(data.features["truth"])(decode=False))
    raw = raw.cast_column("reconstruction", type(data.features["truth"])(decode=False))
    for entry, stored in zip(data, raw):
        row = rows.loc[entry["key"]]
        position = entry["position"]
        for kind in ("truth", "reconstruction"):
            expected = row[f"{kind}_png"][position]
            assert stored[kind]["bytes"] == expected
            assert stored[kind]["path"] == f"{entry['key']}-{position}-{kind}.png"
            assert np.array_equal(np.asarray(entry[kind]), np.asarray(Image.open(io.BytesIO(expected))))
        assert entry["image"] == row["images"][position] and entry["images"] == list(row["images"])
        assert entry["psnr"] == row["psnr_per_image"][position] and entry["trial_psnr"] == row["psnr"]
        assert (entry["dataset"], entry["fl"], entry["local_steps"], entry["layers"]) == (
            row["dataset"],
            row["fl"],
            None if pd.isna(row["local_steps"]) else row["local_steps"],
            list(row["layers"]),
        )
        assert (entry["study"], entry["gradinv_version"], entry["commit"]) == ("fmnist-leak", "0.1.0", "c0ffee1234")
    assert "f" * 20 not in set(data["key"])  # a failed trial has no images


def test_the_card_states_features_licence_study_and_code_and_loads_through_itself(results, tmp_path, offline):
    out = tmp_path / "hf"
    hf.export_hf(results, out)
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    shard = pq.read_schema(next(out.glob(SHARDS)))
    assert meta["license"] == "mit"
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": SHARDS}]}]
    features = meta["dataset_info"]["features"]
    assert [f["name"] for f in features] == shard.names
    assert {f["name"]: f.get("dtype") for f in features}["truth"] == "image"
    assert {"name": "images", "sequence": "int32"} in features and {"name": "psnr", "dtype": "float64"} in features
    assert meta["dataset_info"]["splits"][0]["num_examples"] == 5
    assert json.loads(shard.metadata[b"huggingface"])["info"]["features"]["reconstruction"] == {"_type": "Image"}
    assert "- `fmnist-leak`: 5 images from 4 trials" in card
    assert "- gradinv 0.1.0, commit `c0ffee1234`: 5 images" in card
    assert "- `fashion-mnist`: Fashion-MNIST test images (Zalando Research). Licence: MIT licence." in card
    from datasets import load_dataset

    through_card = load_dataset(str(out), split="train", cache_dir=str(offline / "card"))
    assert through_card.features == load(out, offline).features and len(through_card) == 5


def test_sources_of_mixed_licences_are_each_named(tmp_path):
    path = tmp_path / "results"
    rng = np.random.default_rng(1)
    with ResultsDir(path) as written:
        written.write(
            [
                trial("mixed", "a" * 20, "faces", [0], rng),
                trial("mixed", "b" * 20, "folder:pets", [1], rng, commit="beef"),
                trial("other", "c" * 20, "photos", [2], rng),
            ]
        )
    hf.export_hf(path, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert front_matter(card)["license"] == "other"
    for name in ("faces", "folder:pets", "photos"):
        assert f"- `{name}`: {hf.source(name).images}. Licence: {hf.source(name).licence}." in card
    assert "its owner states" in card and "Labeled Faces in the Wild" in card and "CC0" in card
    assert "- `mixed`: 2 images from 2 trials" in card and "- `other`: 1 images from 1 trials" in card
    assert "commit `beef`: 1 images" in card and "commit `c0ffee1234`: 2 images" in card


def test_shards_split_by_size_and_a_new_export_replaces_the_old_whole(results, tmp_path, offline, monkeypatch):
    out = tmp_path / "hf"
    monkeypatch.setattr(hf, "ROW_GROUP", 2)
    tally = hf.export_hf(results, out, shard_bytes=1)  # every row group closes its shard: 2 + 2 + 1 rows
    shards = sorted(out.glob(SHARDS))
    assert tally.shards == len(shards) == 3 and [pq.read_metadata(s).num_rows for s in shards] == [2, 2, 1]
    many = load(out, offline)
    monkeypatch.setattr(hf, "ROW_GROUP", 100)
    assert hf.export_hf(results, out).shards == 1
    assert [s.name for s in sorted(out.glob(SHARDS))] == ["train-00000.parquet"]  # none left from before
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data"]  # no staging folder left
    one = load(out, offline.parent / "again")
    assert many["key"] == one["key"] and many["position"] == one["position"]
    assert front_matter((out / "README.md").read_text())["dataset_info"]["splits"][0]["num_examples"] == 5


def test_a_killed_exports_staged_folder_is_cleared_by_the_next_and_a_link_is_not_followed(results, tmp_path):
    out, kept = tmp_path / "hf", tmp_path / "kept"
    staged = out / ".data.0123456789ab.tmp"
    staged.mkdir(parents=True)
    (staged / "train-00000.parquet").write_bytes(b"half a shard")
    kept.mkdir()
    (kept / "file").write_text("mine")
    (out / ".data.link.tmp").symlink_to(kept, target_is_directory=True)
    hf.export_hf(results, out)
    assert not staged.exists() and (kept / "file").read_text() == "mine"


def test_the_hf_export_does_not_import_torch(results, tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "from sweep.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main(['export', {str(results)!r}, '--to', {str(tmp_path / 'hf')!r}, '--format', 'hf'])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "False"], done.stderr


# --- refusals: one line, exit 2, nothing written ----------------------------------------------------------


def refusal(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_an_unknown_format_is_one_line(results, tmp_path, capsys):
    code, err = refusal(["export", str(results), "--to", str(tmp_path / "x"), "--format", "zip"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("gradinv export: error: argument --format: invalid choice: 'zip'") and "'hf'" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("place", ["inside-results", "a-file", "empty"])
def test_a_bad_to_is_refused_as_for_png(place, results, tmp_path, capsys):
    target = {"inside-results": results / "hf", "a-file": tmp_path / "file", "empty": ""}[place]
    if place == "a-file":
        target.write_text("keep")
    code, err = refusal(["export", str(results), "--to", str(target), "--format", "hf"], capsys)
    assert code == 2 and len(err) == 1, err
    expected = {
        "inside-results": "outside the results directory",
        "a-file": "name a directory (it is created if missing)",
        "empty": "an empty one is not the current directory",
    }[place]
    assert err[0].startswith("gradinv export: error:") and expected in err[0]
    assert not (results / "hf").exists() and sorted(p.name for p in results.iterdir() if p.name.endswith(".tmp")) == []
    if place == "a-file":
        assert target.read_text() == "keep"


def test_a_data_folder_with_other_files_is_left_alone(results, tmp_path, capsys):
    out = tmp_path / "hf"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("mine")
    code, err = refusal(["export", str(results), "--to", str(out), "--format", "hf"], capsys)
    assert code == 2 and err == [
        f"gradinv export: error: --to: '{out}' is not valid; {out / 'data'} holds files an export did not write "
        "(notes.txt), and exporting replaces it; name another directory"
    ]
    assert sorted(p.name for p in out.rglob("*")) == ["data", "notes.txt"]


@pytest.mark.parametrize("state", ["missing", "only-failures"])
def test_results_without_images_are_refused(state, tmp_path, capsys):
    path = tmp_path / "results"
    if state == "only-failures":
        with ResultsDir(path) as written:
            written.write([failed("s", "f" * 20)])
    code, err = refusal(["export", str(path), "--to", str(tmp_path / "x"), "--format", "hf"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"gradinv export: error: results: '{path}'"), err
    assert not (tmp_path / "x").exists()


def test_the_results_pages_hugging_face_section_runs(results, tmp_path, offline, monkeypatch):
    text = (REPO / "docs" / "results.md").read_text()
    start = text.index("\n## A Hugging Face dataset\n")
    section = text[start : text.find("\n## ", start + 1)]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(results, tmp_path / "results" / "quickstart")
    commands = [
        shlex.split(line) for block in re.findall(r"```sh\n(.*?)```", section, re.S) for line in block.splitlines()
    ]
    assert commands and all(words[0] == "gradinv" for words in commands)
    for words in commands:
        assert main(words[1:]) == 0, words
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(compile(block, "docs/results.md", "exec"), namespace)
    assert len(namespace["hf"]) == 5 and len(namespace["leaky"]) == 2  # images 4 and 5 gain 13 and 15 dB
