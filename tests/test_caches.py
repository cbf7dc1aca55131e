"""Damaged caches under `gradinv run`: a checkpoint that holds more than tensors, an unwritable cache, a
federation round whose sidecar is damaged. Each is one line naming the file and the fix, exit 2, before
Ray starts or the results directory is created (and the weights_only guard runs no code). Checkpoints and
rounds are entries of one cache (gradinv.cache): the same checks, the same line for the same damage."""

import dataclasses
import gc
import json
import pickle

import pandas as pd
import pytest
import torch

from gradinv import cache, federation, zoo
from gradinv.errors import ConfigError
from gradinv.files import require_writable_directory
from sweep import preflight, runner
from sweep.cli.main import main
from sweep.study import load_study

ZOO_STUDY = """
name: cached
data: {dataset: faces, images: 2, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 2, trained_epochs: 1, train_subset: 16}
"""
FEDERATION_STUDY = """
name: federated
data: {dataset: faces, images: 1, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 2, round: 1, fed_rounds: 1, fed_clients: 2, train_subset: 8,
        fed_batch_size: 4}
"""
EMPTY_SIDECAR = (
    "round-00001.json lacks key, round, test_accuracy, participants, partitions, label_histograms, training_seconds"
)
RAN = "ran.txt"  # a pickled checkpoint that executed code would leave this file


class Planted:
    """A pickle payload that writes a file when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "connect", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))


def refused(study, tmp_path, capsys) -> list[str]:
    """`gradinv run` on the study: exit 2, nothing written; its stderr lines."""
    results = tmp_path / "results"
    code = main(["run", str(study), "--results", str(results), "--no-progress"])
    assert code == 2 and not results.exists()
    return capsys.readouterr().err.strip().splitlines()


def test_a_cached_checkpoint_holding_more_than_tensors_is_one_line_and_runs_no_code(
    no_ray, write_study, tmp_path, capsys
):
    study = write_study(ZOO_STUDY)
    recipe = load_study(study).trials[0].recipe()
    sidecar = {
        "key": recipe.key,
        "test_accuracy": 0.5,
        "epochs": 1,
        "seed": 0,
        "training_seconds": 1.0,
        "recipe": dataclasses.asdict(recipe),
    }
    zoo.store(zoo.Checkpoint(recipe, recipe.untrained().state_dict(), sidecar))
    weights = zoo.entry(recipe).weights
    torch.save({**recipe.untrained().state_dict(), "extra": Planted(str(tmp_path / RAN))}, weights)
    assert refused(study, tmp_path, capsys) == [
        f"gradinv run: error: checkpoint: '{weights}' is not valid; it is unreadable ({weights.name} holds more than "
        f"tensors); delete {weights.name} and {recipe.key}.json and run '{recipe.train_command()}' (or the study) "
        "again to rebuild it"
    ]
    assert not (tmp_path / RAN).exists()


def test_an_unwritable_cache_is_one_line(monkeypatch, no_ray, write_study, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "cache"  # below a file: no process can create it
    monkeypatch.setenv("GRADINV_CACHE", str(cache))
    with pytest.raises(ConfigError) as expected:
        require_writable_directory("GRADINV_CACHE", cache)
    assert refused(write_study(ZOO_STUDY), tmp_path, capsys) == [f"gradinv run: error: {expected.value}"]
    assert str(expected.value).startswith(f"GRADINV_CACHE: '{cache}' is not valid; ")


def test_an_untrained_study_needs_no_cache(monkeypatch, write_study, tmp_path):
    from sweep.victim_training import check_caches

    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "a-file" / "cache"))
    (tmp_path / "a-file").write_text("")
    check_caches(list(load_study(write_study(ZOO_STUDY.replace("trained_epochs: 1", "trained_epochs: 0"))).trials))


@pytest.fixture
def kept_round(no_ray, write_study):
    """The federation study's file, and its round 1 as trained and kept in the cache (clients in process)."""
    study = write_study(FEDERATION_STUDY)
    recipe = federation.Federation.of_trial(load_study(study).trials[0])
    federation.train(recipe, 1, keep=(1,))
    root = federation.federation_dir(recipe)
    return study, root / "round-00001.pt", root / "round-00001.json"


