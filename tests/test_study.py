"""Study files: expansion, keys, the dry run, and one-line errors for a corpus of mistakes."""

import dataclasses
import re
from pathlib import Path

import pytest

from gradinv.data import dataset_spec
from gradinv.results.schema import trial_key
from gradinv.trial import TrialSpec
from sweep.cli.main import main
from sweep.study import StudyError, load_study

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


AGGREGATED = """
name: aggregated
data: {dataset: faces, images: 6, image_size: 8}
fixed: {model: convnet, width: 4, iterations: 5}
grid: {images_per_client: [1, 2]}
zip: {aggregated_clients: [1, 3]}
"""


def test_a_trial_deals_images_per_client_to_each_of_its_clients(write_study):
    study = load_study(write_study(AGGREGATED))
    by_size = {}
    for trial in study.trials:
        by_size.setdefault((trial.images_per_client, trial.aggregated_clients), []).append(trial.images)
    assert by_size[(1, 1)] == [(n,) for n in range(6)]
    assert by_size[(2, 1)] == [(0, 1), (2, 3), (4, 5)]
    assert by_size[(1, 3)] == [(0, 1, 2), (3, 4, 5)]  # three clients of one image each
    assert by_size[(2, 3)] == [(0, 1, 2, 3, 4, 5)]
    assert study.points == len(study.trials) == 6 + 3 + 2 + 1  # counted from the axes as expanded


@pytest.mark.parametrize(
    "axes, expected",
    [
        (
            "grid: {images_per_client: [2]}\nzip: {aggregated_clients: [1, 4]}",
            "grid.images_per_client: 2 x 4 clients = 8: use 1 to 1 images per client (the study has 6 images)",
        ),
        ("fixed: {aggregated_clients: 7}", "fixed.images_per_client: 1 x 7 clients = 7: the study has 6 images, fewer"),
        ("zip: {aggregated_clients: [0, 1]}", "zip.aggregated_clients: 0: use 1 (no aggregation) or more clients"),
    ],
)
def test_trials_larger_than_the_study_are_refused_naming_the_setting(write_study, axes, expected):
    with pytest.raises(StudyError, match=re.escape(expected)):
        load_study(write_study("name: x\ndata: {dataset: faces, images: 6}\n" + axes + "\n"))


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
    ("name: x\ndata: {dataset: faces, images: 300}\n", ":2: data.images: 300: faces has 50 test images"),
    ("name: x\ndata: {dataset: faces}\nresources: {num_gpus: -1}\n", ":3: resources.num_gpus: must be at least 0"),
    ("name: x\ndata: {dataset: faces}\nresources: {num_cpus: 0}\n", ":3: resources.num_cpus: must be greater than 0"),
    ("name: x\ndata: {dataset: faces}\nmax_retries: 1.5\n", ":3: max_retries: expected a whole number"),
    ("name: x\ndata: {dataset: faces}\ntimeout: 0\n", ":3: timeout: must be greater than 0"),
    ("name: 'bad name!'\ndata: {dataset: faces}\n", ":1: name:"),
    ("name: x\ndata: {dataset: faces}\nfixed: {tv: 0.1}\ngrid: {tv: [0.1, 0.2]}\n", ":4: grid.tv: is also in 'fixed'"),
    ("name: x\ndata: {dataset: faces, images: 2}\nfixed: {images_per_client: 3}\n", ":3: fixed.images_per_client"),
    ("name: x\ndata: {dataset: faces}\nfixed: {tv: .nan}\n", ":3: fixed.tv: expected a finite number"),
    ("name: !!python/object/apply:os.system ['touch PWNED']\ndata: {dataset: faces}\n", ":1: yaml:"),
    ("name: x\ndata: {dataset: !!python/name:os.system }\n", ":2: yaml: tag"),
    ("name: x\ndata: {dataset: faces}\nfixed: {iterations: !!int many}\n", ":3: fixed.iterations: 'many' cannot be"),
    ("name: x\ndata: {dataset: faces}\nfixed: {[width]: 8}\n", ":3: fixed: a key must be plain text"),
    (f"name: {'n' * 300}\ndata: {{dataset: faces}}\n", ":1: name:"),  # the default results directory
    ("name: x\ndata: {dataset: faces}\nfixed: {width: 8, width: 16}\n", ":3: fixed.width: set twice"),
    ("name: x\ndata: {dataset: faces, images: []}\n", ":2: data.images: expected a count or a non-empty list"),
    ("name: x\ndata: {dataset: faces}\ntune: " + "[" * 1500 + "]" * 1500 + "\n", "yaml: nested too deeply"),
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


