"""`gradinv attack --replay`: a row's trial computed again gives its stored numbers, to the last digit."""

import json
import textwrap

import pandas as pd
import pytest

from gradinv.results.store import ResultsDir
from sweep.cli import replay
from sweep.cli.main import main

# Two clients per setting, packed two lanes to a computation: replay must rebuild the pack.
STUDY = """
name: replay-tiny
data: {dataset: faces, images: 4, image_size: 8}
fixed: {model: convnet, width: 4, iterations: 20, images_per_client: 2, train_subset: 32}
zip:
  fl: [fedsgd, fedavg, fedsgd]
  local_steps: [1, 2, 1]
  trained_epochs: [0, 0, 1]
resources: {num_cpus: 1}
lanes: 2
"""

SETTINGS = {
    "fedsgd": "fl == 'fedsgd' and trained_epochs == 0",
    "fedavg": "fl == 'fedavg' and local_steps == 2",
    "trained": "trained_epochs == 1",
}


@pytest.fixture(scope="module")
def study_results(tmp_path_factory):
    """The study run once on a local Ray instance (started and stopped by the command), its
    checkpoint cache kept in the environment while the module's tests replay its rows."""
    root = tmp_path_factory.mktemp("replay")
    study = root / "study.yaml"
    study.write_text(textwrap.dedent(STUDY).lstrip())
    results = root / "results"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADINV_CACHE", str(root / "cache"))
        assert main(["run", str(study), "--results", str(results), "--no-progress"]) == 0
        yield results, pd.read_parquet(results)


@pytest.mark.parametrize("setting", SETTINGS)
def test_replay_reproduces_a_row_to_the_last_digit(study_results, setting):
    results, frame = study_results
    rows = frame.query(SETTINGS[setting])
    assert len(rows) == 2 and (rows["status"] == "ok").all() and (rows["lanes"] == 2).all()
    assert rows["pack_id"].nunique() == 1  # the two clients ran as one pack
    row = rows[rows["lane_index"] == 1].iloc[0]  # the second lane: its numbers depend on the first
    found, pack = replay.find_pack(results, row["key"])
    assert found["key"] == row["key"] and [mate["key"] for mate in pack] == list(rows.sort_values("lane_index")["key"])
    result = replay.replay(results, row["key"])
    assert result.outcome.status == "ok" and result.notes == ()
    for name in replay.COMPARED:
        assert result.outcome.metrics[name] == row[name], name
    assert result.outcome.per_image["psnr"] == list(row["psnr_per_image"])
    assert replay.identical(replay.compare(result.row, result.outcome))


