"""Simulated federations: FedAvg's arithmetic, bit-identical rounds, resuming a killed training, one
training for two processes, and one-line errors for bad recipes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gradinv import data, parameters
from gradinv import federation as fed
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec
from gradinv.victims import victim_source
from sweep.cli.main import main

REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    dataset="fashion-mnist",
    model="convnet",
    width=4,
    image_size=8,
    train_subset=60,
    fed_clients=4,
    clients_per_round=2,
    fed_batch_size=8,
    fed_lr=0.05,
    fed_rounds=4,
)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_the_server_averages_states_weighted_by_image_count_in_client_order():
    states = [
        (1, {"w": torch.tensor([3.0, 0.0]), "seen": torch.tensor(4)}),
        (3, {"w": torch.tensor([-1.0, 4.0]), "seen": torch.tensor(7)}),
    ]
    new = fed.averaged(states)
    assert torch.equal(new["w"], torch.tensor([0.0, 3.0])), new["w"]  # 1/4 [3, 0] + 3/4 [-1, 4]
    assert new["seen"].item() == 7 and new["seen"].dtype == torch.int64  # a counter: the largest


def test_clients_are_drawn_per_round_from_the_seed():
    recipe = fed.Federation(**TINY)
    draws = [fed.selected_clients(recipe, r) for r in range(1, 9)]
    assert all(len(d) == 2 and d == sorted(d) and len(set(d)) == 2 for d in draws)
    assert draws == [fed.selected_clients(recipe, r) for r in range(1, 9)]
    assert len({tuple(d) for d in draws}) > 1  # not the same pair every round
    assert fed.selected_clients(dataclasses.replace(recipe, clients_per_round=4), 3) == [0, 1, 2, 3]


def test_the_same_recipe_gives_bit_identical_rounds_and_extends_without_retraining(tmp_path):
    recipe = fed.Federation(**TINY)
    first = fed.train(recipe, 3, cache=tmp_path / "a")
    again = fed.train(recipe, 3, cache=tmp_path / "b")
    assert _states_equal(first.state, again.state)
    assert not _states_equal(first.state, fed.train(recipe, 0, cache=tmp_path / "a").state)  # it trained
    assert first.sidecar["participants"] == again.sidecar["participants"]
    assert sorted(int(r) for r in first.sidecar["participants"]) == [1, 2, 3]
    events = []
    further = fed.train(recipe, 4, cache=tmp_path / "a", on_round=lambda r, trained: events.append((r.number, trained)))
    assert events == [(3, False), (4, True)]  # round 3 was kept: only round 4 is trained
    assert _states_equal(further.state, fed.train(recipe, 4, cache=tmp_path / "b").state)


def test_the_key_ignores_how_far_to_train_and_alpha_under_iid():
    recipe = fed.Federation(**TINY)
    assert recipe.key == dataclasses.replace(recipe, fed_rounds=50, checkpoint_every=5).key
    assert recipe.key == fed.Federation(**{**TINY, "alpha": 0.3}).key
    assert recipe.key != dataclasses.replace(recipe, fed_lr=0.1).key
    assert recipe.key != dataclasses.replace(recipe, fed_momentum=0.9).key
    assert recipe.key == "convnet-fashion-mnist-iid-c4-a7f1b8e40ca7"  # the key before fed_momentum existed
    assert fed.Federation(**{**TINY, "partition": "dirichlet", "alpha": 0.1}).key != recipe.key


TRAIN_SCRIPT = """
import sys
from gradinv import data, federation as fed, parameters
recipe = fed.Federation(**{tiny}, checkpoint_every=1)
fed.train(recipe, int(sys.argv[2]), cache=sys.argv[1],
          on_round=lambda r, trained: print(r.number, trained, flush=True))
