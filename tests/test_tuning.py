"""`gradinv tune`: one-line errors for bad tune sections, pruning that stops weak candidates early,
and a driver killed mid-search that resumes without losing or double-counting a candidate."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from analysis import load, tuning_history
from gradinv.results.store import ResultsDir
from sweep.cli.tune import main
from sweep.study import load_study
from sweep.tune.audit import rerun_pruned
from sweep.tune.report import TOO_SMALL, compare_on_held_out
from sweep.tune.search import JOURNAL_NAME, make_pruner, open_study, sampled_params, suggest
from sweep.tune.section import FIRST_DECAY, tune_searches
from sweep.tune.settings import CHECKPOINTS, PAPER_DEFAULTS, trial_specs
from sweep.tune.tuner import tune_study

REPO = Path(__file__).resolve().parent.parent

TINY = """
name: tiny-tune
data: {{dataset: faces, images: 6, image_size: 8}}
fixed: {{model: convnet, width: 2}}
resources: {{num_cpus: 1}}
max_retries: 1
tune:
  budget: {budget}
  candidates: {candidates}
  parallel: 2
  tuning_images: 3
  held_out_images: 3
  sampler: {{name: random, seed: 3}}
  pruner: {{name: median, startup: 1}}
  space:
    lr: [1.0e-4, 0.3]
    restarts: [1, 2]
    cost: [cosine, l2]