def test_the_command_prints_both_columns_and_writes_the_outcome(study_results, tmp_path, capsys):
    results, frame = study_results
    row = frame.query(SETTINGS["trained"]).iloc[0]
    out = tmp_path / "again"
    assert main(["attack", "--replay", str(results), row["key"], "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "identical: yes"
    psnr = next(line for line in lines if line.startswith("psnr "))
    assert psnr.split()[1:] == [repr(float(row["psnr"]))] * 2
    assert json.loads((out / "metrics.json").read_text())["psnr"] == row["psnr"]


def one_line_error(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_a_key_not_in_the_results_is_one_line(study_results, capsys):
    results, _ = study_results
    assert "no row of" in one_line_error(["attack", "--replay", str(results), "0" * 20], capsys)


def test_a_missing_directory_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert str(missing) in one_line_error(["attack", "--replay", str(missing), "0" * 20], capsys)


def test_a_row_whose_parameters_give_another_key_is_refused(study_results, tmp_path, capsys):
    """A row written under another results format: its parameters no longer hash to its key."""
    results, _ = study_results
    rows = ResultsDir(results).read().to_pylist()
    first, *mates = [row for row in rows if row["pack_id"] == rows[0]["pack_id"]]
    foreign = tmp_path / "foreign"
    with ResultsDir(foreign) as writer:
        writer.write([{**first, "key": "f" * 20}, *mates])
    assert "another results format" in one_line_error(["attack", "--replay", str(foreign), "f" * 20], capsys)


def test_attack_without_out_or_replay_is_one_line(capsys):
    assert "--out" in one_line_error(["attack", "--dataset", "faces"], capsys)


def rewritten_pack(study_results, tmp_path, **changes) -> tuple:
    """A copy of the fedsgd setting's pack in a new results directory, its second lane's row changed;
    returns that directory and the changed row's key."""
    results, frame = study_results
    key = frame.query(SETTINGS["fedsgd"]).sort_values("lane_index")["key"].iloc[1]
    rows = ResultsDir(results).read().to_pylist()
    pack_id = next(row["pack_id"] for row in rows if row["key"] == key)
    copy = tmp_path / "changed"
    with ResultsDir(copy) as writer:
        writer.write([{**row, **changes} if row["key"] == key else row for row in rows if row["pack_id"] == pack_id])
    return copy, key


def test_a_row_with_an_impossible_thread_count_is_one_line_naming_the_field(study_results, tmp_path, capsys):
    results, key = rewritten_pack(study_results, tmp_path, threads=-3)
    out = tmp_path / "never"
    assert one_line_error(["attack", "--replay", str(results), key, "--out", str(out)], capsys) == (
        f"gradinv attack: error: threads of row {key}: -3 is not valid; a trial runs on 1 or more threads; "
        "correct the row's threads column or replay another row"
    )
    assert not out.exists()


def test_replaying_a_failed_row_says_how_it_failed(study_results, tmp_path, capsys):
    """Its metrics are missing, so they differ: the report says why, the error's control characters escaped."""
    results, key = rewritten_pack(
        study_results,
        tmp_path,
        status="failed",
        error="RuntimeError: boom\x1b[2J",
        psnr=None,
        ssim=None,
        psnr_per_image=None,
    )
    assert main(["attack", "--replay", str(results), key]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert "the stored trial failed: RuntimeError: boom\\x1b[2J" in lines
    assert lines[-1] == "identical: no"


# ------------------------------------------------------------------------------------------------
# `layers` and `layer_set` merged into one parameter: keys and rows from before the merge stay valid.

TINY = dict(dataset="faces", image_size=8, width=4, iterations=5)
KEYS_BEFORE_THE_MERGE = [  # trial_key of each, computed with `layer_set` still a knob of its own
    ("first4", "85a68f9e2e0fff32b691"),  # then layer_set: first4
    ((0, -1), "09bf660794ee90d112a4"),
    ("all", "5eb05644a211a3fb1801"),  # the default, then layer_set's
]


@pytest.mark.parametrize("layers, key", KEYS_BEFORE_THE_MERGE)
def test_a_trials_layers_keep_the_key_they_had_before_the_merge(layers, key):
    from gradinv.results.schema import trial_key
    from gradinv.trial import TrialSpec

    assert trial_key(TrialSpec(**TINY, layers=layers)) == key


def _old_layout(table):
    """The table with its columns in the order of files written before the merge: layer_set after clamp_init."""
    names = [name for name in table.column_names if name != "layer_set"]
    names.insert(names.index("clamp_init") + 1, "layer_set")
    return table.select(names)


@pytest.mark.parametrize(
    "layers, columns",
    [("first4", {"layers": None, "layer_set": "first4"}), ((0, -1), {"layers": [0, -1], "layer_set": "all"})],
)
def test_a_row_written_before_the_merge_reads_and_replays_identically(tmp_path, layers, columns):
    import pyarrow.parquet as pq
    import torch

    from gradinv.provenance import provenance
    from gradinv.results.schema import parameter_columns, to_table
    from gradinv.trial import TrialSpec, run_trials

    spec = TrialSpec(**TINY, layers=layers)
    key = dict(KEYS_BEFORE_THE_MERGE)[layers]
    written = parameter_columns(spec)
    assert {name: written[name] for name in columns} == columns  # the columns as they were written before
    outcome = run_trials([spec])[0]
    row = {
        **written,
        **{name: outcome.metrics[name] for name in replay.COMPARED},
        "key": key,
        "study": "old",
        "status": "ok",
        "lanes": 1,
        "lane_index": 0,
        "threads": torch.get_num_threads(),
        "device": provenance("cpu")["device"],
        "psnr_per_image": outcome.per_image["psnr"],
    }
    results = tmp_path / "results"
    results.mkdir()
    pq.write_table(_old_layout(to_table([row])), results / "part-0.parquet")
    read, _ = replay.find_pack(results, key)
    assert {name: read[name] for name in columns} == columns
    assert replay.spec_from_row(read) == spec
    again = replay.replay(results, key)
    assert again.notes == () and replay.identical(replay.compare(again.row, again.outcome))
