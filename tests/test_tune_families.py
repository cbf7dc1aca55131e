"""`gradinv tune` across attack families and per setting: the sections it refuses, how a candidate's
family spends the budget, PSNR as the pruning signal, and a search per value of a `per:` axis whose
strongest attacks the report tabulates."""

import optuna
import pandas as pd
import pytest
import yaml

from analysis.report import write_report
from sweep.cli.tune import main
from sweep.study import load_study
from sweep.tune.search import JOURNAL_NAME, suggest
from sweep.tune.section import tune_searches
from sweep.tune.settings import PAPER_DEFAULTS, candidate, trial_specs
from sweep.tune.tuner import tune_study
from tests.html_tables import section, table_frame

BASE = "name: x\ndata: {dataset: faces, images: 6, image_size: 8}\nfixed: {model: convnet, width: 2}\ntune:\n"
BAD = [
    ("  families:\n    gan: {}\n", ":6: tune.families.gan: unknown attack family; choose from ig, dlg"),
    (
        "  families:\n    dlg: {tv: [1.0e-5, 1.0e-2]}\n",
        ":6: tune.families.dlg.tv: a setting of ig, not of dlg; move it under families.ig",
    ),
    (
        "  families:\n    ig: {imprint_bins: [64, 128]}\n",
        ":6: tune.families.ig.imprint_bins: a setting of imprint, not of ig",
    ),
    (
        "  families:\n    imprint: {}\n",
        ":6: tune.families.imprint: imprint cannot run here: threat_model 'honest': "
        "the imprint attack ships a modified model: declare threat_model malicious",
    ),
    ("  families:\n    analytic: {}\n", ":6: tune.families.analytic: analytic cannot run here: model 'convnet'"),
    (
        "  families:\n    ig: {momentum: [0.1, 0.9]}\n",
        ":6: tune.families.ig.momentum: unknown parameter; searchable for ig:",
    ),
    (
        "  families: {ig: {tv: [1.0e-5, 1.0e-2]}}\n  space: {tv: [1.0e-5, 1.0e-2]}\n",
        ":6: tune.space: give each family's space under 'families'",
    ),
    ("  families: {}\n", ":5: tune.families: name at least one family"),
    (
        "  per: [noise_std]\n  space: {tv: [1.0e-5, 1.0e-2]}\n",
        ":5: tune.per.0: 'noise_std' is not an axis of the study",
    ),
    ("  families:\n    ig: {bn_prior: [1.0e-3, 1.0e-1]}\n", None),  # valid: searched as an ig setting
]