def expected_round_error(weights, problem: str) -> str:
    return (
        f"gradinv run: error: federation: '{weights}' is not valid; round 1 is unreadable ({problem}); delete "
        "round-00001.pt and round-00001.json and run again to retrain it"
    )


def test_an_empty_round_sidecar_is_one_line(kept_round, tmp_path, capsys):
    study, weights, sidecar = kept_round
    sidecar.write_text("{}")
    problem = EMPTY_SIDECAR
    assert refused(study, tmp_path, capsys) == [expected_round_error(weights, problem)]


def test_a_round_sidecar_with_fewer_partitions_than_clients_is_one_line(kept_round, tmp_path, capsys):
    study, weights, sidecar = kept_round
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "partitions": info["partitions"][:1]}))
    problem = "round-00001.json holds 1 partitions for 2 clients"
    assert refused(study, tmp_path, capsys) == [expected_round_error(weights, problem)]


def test_gradinv_attack_on_a_damaged_round_is_the_same_line(kept_round, tmp_path, capsys):
    _, weights, sidecar = kept_round
    sidecar.write_text("{}")
    out = tmp_path / "out"
    code = main(
        [
            "attack",
            "--dataset",
            "faces",
            "--image-size",
            "8",
            "--width",
            "2",
            "--iterations",
            "2",
            "--round",
            "1",
            "--fed-rounds",
            "1",
            "--fed-clients",
            "2",
            "--train-subset",
            "8",
            "--fed-batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    problem = EMPTY_SIDECAR
    assert code == 2 and err == [expected_round_error(weights, problem).replace("gradinv run", "gradinv attack")]
    assert not out.exists()


def test_a_sound_cache_passes_the_check(kept_round):
    from sweep.victim_training import check_caches

    study, _, _ = kept_round
    check_caches(list(load_study(study).trials))  # no error


def test_on_a_cluster_node_a_damaged_checkpoint_fails_its_trials_with_the_same_line_and_nothing_else(
    monkeypatch, write_study, tmp_path, ray_tmpdir, capfd
):
    """A cluster's nodes keep caches of their own that the driver cannot check: the node's one line
    reaches the trials' rows (the zoo's error survives Ray's pickling), and Ray prints no unhandled error."""
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preflight, "check_caches", lambda specs: None)  # as on a cluster: the node finds it
    study = write_study(ZOO_STUDY)
    recipe = load_study(study).trials[0].recipe()
    sidecar = {"key": recipe.key, "test_accuracy": 0.5, "epochs": 1, "seed": 0, "training_seconds": 1.0}
    zoo.store(zoo.Checkpoint(recipe, recipe.untrained().state_dict(), sidecar))
    weights = zoo.entry(recipe).weights
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError) as expected:
        zoo.load(recipe)
    results = tmp_path / "results"
    assert main(["run", str(study), "--results", str(results), "--no-progress"]) == 0
    gc.collect()  # Ray reports an error nobody fetched when its reference is collected
    rows = pd.read_parquet(results)
    assert list(rows["status"]) == ["failed", "failed"]
    line = f"training the victim {recipe.key} failed: gradinv.errors.ConfigError: {expected.value}"
    assert set(rows["error"]) == {line}
    assert "Unhandled error" not in "".join(capfd.readouterr())


# ------------------------------------------------------------------------------------------------
# One cache for checkpoints and rounds


CHECKPOINT = zoo.Recipe("faces", "convnet", 2, epochs=1, image_size=8)
ROUNDS = federation.Federation(
    dataset="faces", width=2, image_size=8, fed_clients=2, train_subset=8, fed_batch_size=4, fed_rounds=1
)
CHECKPOINT_FIELDS = "key, test_accuracy, epochs, seed, training_seconds"
ROUND_FIELDS = "key, round, test_accuracy, participants, partitions, label_histograms, training_seconds"


