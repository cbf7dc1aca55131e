"""Every list of knobs is derived from their declarations (gradinv.parameters): a knob and a defence declared
here, in the test alone, reach the flags of `attack`, `zoo train` and `federation train`, the results schema,
the privacy section's defence columns and the zoo and federation keys, with no other edit."""

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pytest

from analysis import privacy_table
from gradinv import federation as fed
from gradinv import parameters, trial
from gradinv.parameters import FEDERATION, ZOO, knob
from gradinv.results import schema
from sweep.cli import federation as federation_cli
from sweep.cli import main as cli

TINY_FEDERATION = dict(
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
TINY_FEDERATION_KEY = "convnet-fashion-mnist-iid-c4-a7f1b8e40ca7"  # tests/test_federation.py pins it too


@dataclass(frozen=True, kw_only=True)
class DropoutSettings(parameters.Part):
    fed_dropout: float = knob(
        0.0,
        kind="float",
        recipes=(FEDERATION,),
        applies=parameters.federated,
        check=lambda v: 0 <= v < 1,
        fix="use a fraction from 0 to below 1",
        help="test only: the chance that a drawn client drops out of a round",
    )


@dataclass(frozen=True, kw_only=True)
class BlurSettings(parameters.Part):
    blur: float = knob(
        0.0,
        kind="float",
        defence=True,
        recipes=(ZOO,),
        check=lambda v: v >= 0,
        fix="use 0 or more",
        help="test only: blur the update with a Gaussian of this width; 0: none",
    )
    blur_seed: int = knob(
        0, kind="int", repetition=True, applies=lambda t: t.blur > 0, help="test only: seeds the blur's jitter"
    )


@pytest.fixture
def with_test_knobs(monkeypatch):
    monkeypatch.setattr(parameters, "PARTS", [*parameters.PARTS, DropoutSettings, BlurSettings])
    spec_class = trial.spec_class(parameters.PARTS)
    monkeypatch.setattr(trial, "TrialSpec", spec_class)
    monkeypatch.setattr(fed, "Federation", fed.recipe_class(parameters.PARTS))
    return spec_class


def test_the_new_knobs_are_attack_flags(with_test_knobs, tmp_path):
    Spec = with_test_knobs
    args = cli.build_parser().parse_args(
        ["attack", "--out", str(tmp_path), "--round", "1", "--fed-dropout", "0.25", "--blur", "0.5", "--blur-seed", "3"]
    )
    assert cli._trial_spec(args) == Spec(round=1, fed_dropout=0.25, blur=0.5, blur_seed=3)


def test_the_new_knobs_are_schema_columns_and_the_seed_a_repetition(with_test_knobs):
    types = schema.parameter_types()
    assert (types["fed_dropout"], types["blur"], types["blur_seed"]) == (pa.float64(), pa.float64(), pa.int32())
    assert schema.repetition_columns() == (*schema.REPETITION, "blur_seed")


def test_the_new_defence_is_a_defence_column_not_a_setting_of_the_privacy_table(with_test_knobs):
    assert "blur" in privacy_table.defence_columns() and "fed_dropout" not in privacy_table.defence_columns()
    runs = pd.DataFrame(
        [
            {
                "status": "ok",
                "dataset": "faces",
                "trained_epochs": 0,
                "train_subset": None,
                "psnr": 10.0,
                "blur": blur,
                "fed_dropout": 0.25,
            }
            for blur in (0.0, 0.5)
        ]
    )
    labelled = privacy_table.labelled(runs, by=["blur", "fed_dropout"])
    assert list(labelled["setting"]) == ["fed_dropout 0.25", "fed_dropout 0.25"]  # both rows compared in one setting


def test_the_new_defence_turns_a_victim_defended_and_keys_its_checkpoint(with_test_knobs):
    Spec = with_test_knobs
    assert parameters.defended(Spec(blur=0.5)) and not parameters.defended(Spec())
    plain = Spec(dataset="faces", trained_epochs=1).recipe()
    assert Spec(dataset="faces", trained_epochs=1, blur=0.5).recipe().key == plain.key  # not trained under it
    blurred = Spec(dataset="faces", trained_epochs=1, blur=0.5, defended_training=True).recipe()
    assert blurred.defence == (("blur", 0.5),) and blurred.key != plain.key


def test_zoo_train_takes_the_new_defence_and_its_rebuild_command_gives_the_same_key(with_test_knobs):
    parser = cli.build_parser()
    args = parser.parse_args(["zoo", "train", "--dataset", "faces", "--trained-epochs", "1", "--blur", "0.5"])
    recipe = cli._zoo_victim(args).recipe()
    assert recipe.defence == (("blur", 0.5),) and "--blur 0.5" in recipe.train_command()
    again = parser.parse_args(recipe.train_command().split()[1:])
    assert cli._zoo_victim(again).recipe().key == recipe.key
    with pytest.raises(SystemExit):  # a federation knob is no ingredient of a checkpoint
        parser.parse_args(["zoo", "train", "--trained-epochs", "1", "--fed-dropout", "0.25"])


def test_the_new_federation_knob_is_a_recipe_field_keyed_only_off_its_default(with_test_knobs):
    Spec = with_test_knobs
    assert fed.Federation(**TINY_FEDERATION).key == TINY_FEDERATION_KEY  # an existing federation keeps its key
    dropping = fed.Federation(**TINY_FEDERATION, fed_dropout=0.25)
    assert dropping.fed_dropout == 0.25 and dropping.key != TINY_FEDERATION_KEY
    assert fed.Federation.of_trial(Spec(round=1, fed_dropout=0.25)).fed_dropout == 0.25
    assert not hasattr(fed.Federation.of_trial(Spec(round=1)), "blur")  # a defence is no part of a federation
    args = federation_cli._parser().parse_args(["train", "--fed-dropout", "0.25", "--dataset", "faces"])
    assert (args.fed_dropout, args.dataset, args.fed_clients) == (0.25, "faces", 10)


# ------------------------------------------------------------------------------------------------
# The derived lists are the hand lists they replaced


def test_the_derived_lists_hold_what_the_hand_lists_held():
    declared = parameters.parameters()
    assert schema.REPETITION == ("images", "model_seed", "data_order_seed", "attack_seed", "attacked_client")
    assert set(privacy_table.defence_columns()) == {
        "clip_update",
        "noise_std",
        "keep_fraction",
        "prune_scope",
        "quant_bits",
        "quant_rounding",
        "defence_seed",
        "prune_aware",
        "clip_aware",
        "dp_delta",
        "dp_clip",
        "dp_noise",
        "dp_sample_rate",
        "dp_aware",
        "aggregated_clients",
        "defended_training",
    }
    assert set(parameters.training_defences(parameters.DefenceSettings)) == {
        "dp_clip",
        "dp_noise",
        "dp_delta",
        "clip_update",
        "noise_std",
        "keep_fraction",
        "prune_scope",
        "quant_bits",
        "quant_rounding",
        "defence_seed",
    }
    assert set(parameters.checkpoint_identity()) == {
        "dataset",
        "model",
        "width",
        "norm",
        "image_size",
        "model_seed",
        "trained_epochs",
        "train_subset",
    }
    assert [name for name, _ in parameters.defence_switches(tuple(parameters.PARTS))] == [
        "dp_clip",
        "clip_update",
        "noise_std",
        "keep_fraction",
        "quant_bits",
    ]
    assert [name for name in declared if FEDERATION in declared[name].recipes] == [
        "dataset",
        "image_size",
        "model",
        "width",
        "norm",
        "model_seed",
        "train_subset",
        "fed_rounds",
        "fed_clients",
        "partition",
        "alpha",
        "min_partition_size",
        "clients_per_round",
        "fed_epochs",
        "fed_batch_size",
        "fed_lr",
        "fed_momentum",
    ]
