"""Value bounds and cross-field rules: one declaration serves study files and `gradinv attack` flags,
and every rule a trial's victim puts on its settings is checked before anything starts (Ray, the
results directory)."""

import os

import pytest
from cli_refusals import assert_attack_refuses

from gradinv import federation as fed
from gradinv import parameters, partition
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec
from sweep.cli.main import main

SEED_FIX = "use a seed of 0 or more (the federation and DP-SGD draw from numpy seed sequences, which take no sign)"
QUANT_FIX = (
    "use 1 to 32 bits (finer levels than a float32 update's 24-bit precision change nothing), or leave it "
    "out for no quantisation"
)
DELTA_FIX = (
    "use a delta from 1e-12 to below 1 (1e-5 is usual): a smaller chance of failure than 1e-12 protects "
    "nothing more and only inflates epsilon"
)
SAMPLE_FIX = (
    "use 20 or more training images: the bins span the sample's brightness, and with n images 2/(n+1) of "
    "the client's images fall outside them and are lost"
)
DP_NORM_FIX = (
    "DP-SGD training needs norm: group (BatchNorm mixes the examples of a batch); compare it with plain "
    "norm: group victims"
)
FACES_ROUND = ["--dataset", "faces", "--round", "0"]
IMPRINT = ["--attack", "imprint", "--threat-model", "malicious"]


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["--iterations", "2147483648"],
            "iterations: 2147483648 is not valid; use at most 2147483647, what its int32 column holds",
        ),
        (
            ["--attack-seed", "99999999999999999999"],
            "attack_seed: 99999999999999999999 is not valid; "
            "use at most 9223372036854775807, what its int64 column holds",
        ),
        (["--model-seed", "-1"], f"model_seed: -1 is not valid; {SEED_FIX}"),
        (["--noise-std", "0.1", "--defence-seed", "-1"], f"defence_seed: -1 is not valid; {SEED_FIX}"),
        (["--lr", "inf"], "lr: inf is not valid; use a finite number"),
        (["--tv", "inf"], "tv: inf is not valid; use a finite number"),
        (["--bn-prior", "inf"], "bn_prior: inf is not valid; use a finite number"),
        (["--fl", "fedavg", "--local-lr", "inf"], "local_lr: inf is not valid; use a finite number"),
        (["--restarts", "2", "--group-consistency", "inf"], "group_consistency: inf is not valid; use a finite number"),
        (["--quant-bits", "1100"], f"quant_bits: 1100 is not valid; {QUANT_FIX}"),
        (["--quant-bits", "2147483647"], f"quant_bits: 2147483647 is not valid; {QUANT_FIX}"),
        (
            ["--clip-update", "1", "--noise-std", "0.1", "--dp-delta", "1e-320"],
            f"dp_delta: 1e-320 is not valid; {DELTA_FIX}",
        ),
        ([*IMPRINT, "--dataset", "faces", "--imprint-sample", "2"], f"imprint_sample: 2 is not valid; {SAMPLE_FIX}"),
        (
            [*FACES_ROUND, "--fed-clients", "100000"],
            "fed_clients: 100000 is not valid; use at most 150 clients (the 150 training images of faces)",
        ),
        (
            [*FACES_ROUND, "--fed-clients", "4", "--clients-per-round", "5"],
            "clients_per_round: 5 is not valid; use 1 to 4 (the federation's clients)",
        ),
        (
            [*FACES_ROUND, "--fed-clients", "4", "--train-subset", "3"],
            "fed_clients: 4 is not valid; use at most 3 clients (the train_subset's 3 images)",
        ),
        (
            [*FACES_ROUND, "--fed-clients", "10", "--partition", "dirichlet", "--min-partition-size", "16"],
            "min_partition_size: 16 is not valid; no partition gives each of 10 clients "
            "that many of the 150 training images of faces; use 0 to 15, or fewer clients",
        ),
        (
            [*FACES_ROUND, "--fed-clients", "10", "--image", "15"],
            "images: 15 is not valid; client 0 holds 15 images; use positions 0 to 14",
        ),
        (
            [*FACES_ROUND, "--fed-clients", "10", "--partition", "dirichlet", "--image", "60"],
            "images: 60 is not valid; client 0 holds at most 60 images; use positions 0 to 59",
        ),
        (
            ["--dataset", "faces", "--trained-epochs", "1", "--dp-clip", "1", "--defended-training"],
            f"norm: 'batch' is not valid; {DP_NORM_FIX}",
        ),
    ],
)
def test_a_bad_value_or_combination_of_flags_is_refused_before_the_attack(argv, line, tmp_path, capsys):
    assert_attack_refuses(argv, line, tmp_path, capsys)


