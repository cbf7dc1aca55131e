"""The driver loses nothing it finished: on SIGTERM, on a full or read-only disk; impossible
resource requests are refused instead of waited on forever."""

import errno
import json
import os
import re
import signal
import subprocess
import time

import pandas as pd
import pytest

from gradinv.errors import ConfigError
from gradinv.results.journal import JOURNAL_DIR, RowJournal
from gradinv.results.schema import to_table, trial_key
from gradinv.results.store import ResultsDir
from sweep.cli.main import main
from sweep.preflight import NodeFit
from sweep.study import Resources, load_study

STUDY = """
name: crash
data: {{dataset: faces, images: {images}, image_size: 8}}
fixed: {{model: convnet, width: 2, iterations: 3}}
grid:
  fl: [fedsgd, fedavg]
resources: {{num_cpus: {num_cpus}, num_gpus: {num_gpus}}}
max_retries: 1
"""


def study_file(write_study, images=2, num_cpus=1, num_gpus=0):
    return write_study(STUDY.format(images=images, num_cpus=num_cpus, num_gpus=num_gpus))


def with_a_stuck_trial(study_path, tmp_path) -> dict:
    """The study's first trial sleeps (stays in flight); its driver's environment says so."""
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({trial_key(load_study(study_path).trials[0]): "sleep:600"}))
    return {"GRADINV_FAULTS": str(faults)}


def leftovers(results) -> list[str]:
    """Files no reader should meet: partial files and journals."""
    hidden = [p.name for p in results.glob(".*.tmp")]
    return hidden + [p.name for p in (results / JOURNAL_DIR).glob("*")]


def wait_for(condition, seconds=240):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_writes_the_finished_rows_and_exits_143(write_study, tmp_path, driver):
    study_path = study_file(write_study, images=6)
    results = tmp_path / "results"
    run = driver(
        "run",
        str(study_path),
        "--results",
        str(results),
        "--no-progress",
        "--batch-seconds",
        "600",
        env=with_a_stuck_trial(study_path, tmp_path),
    )
    wait_for(lambda: ResultsDir(results).journalled_rows() >= 3)
    journalled = ResultsDir(results).journalled_rows()
    run.signal(signal.SIGTERM)
    code, output = run.wait()
    assert code == 143, output
    assert "Traceback" not in output and "run the same command to finish" in output
    frame = pd.read_parquet(results)
    assert 3 <= journalled <= len(frame) < 12 and frame["key"].is_unique
    assert leftovers(results) == []


# ---------------------------------------------------------------------------------------------
# A full, read-only or forbidden disk


def _refuse(code):
    def write(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize(
    "code, seams",
    [
        (errno.ENOSPC, ["batch"]),  # the small journal appends fit, the batch file does not
        (errno.EROFS, ["batch", "journal"]),  # nothing can be written
        (errno.EACCES, ["journal"]),
    ],
)
def test_a_write_failure_stops_the_run_with_one_line_and_keeps_the_rows(
    code, seams, write_study, tmp_path, monkeypatch, capsys
):
    study_path = study_file(write_study, images=2)
    results = tmp_path / "results"
    if "batch" in seams:
        monkeypatch.setattr(ResultsDir, "write", _refuse(code))
    if "journal" in seams:
        monkeypatch.setattr(RowJournal, "append", _refuse(code))
    assert main(["run", str(study_path), "--results", str(results), "--no-progress", "--batch-rows", "1"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("gradinv")]  # Ray may warn too
    assert len(lines) == 1 and str(results) in lines[0] and os.strerror(code) in lines[0], err
    assert not list(results.glob(".*.tmp")) and ResultsDir(results).files() == []
    journalled = ResultsDir(results).journalled_rows()
    if "journal" in seams:  # the rows could not be kept: the line says how many
        assert journalled == 0 and "1 finished row could not be kept" in lines[0], lines[0]
    else:  # the one finished task's row stays in the journal; the next writer folds it in
        assert journalled == 1 and "1 finished row kept in" in lines[0], lines[0]
        monkeypatch.undo()
        with ResultsDir(results) as reopened:
            assert len(reopened.read()) == 1
        assert leftovers(results) == []


def test_a_real_full_then_read_only_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root or CAP_SYS_ADMIN: {mounted.stderr.strip()}")
    try:
        results = disk / "results"
        rows = [{"study": "s", "key": f"k{i}", "status": "ok", "error": "x" * 2000} for i in range(40)]
        with ResultsDir(results) as writer:
            writer.write(rows[:2])
            journal = writer.journal()
            journal.append(to_table(rows[2:3]))
            filler = disk / "filler"
            with pytest.raises(OSError) as full, open(filler, "wb", buffering=0) as handle:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            assert full.value.errno == errno.ENOSPC
            with pytest.raises(OSError) as full:
                writer.write(rows[3:])
            assert full.value.errno == errno.ENOSPC
            assert not list(results.glob(".*.tmp")) and len(writer.read()) == 2  # nothing partial, nothing lost
            with pytest.raises(OSError) as full:
                journal.append(to_table(rows[3:]))
            assert full.value.errno == errno.ENOSPC
            assert writer.journalled_rows() == 1  # the torn append is left out; the row before it stands
            filler.unlink()
        with ResultsDir(results) as writer:  # space again: the next writer folds the journal in
            assert sorted(writer.read(["key"])["key"].to_pylist()) == ["k0", "k1", "k2"]
        assert leftovers(results) == []

        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OSError) as read_only:
            RowJournal(results / JOURNAL_DIR, to_table(rows[:1]).schema).append(to_table(rows[:1]))
        assert read_only.value.errno == errno.EROFS
        assert len(ResultsDir(results).read()) == 3
    finally:  # a file still open keeps the mount busy: detach it then
        if subprocess.run(["umount", str(disk)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


# ---------------------------------------------------------------------------------------------
# Resource requests no node can meet


def test_more_cpus_than_any_local_node_is_refused_at_once(write_study, tmp_path, driver):
    study_path = study_file(write_study, images=1, num_cpus=64)
    run = driver("run", str(study_path), "--results", str(tmp_path / "results"), "--no-progress")
    code, output = run.wait(timeout=120)
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if "resources.num_cpus" in line]
    assert len(lines) == 1 and "Traceback" not in output, output
    largest = re.search(r"the largest node has (\d+) CPU", lines[0])
    assert "64" in lines[0] and largest and int(largest.group(1)) < 64, lines[0]


class _FakeRay:
    """Ray's node table as a cluster reports it, one snapshot per call."""

    def __init__(self, *snapshots):
        self.snapshots = list(snapshots)

    def nodes(self):
        return self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]


def _node(cpus, gpus=0, alive=True):
    return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}}