"""


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL the driver's process group: it and the local Ray instance it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group already ended
        pass
    process.communicate()


def journal(results: Path, name: str = "tiny-tune") -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(results / JOURNAL_NAME)))
    return optuna.load_study(study_name=name, storage=storage)


BASE = "name: x\ndata: {dataset: faces, images: 6, image_size: 8}\nfixed: {model: convnet, width: 2}\ntune:\n"
BAD = [
    ("  space:\n    momentum: [0.1, 0.9]\n", ":6: tune.space.momentum: unknown parameter"),
    ("  space:\n    tv: []\n", ":6: tune.space.tv: empty range"),
    ("  space:\n    tv: [1.0e-3, 1.0e-3]\n", ":6: tune.space.tv: empty range"),
    ("  space:\n    tv: [0, 1.0e-1]\n", ":6: tune.space.tv: a log-uniform range needs low > 0"),
    ("  space:\n    lr: [0.5, 0.1]\n", ":6: tune.space.lr: low 0.5 is above high 0.1"),
    ("  space:\n    decay: [step, linear]\n", ":6: tune.space.decay.1: 'linear'"),
    ("  space:\n    restarts: [1, 200]\n  budget: 100\n", ":6: tune.space.restarts.1: 200 restarts leave under 8"),
    ("  sampler: annealing\n  space: {tv: [1.0e-6, 1.0e-1]}\n", ":5: tune.sampler: unknown sampler 'annealing'"),
    ("  sampler: {name: grid}\n  space: {tv: [1.0e-6, 1.0e-1]}\n", ":5: tune.sampler.name: unknown sampler 'grid'"),
    ("  pruner: hyperband\n  space: {tv: [1.0e-6, 1.0e-1]}\n", ":5: tune.pruner: unknown pruner 'hyperband'"),
    ("  pruner: {name: median, warmup: 0.1}\n  space: {tv: [1.0e-6, 1.0e-1]}\n", ":5: tune.pruner.warmup: 0.1"),
    ("  objective: mse\n  space: {tv: [1.0e-6, 1.0e-1]}\n", ":5: tune.objective: 'mse'"),
    (
        "  tuning_images: [0, 1]\n  held_out_images: [1, 2]\n  space: {tv: [1.0e-6, 1.0e-1]}\n",
        ":6: tune.held_out_images: shares images [1]",
    ),
    (
        "  tuning_images: 4\n  held_out_images: 4\n  space: {tv: [1.0e-6, 1.0e-1]}\n",
        ":6: tune.held_out_images: needs 4",
    ),
    ("  space: {tv: [1.0e-6, 1.0e-1]}\n  candidates: 0\n", ":6: tune.candidates: must be at least 1"),
    ("  colour: blue\n", ":5: tune.colour: unknown key"),
    (
        "  bootstrap: 10000\n  space: {tv: [1.0e-6, 1.0e-1]}\n",
        ":5: tune.bootstrap: the held-out interval is the report's",
    ),
]


@pytest.mark.parametrize("section, message", BAD, ids=[m.split(": ")[1] + ":" + m.split(": ")[-1][:20] for _, m in BAD])
def test_a_bad_tune_section_is_one_line_naming_file_line_and_field(section, message, write_study, tmp_path, capsys):
    path = write_study(BASE + section)
    results = tmp_path / "results"
    assert main([str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{path}{message}" in err[0]
    assert not results.exists()  # nothing started, nothing written


STORAGES = [  # (--storage, relative to tmp_path where it is a path; what the one line says)
    ("missing/search.journal", "missing is not a directory; create it"),
    ("a-file/search.journal", "a-file is not a directory; create it"),
    (".", "it is not a regular file"),
    ("sqlite:///{tmp}/missing/search.db", "missing is not a directory; create it"),
    ("ftp://example/search", "Can't load plugin: sqlalchemy.dialects:ftp; give sqlite:///FILE.db"),
    ("redis://localhost:6379", "Can't load plugin: sqlalchemy.dialects:redis; give sqlite:///FILE.db"),
    ("postgresql://user@127.0.0.1:1/search", "its database driver is not installed (no module 'psycopg')"),
]


@pytest.mark.parametrize("storage, message", STORAGES, ids=[s.split("/")[0] for s, _ in STORAGES])
def test_a_storage_that_cannot_be_opened_is_one_line_before_anything_starts(
    storage, message, write_study, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    path = write_study(TINY.format(budget=16, candidates=1))
    results = tmp_path / "results"
    assert main([str(path), "--results", str(results), "--storage", storage.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradinv tune: error: --storage: ") and message in err[0], err
    assert not results.exists()  # nothing started, nothing written


def test_fixed_and_searched_in_one_place_and_budget_shared_by_restarts(write_study, capsys):
    path = write_study(BASE.replace("width: 2}", "width: 2, tv: 0.01}") + "  space: {tv: [1.0e-6, 1.0e-1]}\n")
    assert main([str(path)]) == 2
    assert ":5: tune.space.tv: is also in 'fixed'" in capsys.readouterr().err
    settings = tune_searches(load_study(write_study(TINY.format(budget=60, candidates=4))))[0]
    assert settings.tuning == ((0,), (1,), (2,)) and settings.held_out == ((3,), (4,), (5,))
    assert settings.warmup_steps == 4  # judged from the 4th of 8 checkpoints: after the first decay at 3/8
    for restarts in (1, 2):
        specs = trial_specs(settings, {"lr": 0.1, "restarts": restarts, "cost": "l2"}, settings.tuning).values()
        assert {s.restarts * s.iterations for s in specs} == {60}


@pytest.mark.parametrize("pruner", ["{name: median, startup: 1}", "{name: successive-halving}"])
def test_the_pruner_judges_no_checkpoint_of_the_warm_up(pruner, write_study):
    text = TINY.format(budget=48, candidates=4).replace("{name: median, startup: 1}", pruner)
    settings = tune_searches(load_study(write_study(text)))[0]
    first_judged = settings.warmup_steps
    assert (first_judged - 1) / CHECKPOINTS <= FIRST_DECAY < first_judged / CHECKPOINTS  # 3 of 8, then 4 of 8
    tuned = optuna.create_study(direction="maximize", pruner=make_pruner(settings))
    for value in (1.0, 2.0):  # candidates that ran to the end, every checkpoint better than the next one's
        strong = tuned.ask()
        for step in range(1, CHECKPOINTS + 1):
            strong.report(value, step)
            strong.should_prune()
        tuned.tell(strong, value)
    weak = tuned.ask()
    judged = []
    for step in range(1, first_judged + 1):
        weak.report(0.0, step)
        judged.append(weak.should_prune())
    assert judged == [False] * (first_judged - 1) + [True]  # spared through the warm-up's last checkpoint


def test_a_resumed_search_continues_rather_than_replaying_its_first_candidates(write_study, tmp_path):
    study = load_study(write_study(TINY.format(budget=48, candidates=6)))
    settings = tune_searches(study)[0]

    def ask(tuned, count: int) -> list[dict]:
        asked = []
        for _ in range(count):
            trial = tuned.ask()
            asked.append(suggest(trial, settings.families))
            tuned.tell(trial, 1.0)
        return asked

    url = str(tmp_path / JOURNAL_NAME)
    first = ask(open_study(settings, url), 3)
    resumed = ask(open_study(settings, url), 3)  # the sampler rebuilt, as a restarted driver does
    assert not [params for params in resumed if params in first]
    assert ask(open_study(settings, str(tmp_path / "fresh.journal")), 3) == first  # a fresh search: seeded


class Killed(BaseException):
    """The driver's process ends here: nothing after this write reaches storage."""


