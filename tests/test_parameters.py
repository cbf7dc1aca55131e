"""Trial parameters declared once: every derived place (flags, study files, columns, keys, lanes, the
tune space, the README) follows the declarations, including a part a test adds."""

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from gradinv import parameters, parameters_page, trial
from gradinv.attacks.registry import FAMILIES
from gradinv.client.update import client_update
from gradinv.errors import ConfigError
from gradinv.models import build_model, default_width, initial_model
from gradinv.parameters import ClientSettings, knob
from gradinv.results.schema import SCHEMA, parameter_columns, parameter_types
from gradinv.trial import TrialSpec, lane_signature
from gradinv.victims import Untrained, ZooCheckpoint, victim_source
from sweep import study, study_checks
from sweep.cli import main as cli

REPO = Path(__file__).resolve().parent.parent
DATA_SECTION = ("dataset", "images", "labels", "image_size")
DEFENDED_FIXED = {
    "clip_update": 1.0,
    "noise_std": 0.1,
    "keep_fraction": 0.5,
    "quant_bits": 4,
    "dp_clip": 1.0,
}  # every defence knob applies
DEFENDED = [arg for name, value in DEFENDED_FIXED.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
# a value that needs more than the default image: (flags, study-file settings) that give each trial two
# (a study deals images_per_client to each of the trial's clients)
IMAGES_FOR = {
    "aggregated_clients": (["--image", "0", "--image", "1"], {"images_per_client": 1}),
    "attacker_order": (["--image", "0", "--image", "1"], {"images_per_client": 2}),  # batches of one of two
    "output_gradient": (["--image", "0"], {"images_per_client": 1}),  # one image's bias gradient
}


FEDERATED_FIXED = {"round": 1, "partition": "dirichlet", "fl": "fedavg"}  # every federation setting applies
FEDERATED = [arg for name, value in FEDERATED_FIXED.items() for arg in (f"--{name}", str(value))]
# settings that apply only beside others that contradict DEFENDED_FIXED: where each applies instead
IMPRINTED = {"attack": "imprint", "threat_model": "malicious", "imprint_sample": 100}  # faces keep 150
APPLIES_WITH = {
    "client_bn": {"fl": "fedavg", "restarts": 2},  # DP-SGD runs BatchNorm in eval mode
    "local_momentum": {"fl": "fedavg"},  # DP-SGD's local steps are plain SGD
    "attacker_order": {"fl": "fedavg", "local_batch_size": 1},  # shuffled mini-batches; DP-SGD draws its own
    "bn_stats": {"bn_prior": 0.1, "client_bn": "train"},
    "label_method": {"labels": "recovered"},  # iLRG reads one FedSGD gradient
    "imprint_bins": IMPRINTED,
    "imprint_sample": IMPRINTED,
    "defended_training": {"trained_epochs": 1, **DEFENDED_FIXED, "norm": "group"},  # DP-SGD training needs GroupNorm
    "weights": {"dataset": "faces"},  # refused beside trained_epochs; the file fits the default model on faces
    "output_gradient": {"fl": "fedsgd", "restarts": 2},  # read: one FedSGD image, no DP-SGD
}
WEIGHTS_FILE = {}  # "path": a state_dict of the default model on faces, written once for the module


@pytest.fixture(scope="module", autouse=True)
def _weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "faces-convnet.pt"
    torch.save(initial_model(TrialSpec(dataset="faces")).state_dict(), path)
    WEIGHTS_FILE["path"] = str(path)


def federation(name: str) -> bool:
    return name in parameters.declarations(parameters.FederationSettings)


def _flag(name: str) -> str:
    declared = parameters.parameters()[name]
    return f"--{(declared.repeat_flag or name).replace('_', '-')}"


def _good_value(name: str, declared: parameters.Knob, default):
    """A valid value other than the default (the YAML value, and what the trial then holds)."""
    special = {
        "dataset": "faces",
        "model": "mlp",
        "images": [1],
        "layers": [0],
        "image_size": 16,
        "keep_fraction": 0.25,
        "noise_std": 0.5,
        "dp_delta": 0.001,
        "dp_sample_rate": 0.5,
        "aggregated_clients": 2,
        "imprint_sample": 120,
        "attack": "dlg",
        "max_iterations": 48_000,  # at least iterations (24,000 by default)
        "weights": WEIGHTS_FILE.get("path"),  # a file that fits the model (see APPLIES_WITH)
    }
    if name in special:
        value = special[name]
        return value, tuple(value) if isinstance(value, list) else value
    if declared.allowed():
        value = next(v for v in declared.allowed() if v != default)
    elif declared.kind == "bool":
        value = not default
    elif declared.kind == "int":
        value = 2 if default is None else default + 2
    else:
        value = 0.5 if default is None else default * 2
    return value, value


def _flag_arguments(name: str, declared: parameters.Knob, value) -> list[str]:
    if declared.kind == "bool":
        return [_flag(name) if value else f"--no-{name.replace('_', '-')}"]
    return [_flag(name), ",".join(map(str, value)) if isinstance(value, list) else str(value)]


def _bad_values(name: str, declared: parameters.Knob) -> list[list[str]]:
    """Command-line arguments with a wrong value for the parameter."""
    flag = _flag(name)
    if declared.kind == "bool":
        return [[f"{flag}=maybe"]]
    wrong_type = {"int": "abc", "float": "abc", "str": "nope", "ints": "0,x"}[declared.kind]
    out_of_range = {"int": "-1", "float": "nan"}.get(declared.kind) if declared.rules else None
    return [[flag, value] for value in (wrong_type, out_of_range, "nope" if declared.names else None) if value]


def _study(tmp_path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def _exit_line(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's type errors
        code = stop.code
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------


def test_the_declarations_import_neither_torch_nor_pyarrow():
    probe = (
        "import sys, gradinv.parameters, gradinv.attacks.registry; "
        "print('torch' in sys.modules, 'pyarrow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(
    "spec, fields",
    [  # key_fields() computed before the parameters were declared in parts: IG keys must not move
        (TrialSpec(), {}),
        (
            TrialSpec(fl="fedavg", local_steps=5, local_batch_size=2, images=(0, 1, 2, 3)),
            {"images": [0, 1, 2, 3], "fl": "fedavg", "local_steps": 5, "local_batch_size": 2},
        ),
        (
            TrialSpec(trained_epochs=2, width=16, train_subset=100),
            {"width": 16, "trained_epochs": 2, "train_subset": 100},
        ),
        (
            TrialSpec(
                dataset="faces",
                model="resnet20",
                tv=1e-2,
                decay="cosine",
                layers="last10",
                restarts=2,
                scoring="tv",
                optimizer="sgd",
                clamp_init=True,
            ),
            {
                "dataset": "faces",
                "model": "resnet20",
                "restarts": 2,
                "tv": 0.01,
                "decay": "cosine",
                "clamp_init": True,
                "layer_set": "last10",
                "optimizer": "sgd",
                "scoring": "tv",
                "split_version": 1,
            },
        ),
        (
            TrialSpec(
                fl="fedavg",
                batch_order="sequential",
                data_order_seed=3,
                local_batch_size=1,
                images=(0, 1),
                width=8,
                model_seed=2,
                labels="recovered",
                attack_seed=4,
                layers=(0, 1),
                tol=0.1,
            ),
            {
                "images": [0, 1],
                "labels": "recovered",
                "width": 8,
                "model_seed": 2,
                "fl": "fedavg",
                "local_batch_size": 1,
                "batch_order": "sequential",
                "layers": [0, 1],
                "attack_seed": 4,
            },
        ),
        (TrialSpec(attack="analytic", model="mlp", tv=0.1, iterations=5), {"model": "mlp", "attack": "analytic"}),
    ],
)
def test_inverting_gradients_and_analytic_key_fields_are_unchanged(spec, fields):
    assert json.dumps(spec.key_fields(), sort_keys=True) == json.dumps(fields, sort_keys=True)


def test_every_declared_parameter_is_a_flag_a_column_and_a_study_key(tmp_path):
    declared_defaults = parameters.parameter_defaults()
    assert list(parameter_types()) == list(declared_defaults) == list(trial.DEFAULTS)
    for name, declared in parameters.parameters().items():
        default = declared_defaults[name]
        yaml_value, held = _good_value(name, declared, default)
        # the flag
        flag_value = _flag_arguments(name, declared, yaml_value)
        where_all_apply = (
            FEDERATED if federation(name) else ["--fl", "fedavg", "--restarts", "2", "--trained-epochs", "1", *DEFENDED]
        )  # the flag comes last
        if name in APPLIES_WITH:
            where_all_apply = [arg for other, value in APPLIES_WITH[name].items() for arg in (_flag(other), str(value))]
        image_flags, image_settings = IMAGES_FOR.get(name, ([], {}))
        args = cli.build_parser().parse_args(
            ["attack", "--out", str(tmp_path), *where_all_apply, *image_flags, *flag_value]
        )
        assert getattr(cli._trial_spec(args), name) == held, name
        # the column, of the declared type
        column = SCHEMA.field(name).type
        assert (
            column
            == {
                "int32": pa.int32(),
                "int64": pa.int64(),
                "float64": pa.float64(),
                "string": pa.string(),
                "bool": pa.bool_(),
                "list<int32>": pa.list_(pa.int32()),
            }[declared.arrow]
        ), name
        # the study key
        data = {"dataset": "faces", "images": 2}
        fixed = (
            dict(FEDERATED_FIXED)
            if federation(name)
            else {  # where all apply
                "fl": "fedavg",
                "restarts": 2,
                "trained_epochs": 1,
                **DEFENDED_FIXED,
                **image_settings,
            }
        )
        if name in APPLIES_WITH:
            fixed = {other: value for other, value in APPLIES_WITH[name].items() if other not in DATA_SECTION}
            fixed.update(image_settings)
            data.update({other: value for other, value in APPLIES_WITH[name].items() if other in DATA_SECTION})
        (data if name in DATA_SECTION else fixed)[name] = yaml_value
        path = _study(tmp_path, f"name: p\ndata: {json.dumps(data)}\nfixed: {json.dumps(fixed)}\n")
        trials = study.read_study(path).trials
        assert {getattr(t, name) for t in trials} == {held}, name


def test_a_wrong_value_of_any_parameter_exits_2_with_one_line_naming_it(capsys, tmp_path):
    for name, declared in parameters.parameters().items():
        for bad in _bad_values(name, declared):
            code, err = _exit_line(capsys, ["attack", "--out", str(tmp_path / "never"), *bad])
            assert code == 2, (name, bad)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert name in err or _flag(name) in err, (name, err)
    assert not (tmp_path / "never").exists()


def test_a_wrong_value_in_a_study_file_names_the_file_line_and_parameter(tmp_path):
    for name, declared in parameters.parameters().items():
        if name in DATA_SECTION:
            continue
        bad = {"bool": "maybe", "str": 3, "ints": "[0.5]", "int": 1.5, "float": "text"}[declared.kind]
        path = _study(tmp_path, f"name: p\ndata: {{dataset: faces, images: 1}}\nfixed:\n  {name}: {bad}\n")
        with pytest.raises(study.StudyError, match=rf"study.yaml:4: fixed\.{name}: "):
            study.read_study(path)


def test_dlg_trials_carry_only_the_settings_dlg_reads(tmp_path):
    path = _study(
        tmp_path,
        """
        name: dlg
        data: {dataset: faces, images: 1}
        fixed: {attack: dlg, iterations: 5}
        grid: {tv: [1.0e-4, 1.0e-3], restarts: [1, 2], lr: [0.1, 1.0]}
    """,
    )
    trials = study.read_study(path).trials
    assert len(trials) == 2 and sorted(t.lr for t in trials) == [0.1, 1.0]  # tv and restarts collapse
    columns = parameter_columns(trials[0])
    inverting_only = parameters.declarations(parameters.InvertingSettings)
    assert all(columns[name] is None for name in inverting_only)
    assert columns["iterations"] == 5 and columns["attack_seed"] == 0 and columns["lr"] is not None
    assert TrialSpec(attack="dlg", tv=1e-3).key_fields() == {"attack": "dlg"}
    assert TrialSpec(attack="dlg", optimizer="sgd", lr=0.5).key_fields() == {"attack": "dlg", "lr": 0.5}


def test_the_parameters_page_lists_every_parameter_as_declared():
    text = (REPO / "docs" / "parameters.md").read_text()
    assert parameters_page.page_block() in text, "regenerate it: python -m gradinv.parameters_page docs/parameters.md"
    for name in parameters.parameter_defaults():
        assert f"| `{name}` |" in text


def test_every_family_runs_through_the_registry(monkeypatch):
    knob = parameters.declarations(TrialSpec)["attack"]
    assert parameters_page.listed_values("attack", knob) == tuple(FAMILIES) == ("ig", "dlg", "analytic", "imprint")
    with pytest.raises(ConfigError, match=r"^attack: 'nope' is not valid; choose one of ig, dlg, analytic, imprint$"):
        TrialSpec(attack="nope")
    modules = {"ig": "inverting", "dlg": "dlg", "analytic": "analytic", "imprint": "imprint"}
    for name, family in FAMILIES.items():  # each runner imports its family's module when a trial runs
        monkeypatch.setattr(f"gradinv.attacks.{modules[name]}.run", lambda job, name=name: f"{name} ran {job}")
        assert family.run("job") == f"{name} ran job"


def test_the_knobs_read_the_family_traits_not_its_name(monkeypatch):
    from gradinv.attacks import registry

    assert {"prune_aware", "attack_seed"} <= TrialSpec(
        attack="analytic", model="mlp", keep_fraction=0.5
    ).not_applicable()
    mirroring = dataclasses.replace(FAMILIES["analytic"], mirrors_defences=True, seeded=True)
    monkeypatch.setitem(registry.FAMILIES, "analytic", mirroring)
    spec = TrialSpec(attack="analytic", model="mlp", keep_fraction=0.5, prune_aware=True, attack_seed=3)
    assert not {"prune_aware", "attack_seed"} & spec.not_applicable()
    kept = {"attack": "analytic", "model": "mlp", "keep_fraction": 0.5, "prune_aware": True, "attack_seed": 3}
    assert spec.key_fields() == kept
    assert "width" in TrialSpec(model="resnet18").not_applicable() and "width" not in TrialSpec().not_applicable()


def test_victim_sources_and_the_default_width_share_one_checkpoint():
    assert isinstance(victim_source(TrialSpec()), Untrained) and victim_source(TrialSpec()).recipe is None
    named = victim_source(TrialSpec(trained_epochs=2, width=default_width("convnet")))
    assert (
        isinstance(named, ZooCheckpoint) and named.recipe.key == victim_source(TrialSpec(trained_epochs=2)).recipe.key
    )
    assert named.row_columns({"test_accuracy": 0.5}) == {
        "checkpoint_key": named.recipe.key,
        "model_accuracy": 0.5,
        "training_epsilon": None,
    }


def test_a_client_update_passes_through_its_defences_in_order():
    model = build_model("mlp", channels=1, num_classes=2, image_size=4, seed=0)
    images, labels = torch.rand(1, 1, 4, 4), torch.tensor([1])
    plain = client_update(model, images, labels, ClientSettings())
    halve = lambda tensors: tuple(t / 2 for t in tensors)  # noqa: E731
    shift = lambda tensors: tuple(t + 1 for t in tensors)  # noqa: E731
    defended = client_update(model, images, labels, ClientSettings(), defences=(halve, shift))
    assert defended.defences == (halve, shift)
    assert all(torch.equal(d, p / 2 + 1) for d, p in zip(defended.tensors, plain.tensors))


# --------------------------------------------------------------------------------------------------
# A part declared here, in the test alone, reaches every derived place.


@dataclass(frozen=True, kw_only=True)
class ClipSettings(parameters.Part):
    clip: float = knob(
        0.0,
        kind="float",
        help="FedAvg: clip the update to this norm; 0: no clipping",
        search="log",
        check=lambda v: v >= 0,
        fix="use 0 (no clipping) or more",
        applies=lambda t: t.fl == "fedavg",
    )


@pytest.fixture
def with_clip(monkeypatch):
    monkeypatch.setattr(parameters, "PARTS", [*parameters.PARTS, ClipSettings])
    spec_class = trial.spec_class(parameters.PARTS)
    monkeypatch.setattr(trial, "TrialSpec", spec_class)
    return spec_class


def test_a_new_part_reaches_flags_schema_study_applicability_lanes_and_tune(with_clip, capsys, tmp_path):
    Spec = with_clip
    args = cli.build_parser().parse_args(["attack", "--out", str(tmp_path), "--fl", "fedavg", "--clip", "0.5"])
    assert cli._trial_spec(args) == Spec(fl="fedavg", clip=0.5)
    code, err = _exit_line(capsys, ["attack", "--out", str(tmp_path / "never"), "--clip", "-1"])
    assert code == 2 and err.strip().splitlines() == [
        "gradinv attack: error: clip: -1.0 is not valid; use 0 (no clipping) or more"
    ]
    assert parameter_types()["clip"] == pa.float64()
    checker = study_checks.Checker(Path("s.yaml"), {("fixed", "clip"): 3})
    assert study_checks.coerce(checker, "clip", 1, ("fixed", "clip")) == 1.0
    with pytest.raises(study.StudyError, match=r"s.yaml:3: fixed.clip: expected a number"):
        study_checks.coerce(checker, "clip", "x", ("fixed", "clip"))
    assert "clip" in Spec(clip=0.5).not_applicable() and "clip" not in Spec(fl="fedavg", clip=0.5).not_applicable()
    assert Spec(clip=0.5).key_fields() == {} and Spec(fl="fedavg", clip=0.5).key_fields() == {
        "fl": "fedavg",
        "clip": 0.5,
    }
    assert lane_signature(Spec(fl="fedavg", clip=0.5)) != lane_signature(Spec(fl="fedavg", clip=1.0))
    log_uniform, _ = parameters.search_space()
    assert "clip" in log_uniform and parameters.paper_defaults()["clip"] == 0.0
    assert "| `clip` |" in parameters_page.markdown_table()


def test_the_new_part_validates_like_any_other(with_clip):
    with pytest.raises(ConfigError, match="clip: nan is not valid; use 0"):
        with_clip(clip=math.nan)
