"""Ray failing under a run (its raylet killed) is not the trials' failure: the trials that did not run to
their own end get no row, the driver says what happened in one line and exits 1, and the next run runs
them. The kill lands at a chosen trial (sweep.worker.inject_fault), not at a moment."""

import json

import pandas as pd

from gradinv.results.journal import JOURNAL_DIR
from gradinv.results.schema import trial_key
from sweep.study import load_study

STUDY = """
name: raylet
data: {dataset: faces, images: 2, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 3}
grid:
  fl: [fedsgd, fedavg]
resources: {num_cpus: 1}
max_retries: 1
"""


def run_into_a_raylet_kill(fault, write_study, tmp_path, driver, what) -> tuple[list[str], tuple, pd.DataFrame]:
    """A run whose third trial kills its raylet (``fault``), one task at a time: trials 0 and 1 finished
    before. Checks the exit code, the one line (``what`` in it) and the rows kept; returns the study's keys,
    the command line and the kept rows."""
    study_path = write_study(STUDY)
    keys = [trial_key(spec) for spec in load_study(study_path).trials]
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({keys[2]: fault}))
    results = tmp_path / "results"
    args = ("run", str(study_path), "--results", str(results), "--no-progress", "--max-concurrent", "1")
    code, output = driver(*args, env={"GRADINV_FAULTS": str(faults)}).wait()
    assert code == 1, output
    lines = [line for line in output.splitlines() if line.startswith("gradinv")]  # Ray reports the death too
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith("gradinv run: Ray failed under the run (") and what in lines[0], lines[0]
    assert "2 trials did not finish and have no row" in lines[0] and str(results) in lines[0], lines[0]
    kept = pd.read_parquet(results)
    assert sorted(kept["key"]) == sorted(keys[:2]) and (kept["status"] == "ok").all()  # no failed rows
    assert list((results / JOURNAL_DIR).iterdir()) == []
    return keys, args, kept


def test_a_raylet_killed_under_a_trial_leaves_it_and_the_unstarted_ones_to_the_next_run(
    write_study, tmp_path, driver, ray_tmpdir
):
    keys, args, kept = run_into_a_raylet_kill("kill-raylet", write_study, tmp_path, driver, "Ray failed")
    code, output = driver(*args).wait()  # Ray whole again: the two left run now, the two kept do not
    assert code == 0, output
    frame = pd.read_parquet(args[3]).set_index("key")
    assert sorted(frame.index) == sorted(keys) and (frame["status"] == "ok").all()
    assert (frame.loc[kept["key"], "finished_at"].to_numpy() == kept["finished_at"].to_numpy()).all()


def test_a_raylet_killed_under_a_task_that_never_answers_is_seen_from_the_node_table(
    write_study, tmp_path, driver, ray_tmpdir
):
    """The trial's worker outlives its raylet and never answers: only the GCS's node table tells."""
    run_into_a_raylet_kill("kill-raylet-and-hang", write_study, tmp_path, driver, "the Ray node of this driver died")