WRITES = (
    "create_new_trial",
    "set_trial_param",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "set_trial_state_values",
    "set_trial_intermediate_value",
)


def killed_after(url: str, writes: int | None):
    """The search's journal storage, as a driver killed after ``writes`` more writes leaves it."""

    class Storage(optuna.storages.JournalStorage):
        left = writes

    def counted(name):
        def write(self, *args, **kwargs):
            if self.left is not None:
                if self.left == 0:
                    raise Killed(name)
                self.left -= 1
            return getattr(optuna.storages.JournalStorage, name)(self, *args, **kwargs)

        return write

    for name in WRITES:
        setattr(Storage, name, counted(name))
    return Storage(optuna.storages.journal.JournalFileBackend(url))


class StartingDriver:
    """Stands in for the Ray driver: records the parameters of every candidate it is asked to start."""

    known: dict = {}

    def __init__(self):
        self.started = []

    def reusable(self, specs) -> bool:
        return False

    def start(self, evaluation) -> None:
        self.started.append((evaluation.number, evaluation.trial.params))


def driver_life(settings, url: str, writes: int | None) -> tuple[list, tuple[int, int] | None]:
    """One driver: open the search, queue again what a stopped driver left, ask one candidate; killed
    after ``writes`` storage writes. The candidates it started, and what the requeue said."""
    from sweep.tune.search import make_sampler, requeue_interrupted
    from sweep.tune.tuner import Tuner

    open_study(settings, url)  # created (or loaded) before the counted writes, as at start-up
    tuned = optuna.load_study(
        study_name=settings.name, storage=killed_after(url, writes), sampler=make_sampler(settings)
    )
    driver, said = StartingDriver(), None
    try:
        said = requeue_interrupted(tuned)
        Tuner(driver, tuned, settings, bar=None)._ask()
    except Killed:
        pass
    return driver.started, said


@pytest.mark.parametrize("first_kill", range(7))
def test_a_kill_at_any_write_requeues_exactly_the_candidate_drawn_or_drops_one_never_drawn(
    first_kill, write_study, tmp_path
):
    """Kill the driver after each storage write of drawing a candidate, then kill the resumed driver
    after each write of its requeue and draw, then resume once more: every started candidate has all
    its parameters, and a candidate queued again starts with exactly the parameters first drawn."""
    settings = tune_searches(load_study(write_study(TINY.format(budget=48, candidates=6))))[0]
    names = {"lr", "restarts", "cost"}
    for second_kill in range(9):
        url = str(tmp_path / f"{first_kill}-{second_kill}.journal")
        lives = [driver_life(settings, url, writes) for writes in (first_kill, second_kill, None)]
        tuned = journal_at(url, settings.name)
        started = [(number, params) for life, _ in lives for number, params in life]
        assert started and all(set(params) == names for _, params in started)
        for trial in tuned.trials:
            origin = trial.user_attrs.get("requeued_from")
            if origin is not None:  # queued again with its origin's parameters, drawn in full
                assert trial.system_attrs["fixed_params"] == sampled_params(tuned.trials[origin])
                assert set(trial.system_attrs["fixed_params"]) == names
        for number, params in started:  # a queued candidate starts with exactly what it was queued with
            assert params == tuned.trials[number].system_attrs.get("fixed_params", params)
        origins = [t.user_attrs["requeued_from"] for t in tuned.trials if "requeued_from" in t.user_attrs]
        assert len(origins) == len(set(origins))  # never queued twice
        running = [t for t in tuned.trials if t.state == optuna.trial.TrialState.RUNNING]
        assert [t.number for t in running] == [started[-1][0]]  # only the last life's candidate is in flight
        interrupted = [t for t in tuned.trials if t.user_attrs.get("interrupted")]
        assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
        drawn = [t.number for t in interrupted if t.user_attrs.get("sampled") or "fixed_params" in t.system_attrs]
        assert sorted(origins) == sorted(drawn)  # every drawn candidate cut off is queued again; no other