@pytest.mark.parametrize(
    "resources, nodes, field, largest",
    [
        (Resources(num_cpus=1, num_gpus=1), [_node(8)], "resources.num_gpus", "0 GPUs"),
        (Resources(num_cpus=16), [_node(8), _node(32, alive=False)], "resources.num_cpus", "8 CPUs"),
        (Resources(num_cpus=8, num_gpus=1), [_node(8), _node(4, gpus=2)], "resources", "no node has both"),
    ],
)
def test_a_local_instance_refuses_what_no_node_has(resources, nodes, field, largest):
    with pytest.raises(ConfigError) as refused:
        NodeFit(_FakeRay(nodes), resources, named_cluster=False, wait_seconds=300).check()
    message = str(refused.value)
    assert message.startswith(f"{field}:") and largest in message, message


def test_a_named_cluster_waits_for_autoscaling_then_says_so(capsys):
    clock = [0.0]
    small, grown = [_node(8)], [_node(8), _node(64)]
    fit = NodeFit(
        _FakeRay(small, small, grown),
        Resources(num_cpus=64),
        named_cluster=True,
        wait_seconds=300,
        clock=lambda: clock[0],
    )
    fit.check()  # no node fits yet: it says it waits, and does
    assert "waiting up to 300 s" in capsys.readouterr().out
    clock[0] = 200.0
    fit.check()
    clock[0] = 299.0
    fit.check()  # a node that fits has joined
    clock[0] = 10_000.0
    fit.check()

    clock[0] = 0.0
    never = NodeFit(
        _FakeRay(small), Resources(num_cpus=64), named_cluster=True, wait_seconds=300, clock=lambda: clock[0]
    )
    never.check()
    clock[0] = 300.5
    with pytest.raises(ConfigError) as refused:
        never.check()
    message = str(refused.value)
    assert message.startswith("resources.num_cpus: 64") and "300 s" in message and "8 CPUs" in message, message


def test_status_counts_journalled_rows_with_the_batched_ones(tmp_path, capsys):
    results = tmp_path / "results"
    rows = [{"study": "s", "key": f"{i:020x}", "status": "ok", "psnr": 20.0 + i} for i in range(5)]
    with ResultsDir(results) as directory:
        directory.write(rows[:2])
    journal = RowJournal(results / JOURNAL_DIR, to_table(rows).schema)
    journal.append(to_table(rows[2:]))  # a driver killed before its batch file: its rows are still finished
    journal.close()
    assert main(["status", str(results)]) == 0
    assert "5 rows in 1 files and 3 in the journal" in capsys.readouterr().out


def test_a_bad_file_appearing_mid_run_ends_it_with_one_line_and_every_row_kept(
    write_study, tmp_path, monkeypatch, capsys, ray_tmpdir
):
    """The batches go on beside it (no traceback at the next write); the summary, which reads the
    directory, names it like any bad file."""
    study_path = study_file(write_study, images=2)
    results = tmp_path / "results"
    bad = results / "part-0000000000000000001-bad.parquet"
    write = ResultsDir.write

    def write_after_a_bad_file_appears(self, rows):
        if not bad.exists():
            bad.write_text("not parquet")
        return write(self, rows)

    monkeypatch.setattr(ResultsDir, "write", write_after_a_bad_file_appears)
    assert main(["run", str(study_path), "--results", str(results), "--no-progress", "--batch-rows", "1"]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("gradinv")]  # Ray may warn too
    assert len(lines) == 1 and lines[0].startswith(f"gradinv run: error: results file: '{bad}'"), err
    assert bad.read_text() == "not parquet"
    bad.unlink()
    frame = pd.read_parquet(results)
    assert len(frame) == 4 and frame["key"].is_unique and (frame["status"] == "ok").all()
    assert leftovers(results) == []