"""


def _trainer(cache: Path, up_to: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = TRAIN_SCRIPT.format(tiny={**TINY, "fed_rounds": 6})
    return subprocess.Popen(
        [sys.executable, "-c", script, str(cache), str(up_to)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def test_a_killed_training_resumes_from_the_last_round_kept(tmp_path):
    recipe = fed.Federation(**{**TINY, "fed_rounds": 6})
    root = fed.federation_dir(recipe, tmp_path)
    trainer = _trainer(tmp_path, 6)
    try:
        while not (root / "round-00002.json").exists():
            assert trainer.poll() is None, "the training ended before round 2 was kept"
            time.sleep(0.05)
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    kept = max(int(p.stem.split("-")[1]) for p in root.glob("round-*.json"))
    assert 2 <= kept < 6, kept
    events = []
    resumed = fed.train(recipe, 6, cache=tmp_path, on_round=lambda r, trained: events.append((r.number, trained)))
    assert events == [(kept, False)] + [(n, True) for n in range(kept + 1, 7)]
    assert not list(root.glob(".*.tmp"))  # the kill left no half-written round
    assert _states_equal(resumed.state, fed.train(recipe, 6, cache=tmp_path / "whole").state)


def test_two_processes_asking_for_one_federation_train_it_once(tmp_path):
    trainers = [_trainer(tmp_path, 3) for _ in range(2)]
    outputs = [trainer.communicate(timeout=300)[0] for trainer in trainers]
    assert all(trainer.returncode == 0 for trainer in trainers), outputs
    trained = [line for out in outputs for line in out.splitlines() if line.endswith("True")]
    assert sorted(trained) == ["1 True", "2 True", "3 True"], outputs


@pytest.mark.parametrize(
    "change, field",
    [
        ({"partition": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"partition": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"clients_per_round": 5}, "clients_per_round"),
        ({"fed_clients": 61}, "fed_clients"),
        ({"partition": "shards"}, "partition"),
        ({"fed_epochs": 0}, "fed_epochs"),
        ({"fed_lr": float("nan")}, "fed_lr"),
    ],
)
def test_a_bad_recipe_is_a_config_error_naming_the_field(change, field):
    with pytest.raises(ConfigError) as error:
        fed.Federation(**{**TINY, **change})
    assert error.value.field == field, error.value


def test_a_round_beyond_the_recipe_and_a_client_without_images_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="round: 5 is not valid; use 0 to 4"):
        fed.train(fed.Federation(**TINY), 5, cache=tmp_path)
    skewed = fed.Federation(
        **{**TINY, "partition": "dirichlet", "alpha": 0.01, "min_partition_size": 0, "fed_clients": 30}
    )
    with pytest.raises(ConfigError, match="holds no images"):
        fed.train(skewed, 1, cache=tmp_path)
    assert not list(fed.federation_dir(skewed, tmp_path).glob("round-*"))


def test_federation_train_trains_up_to_the_round_it_is_given(tmp_path, capsys):
    flags = [
        "federation",
        "train",
        "--in-process",
        "--cache",
        str(tmp_path),
        "--dataset",
        "fashion-mnist",
        "--width",
        "4",
        "--image-size",
        "8",
        "--train-subset",
        "60",
        "--fed-clients",
        "4",
        "--clients-per-round",
        "2",
        "--fed-batch-size",
        "8",
        "--fed-lr",
        "0.05",
        "--fed-rounds",
        "4",
    ]
    assert main([*flags, "--up-to-round", "1"]) == 0
    root = fed.federation_dir(fed.Federation(**TINY), tmp_path)
    assert sorted(p.name for p in root.glob("round-*.json")) == ["round-00000.json", "round-00001.json"]
    assert ": round 1, test accuracy" in capsys.readouterr().out
    assert main([*flags, "--up-to-round", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gradinv federation: error: --up-to-round: 5 is not valid; use 0 to 4 (fed_rounds), or raise fed_rounds"
    ]
    with pytest.raises(SystemExit):  # the flag's old name, which read like the trial's round
        main([*flags, "--round", "1"])


def test_rounds_record_accuracy_and_who_took_part(tmp_path):
    recipe = fed.Federation(**TINY)
    final = fed.train(recipe, 2, cache=tmp_path)
    info = json.loads((fed.federation_dir(recipe, tmp_path) / "round-00002.json").read_text())
    assert info["round"] == 2 and 0 <= info["test_accuracy"] <= 1 and info["key"] == recipe.key
    assert sorted(i for part in info["partitions"] for i in part) == list(range(60))
    assert len(info["label_histograms"]) == 4
    for client in range(4):
        expected = [r for r in (1, 2) if client in fed.selected_clients(recipe, r)]
        assert final.participation(client) == expected


def test_a_trials_federation_settings_make_its_recipe_with_the_same_defaults():
    declared = parameters.parameter_defaults()
    recipe_knobs = [f.name for f in dataclasses.fields(fed.Federation) if f.name in declared]
    assert recipe_knobs == [f.name for f in parameters.recipe_fields(parameters.FEDERATION)]
    assert {"round", "attacked_client"}.isdisjoint(
        recipe_knobs
    )  # which round and client: the trial's, not the recipe's
    assert all(fed.Federation.__dataclass_fields__[name].default == declared[name] for name in recipe_knobs)
    assert fed.Federation(**{**TINY, "partition": "dirichlet"}).alpha == declared["alpha"] == 1.0
    trial = TrialSpec(round=2, partition="dirichlet", alpha=0.1, fed_clients=4, train_subset=60, width=4)
    recipe = fed.Federation.of_trial(trial)
    assert (recipe.partition, recipe.alpha, recipe.fed_clients, recipe.train_subset) == ("dirichlet", 0.1, 4, 60)
    assert fed.Federation.of_trial(TrialSpec(round=2, alpha=0.1)).key == fed.Federation.of_trial(TrialSpec(round=2)).key


# ------------------------------------------------------------------------------------------------
# Trials on a round


ROUND_TRIAL = dict(
    dataset="fashion-mnist",
    model="convnet",
    width=4,
    image_size=8,
    train_subset=60,
    fed_clients=4,
    clients_per_round=2,
    fed_batch_size=8,
    fed_lr=0.05,
    fed_rounds=4,
    iterations=5,
)


def test_a_round_victim_attacks_its_clients_own_training_images(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path))
    spec = TrialSpec(**ROUND_TRIAL, round=2, attacked_client=3, images=(0, 1))
    source = victim_source(spec)
    kept = fed.train(fed.Federation.of_trial(spec), 2)
    assert _states_equal(source.model().state_dict(), kept.model().state_dict())
    images01, labels, columns = source.client_images()
    indices = columns["train_images"]
    assert set(indices) <= set(kept.sidecar["partitions"][3]) and len(set(indices)) == 2
    expected, expected_labels = data.load_images("fashion-mnist", indices, split="train", image_size=8)
    assert torch.equal(images01, expected) and torch.equal(labels, expected_labels)
    assert source.row_columns(kept.sidecar)["client_rounds"] == kept.participation(3)
    with pytest.raises(ConfigError, match="images: 99 is not valid; client 3 holds"):
        victim_source(dataclasses.replace(spec, images=(99,))).client_images()


def test_fedavg_on_a_round_trains_as_the_federation_does():
    spec = TrialSpec(**ROUND_TRIAL, round=1, fl="fedavg", fed_epochs=2, images=tuple(range(10)))
    config = spec.fl_config()
    assert (config.local_steps, config.local_lr, config.local_batch_size) == (4, 0.05, 8)  # 2 epochs x ceil(10 / 8)
    assert TrialSpec(**ROUND_TRIAL, round=1).fl_config().fl == "fedsgd"
    momentum = TrialSpec(**ROUND_TRIAL, round=1, fl="fedavg", fed_momentum=0.9, images=(0, 1)).fl_config()
    assert (
        momentum.local_momentum == 0.9
        and fed.Federation.of_trial(TrialSpec(**ROUND_TRIAL, round=1, fed_momentum=0.9)).fed_momentum == 0.9
    )


@pytest.mark.parametrize(
    "change, line",
    [
        ({"round": 5}, "round: 5 is not valid; use 0 to 4 (fed_rounds), or raise fed_rounds"),
        ({"trained_epochs": 2}, "trained_epochs: 2 is not valid; use 0: a federation round is the victim"),
        ({"attacked_client": 4}, "attacked_client: 4 is not valid; use 0 to 3 (the federation's clients)"),
        ({"aggregated_clients": 2, "images": (0, 1)}, "aggregated_clients: 2 is not valid; use 1: a federation round"),
        ({"dataset": "photos", "model": "mlp"}, "dataset: 'photos' is not valid; it keeps no images to train on"),
        (
            {"fl": "fedavg", "dp_clip": 1.0, "images": tuple(range(10))},  # the client's batches are fed_batch_size's
            "fed_batch_size: 8 is not valid; DP-SGD draws its own batches at dp_sample_rate; use 10 or more",
        ),
    ],
)
def test_a_bad_round_trial_is_one_line_naming_the_field(change, line):
    with pytest.raises(ConfigError) as error:
        TrialSpec(**{**ROUND_TRIAL, "round": 1, **change})
    assert str(error.value).startswith(line), error.value


ROUND_STUDY = """
name: rounds
data: {dataset: fashion-mnist, images: 2, image_size: 8}
fixed: {model: convnet, width: 4, iterations: 5, train_subset: 60, fed_clients: 4, clients_per_round: 2,
        fed_batch_size: 8, fed_lr: 0.05, fed_rounds: 4, attacked_client: 1}
