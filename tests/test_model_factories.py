"""A victim from the user's code (``model: package.module:function``): the trial attacks the module the
function returns, the key follows the module's source, and every bad value is one line with exit code 2."""

import hashlib
import itertools
import sys
import textwrap

import pandas as pd
import pytest
from torch import nn

from gradinv import models
from gradinv.errors import ConfigError
from gradinv.results.schema import trial_key
from gradinv.trial import TrialSpec, run
from gradinv.victims import victim_source
from sweep.cli.main import main
from sweep.runner import runtime_environment
from sweep.study import load_study

SOURCE = """
import torch
from torch import nn

CALLS = []


def tiny(**arguments):
    CALLS.append(arguments)
    side, hidden = arguments["image_size"], arguments.get("width", 3)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(arguments["in_channels"] * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, arguments["num_classes"]),
    )


def other(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def raises(**arguments):
    raise ValueError("no such layer")


def not_a_module(**arguments):
    return 42


def real(**arguments):
    model = other(arguments["num_classes"], arguments["in_channels"], arguments["image_size"])
    model[1].weight.data *= 1 / (1 + model[1].weight.abs().max().item())  # not on the meta device
    return model


NOT_CALLABLE = 3
"""
TINY = dict(dataset="faces", image_size=8, images=(0,), iterations=3)
FLAGS = ["--dataset", "faces", "--image-size", "8", "--image", "0", "--iterations", "2", "--threads", "1"]
_names = itertools.count()


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A fresh module of factories on the Python path; its name is unique (modules stay imported)."""
    name = f"user_models_{next(_names)}"
    path = tmp_path / "code" / f"{name}.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(path.parent))
    return name, path


def test_run_trials_attacks_the_module_the_function_returns(module, monkeypatch):
    name, _ = module
    spec = TrialSpec(**TINY, model=f"{name}:tiny", width=5)
    attacked = []

    def recording(trial):
        source = victim_source(trial)
        original = source.model

        class Recorded:
            def __getattr__(self, attribute):
                return getattr(source, attribute)

            def model(self):
                attacked.append(original())
                return attacked[-1]

        return Recorded()

    monkeypatch.setattr(run, "victim_source", recording)
    (outcome,) = run.run_trials([spec])
    assert outcome.status == "ok" and outcome.reconstruction.shape == (1, 1, 8, 8)
    (victim,) = attacked
    assert [type(layer) for layer in victim] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert (victim[1].in_features, victim[1].out_features, victim[3].out_features) == (64, 5, 2)
    assert not victim.training
    assert sys.modules[name].CALLS[-1] == {"num_classes": 2, "in_channels": 1, "image_size": 8, "width": 5}


def test_width_is_passed_only_when_the_trial_sets_it_and_the_seed_fixes_the_weights(module):
    name, _ = module
    spec = TrialSpec(**TINY, model=f"{name}:other")
    first, again = models.initial_model(spec), models.initial_model(spec)
    assert all((a == b).all() for a, b in zip(first.parameters(), again.parameters()))
    reseeded = models.initial_model(TrialSpec(**TINY, model=f"{name}:other", model_seed=1))
    assert not (first[1].weight == reseeded[1].weight).all()
    assert spec.width is None and "width" not in spec.key_fields()
    assert TrialSpec(**TINY, model=f"{name}:tiny", width=4).key_fields()["width"] == 4


def test_the_key_follows_the_factory_and_its_source(module):
    name, path = module
    spec = TrialSpec(**TINY, model=f"{name}:tiny")
    fields = spec.key_fields()
    assert fields["model"] == f"{name}:tiny"
    assert fields["model_source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert trial_key(TrialSpec(**TINY, model=f"{name}:tiny")) == trial_key(spec)  # nothing changed: same key
    assert trial_key(TrialSpec(**TINY, model=f"{name}:other")) != trial_key(spec)  # another function
    path.write_text(path.read_text() + "\n# edited\n")
    edited = TrialSpec(**TINY, model=f"{name}:tiny")
    assert trial_key(edited) != trial_key(spec)
    assert edited.key_fields()["model_source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="its module changed after its trials were keyed"):
        models.initial_model(spec)  # the code the old key named is gone
    assert isinstance(models.initial_model(edited), nn.Sequential)


def test_a_function_that_needs_real_numbers_is_checked_and_estimated_on_the_cpu(module):
    from gradinv import memory

    name, _ = module
    spec = TrialSpec(**TINY, model=f"{name}:real")
    size = memory.model_size(spec.model, 1, 2, 8, None, "batch")
    assert (size.parameters, size.tensors) == (64 * 2 + 2, 2)
    assert memory.trial_bytes(spec) > 0


def test_registry_models_keep_their_keys(module):
    assert "model_source_sha256" not in TrialSpec(**TINY, model="mlp", width=4).key_fields()


def exit_line(capsys, argv) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_factories_are_one_line_exit_2_and_nothing_written(module, tmp_path, capsys):
    name, path = module
    (path.parent / f"{name}_broken.py").write_text("raise RuntimeError('half written')\n")
    cases = [
        ("no_such_module_here:tiny", "no module 'no_such_module_here' on the Python path; put the module's"),
        (f"{name}:missing", f"module {name} has no function 'missing'"),
        (f"{name}:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        (f"{name}:raises", "the function raised ValueError: no such layer; it must build a model"),
        (f"{name}:not_a_module", "the function returned a int, not a torch.nn.Module"),
        (f"{name}_broken:tiny", f"importing {name}_broken failed (RuntimeError: half written)"),
        ("a:b:c", "write it as package.module:function"),
        (":f", "write it as package.module:function"),
        (f"{name}:", "write it as package.module:function"),
        ("no-dash:f", "write it as package.module:function"),
    ]
    for value, expected in cases:
        out = tmp_path / "never"
        code, err = exit_line(capsys, ["attack", *FLAGS, "--model", value, "--out", str(out)])
        assert code == 2, value
        assert len(err) == 1 and f"model: '{value}' is not valid; " in err[0] and expected in err[0], (value, err)
        assert not out.exists()
    code, err = exit_line(capsys, ["attack", *FLAGS, "--model", "no_model", "--out", str(tmp_path / "never")])
    assert code == 2 and len(err) == 1 and "model: 'no_model' is not valid; choose one of convnet," in err[0]
    flags = ["--model", f"{name}:tiny", "--trained-epochs", "1"]
    code, err = exit_line(capsys, ["attack", *FLAGS, *flags, "--out", str(tmp_path / "never")])
    assert code == 2 and len(err) == 1 and "trained_epochs: 1 is not valid; use 0 with a model from your code" in err[0]
    assert not (tmp_path / "never").exists()


def test_attack_with_a_factory_writes_its_model(module, tmp_path):
    name, _ = module
    out = tmp_path / "run"
    assert main(["attack", *FLAGS, "--model", f"{name}:other", "--out", str(out)]) == 0
    assert (out / "metrics.json").exists()


STUDY = """
name: own-model
data: {{dataset: faces, images: 2, image_size: 8}}
fixed: {{model: "{module}:tiny", iterations: 3}}
grid: {{width: [3, 4]}}
"""


def test_a_study_finds_the_module_beside_it_and_ships_it_to_ray(tmp_path, write_study):
    name = f"beside_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SOURCE))
    study = load_study(write_study(STUDY.format(module=name)))
    assert len(study.trials) == 4
    assert {spec.key_fields()["width"] for spec in study.trials} == {3, 4}
    environment = runtime_environment(None, study.trials)
    assert environment["py_modules"] == [str(tmp_path / f"{name}.py")]
    assert "py_modules" not in runtime_environment(None, [TrialSpec(**TINY)])


# On a multi-node cluster (worker nodes of their own): tests/test_own_parts_study.py, which shares one cluster
# between its studies.


def test_a_study_runs_on_ray_with_the_module_shipped(tmp_path, write_study, driver):
    """The driver runs from the repository and the module lies only beside the study: Ray's workers import it
    from the runtime environment's py_modules."""
    name = f"shipped_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SOURCE))
    study = write_study(STUDY.format(module=name))
    results = tmp_path / "results"
    code, output = driver("run", str(study), "--results", str(results), "--no-progress").wait(timeout=300)
    assert code == 0, output
    frame = pd.read_parquet(results)
    assert len(frame) == 4 and (frame["status"] == "ok").all(), frame["error"].tolist()
    assert set(frame["model"]) == {f"{name}:tiny"} and sorted(set(frame["width"])) == [3, 4]
