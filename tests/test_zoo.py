"""The model zoo: reproducible training, one training under contention, clear errors, trained studies."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from gradinv import zoo
from gradinv.errors import ConfigError
from sweep.cli import main

SMALL = zoo.Recipe("fashion-mnist", "convnet", 4, epochs=2, train_subset=600, image_size=10, batch_size=32)
TINY = ["--dataset", "faces", "--model", "convnet", "--width", "2", "--epochs", "1", "--image-size", "8"]


def test_training_learns_and_is_deterministic_on_cpu():
    first, second = zoo.train(SMALL), zoo.train(SMALL)
    assert first.sidecar["test_accuracy"] >= 0.5  # chance is 0.1
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert first.sidecar["test_accuracy"] == second.sidecar["test_accuracy"]


def test_cache_round_trip_and_listing(tmp_path):
    recipe = zoo.Recipe("faces", "convnet", 2, epochs=2, image_size=8)
    checkpoint, trained = zoo.ensure(recipe, tmp_path)
    again, trained_again = zoo.ensure(recipe, tmp_path)
    assert trained and not trained_again
    assert all(torch.equal(checkpoint.state[k], again.state[k]) for k in checkpoint.state)
    info = zoo.listing(tmp_path)[0]
    assert info["key"] == recipe.key and info["epochs"] == 2 and info["torch"] == torch.__version__
    assert 0 <= info["test_accuracy"] <= 1 and info["training_seconds"] > 0


def test_two_processes_missing_the_same_checkpoint_train_it_once(tmp_path):
    command = [sys.executable, "-m", "sweep", "zoo", "train", *TINY, "--cache", str(tmp_path)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert sum("trained in" in out for out in outputs) == 1
    assert sum("already in the cache" in out for out in outputs) == 1
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob(".*"))


def test_a_truncated_checkpoint_is_one_clear_error(tmp_path, capsys):
    recipe = zoo.Recipe("faces", "convnet", 2, epochs=1, image_size=8)
    zoo.ensure(recipe, tmp_path)
    weights, _ = zoo.paths(recipe, tmp_path)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match="rebuild"):
        zoo.load(recipe, tmp_path)
    code = main(["attack", "--dataset", "faces", "--image-size", "8", "--model", "convnet", "--width", "2",
                 "--trained-epochs", "1", "--iterations", "2", "--cache", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(weights) in err[0] and "gradinv zoo train" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_study_over_trained_epochs_carries_checkpoint_key_and_accuracy(write_study, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))
    study = write_study("""
        name: zoo-study
        data: {dataset: faces, images: 2, image_size: 8}
        fixed: {model: convnet, width: 2, iterations: 3, train_subset: 64}
        grid:
          trained_epochs: [0, 1]
        resources: {num_cpus: 1}
    """)
    results = tmp_path / "results"
    assert main(["run", str(study), "--results", str(results), "--no-progress"]) == 0
    frame = pd.read_parquet(results)
    assert len(frame) == 4 and (frame["status"] == "ok").all()
    trained = frame[frame["trained_epochs"] == 1]
    untrained = frame[frame["trained_epochs"] == 0]
    recipe = zoo.Recipe("faces", "convnet", 2, 1, train_subset=64, image_size=8)
    assert (trained["checkpoint_key"] == recipe.key).all()
    assert trained["model_accuracy"].between(0, 1).all()
    assert trained["train_subset"].eq(64).all() and untrained["train_subset"].isna().all()
    assert untrained["checkpoint_key"].isna().all()
    assert zoo.load(recipe, tmp_path / "cache") is not None  # trained once, in this node's cache