grid: {round: [0, 3], fl: [fedsgd, fedavg]}
resources: {num_cpus: 1}
"""


def test_a_study_attacks_rounds_of_a_federation_it_trains_once_on_ray(write_study, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    assert main(["run", str(write_study(ROUND_STUDY)), "--results", str(results), "--no-progress"]) == 0
    frame = pd.read_parquet(results)
    assert len(frame) == 8 and (frame["status"] == "ok").all()
    recipe = fed.Federation(**{**TINY, "fed_rounds": 4})
    assert set(frame["federation_key"]) == {recipe.key}
    root = fed.federation_dir(recipe, tmp_path / "cache")
    kept = fed.kept_rounds(recipe, (0, 3), tmp_path / "cache")
    for number, rows in frame.groupby("round"):
        assert (rows["model_accuracy"] == kept[number].sidecar["test_accuracy"]).all()
        assert all(list(r) == kept[number].participation(1) for r in rows["client_rounds"])
        assert all(set(images) <= set(kept[number].sidecar["partitions"][1]) for images in rows["train_images"])
    assert _states_equal(kept[3].state, fed.train(recipe, 3, cache=tmp_path / "again").state)  # trained as alone
    assert sorted(p.name for p in root.glob("round-*.json")) == [f"round-0000{n}.json" for n in range(4)]