def journal_at(url: str, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    return optuna.load_study(study_name=name, storage=storage)


class HeldOutDriver:
    """Stands in for the Ray driver: every held-out trial finishes with the PSNR ``psnr`` gives it."""

    def __init__(self, psnr):
        self.psnr, self.rows = psnr, []

    def evaluate(self, *evaluations):
        answers = []
        for evaluation in evaluations:
            rows = [
                {
                    "study": "tiny-tune",
                    "key": key,
                    "candidate": evaluation.number,
                    "images": list(spec.images),
                    "images_per_client": 1,
                    "status": "ok",
                    "psnr": self.psnr(evaluation.number, spec.images[0]),
                    "baseline_psnr": 10.0,
                }
                for key, spec in evaluation.specs.items()
            ]
            self.rows += rows
            answers.append(rows)
        return answers


def test_the_held_out_interval_is_the_reports(write_study, tmp_path):
    text = TINY.format(budget=48, candidates=4).replace("images: 6", "images: 22").replace("_images: 3", "_images: 11")
    settings = tune_searches(load_study(write_study(text)))[0]
    best = type("Best", (), {"number": 2, "params": {"lr": 0.05, "restarts": 1, "cost": "cosine"}})()
    rng = np.random.default_rng(0)
    gains = {image: float(g) for image, g in zip(range(11, 22), rng.normal(1.0, 2.0, 11))}
    gains[11] = float("inf")  # an exact copy: counted as 100 dB on both sides
    driver = HeldOutDriver(lambda number, image: 20.0 + (gains.get(image, 1.0) if number is not None else 0.0))
    comparison = compare_on_held_out(driver, settings, best)
    with ResultsDir(tmp_path / "results") as results:
        results.write(driver.rows)
    _, tuned, defaults = tuning_history.split(load.load_trials(tmp_path / "results"))
    reported = tuning_history.comparison(tuned, defaults)
    assert reported["clients"] == len(comparison.tuned) == 11
    assert comparison.gain == pytest.approx(reported["gain"], rel=1e-12)
    assert (comparison.low, comparison.high) == (
        pytest.approx(reported["ci_low"], rel=1e-12),
        pytest.approx(reported["ci_high"], rel=1e-12),
    )
    assert comparison.low < comparison.gain < comparison.high
    assert "BCa" in comparison.interval() and f"{comparison.low:+.2f}" in comparison.interval()
    # Under stats.MIN_BOOTSTRAP clients there is no interval, and the line says so.
    few = compare_on_held_out(
        driver, tune_searches(load_study(write_study(TINY.format(budget=48, candidates=4))))[0], best
    )
    assert np.isnan(few.low) and few.interval().startswith(TOO_SMALL)
    assert set(trial_specs(settings, PAPER_DEFAULTS, settings.held_out)) == {
        row["key"] for row in driver.rows if row["candidate"] is None and row["images"][0] >= 11
    }


def test_pruning_stops_weak_candidates_early_and_rows_carry_candidates(write_study, tmp_path, ray_tmpdir, capsys):
    study = load_study(write_study(TINY.format(budget=48, candidates=6)))
    results = tmp_path / "results"
    assert tune_study(study, results, progress=False) == 0
    frame = pd.read_parquet(results)
    tuned = journal(results)
    states = {t.number: t.state for t in tuned.trials}
    pruned = [n for n, s in states.items() if s == optuna.trial.TrialState.PRUNED]
    complete = [n for n, s in states.items() if s == optuna.trial.TrialState.COMPLETE]
    assert len(states) == 6 and pruned and complete
    tuning = frame[frame["candidate"].isin(list(states)) & frame["images"].map(lambda i: i[0] < 3)]
    for number in pruned:
        rows = tuning[tuning["candidate"] == number]
        assert len(rows) == 3 and (rows["status"] == "pruned").all()
        assert (rows["iterations_run"] < rows["iterations"]).all()
    # The pruning signal is the candidate's mean PSNR at each checkpoint, as its rows record it.
    for number in pruned + complete:
        rows = tuning[tuning["candidate"] == number]
        reported = tuned.trials[number].intermediate_values
        curves = np.array([list(curve)[: len(reported)] for curve in rows["curve_psnr"]])
        assert [reported[step] for step in sorted(reported)] == pytest.approx(list(curves.mean(axis=0)))
    for number in complete:
        rows = tuning[tuning["candidate"] == number]
        assert (rows["status"] == "ok").all() and (rows["iterations_run"] == rows["iterations"]).all()
        assert tuned.trials[number].value == pytest.approx(rows["psnr"].mean())
    assert frame["key"].is_unique
    # The comparison: best and paper defaults on the held-out images, and a fragment to paste.
    held_out = frame[frame["images"].map(lambda i: i[0] >= 3)]
    assert len(held_out) == 6 and (held_out["status"] == "ok").all()
    assert held_out["candidate"].isna().sum() == 3  # the paper's defaults belong to no candidate
    out = capsys.readouterr().out
    assert TOO_SMALL in out and f"optuna-dashboard {results / JOURNAL_NAME}" in out
    assert "family ig (honest server)" in out and "no-information baseline" in out
    fragment = (results / "_best.yaml").read_text()
    import yaml

    fixed = yaml.safe_load(fragment)["fixed"]
    assert fixed["restarts"] * fixed["iterations"] == 48 and "lr" in fixed and "cost" in fixed
    # A second run finds the search finished and re-runs nothing.
    files = ResultsDir(results).files()
    assert tune_study(study, results, progress=False) == 0
    assert ResultsDir(results).files() == files and len(journal(results).trials) == 6
    # The false-prune audit runs each pruned candidate to the end, beside the completed ones' median.
    audit = rerun_pruned(study, results)
    assert sorted(record["candidate"] for record in audit) == sorted(pruned)
    median = float(np.median([tuned.trials[n].value for n in complete]))
    for record in audit:
        assert record["iterations"] == [48 // tuned.trials[record["candidate"]].params["restarts"]] * 3
        assert record["median_completed"] == pytest.approx(median)
        assert record["false_prune"] == (record["final"] > median)
    assert ResultsDir(results).files() == files  # nothing written


def test_driver_killed_mid_search_resumes_without_losing_or_doubling_a_candidate(write_study, tmp_path, ray_tmpdir):
    path = write_study(TINY.format(budget=160, candidates=6))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "sweep.cli.tune", str(path), "--results", str(results), "--no-progress"]
    first = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not ResultsDir(results).files() and time.monotonic() < deadline:  # the first candidate's rows
            time.sleep(0.2)
    finally:
        stop_group(first)
    assert ResultsDir(results).files(), "no candidate finished before the deadline"
    killed = journal(results)
    running = [t.number for t in killed.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert running  # a candidate was cut off mid-evaluation

    second = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = second.communicate(timeout=300)
    finally:
        stop_group(second)
    assert second.returncode == 0, output
    tuned = journal(results)
    interrupted = [t for t in tuned.trials if t.user_attrs.get("interrupted")]
    assert sorted(t.number for t in interrupted) == running
    assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    requeued = [t.user_attrs["requeued_from"] for t in tuned.trials if "requeued_from" in t.user_attrs]
    drawn = [number for number in running if sampled_params(tuned.trials[number]) is not None]
    assert sorted(requeued) == drawn  # each cut-off candidate queued again exactly once ...
    assert ("queued again" in output) == bool(drawn) and ("dropped" in output) == (len(drawn) < len(running))
    for number in drawn:  # ... with the same parameters, and finished
        again = next(t for t in tuned.trials if t.user_attrs.get("requeued_from") == number)
        assert again.params == tuned.trials[number].params and again.state.is_finished()
    counted = [t for t in tuned.trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
    assert len(counted) == 6 and all(t.state != optuna.trial.TrialState.RUNNING for t in tuned.trials)
    frame = pd.read_parquet(results)
    assert frame["key"].is_unique
    # Rows written just before the kill keep the candidate number they were written under.
    assert set(frame["candidate"].dropna().astype(int)) <= {t.number for t in tuned.trials}


def test_a_trained_victim_is_trained_once_and_every_candidate_attacks_it(
    write_study, tmp_path, ray_tmpdir, monkeypatch
):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))
    trained = TINY.format(budget=16, candidates=2).replace(
        "fixed: {model: convnet, width: 2}", "fixed: {model: convnet, width: 2, trained_epochs: 1, train_subset: 40}"
    )
    study = load_study(write_study(trained))
    results = tmp_path / "results"
    assert tune_study(study, results, progress=False) == 0
    frame = pd.read_parquet(results)
    assert len(frame) == 2 * 3 + 2 * 3  # two candidates and the comparison's two settings, 3 images each
    assert (frame["status"] == "ok").all() and frame["checkpoint_key"].nunique() == 1
    assert frame["model_accuracy"].between(0, 1).all()
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1  # one checkpoint, trained once
