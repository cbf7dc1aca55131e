"""`--set KEY=VALUE`: a study changed on the command line as if its file said so, every check applied,
a bad override one line naming the flag, its value and the fix."""

import pandas as pd
import pytest

from gradinv.results.schema import trial_key
from gradinv.trial import DEFAULTS
from sweep.cli.main import main
from sweep.study import StudyError, load_study
from sweep.tune.section import tune_searches

STUDY = """
name: tiny
data: {dataset: faces, images: 4, image_size: 8}
fixed: {model: convnet, width: 4, iterations: 5}
grid:
  fl: [fedsgd, fedavg]
zip:
  tv: [1.0e-4, 1.0e-2]
  attack_seed: [0, 1]
resources: {num_cpus: 1}
tune:
  per: [fl, tv, attack_seed]
  candidates: 2
  tuning_images: 2
  held_out_images: 2
  families: {dlg: {lr: [0.1, 1.0]}}
"""
# 4 one-image clients x 2 fl x 2 zip rows
TRIALS = 16


def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and not captured.out, err
    return err[0]


def _dry_run(argv: list[str], capsys) -> list[str]:
    assert main(["run", *argv, "--dry-run"]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_an_override_changes_every_trial(write_study):
    path = write_study(STUDY)
    assert {t.iterations for t in load_study(path).trials} == {5}
    study = load_study(path, overrides=["fixed.iterations=7"])
    assert len(study.trials) == TRIALS and {t.iterations for t in study.trials} == {7}
    assert study.overrides == ("fixed.iterations=7",)
    assert study.fixed["iterations"] == 7


def test_the_trials_are_those_of_the_file_edited_alike(write_study):
    """What a run records (the trial keys, every resolved setting) is the effective study's."""
    edited = write_study(STUDY.replace("iterations: 5", "iterations: 9").replace("images: 4", "images: 2"), "b.yaml")
    overridden = load_study(write_study(STUDY), overrides=["fixed.iterations=9", "data.images=2"])
    assert [trial_key(t) for t in overridden.trials] == [trial_key(t) for t in load_study(edited).trials]


def test_data_images_changes_the_trial_count(write_study, capsys):
    path = str(write_study(STUDY))
    assert _dry_run([path], capsys)[-1] == f"{TRIALS} trials"
    out = _dry_run([path, "--set", "data.images=2"], capsys)
    assert out[-1] == f"{TRIALS // 2} trials"
    assert "  images: 2 distinct test images" in out


def test_a_list_value_makes_an_axis_and_the_dry_run_shows_the_effective_study(write_study, capsys):
    path = str(write_study(STUDY))
    out = _dry_run([path, "--set", "grid.width=[4,8]", "--set=resources.num_cpus=2", "--set", "timeout=30"], capsys)
    assert out[:4] == [
        f"study tiny ({path})",
        "  --set grid.width=[4,8]",
        "  --set resources.num_cpus=2",
        "  --set timeout=30",
    ]
    assert "  axis width: [4, 8]" in out
    assert "  resources per trial: 2 CPU, 0 GPU; max_retries 3; timeout 30.0" in out
    assert out[-1] == f"{TRIALS * 2} trials"
    # the file fixed width 4: sweeping it moves it out of fixed
    study = load_study(path, overrides=["grid.width=[4,8]"])
    assert {t.width for t in study.trials} == {4, 8} and "width" not in study.fixed


def test_fixing_an_axis_removes_it(write_study, capsys):
    path = str(write_study(STUDY))
    study = load_study(path, overrides=["fixed.fl=fedavg", "fixed.local_steps=3"])
    assert {(t.fl, t.local_steps) for t in study.trials} == {("fedavg", 3)}
    assert len(study.trials) == TRIALS // 2
    out = _dry_run([path, "--set", "fixed.fl=fedavg"], capsys)
    assert not any("axis fl" in line for line in out)


def test_every_part_of_a_study_can_be_set(write_study):
    study = load_study(
        write_study(STUDY),
        overrides=[
            "name=renamed",
            "data.dataset=fashion-mnist",
            "zip.tv=[0.1, 0.2, 0.3]",
            "zip.attack_seed=[3, 4, 5]",
            "resources={num_cpus: 0.5, num_gpus: 0}",
            "max_retries=0",
            "lanes=2",
            "tune.candidates=3",
        ],
    )
    assert study.name == "renamed"  # the default results directory and every row's `study`
    assert {t.dataset for t in study.trials} == {"fashion-mnist"}
    assert {(t.tv, t.attack_seed) for t in study.trials} == {(0.1, 3), (0.2, 4), (0.3, 5)}
    assert study.resources.num_cpus == 0.5 and study.max_retries == 0 and study.lanes == 2
    searches = tune_searches(study)  # one per fl and zip row
    assert [s.candidates for s in searches] == [3] * 6 and {tuple(s.families) for s in searches} == {("dlg",)}


def test_a_later_override_wins_and_a_mapping_replaces_the_section(write_study):
    path = write_study(STUDY)
    study = load_study(path, overrides=["fixed.iterations=7", "fixed.iterations=8"])
    assert {t.iterations for t in study.trials} == {8}
    study = load_study(path, overrides=["fixed={model: convnet, width: 2}"])
    assert study.fixed == {"model": "convnet", "width": 2}
    assert {t.iterations for t in study.trials} == {DEFAULTS["iterations"]}  # the file's 5 went with the section


def test_a_new_section_is_created(write_study):
    study = load_study(write_study("name: x\ndata: {dataset: faces, images: 2}\n"), overrides=["grid.restarts=[1,2]"])
    assert sorted({t.restarts for t in study.trials}) == [1, 2] and len(study.trials) == 4


def test_tune_takes_overrides_through_the_same_checks(write_study, tmp_path, capsys):
    path = str(write_study(STUDY))
    results = tmp_path / "results"
    err = _one_line_exit_2(["tune", path, "--set", "tune.objective=loss", "--results", str(results)], capsys)
    assert err == (
        f"gradinv tune: error: {path} (--set tune.objective=loss): tune.objective: 'loss': choose one of psnr, ssim "
        "(maximised)"
    )
    # the file fixes iterations, so a budget given by --set conflicts with it; the error names the flag
    err = _one_line_exit_2(["tune", path, "--set", "tune.budget=40", "--results", str(results)], capsys)
    assert err == (
        f"gradinv tune: error: {path} (--set tune.budget=40): tune.budget: fixed.iterations also sets the budget; "
        "keep one of them"
    )
    # ... and where an override fixes it, the file's budget conflicts with the override, at the budget's line
    budgeted = str(
        write_study(
            STUDY.replace(
                "fixed: {model: convnet, width: 4, iterations: 5}",
                "fixed: {model: convnet, width: 4}",
            ).replace("tune:\n", "tune:\n  budget: 40\n"),
            "b.yaml",
        )
    )
    assert load_study(budgeted).tune["budget"] == 40
    err = _one_line_exit_2(["tune", budgeted, "--set", "fixed.restarts=2", "--results", str(results)], capsys)
    assert err == (
        f"gradinv tune: error: {budgeted}:11: tune.budget: fixed.restarts also sets the budget; keep one of them"
    )
    assert not results.exists()


def _bad(path: str) -> list[tuple[str, str]]:
    """(--set value, the error after 'gradinv run: error: ')"""
    example = "e.g. --set fixed.iterations=500 or --set grid.width=[16,32]"
    return [
        ("fixed.iterations", f"--set: 'fixed.iterations' is not valid; write KEY=VALUE, {example}"),
        ("=5", f"--set: '=5' is not valid; name the key before '=', {example}"),
        ("fixed..width=4", f"--set: 'fixed..width=4' is not valid; a key is names joined by single dots, {example}"),
        (
            "colour=blue",
            "--set: 'colour=blue' is not valid; a study has no 'colour'; start the key with one of name, data, fixed, "
            "grid, zip, resources, max_retries, timeout, lanes, tune",
        ),
        (
            "name.first=x",
            f"--set: 'name.first=x' is not valid; name ({path}:1) holds text, not a mapping; set name whole "
            "(--set name=VALUE)",
        ),
        (
            "grid.fl.first=fedsgd",
            f"--set: 'grid.fl.first=fedsgd' is not valid; grid.fl ({path}:5) holds a list, not a mapping; set grid.fl "
            "whole (--set grid.fl=VALUE)",
        ),
        (
            "grid.width=[4,8",
            "--set: 'grid.width=[4,8' is not valid; the value is not YAML (expected ',' or ']', but got "
            "'<stream end>'); write a list as [a, b], and quote text holding : [ ] { }",
        ),
        (
            "data.dataset=!!python/name:os.system",
            "--set: 'data.dataset=!!python/name:os.system' is not valid; tag 'tag:yaml.org,2002:python/name:os.system' "
            "is not allowed in a study file; remove it",
        ),
        (
            "fixed.iterations=many",
            f"{path} (--set fixed.iterations=many): fixed.iterations: expected a whole number, got 'many'",
        ),
        (
            "fixed.tv=1e-4",
            f"{path} (--set fixed.tv=1e-4): fixed.tv: expected a number, got '1e-4'; YAML reads it as text, write "
            "1.0e-4",
        ),
        (
            "fixed={iterations: -1}",
            f"{path} (--set fixed={{iterations: -1}}): fixed.iterations: -1: use at least 1 iteration",
        ),
        ("fixed.iteratons=5", f"{path} (--set fixed.iteratons=5): fixed.iteratons: unknown key; allowed: model,"),
        ("grid.width=[]", f"{path} (--set grid.width=[]): grid.width: expected a non-empty list of values"),
        (
            "data.images=300",
            f"{path} (--set data.images=300): data.images: 300: faces has 50 test images; use 1 to 50",
        ),
        (
            "resources.num_gpus=-1",
            f"{path} (--set resources.num_gpus=-1): resources.num_gpus: must be at least 0, got -1",
        ),
        ("name=bad name!", f"{path} (--set name=bad name!): name: 'bad name!': use letters, digits, '.', '_' and '-'"),
        ("zip.lr=[0.1]", f"{path}:7: zip: all zip axes must have the same length"),  # the section's check
    ]


@pytest.mark.parametrize("case", range(17))
def test_a_bad_override_is_one_line_exit_2_nothing_written(write_study, tmp_path, capsys, case):
    path = str(write_study(STUDY))
    value, expected = _bad(path)[case]
    results = tmp_path / "results"
    err = _one_line_exit_2(["run", path, "--set", value, "--results", str(results)], capsys)
    assert err.startswith(f"gradinv run: error: {expected}"), err
    if not expected.endswith("allowed: model,"):
        assert err == f"gradinv run: error: {expected}"
    assert not results.exists()


def test_two_overrides_that_disagree_are_refused_naming_the_flag(write_study, capsys):
    path = str(write_study(STUDY))
    err = _one_line_exit_2(["run", path, "--set", "fixed.lr=0.2", "--set", "grid.lr=[0.1,0.3]", "--dry-run"], capsys)
    assert (
        err == f"gradinv run: error: {path} (--set grid.lr=[0.1,0.3]): grid.lr: is also in 'fixed'; set it in one place"
    )


def test_an_error_inside_a_mapping_value_names_the_flag(write_study):
    with pytest.raises(StudyError) as error:
        load_study(write_study(STUDY), overrides=["resources={num_cpus: 0}"])
    assert str(error.value).endswith(
        "(--set resources={num_cpus: 0}): resources.num_cpus: must be greater than 0, got 0"
    )


def test_a_run_records_the_effective_study_and_resumes_it(write_study, tmp_path, capsys):
    text = "name: set-run\ndata: {dataset: faces, images: 2, image_size: 8}\nfixed: {model: convnet, width: 2}\n"
    path = str(write_study(text))
    results = tmp_path / "results"
    argv = ["run", path, "--results", str(results), "--no-progress", "--set", "fixed.iterations=3"]
    assert main(argv) == 0
    frame = pd.read_parquet(results)
    assert len(frame) == 2 and set(frame["iterations"]) == {3} and set(frame["study"]) == {"set-run"}
    assert [list(flags) for flags in frame["study_overrides"]] == [["fixed.iterations=3"]] * 2
    effective = load_study(path, overrides=["fixed.iterations=3"])
    assert sorted(frame["key"]) == sorted(trial_key(t) for t in effective.trials)
    capsys.readouterr()
    assert main(argv) == 0  # the same overrides: every key is there
    assert "already have rows" in capsys.readouterr().out
    assert len(pd.read_parquet(results)) == 2