@pytest.mark.parametrize("section_text, message", BAD, ids=[str(m).split(": ")[1] if m else "valid" for _, m in BAD])
def test_a_bad_families_or_per_section_is_one_line(section_text, message, write_study, tmp_path, capsys):
    path = write_study(BASE + section_text)
    if message is None:
        searched = tune_searches(load_study(path))[0].families
        assert list(searched) == ["ig"] and (searched["ig"]["bn_prior"].low, searched["ig"]["bn_prior"].high) == (
            1e-3,
            0.1,
        )
        return
    results = tmp_path / "results"
    assert main([str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}{message}" in err[0], err
    assert not results.exists()


def test_an_axis_outside_per_is_refused_and_a_choice_that_cannot_run_is_named(write_study, capsys):
    grid = BASE.replace("tune:\n", "grid: {noise_std: [0.0, 0.1]}\ntune:\n") + "  space: {tv: [1.0e-5, 1.0e-2]}\n"
    assert main([str(write_study(grid))]) == 2
    assert ":4: grid.noise_std: tune searches the attack of one setting; fix this axis" in capsys.readouterr().err
    both = (
        BASE.replace("tune:\n", "grid: {tv: [1.0e-4, 1.0e-3]}\ntune:\n  per: [tv]\n")
        + "  space: {tv: [1.0e-5, 1.0e-2]}\n"
    )
    assert main([str(write_study(both))]) == 2
    assert ":7: tune.space.tv: is also an axis of the study" in capsys.readouterr().err
    named = BASE.replace("width: 2}", "width: 2, layers: first4}") + "  space: {lr: [0.1, 1.0]}\n"
    assert tune_searches(load_study(write_study(named)))[0].base.layers == "first4"  # a named set, as given
    # A choice that cannot run in the study's setting is refused before anything runs: the batch's own
    # BatchNorm statistics exist only for a client in train mode.
    bad_choice = (
        BASE.replace("width: 2}", "width: 2, bn_stats: batch}") + "  families:\n    ig: {bn_prior: [1.0e-3, 1.0]}\n"
    )
    assert main([str(write_study(bad_choice))]) == 2
    assert ":6: tune.families.ig.bn_prior: 0.001 cannot run here: bn_stats 'batch'" in capsys.readouterr().err


def test_each_family_spends_the_budget_its_own_way(write_study):
    study = BASE.replace("width: 2}", "width: 2, threat_model: malicious, imprint_sample: 100}") + (
        "  budget: 40\n  families:\n    ig: {restarts: [1, 2], tv: [1.0e-5, 1.0e-2]}\n    dlg: {lr: [1.0e-2, 1.0]}\n"
        "    imprint: {imprint_bins: [32, 64]}\n"
    )
    settings = tune_searches(load_study(write_study(study)))[0]
    assert list(settings.families) == ["ig", "dlg", "imprint"]
    assert candidate(settings, {"attack": "ig", "ig.restarts": 2, "ig.tv": 1e-3}) == {
        "attack": "ig",
        "tv": 1e-3,
        "restarts": 2,
        "iterations": 20,
    }
    assert candidate(settings, {"attack": "dlg", "dlg.lr": 0.5}) == {"attack": "dlg", "lr": 0.5, "iterations": 40}
    assert candidate(settings, {"attack": "imprint", "imprint.imprint_bins": 32}) == {
        "attack": "imprint",
        "imprint_bins": 32,
    }
    # The paper's defaults are inverting gradients' whatever the families searched.
    defaults = next(iter(trial_specs(settings, PAPER_DEFAULTS, settings.held_out).values()))
    assert (defaults.attack, defaults.tv, defaults.lr, defaults.restarts * defaults.iterations) == ("ig", 1e-4, 0.1, 40)
    # Optuna sees the family first, then only that family's settings, named family.setting.
    tuned = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    asked = [suggest(tuned.ask(), settings.families) for _ in range(30)]
    assert {params["attack"] for params in asked} == {"ig", "dlg", "imprint"}
    for params in asked:
        assert {name.split(".")[0] for name in params if name != "attack"} == {params["attack"]}


PER_STUDY = """
name: per-tune
data: {dataset: faces, images: 6, image_size: 8}
fixed: {model: convnet, width: 2, threat_model: malicious, imprint_sample: 100}
grid: {noise_std: [0.0, 0.1]}
resources: {num_cpus: 1}
max_retries: 1
tune:
  per: [noise_std]
  budget: 16
  candidates: 3
  parallel: 1
  tuning_images: 3
  held_out_images: 3
  sampler: {name: random, seed: 1}
  pruner: none
  families:
    ig: {lr: [1.0e-3, 0.3]}
    imprint: {imprint_bins: [32, 64]}
"""


def test_a_search_per_setting_and_the_strongest_attack_table(write_study, tmp_path, ray_tmpdir, capsys):
    study = load_study(write_study(PER_STUDY))
    results = tmp_path / "results"
    assert tune_study(study, results, progress=False) == 0
    out = capsys.readouterr().out
    assert "strongest attack per setting" in out and "noise_std 0.0" in out and "noise_std 0.1" in out
    frame = pd.read_parquet(results)
    assert set(frame["noise_std"]) == {0.0, 0.1} and set(frame["attack"]) <= {"ig", "imprint"}
    assert frame["key"].is_unique and (frame["status"] == "ok").all()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(results / JOURNAL_NAME)))
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["per-tune [noise_std=0.0]", "per-tune [noise_std=0.1]"]
    fragments = list(yaml.safe_load_all((results / "_best.yaml").read_text()))
    assert [f["fixed"].get("noise_std", 0.0) for f in fragments] == [0.0, 0.1]
    chosen = [f["fixed"].get("attack", "ig") for f in fragments]
    # The report: one row per setting, the family each search chose, and the gains the driver printed.
    page = write_report(results, tmp_path / "report.html").read_text()
    table = table_frame(section(page, "Tuning"), "strongest-per-tune")
    assert [float(v) for v in table["noise std"]] == [0.0, 0.1]
    assert list(table["family"]) == chosen
    printed = [line for line in out.splitlines() if line.startswith("  noise_std 0")]
    for tuned, line in zip(table["tuned psnr"], printed, strict=True):
        assert f" {tuned} " in f" {line} "  # the report's number is the one the driver printed


def test_a_defended_federation_round_is_tuned_like_any_setting(write_study, tmp_path, ray_tmpdir, monkeypatch, capsys):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))
    text = """
name: fed-tune
data: {dataset: faces, images: 4, image_size: 8}
fixed: {model: convnet, width: 2, round: 1, fed_rounds: 1, fed_clients: 2, clients_per_round: 2, train_subset: 40,
        noise_std: 0.001}
resources: {num_cpus: 1}
max_retries: 1
tune:
  budget: 16
  candidates: 2
  tuning_images: 2
  held_out_images: 2
  sampler: {name: random, seed: 1}
  families:
    ig: {lr: [1.0e-3, 0.3]}
    dlg: {lr: [0.1, 1.0]}
"""
    results = tmp_path / "results"
    assert tune_study(load_study(write_study(text)), results, progress=False) == 0
    frame = pd.read_parquet(results)
    assert (frame["status"] == "ok").all() and set(frame["round"]) == {1} and set(frame["noise_std"]) == {0.001}
    assert frame["federation_key"].nunique() == 1 and frame["model_accuracy"].between(0, 1).all()
    assert "family " in capsys.readouterr().out