# ---------------------------------------------------------------------------------------------
# Hostile or oversized study files: one line each, refused before anything large is built


def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and not captured.out, err
    return err[0]


@pytest.mark.parametrize("content", [GOOD.encode("utf-16"), b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"])
def test_study_that_is_not_utf8_text_is_one_line(tmp_path, capsys, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "binary.yaml"
    path.write_bytes(content)
    line = _one_line_exit_2(["run", str(path)], capsys)
    assert f"{path}: file:" in line and "UTF-8" in line, line
    assert not (tmp_path / "results").exists()


def _alias_bomb(levels: int) -> str:
    """Each level lists the previous one ten times: 10**levels leaves from a few hundred bytes."""
    lines = ["name: bomb", "data: {dataset: faces}", "tune:", "  l0: &l0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_expands(write_study):
    with pytest.raises(StudyError, match=r"study\.yaml:7: tune\.l3\.\d: aliases expand to more than 10000 values"):
        load_study(write_study(_alias_bomb(9)))  # a billion values if expanded


def test_aliases_within_the_bound_still_work(write_study):
    study = load_study(
        write_study("""
        name: reuse
        data: {dataset: faces, images: 2}
        fixed: {iterations: 5}
        grid: {attack_seed: &seeds [0, 1]}
        zip: {data_order_seed: *seeds, model_seed: *seeds}
        """)
    )
    assert {(t.attack_seed, t.model_seed) for t in study.trials} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_recursive_alias_is_one_line(write_study):
    with pytest.raises(StudyError, match=r"study\.yaml:4: tune\.loop\.1: .*refers to itself"):
        load_study(write_study("name: x\ndata: {dataset: faces}\ntune:\n  loop: &loop [1, *loop]\n"))


HUGE_GRID = """
name: huge
data: {dataset: faces, images: 10}
fixed: {iterations: 5}
grid:
  attack_seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  model_seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  data_order_seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  restarts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
  tv: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
  lr: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
"""  # 10**6 grid points x 10 one-image clients


def test_dry_run_of_a_huge_grid_counts_without_expanding(write_study, capsys):
    assert main(["run", str(write_study(HUGE_GRID)), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "10000000 trials before collapsing, above the cap of 1000000; not expanded (--max-trials N)"
    assert any("axis lr: [0.1, 0.2" in line for line in out)


def test_run_refuses_a_huge_grid_naming_the_override(write_study, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _one_line_exit_2(["run", str(write_study(HUGE_GRID))], capsys)
    assert "grid: 10000000 trials exceed the cap of 1000000" in line and "--max-trials 10000000" in line, line
    assert not (tmp_path / "results").exists()


def test_max_trials_sets_the_cap(write_study, capsys):
    path = str(write_study(GOOD))  # 48 grid points x clients, 36 distinct trials
    assert load_study(path, max_trials=48).points == 48
    line = _one_line_exit_2(["run", path, "--max-trials", "47"], capsys)
    assert "grid: 48 trials exceed the cap of 47" in line and "--max-trials 48" in line, line
    assert main(["run", path, "--dry-run", "--max-trials", "47"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("48 trials before collapsing, above the cap")
    assert "--max-trials: 0" in _one_line_exit_2(["run", path, "--dry-run", "--max-trials", "0"], capsys)


def test_image_count_is_checked_against_the_test_split_before_building(write_study):
    faces = dataset_spec("faces").test_images  # the smaller split of the two
    message = f":1: data.images: 1000000000: faces has {faces} test images; use 1 to {faces}"
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(write_study("data: {dataset: [mnist, faces], images: 1000000000}\nname: x\n"))


@pytest.mark.parametrize(
    "text, lines",
    [
        (
            "name: x\ndata: {dataset: faces}\nfixed: {width: 8, width: 16}\n",
            ":3: fixed.width: set twice (lines 3 and 3)",
        ),
        ("name: x\ndata: {dataset: faces}\nname: y\n", ":3: name: set twice (lines 1 and 3)"),
        ("name: x\ndata:\n  dataset: faces\n  images: 2\n  images: 3\n", ":5: data.images: set twice (lines 4 and 5)"),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(write_study, text, lines):
    with pytest.raises(StudyError, match=re.escape(lines)):
        load_study(write_study(text))


INT32 = "-2147483648 to 2147483647"
INT64 = "-9223372036854775808 to 9223372036854775807"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("fixed: {attack_seed: 9223372036854775808}", f"fixed.attack_seed: {2**63} is out of range; use {INT64}"),
        ("fixed: {model_seed: -9223372036854775809}", f"fixed.model_seed: {-(2**63) - 1} is out of range; use {INT64}"),
        ("fixed: {iterations: 2147483648}", f"fixed.iterations: 2147483648 is out of range; use {INT32}"),
        ("grid: {width: [8, 2147483648]}", f"grid.width: 2147483648 is out of range; use {INT32}"),
        ("zip: {images_per_client: [4294967296]}", f"zip.images_per_client: 4294967296 is out of range; use {INT32}"),
        ("fixed: {layers: [0, 2147483648]}", f"fixed.layers: 2147483648 is out of range; use {INT32}"),
        ("max_retries: 2147483647", "max_retries: 2147483647 is out of range; use 0 to 2147483646"),
        ("lanes: 2147483648", "lanes: 2147483648 is out of range; use 1 to 2147483647"),
    ],
)
def test_integers_must_fit_their_results_column(write_study, setting, message):
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(write_study(f"name: x\ndata: {{dataset: faces, images: 2}}\n{setting}\n"))


def test_image_index_must_fit_the_test_split(write_study):
    last = dataset_spec("faces").test_images - 1
    with pytest.raises(StudyError, match=re.escape(f"data.images.1: 4294967296: use 0 to {last} for faces")):
        load_study(write_study("name: x\ndata: {dataset: faces, images: [0, 4294967296]}\n"))


def test_long_name_is_refused(write_study):
    with pytest.raises(StudyError, match=r":1: name: 'a{100}\.\.\.' is 300 characters; use at most 100"):
        load_study(write_study(f"name: {'a' * 300}\ndata: {{dataset: faces}}\n"))


@pytest.mark.parametrize(
    "flag, value",
    [("--batch-seconds", "nan"), ("--batch-seconds", "inf"), ("--batch-seconds", "0"), ("--batch-rows", "0")],
)
def test_batch_flags_must_be_finite_and_positive(write_study, tmp_path, capsys, monkeypatch, flag, value):
    import sweep.runner

    monkeypatch.setattr(sweep.runner, "run_study", lambda *args, **kwargs: pytest.fail("the study ran"))
    line = _one_line_exit_2(["run", str(write_study(GOOD)), "--results", str(tmp_path / "r"), flag, value], capsys)
    assert line.startswith(f"gradinv run: error: {flag}: {value}") and "positive" in line, line


def test_oversized_file_is_refused_unread(write_study):
    from sweep.study_yaml import MAX_FILE_BYTES

    with pytest.raises(StudyError, match=r"study\.yaml: file: larger than \d+ bytes"):
        load_study(write_study("name: x\ndata: {dataset: faces}\n" + "#" * MAX_FILE_BYTES))


def test_paper_cifar10_dry_run_lists_trained_and_untrained_without_the_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADINV_DATA", str(tmp_path / "no-data-here"))  # CIFAR-10 is not needed to count
    study = Path(__file__).resolve().parent.parent / "studies" / "paper-cifar10.yaml"
    assert main(["run", str(study), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    axes = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in out if line.startswith("  axis ")}
    assert axes == {
        "axis trained_epochs": "[0, 30]",
        "axis fl": "['fedsgd', 'fedavg']",
        "axis local_steps": "[1, 5]",
        "axis images_per_client": "[1]",
    }
    # 100 images x 2 model states x (FedSGD once + FedAvg at 1 and 5 local steps)
    assert out[-1] == "600 trials" and not (tmp_path / "r").exists()
