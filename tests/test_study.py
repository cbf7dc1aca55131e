"""Study files: expansion, keys, the dry run, and one-line errors for a corpus of mistakes."""

import dataclasses

import pytest

from gradinv.trial import TrialSpec
from sweep.cli import main
from sweep.results import trial_key
from sweep.study import load_study

GOOD = """
name: tiny
data: {dataset: faces, images: 4, image_size: 8}
fixed: {model: convnet, width: 4, iterations: 5}
grid:
  images_per_client: [1, 2]
  fl: [fedsgd, fedavg]
  local_steps: [1, 3]
zip:
  tv: [1.0e-4, 1.0e-2]
  attack_seed: [0, 1]
resources: {num_cpus: 1, num_gpus: 0}
max_retries: 2
timeout: 60
"""


def test_grid_and_zip_expand_and_inapplicable_settings_collapse(write_study):
    study = load_study(write_study(GOOD))
    # 2 zip rows x (4 one-image + 2 two-image clients) x (fedsgd once + fedavg x 2 step counts)
    assert len(study.trials) == 2 * 6 * 3
    assert study.collapsed == 2 * 6  # fedsgd with local_steps 3 is fedsgd with local_steps 1
    assert {t.images for t in study.trials} == {(0,), (1,), (2,), (3,), (0, 1), (2, 3)}
    assert {(t.tv, t.attack_seed) for t in study.trials} == {(1e-4, 0), (1e-2, 1)}
    assert study.max_retries == 2 and study.timeout == 60 and study.resources.num_cpus == 1


def test_keys_leave_out_defaults_and_execution_settings():
    explicit = TrialSpec(dataset="faces", iterations=5, tv=1e-4, lr=0.1, width=64)  # all but iterations default
    assert trial_key(explicit) == trial_key(TrialSpec(dataset="faces", iterations=5))
    assert trial_key(dataclasses.replace(explicit, local_steps=7)) == trial_key(explicit)  # not FedAvg
    assert trial_key(dataclasses.replace(explicit, tv=1e-3)) != trial_key(explicit)
    assert TrialSpec(dataset="faces", iterations=5).non_default() == {"dataset": "faces", "iterations": 5}


def test_dry_run_prints_axes_and_count_and_writes_nothing(write_study, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", str(write_study(GOOD)), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "36 trials"
    assert any("axis fl: ['fedsgd', 'fedavg']" in line for line in out)
    assert any("12 grid points collapsed" in line for line in out)
    assert not results.exists()


MALFORMED = [
    ("name: x\ndata: {dataset: faces\n", "yaml: expected ','"),  # unclosed flow mapping
    ("name: x\ndata:\n  dataset: faces\n   images: 2\n", ": yaml:"),  # bad indentation
    ("- just\n- a list\n", ":1: study: the file must be a mapping"),
    ("", "study: the file must be a mapping"),
    ("data: {dataset: faces}\n", "missing required key 'name'"),
    ("name: x\n", "missing required key 'data'"),
    ("name: x\ndata: {dataset: faces}\ncolour: blue\n", ":3: colour: unknown key"),
    ("name: x\ndata: {dataset: faces, pictures: 3}\n", ":2: data.pictures: unknown key"),
    ("name: x\ndata: {dataset: svhn}\n", ":2: data.dataset: 'svhn'"),
    ("name: x\ndata: {dataset: faces}\nfixed: {iterations: many}\n", ":3: fixed.iterations: expected a whole number"),
    ("name: x\ndata: {dataset: faces}\nfixed: {iterations: -3}\n", ":3: fixed.iterations"),
    ("name: x\ndata: {dataset: faces}\nfixed:\n  tv: -1.0\n", ":4: fixed.tv"),
    ("name: x\ndata: {dataset: faces}\ngrid:\n  fl: [fedsgd, fedprox]\n", ":4: grid.fl"),
    ("name: x\ndata: {dataset: faces}\ngrid:\n  width: []\n", ":4: grid.width: expected a non-empty list"),
    ("name: x\ndata: {dataset: faces}\nzip:\n  tv: [0.1, 0.2]\n  lr: [0.1]\n", "zip: all zip axes"),
    ("name: x\ndata: {dataset: faces}\nfixed: {model: vgg}\n", ":3: fixed.model"),
    ("name: x\ndata: {dataset: faces, images: 300}\n", ":2: data.images: 200"),
    ("name: x\ndata: {dataset: faces}\nresources: {num_gpus: -1}\n", ":3: resources.num_gpus: must be at least 0"),
    ("name: x\ndata: {dataset: faces}\nresources: {num_cpus: 0}\n", ":3: resources.num_cpus: must be greater than 0"),
    ("name: x\ndata: {dataset: faces}\nmax_retries: 1.5\n", ":3: max_retries: expected a whole number"),
    ("name: x\ndata: {dataset: faces}\ntimeout: 0\n", ":3: timeout: must be greater than 0"),
    ("name: 'bad name!'\ndata: {dataset: faces}\n", ":1: name:"),
    ("name: x\ndata: {dataset: faces}\nfixed: {tv: 0.1}\ngrid: {tv: [0.1, 0.2]}\n", ":4: grid.tv: is also in 'fixed'"),
    ("name: x\ndata: {dataset: faces, images: 2}\nfixed: {images_per_client: 3}\n", ":3: fixed.images_per_client"),
    ("name: x\ndata: {dataset: faces}\nfixed: {tv: .nan}\n", ":3: fixed.tv: expected a finite number"),
    ("name: !!python/object/apply:os.system ['touch PWNED']\ndata: {dataset: faces}\n", ":1: yaml:"),
]


@pytest.mark.parametrize("text, expected", MALFORMED)
def test_malformed_study_is_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(path) in err[0] and expected in err[0], err[0]
    assert not results.exists()
    assert not (tmp_path / "PWNED").exists()
