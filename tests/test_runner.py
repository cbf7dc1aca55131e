"""The sweep runner on a real local Ray instance: rows exactly once through crashes and failures."""

import json
import os
import re
import signal
import time

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradinv import data
from gradinv.results.schema import SCHEMA, SCHEMA_VERSION, trial_key
from gradinv.results.store import ResultsDir
from sweep.cli.main import main
from sweep.study import load_study
from sweep.task_loop import Stopped, TaskLoop

STUDY = """
name: tiny-run
data: {{dataset: faces, images: {images}, image_size: 8}}
fixed: {{model: convnet, width: 2, iterations: {iterations}}}
grid:
  fl: [fedsgd, fedavg]
resources: {{num_cpus: 1}}
max_retries: 2
"""


def rows(results) -> pd.DataFrame:
    return pd.read_parquet(results)


def test_a_study_lands_as_one_row_per_trial_readable_by_everyone(write_study, tmp_path, capsys):
    study_path = write_study(STUDY.format(images=6, iterations=3))
    results = tmp_path / "results"
    assert main(["run", str(study_path), "--results", str(results), "--no-progress"]) == 0
    frame = rows(results)
    study = load_study(study_path)
    assert len(frame) == len(study.trials) == 12
    assert sorted(frame["key"]) == sorted(trial_key(t) for t in study.trials)
    assert (frame["status"] == "ok").all() and (frame["attempt"] == 1).all()
    assert frame["worker_pid"].nunique() >= 2
    assert set(frame["fl"]) == {"fedsgd", "fedavg"}
    assert frame.loc[frame["fl"] == "fedsgd", "local_steps"].isna().all()  # does not apply: null
    assert frame["node_id"].notna().all() and frame["commit"].notna().all()
    picture = data.decode_png(frame["reconstruction_png"].iloc[0][0])
    assert picture.shape == (8, 8)
    assert len(frame["psnr_per_image"].iloc[0]) == 1
    files = ResultsDir(results).files()
    schemas = [pq.read_schema(f) for f in files]
    assert all(schema.equals(SCHEMA) for schema in schemas)
    assert all(schema.metadata[b"gradinv.schema_version"] == str(SCHEMA_VERSION).encode() for schema in schemas)
    assert duckdb.sql(f"select count(distinct key) from read_parquet('{results}/*.parquet')").fetchall()[0][0] == 12
    from datasets import load_dataset

    loaded = load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 12
    # A second run finds every key present and computes nothing.
    assert main(["run", str(study_path), "--results", str(results), "--no-progress"]) == 0
    assert "already have rows" in capsys.readouterr().out
    assert len(rows(results)) == 12


def test_driver_killed_midway_loses_only_the_trials_in_flight(write_study, tmp_path, driver):
    """SIGKILL between batches: every row the driver had received is on disk (its journal); the
    next run folds those rows in, recomputes none of them, and ends with exactly one row per trial."""
    study_path = write_study(STUDY.format(images=8, iterations=3))
    keys = [trial_key(t) for t in load_study(study_path).trials]
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({keys[0]: "sleep:600"}))  # one trial stays in flight: the run never ends
    results = tmp_path / "results"
    args = ("run", str(study_path), "--results", str(results), "--batch-seconds", "600")  # no batch file before the end
    first = driver(*args, env={"GRADINV_FAULTS": str(faults)})  # with its progress bar: the driver's own count

    def on_disk() -> pd.DataFrame:
        reader, columns = ResultsDir(results), ["key", "finished_at"]
        return pd.concat([reader.read(columns).to_pandas(), reader.read_journal(columns).to_pandas()])

    deadline = time.monotonic() + 240
    while len(on_disk()) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    first.signal(signal.SIGKILL)
    _, output = first.wait()
    received = max(int(n) for n in re.findall(r"\| *(\d+)/16 \[", output) or ["0"])
    kept = on_disk()
    assert 0 < received <= len(kept) < 16, output  # lost: only what was in flight (the sleeper among it)

    faults.write_text("{}")
    code, output = driver(*args).wait()
    assert code == 0, output
    frame = rows(results).set_index("key")
    assert len(frame) == 16 and frame.index.is_unique
    assert (frame.loc[kept["key"], "finished_at"].to_numpy() == kept["finished_at"].to_numpy()).all()  # not run again
    assert not list(results.glob(".*.tmp")) and ResultsDir(results).journalled_rows() == 0


def test_failures_timeouts_and_worker_deaths_are_rows(write_study, tmp_path, monkeypatch, capsys):
    study_path = write_study(STUDY.format(images=3, iterations=3) + "timeout: 20\n")
    study = load_study(study_path)
    keys = [trial_key(t) for t in study.trials]
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({keys[0]: "raise", keys[1]: "sleep:25", keys[2]: "exit-first-attempt"}))
    monkeypatch.setenv("GRADINV_FAULTS", str(faults))
    results = tmp_path / "results"
    assert main(["run", str(study_path), "--results", str(results), "--no-progress"]) == 0
    frame = rows(results).set_index("key")
    assert len(frame) == 6
    assert frame.loc[keys[0], "status"] == "failed" and "injected fault" in frame.loc[keys[0], "error"]
    assert frame.loc[keys[1], "status"] == "failed" and "timeout" in frame.loc[keys[1], "error"]
    assert frame.loc[keys[2], "status"] == "ok" and frame.loc[keys[2], "attempt"] >= 2
    assert (frame.drop(index=keys[:2])["status"] == "ok").all()
    assert "2 failed, 4 ok" in capsys.readouterr().out

    faults.write_text("{}")  # the faults are gone: retrying the failed keys replaces their rows
    assert main(["run", str(study_path), "--results", str(results), "--no-progress", "--retry-failed"]) == 0
    frame = rows(results)
    assert len(frame) == 6 and frame["key"].is_unique and (frame["status"] == "ok").all()

    assert main(["status", str(results)]) == 0
    assert "tiny-run" in capsys.readouterr().out


def test_a_second_driver_on_the_same_results_is_refused(write_study, tmp_path, capsys):
    study_path = write_study(STUDY.format(images=1, iterations=3))
    results = tmp_path / "results"
    with ResultsDir(results):
        assert main(["run", str(study_path), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another gradinv driver is writing there" in err[0]


def test_ctrl_c_writes_what_finished_and_exits_130(write_study, tmp_path, driver):
    # Long trials (3,000 iterations): on an idle machine 300 finished all 24 within the 2 s before the signal.
    study_path = write_study(STUDY.format(images=12, iterations=3000))
    results = tmp_path / "results"
    run = driver("run", str(study_path), "--results", str(results), "--no-progress", "--batch-rows", "1")
    deadline = time.monotonic() + 240
    while not ResultsDir(results).files() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(0.5)
    run.signal(signal.SIGINT)
    code, output = run.wait()
    assert code == 130, output
    assert "run the same command to finish" in output
    assert 0 < len(rows(results)) < 24


def test_status_of_a_missing_directory_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_is_raised_at_the_loops_next_wait_and_the_handlers_are_restored(signum):
    loop = TaskLoop(ray=None)  # nothing in flight: wait never reaches Ray
    before = signal.getsignal(signum)
    with loop.stopping_on_signals():
        os.kill(os.getpid(), signum)  # recorded, not raised here
        with pytest.raises(Stopped) as stopped:
            loop.wait(timeout=0)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while rows are written changes nothing
    assert stopped.value.signum == loop.stop_signal == signum
    assert signal.getsignal(signum) is before