@pytest.fixture
def one_of_each(tmp_path) -> dict:
    """A checkpoint and a federation's round 0 in one cache: kind -> (its entry, a function loading it)."""
    sidecar = {"key": CHECKPOINT.key, "test_accuracy": 0.5, "epochs": 1, "seed": 0, "training_seconds": 1.0}
    zoo.store(zoo.Checkpoint(CHECKPOINT, CHECKPOINT.untrained().state_dict(), sidecar), tmp_path)
    federation.train(ROUNDS, 0, cache=tmp_path)
    return {
        "checkpoint": (zoo.entry(CHECKPOINT, tmp_path), lambda: zoo.load(CHECKPOINT, tmp_path)),
        "round": (federation.round_entry(ROUNDS, 0, tmp_path), lambda: federation.load_round(ROUNDS, 0, tmp_path)),
    }


def damage_line(kind: str, weights, problem: str) -> str:
    """The one line for a damaged entry of either kind: what is wrong, the two files, how to rebuild them."""
    files = f"{weights.name} and {weights.with_suffix('.json').name}"
    if kind == "checkpoint":
        rebuild = f"run '{CHECKPOINT.train_command()}' (or the study) again to rebuild it"
        return f"checkpoint: '{weights}' is not valid; it is unreadable ({problem}); delete {files} and {rebuild}"
    rebuild = "run again to retrain it"
    return f"federation: '{weights}' is not valid; round 0 is unreadable ({problem}); delete {files} and {rebuild}"


def loading_error(load) -> str:
    with pytest.raises(ConfigError) as error:
        load()
    return str(error.value)


@pytest.mark.parametrize("kind", ["checkpoint", "round"])
def test_a_damaged_sidecar_of_either_kind_is_the_same_one_line(one_of_each, kind):
    entry, load = one_of_each[kind]
    fields = {"checkpoint": CHECKPOINT_FIELDS, "round": ROUND_FIELDS}[kind]
    entry.sidecar.write_text("{}")
    assert loading_error(load) == damage_line(kind, entry.weights, f"{entry.sidecar.name} lacks {fields}")
    entry.sidecar.write_text('{"key": "cut sho')
    assert loading_error(load) == damage_line(kind, entry.weights, f"{entry.sidecar.name}: JSONDecodeError")


@pytest.mark.parametrize("kind", ["checkpoint", "round"])
def test_a_round_and_a_checkpoint_go_through_the_same_checks_of_their_weights(one_of_each, kind, tmp_path):
    entry, load = one_of_each[kind]
    state = load().state
    weights = entry.weights
    weights.write_bytes(weights.read_bytes()[:100])
    assert loading_error(load) == damage_line(kind, weights, f"{weights.name} is not a complete torch archive")
    torch.save({**state, "extra": Planted(str(tmp_path / RAN))}, weights)
    assert loading_error(load) == damage_line(kind, weights, f"{weights.name} holds more than tensors")
    assert not (tmp_path / RAN).exists()
    torch.save({name: value[:1] if value.dim() else value for name, value in state.items()}, weights)
    assert loading_error(load) == damage_line(kind, weights, f"{weights.name} does not hold this recipe's model")


def test_both_kinds_load_through_the_cache_entry(one_of_each, monkeypatch):
    loaded = []
    original = cache.Entry.load

    def spy(entry, *args, **kwargs):
        loaded.append(entry.sidecar.name)
        return original(entry, *args, **kwargs)

    monkeypatch.setattr(cache.Entry, "load", spy)
    for _, load in one_of_each.values():
        assert load() is not None
    assert loaded == [f"{CHECKPOINT.key}.json", "round-00000.json"]


def test_weights_sent_to_ray_workers_load_as_tensors_only(tmp_path):
    state = CHECKPOINT.untrained().state_dict()
    received = cache.from_bytes(cache.to_bytes(state))
    assert received.keys() == state.keys() and all(torch.equal(received[k], state[k]) for k in state)
    planted = cache.to_bytes({"extra": Planted(str(tmp_path / RAN))})
    with pytest.raises(pickle.UnpicklingError):
        cache.from_bytes(planted)
    assert not (tmp_path / RAN).exists()