def _flag(name: str) -> str:
    return f"--{(parameters.parameters()[name].repeat_flag or name).replace('_', '-')}"


@pytest.mark.parametrize(
    "name", [name for name, knob in parameters.parameters().items() if knob.kind in ("int", "float", "ints")]
)
def test_every_number_flag_refuses_what_its_column_cannot_hold(name, tmp_path, capsys):
    declared = parameters.parameters()[name]
    value = "inf" if declared.kind == "float" else str(declared.integer_range()[1] + 1)
    try:
        code = main(["attack", "--out", str(tmp_path / "never"), _flag(name), value])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"error: {name}: " in err[0], err
    assert not (tmp_path / "never").exists()


def test_the_study_loader_and_the_flags_share_one_range_per_knob():
    from sweep.study_checks import column_range

    for name, declared in parameters.parameters().items():
        if declared.kind in ("int", "ints"):
            assert column_range(name) == declared.integer_range(), name
    assert parameters.parameters()["attack_seed"].integer_range() == (-(2**63), 2**63 - 1)
    assert parameters.parameters()["iterations"].integer_range() == (-(2**31), 2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Study files: one line with the file and line, exit 2, no results directory, nothing started

HEAD = "name: x\ndata: {dataset: faces, images: 3, image_size: 8}\n"


@pytest.mark.parametrize(
    "setting, where, message",
    [
        (
            "fixed: {round: 0, fed_clients: 4, clients_per_round: 5}",
            "3: fixed.clients_per_round",
            "5: use 1 to 4 (the federation's clients)",
        ),
        (
            "fixed: {round: 0, fed_clients: 4, train_subset: 3}",
            "3: fixed.fed_clients",
            "4: use at most 3 clients (the train_subset's 3 images)",
        ),
        (
            "fixed: {trained_epochs: 1, dp_clip: 1.0, defended_training: true}",
            "3: fixed.norm",
            f"'batch': {DP_NORM_FIX}",
        ),
        (
            "grid: {norm: [batch], trained_epochs: [1], dp_clip: [1.0], defended_training: [true]}",
            "3: grid.norm",
            f"'batch': {DP_NORM_FIX}",
        ),
        (
            "fixed: {round: 0, fed_clients: 151}",
            "3: fixed.fed_clients",
            "151: use at most 150 clients (the 150 training images of faces)",
        ),
        (
            "fixed: {round: 0, fed_clients: 10, partition: dirichlet, min_partition_size: 16}",
            "3: fixed.min_partition_size",
            "16: no partition gives each of 10 clients that many of the 150 training images of faces; "
            "use 0 to 15, or fewer clients",
        ),
        (
            "fixed: {round: 0, fed_clients: 10, train_subset: 20}",
            "2: data.images",
            "2: client 0 holds 2 images; use positions 0 to 1",
        ),
        (
            "resources: {num_cpus: 1.0e-9}",
            "3: resources.num_cpus",
            "1e-09: Ray counts resources in steps of 0.0001; use a multiple of 0.0001",
        ),
        (
            "resources: {num_cpus: 0.00015}",
            "3: resources.num_cpus",
            "0.00015: Ray counts resources in steps of 0.0001; use a multiple of 0.0001",
        ),
        (
            "resources: {num_gpus: 0.00001}",
            "3: resources.num_gpus",
            "1e-05: Ray counts resources in steps of 0.0001; use a multiple of 0.0001",
        ),
        ("grid: {quant_bits: [4, 1100]}", "3: grid.quant_bits", f"1100: {QUANT_FIX}"),
        ("fixed: {quant_bits: 2147483647}", "3: fixed.quant_bits", f"2147483647: {QUANT_FIX}"),
        ("fixed: {clip_update: 1.0, noise_std: 0.1, dp_delta: 1.0e-320}", "3: fixed.dp_delta", f"1e-320: {DELTA_FIX}"),
        (
            "fixed: {attack: imprint, threat_model: malicious, imprint_sample: 2}",
            "3: fixed.imprint_sample",
            f"2: {SAMPLE_FIX}",
        ),
        ("fixed: {model_seed: -1}", "3: fixed.model_seed", f"-1: {SEED_FIX}"),
        ("fixed: {lr: .inf}", "3: fixed.lr", "expected a finite number, got inf"),
    ],
)
def test_a_study_breaking_a_rule_is_one_line_and_nothing_starts(
    setting, where, message, write_study, tmp_path, capsys, monkeypatch
):
    import sweep.runner

    monkeypatch.setattr(sweep.runner, "run_study", lambda *args, **kwargs: pytest.fail("the study started"))
    path, results = write_study(HEAD + setting + "\n"), tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"gradinv run: error: {path}:{where}: {message}"] and not captured.out
    assert not results.exists()


