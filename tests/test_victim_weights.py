"""Victim weights from a file (``weights``): the victim holds exactly the file's tensors, trials are keyed
by the file's content (not its path), and a file that does not fit is one line with exit code 2."""

import json
import shutil

import pytest
import torch

from gradinv import models
from gradinv.errors import ConfigError
from gradinv.results.schema import trial_key
from gradinv.trial import TrialSpec, run
from gradinv.victims import Untrained, WeightsFile, victim_source
from sweep.cli.main import main
from sweep.cli.replay import spec_from_row
from sweep.study import load_study
from sweep.study_yaml import StudyError
from sweep.worker import Pack, run_pack

TINY = dict(dataset="faces", image_size=8, model="convnet", width=2, images=(0,), iterations=2)
FLAGS = ["--dataset", "faces", "--image-size", "8", "--model", "convnet", "--width", "2", "--image", "0"]


def saved_state(path, seed: int = 7, **changes) -> dict:
    """A state_dict of the tiny model, seeded differently from the trial's default (seed 0), saved at ``path``."""
    state = models.initial_model(TrialSpec(**{**TINY, **changes}, model_seed=seed)).state_dict()
    for name, tensor in state.items():  # running statistics too: not what a fresh model holds
        if tensor.is_floating_point():
            state[name] = tensor + 0.01 * (1 + torch.arange(tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape))
    torch.save(state, path)
    return state


def same_tensors(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[name], state[name]) for name in state)


def test_the_victim_run_trials_attacks_holds_exactly_the_files_weights(tmp_path, monkeypatch):
    state = saved_state(tmp_path / "victim.pt")
    spec = TrialSpec(**TINY, weights=str(tmp_path / "victim.pt"))
    attacked = []

    def recording(trial):
        source = victim_source(trial)
        original = source.model

        class Recorded:
            def __getattr__(self, name):
                return getattr(source, name)

            def model(self):
                attacked.append(original())
                return attacked[-1]

        return Recorded()

    monkeypatch.setattr(run, "victim_source", recording)
    (outcome,) = run.run_trials([spec])
    assert isinstance(victim_source(spec), WeightsFile)
    assert len(attacked) == 1 and same_tensors(attacked[0], state)
    assert not attacked[0].training  # eval mode: BatchNorm uses the file's running statistics
    assert outcome.status == "ok" and outcome.reconstruction.shape == (1, 1, 8, 8)
    untrained = Untrained(TrialSpec(**TINY)).model()
    assert not same_tensors(untrained, state)


def test_the_key_follows_the_content_not_the_path(tmp_path):
    saved_state(tmp_path / "a.pt")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "a.pt", tmp_path / "elsewhere" / "b.pth")
    first = TrialSpec(**TINY, weights=str(tmp_path / "a.pt"))
    copied = TrialSpec(**TINY, weights=str(tmp_path / "elsewhere" / "b.pth"))
    assert trial_key(first) == trial_key(copied)
    assert first.weights != copied.weights  # the rows still say which file each read
    assert "weights" not in first.key_fields() and len(first.key_fields()["weights_sha256"]) == 64
    assert trial_key(first) != trial_key(TrialSpec(**TINY))  # not the untrained victim's key
    # the seed does not reach weights read from a file: it neither changes the key nor the victim
    assert trial_key(TrialSpec(**TINY, model_seed=3, weights=str(tmp_path / "a.pt"))) == trial_key(first)
    saved_state(tmp_path / "a.pt", seed=8)  # new content at the same path
    changed = TrialSpec(**TINY, weights=str(tmp_path / "a.pt"))
    assert trial_key(changed) not in (trial_key(first), trial_key(copied))
    assert changed.key_fields()["weights_sha256"] != first.key_fields()["weights_sha256"]


def test_a_relative_path_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    saved_state(tmp_path / "victim.pt")
    monkeypatch.chdir(tmp_path)
    assert TrialSpec(**TINY, weights="victim.pt").weights == str(tmp_path / "victim.pt")


def test_a_file_changed_after_keying_is_refused_when_loaded(tmp_path):
    saved_state(tmp_path / "victim.pt")
    spec = TrialSpec(**TINY, weights=str(tmp_path / "victim.pt"))
    saved_state(tmp_path / "victim.pt", seed=9)
    with pytest.raises(ConfigError, match="the file changed after its trials were keyed"):
        victim_source(spec).model()


def exit_line(capsys, argv) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def _bad_files(tmp_path) -> list[tuple[list[str], str]]:
    saved_state(tmp_path / "good.pt")
    state = torch.load(tmp_path / "good.pt", weights_only=True)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a torch file")
    first = next(iter(state))
    torch.save({name: t for name, t in state.items() if name != first}, tmp_path / "missing.pt")
    torch.save({**state, "extra.weight": torch.zeros(2)}, tmp_path / "unexpected.pt")
    torch.save({f"module.{name}": t for name, t in state.items()}, tmp_path / "prefixed.pt")
    saved_state(tmp_path / "wide.pt", width=3)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "checkpoint.pt")
    return [
        (
            ["--weights", str(tmp_path / "absent.pt")],
            "weights: '{}' is not valid; no such file".format(tmp_path / "absent.pt"),
        ),
        (["--weights", str(tmp_path / "list.pt")], "it holds a list, not a state_dict"),
        (["--weights", str(tmp_path / "text.pt")], "not a readable torch.save file"),
        (["--weights", str(tmp_path / "checkpoint.pt")], "save the model's own state_dict"),
        (["--weights", str(tmp_path / "missing.pt")], f"weights: state: ['{first}'] is not valid; the file lacks"),
        (
            ["--weights", str(tmp_path / "unexpected.pt")],
            "weights: state[extra.weight]: [2] is not valid; the model has no such entry",
        ),
        (["--weights", str(tmp_path / "prefixed.pt")], "drop the 'module.' prefix"),
        (
            ["--weights", str(tmp_path / "wide.pt")],
            "weights: state[0.weight]: [3, 1, 3, 3] is not valid; the model's is [2, 1, 3, 3]",
        ),
        (
            ["--weights", str(tmp_path / "good.pt"), "--trained-epochs", "1"],
            "trained_epochs: 1 is not valid; use 0 with weights",
        ),
        (["--weights", str(tmp_path / "good.safetensors")], "safetensors files are not supported"),
        (
            ["--weights", str(tmp_path / "good.pt"), "--round", "1", "--fl", "fedavg"],
            "round: 1 is not valid; leave it out with weights",
        ),
    ]


def test_bad_weights_are_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    (tmp_path / "good.safetensors").write_bytes(b"{}")
    for flags, expected in _bad_files(tmp_path):
        out = tmp_path / "never"
        code, err = exit_line(capsys, ["attack", *FLAGS, "--iterations", "2", *flags, "--out", str(out)])
        assert code == 2, flags
        assert len(err) == 1 and expected in err[0], (expected, err)
        assert not out.exists()


def test_the_fix_of_a_wrong_shape_names_the_trials_model(tmp_path):
    saved_state(tmp_path / "wide.pt", width=3)
    with pytest.raises(ConfigError) as raised:
        TrialSpec(**TINY, weights=str(tmp_path / "wide.pt"))
    assert raised.value.fix.endswith(
        "(model convnet, width 2, norm batch, dataset faces, image_size 8), or set those to the file's model"
    )


def test_attack_with_weights_records_the_path(tmp_path):
    saved_state(tmp_path / "victim.pt")
    out = tmp_path / "run"
    assert (
        main(
            [
                "attack",
                *FLAGS,
                "--iterations",
                "2",
                "--threads",
                "1",
                "--weights",
                str(tmp_path / "victim.pt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    document = json.loads((out / "metrics.json").read_text())
    assert document["config"]["weights"] == str(tmp_path / "victim.pt")


def test_a_study_with_weights_runs_its_trials_on_the_file(tmp_path, write_study):
    saved_state(tmp_path / "victim.pt")
    path = write_study(
        f"""
        name: weights
        data: {{dataset: faces, images: 2, image_size: 8}}
        fixed: {{model: convnet, width: 2, iterations: 2, weights: {json.dumps(str(tmp_path / "victim.pt"))}}}
        grid: {{model_seed: [0, 1, 2]}}
        """
    )
    trials = load_study(path).trials
    assert len(trials) == 2  # one per image: the seed does not apply to weights from a file, so its values collapse
    assert {t.weights for t in trials} == {str(tmp_path / "victim.pt")} and {t.model_seed for t in trials} == {0}
    keys = tuple(trial_key(t) for t in trials)
    rows = run_pack(Pack("weights", keys, tuple(trials)))
    assert [row["status"] for row in rows] == ["ok", "ok"] and [row["key"] for row in rows] == list(keys)
    assert {row["weights"] for row in rows} == {str(tmp_path / "victim.pt")}
    assert all(row["model_seed"] is None for row in rows)  # not applicable: null
    assert [trial_key(spec_from_row(row)) for row in rows] == list(keys)  # a row names its trial again (replay)


def test_a_study_with_weights_and_trained_epochs_names_the_setting(tmp_path, write_study):
    saved_state(tmp_path / "victim.pt")
    path = write_study(
        f"""
        name: weights
        data: {{dataset: faces, images: 1, image_size: 8}}
        fixed: {{model: convnet, width: 2, trained_epochs: 2, weights: {json.dumps(str(tmp_path / "victim.pt"))}}}
        """
    )
    with pytest.raises(StudyError, match=r"study.yaml:3: fixed\.trained_epochs: 2: use 0 with weights"):
        load_study(path)
    path.write_text(path.read_text().replace("trained_epochs: 2, ", "").replace("victim.pt", "absent.pt"))
    with pytest.raises(StudyError, match=r"study.yaml:3: fixed\.weights: .*absent.pt.*: no such file"):
        load_study(path)