def test_a_study_file_that_is_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    path, results = tmp_path / "study.yaml", tmp_path / "results"
    os.mkfifo(path)  # nothing ever writes to it: opening it for reading the usual way would wait forever
    assert main(["run", str(path), "--results", str(results)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gradinv run: error: {path}: file: not a regular file; give the path of a YAML file"
    ]
    assert not results.exists()


@pytest.mark.parametrize("resources", ["{num_cpus: 0.3, num_gpus: 0.0001}", "{num_cpus: 64, num_gpus: 0.25}"])
def test_resources_in_whole_ten_thousandths_are_accepted(resources, write_study):
    from sweep.study import load_study

    study = load_study(write_study(HEAD + f"resources: {resources}\n"))
    assert (study.resources.num_cpus, study.resources.num_gpus) in ((0.3, 0.0001), (64.0, 0.25))


# --------------------------------------------------------------------------------------------------
# The federation rules agree with what a federation does


@pytest.mark.parametrize("clients, subset", [(7, None), (10, 20), (4, 1000)])
def test_each_iid_share_checked_up_front_is_the_share_the_partition_deals(clients, subset):
    recipe = fed.Federation(dataset="faces", fed_clients=clients, train_subset=subset)
    parts = partition.iid_partition(recipe.training_images, clients, recipe.model_seed)
    assert recipe.training_images == min(subset or 150, 150)
    assert [recipe.share_size(c) for c in range(clients)] == [(len(part), len(part)) for part in parts]


def test_the_largest_min_partition_size_any_partition_meets_is_accepted():
    TrialSpec(dataset="faces", round=0, fed_clients=10, partition="dirichlet", min_partition_size=15)
    with pytest.raises(ConfigError, match="min_partition_size: 16 is not valid"):
        TrialSpec(dataset="faces", round=0, fed_clients=10, partition="dirichlet", min_partition_size=16)


def test_a_federation_without_train_subset_trains_on_every_training_image():
    images, labels = fed.training_data(fed.Federation(dataset="faces", fed_clients=2))
    assert images.shape[0] == labels.shape[0] == 150


def test_the_last_position_of_the_attacked_clients_share_is_accepted():
    assert TrialSpec(dataset="faces", round=0, fed_clients=10, images=(14,)).images == (14,)  # client 0 holds 15
