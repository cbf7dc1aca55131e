"""Every reader of a results directory (`status`, `report`, `export`, and `run` as it opens the directory)
meets a bad directory with one line and exit code 2: damaged or foreign Parquet files, a read-only file
system, an export into the results, crafted keys, a report that cannot be written.

Rows are written directly through gradinv.results.store (no Ray); `run` refuses before it would start Ray.
"""

import errno
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from analysis import load
from gradinv import data
from gradinv.results import store as results_module
from gradinv.results.journal import JOURNAL_DIR
from gradinv.results.schema import FORMAT_KEY, RESULTS_FORMAT, parameter_columns, results_format, to_table, trial_key
from gradinv.results.store import SET_ASIDE_DIR, SET_ASIDE_FLAG, ResultsDir
from gradinv.trial import TrialSpec
from sweep.cli.main import main

STUDY = """\
name: faults
data: {dataset: faces, images: 2, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 3}
resources: {num_cpus: 1}
"""


def trial_rows(count: int = 4, study: str = "faults") -> list[dict]:
    """Finished rows as `run` writes them, with 8x8 PNGs, two settings (fedsgd, fedavg)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        spec = TrialSpec(
            dataset="faces", images=(i,), image_size=8, width=2, iterations=3, fl=("fedsgd", "fedavg")[i % 2]
        )
        truth, recon = (data.png_bytes(torch.rand(1, 8, 8, generator=generator)) for _ in range(2))
        rows.append(
            {
                **parameter_columns(spec),
                "study": study,
                "key": trial_key(spec),
                "status": "ok",
                "attempt": 1,
                "psnr": 10.0 + i,
                "ssim": 0.1 * i,
                "mse": 0.1,
                "feature_mse": 0.1,
                "label_accuracy": 1.0,
                "psnr_per_image": [10.0 + i],
                "ssim_per_image": [0.1 * i],
                "mse_per_image": [0.1],
                "feature_mse_per_image": [0.1],
                "truth_png": [truth],
                "reconstruction_png": [recon],
                "finished_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
                "attack_seconds": 1.0,
            }
        )
    return rows


@pytest.fixture
def results(tmp_path) -> Path:
    path = tmp_path / "results"
    with ResultsDir(path) as directory:
        directory.write(trial_rows())
    return path


def verb_args(verb: str, results: Path, tmp_path: Path) -> list[str]:
    """The command line of ``verb`` on ``results``; `run` gets a study whose trials are not there."""
    if verb == "report":
        return ["report", str(results), "--out", str(tmp_path / "report.html")]
    if verb == "export":
        return ["export", str(results), "--to", str(tmp_path / "export")]
    if verb == "run":
        (tmp_path / "study.yaml").write_text(STUDY)
        return ["run", str(tmp_path / "study.yaml"), "--results", str(results), "--no-progress"]
    return [verb, str(results)]


def one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gradinv {verb}: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_ray(monkeypatch):
    """`run` must refuse before it connects to Ray: connecting fails the test instead."""
    from sweep import runner

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runner, "connect", refuse)


def listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. damaged and foreign *.parquet files


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    (whole,) = ResultsDir(path.parent).files()
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])


def _not_parquet(path: Path) -> None:
    path.write_text("key,status\nabc,ok\n")


def _foreign(path: Path) -> None:
    pd.DataFrame({"key": ["0" * 20], "position": [0], "truth_file": ["images/x.png"]}).to_parquet(path)


def _wrong_type(path: Path) -> None:  # our column names, another type
    pq.write_table(pa.table({"study": ["s"], "key": ["0" * 20], "status": ["ok"], "psnr": ["high"]}), path)


BAD_FILES = {
    "zero-bytes": _zero_bytes,
    "truncated": _truncated,
    "not-parquet": _not_parquet,
    "foreign-schema": _foreign,
    "wrong-type": _wrong_type,
}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_results(request, results) -> tuple[Path, Path]:
    """Good results plus one bad file; returns (results, the bad file)."""
    bad = results / "part-9999999999999999999-bad.parquet"
    BAD_FILES[request.param](bad)
    return results, bad


@pytest.mark.parametrize("verb", ["status", "report", "export", "run"])
def test_a_bad_parquet_file_is_named_in_one_line_and_nothing_changes(verb, bad_results, tmp_path, capsys, no_ray):
    results, bad = bad_results
    before = listing(results)
    assert main(verb_args(verb, results, tmp_path)) == 2
    err = one_line_error(capsys, verb)
    assert f"results file: '{bad}'" in err and SET_ASIDE_FLAG in err
    assert listing(results) == before  # `run` deletes nothing and repairs nothing
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "export").exists()


def test_run_sets_a_bad_file_aside_when_asked_and_keeps_it(bad_results, tmp_path, capsys, monkeypatch):
    results, bad = bad_results
    content = bad.read_bytes()
    started = []
    from sweep import runner

    class Stop(Exception):
        pass

    def connect(*args, **kwargs):  # the directory is open and repaired by now: stop before Ray
        started.append(ResultsDir(results).statuses())
        raise Stop

    monkeypatch.setattr(runner, "connect", connect)
    with pytest.raises(Stop):
        main([*verb_args("run", results, tmp_path), SET_ASIDE_FLAG])
    moved = results / SET_ASIDE_DIR / bad.name
    assert not bad.exists() and moved.read_bytes() == content
    assert f"set aside {bad}" in capsys.readouterr().err
    assert len(started[0]) == 4  # the good rows, read without the bad file
    assert main(["status", str(results)]) == 0
    assert "4 rows in 1 files" in capsys.readouterr().out
    assert len(pd.read_parquet(results)) == 4  # pyarrow skips the set-aside folder too


def test_a_second_bad_file_of_the_same_name_is_kept_beside_the_first(results, capsys):
    first, second = b"first", b"second"
    (results / "part-bad.parquet").write_bytes(first)
    with ResultsDir(results, set_aside_bad_files=True):
        pass
    (results / "part-bad.parquet").write_bytes(second)
    with ResultsDir(results, set_aside_bad_files=True):
        pass
    kept = sorted(p.read_bytes() for p in (results / SET_ASIDE_DIR).iterdir())
    assert kept == sorted([first, second])


def with_damaged_pages(parquet: bytes) -> bytes:
    """``parquet`` with every data page overwritten, the footer left intact."""
    raw = bytearray(parquet)
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    for i in range(4, len(raw) - footer):
        raw[i] = 0xAB
    return bytes(raw)


def test_damaged_pages_behind_a_sound_footer_are_named_by_every_reader(results, tmp_path, capsys):
    (file,) = ResultsDir(results).files()
    file.write_bytes(with_damaged_pages(file.read_bytes()))
    for verb in ("status", "report", "export"):
        assert main(verb_args(verb, results, tmp_path)) == 2
        err = one_line_error(capsys, verb)
        assert f"results file: '{file}'" in err and "damaged" in err


def test_an_older_file_lacking_newer_columns_is_still_read(results, capsys):
    rows = trial_rows(1, study="old")
    rows[0]["key"] = "0" * 20  # a trial of its own: the same key would count once (the newer row)
    old = to_table(rows).select(["study", "key", "status", "fl", "psnr"])
    pq.write_table(old, results / "part-0000000000000000000-old.parquet")
    assert main(["status", str(results)]) == 0
    assert "5 rows in 2 files" in capsys.readouterr().out


def test_status_shows_psnr_beside_the_baseline_and_the_gain_per_setting(tmp_path, capsys):
    rows = trial_rows()
    for row in rows:
        row.update(baseline_psnr=9.0, psnr_gain=row["psnr"] - 9.0)
    with ResultsDir(tmp_path / "r") as directory:
        directory.write(rows)
    assert main(["status", str(tmp_path / "r")]) == 0
    table = capsys.readouterr().out.split("and the verdict:\n")[1].splitlines()
    assert table[0].split() == ["trials", "psnr", "baseline", "median_gain", "verdict"] and table[1].split() == ["fl"]
    assert table[2].split()[:5] == ["fedavg", "2", "12.0", "9.0", "3.0"]  # psnr 11 and 13
    assert table[3].split()[:5] == ["fedsgd", "2", "11.0", "9.0", "2.0"]  # psnr 10 and 12
    assert all(line.endswith("no leakage detected (n too small)") for line in table[2:4])  # 2 trials, no curves


@pytest.mark.parametrize("schema_version", [b"1", b"2", None])
def test_run_into_a_directory_of_another_results_format_refuses_in_one_line(
    schema_version, results, tmp_path, capsys, no_ray
):
    """Keys of another format never match ours: `run` would redo every trial beside the old rows."""
    old = to_table(trial_rows(1, study="old"))
    old = old.replace_schema_metadata({b"gradinv.schema_version": schema_version} if schema_version else None)
    pq.write_table(old, results / "part-0000000000000000000-old.parquet")
    before = listing(results)
    assert main(verb_args("run", results, tmp_path)) == 2
    error = one_line_error(capsys, "run")
    held = f"results format {schema_version.decode()}" if schema_version else "an unknown results format"
    assert held in error and f"format {RESULTS_FORMAT}" in error and "new directory" in error
    assert listing(results) == before
    assert main(["status", str(results)]) == 0  # still read


def test_files_written_now_record_their_results_format(results):
    assert {results_format(f) for f in ResultsDir(results).files()} == {RESULTS_FORMAT}


# ---------------------------------------------------------------------------------------------
# 2. a read-only results directory


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_directory_that_cannot_be_written_is_one_line(code, results, tmp_path, capsys, monkeypatch, no_ray):
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(results / ".gradinv.lock"))

    monkeypatch.setattr(results_module.filelock.FileLock, "acquire", refuse)
    assert main(verb_args("run", results, tmp_path)) == 2
    err = one_line_error(capsys, "run")
    assert f"--results: '{results}'" in err and os.strerror(code) in err


def _mount(path: Path, *commands: list[str]) -> None:
    """Run mount ``commands`` onto ``path`` (made here); skip the test where mounting is not permitted
    (tests run as root, which permission bits do not stop: only a read-only mount does)."""
    path.mkdir()
    for command in commands:
        done = subprocess.run(["mount", *command, str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            path.rmdir()
            pytest.skip(f"mounting is not permitted here: {done.stderr.strip()}")


def test_results_on_a_read_only_file_system_are_read_and_never_written(results, tmp_path, capsys, no_ray):
    mount = tmp_path / "read-only"
    _mount(mount, ["--bind", str(results)], ["-o", "remount,bind,ro"])
    try:
        before = listing(mount)
        assert main(verb_args("run", mount, tmp_path)) == 2  # the lock cannot be taken
        assert f"--results: '{mount}'" in one_line_error(capsys, "run")
        assert main(verb_args("run", mount / "new", tmp_path)) == 2  # nor the directory made
        assert "Read-only file system" in one_line_error(capsys, "run")
        for verb in ("status", "report", "export"):  # reading needs no writing
            assert main(verb_args(verb, mount, tmp_path)) == 0, capsys.readouterr().err
        assert listing(mount) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _mount_read_only_tmpfs(path: Path) -> None:
    _mount(path, ["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])


def test_a_report_into_a_read_only_file_system_is_one_line(results, tmp_path, capsys):
    mount = tmp_path / "read-only"
    _mount_read_only_tmpfs(mount)
    try:
        for out in (mount / "report.html", mount / "new" / "report.html"):
            assert main(["report", str(results), "--out", str(out)]) == 2
            assert f"--out: '{out}'" in one_line_error(capsys, "report")
        assert main(["export", str(results), "--to", str(mount / "export")]) == 2
        assert f"--to: '{mount / 'export'}'" in one_line_error(capsys, "export")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------------------------------------
# 3. an export into the results directory


@pytest.mark.parametrize("where", [".", "exported", "a/b"])
def test_export_into_the_results_is_refused_and_writes_nothing(where, results, tmp_path, capsys):
    before = listing(results)
    to = results / where
    assert main(["export", str(results), "--to", str(to)]) == 2
    assert f"--to: '{to}'" in one_line_error(capsys, "export")
    assert listing(results) == before
    assert main(["status", str(results)]) == 0 and "4 rows in 1 files" in capsys.readouterr().out


def test_an_export_index_left_in_the_results_is_named_not_counted(results, tmp_path, capsys):
    assert main(["export", str(results), "--to", str(tmp_path / "export")]) == 0
    (results / "index.parquet").write_bytes((tmp_path / "export" / "index.parquet").read_bytes())
    for verb in ("status", "report"):
        assert main(verb_args(verb, results, tmp_path)) == 2
        assert f"results file: '{results / 'index.parquet'}'" in one_line_error(capsys, verb)


# ---------------------------------------------------------------------------------------------
# 4. crafted keys


@pytest.mark.parametrize("key", ["../../escaped", "/tmp/absolute", "a/b", "..", "", "k" * 65])
def test_export_refuses_a_key_that_is_not_a_plain_name(key, results, tmp_path, capsys):
    crafted = trial_rows(1, study="crafted")
    crafted[0]["key"] = key
    pq.write_table(to_table(crafted), results / "part-9999999999999999999-crafted.parquet")
    to = tmp_path / "deep" / "export"
    assert main(["export", str(results), "--to", str(to)]) == 2
    err = one_line_error(capsys, "export")
    assert f"key: {key!r}" in err and "part-9999999999999999999-crafted.parquet" in err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escaped").exists()


def test_export_never_writes_through_a_link_out_of_its_directory(results, tmp_path, capsys):
    to, elsewhere = tmp_path / "export", tmp_path / "elsewhere"
    to.mkdir()
    elsewhere.mkdir()
    (to / "images").symlink_to(elsewhere)
    assert main(["export", str(results), "--to", str(to)]) == 2
    assert f"--to: '{to}'" in one_line_error(capsys, "export")
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 5. a report that cannot be written


def test_a_report_whose_directory_cannot_be_made_is_one_line(results, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    for out in (tmp_path / "a-file" / "report.html", tmp_path / "a-file" / "deeper" / "report.html"):
        assert main(["report", str(results), "--out", str(out)]) == 2
        assert f"--out: '{out}'" in one_line_error(capsys, "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "results"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC])
def test_a_report_that_fails_to_write_is_one_line_and_leaves_no_file(code, results, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "report.html"

    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    assert main(["report", str(results), "--out", str(out)]) == 2
    assert os.strerror(code) in one_line_error(capsys, "report")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_report_still_writes_where_it_can(results, tmp_path, capsys):
    out = tmp_path / "new" / "report.html"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and list(out.parent.iterdir()) == [out]


# ---------------------------------------------------------------------------------------------
# 6. two rows of one key: what a crash between writing a batch and dropping the rows it replaced leaves


def test_every_reader_counts_the_row_the_runner_keeps_when_two_files_hold_a_key(results, tmp_path, capsys):
    first = trial_rows()[0]
    retried = {**first, "status": "failed", "error": "a retry that failed", "psnr": None}
    # a batch written, the driver killed before it dropped the older row: the newer one counts
    ResultsDir._write_atomically(to_table([retried]), results / "part-9999999999999999999-retry.parquet")
    assert sorted(load.load_trials(results)["key"]) == sorted(row["key"] for row in trial_rows())
    assert load.load_trials(results).set_index("key").loc[first["key"], "status"] == "failed"
    assert first["key"] not in dict(load.finished_keys(results))  # its older ok row does not count
    assert len(load.finished_keys(results)) == 3 and len(list(load.iter_image_rows(results))) == 3
    assert ResultsDir(results).statuses()[first["key"]] == "failed" and len(ResultsDir(results).read()) == 4

    assert main(["status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "4 rows in 2 files" in out and "a retry that failed" in out
    assert main(verb_args("export", results, tmp_path)) == 0
    index = pd.read_csv(tmp_path / "export" / "index.csv")
    assert len(index) == 3 and first["key"] not in set(index["key"])
    assert main(verb_args("report", results, tmp_path)) == 0

    counted = load.load_trials(results).sort_values("key").reset_index(drop=True)
    with ResultsDir(results):  # `run` opening the directory repairs it by the same rule
        pass
    assert pq.read_table(results / "part-9999999999999999999-retry.parquet").num_rows == 1
    assert len(pd.read_parquet(results)) == 4  # the files themselves now hold one row per key
    pd.testing.assert_frame_equal(load.load_trials(results).sort_values("key").reset_index(drop=True), counted)


def test_of_two_rows_of_a_key_in_one_file_the_first_counts(tmp_path):
    rows = trial_rows(2)
    twice = [rows[0], {**rows[0], "psnr": 99.0}, rows[1]]
    path = tmp_path / "results"
    path.mkdir()
    pq.write_table(to_table(twice), path / "part-0000000000000000001-twice.parquet")
    assert ResultsDir(path).read(["key", "psnr"])["psnr"].to_pylist() == [10.0, 11.0]
    assert load.load_trials(path)["psnr"].tolist() == [10.0, 11.0]


# ---------------------------------------------------------------------------------------------
# 7. what another program leaves: in the journal, beside the files, as links


def _journal_file(results: Path, name: str = "123-0000000000000000001.arrows") -> Path:
    (results / JOURNAL_DIR).mkdir(exist_ok=True)
    return results / JOURNAL_DIR / name


def _stream(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _foreign_name(results: Path) -> Path:
    path = _journal_file(results, "notes.arrows")
    _stream(path, to_table(trial_rows(1)))
    return path


def _another_schema(results: Path) -> Path:
    path = _journal_file(results)
    _stream(path, pa.table({"key": ["0" * 20], "score": [1.0]}))
    return path


def _another_format(results: Path) -> Path:
    path = _journal_file(results)
    table = to_table(trial_rows(1))
    _stream(path, table.replace_schema_metadata({**table.schema.metadata, FORMAT_KEY: b"2"}))
    return path


def _a_fifo(results: Path) -> Path:
    path = _journal_file(results)
    os.mkfifo(path)
    return path


def _a_directory(results: Path) -> Path:
    path = _journal_file(results)
    path.mkdir()
    return path


FOREIGN_JOURNALS = {
    "foreign-name": _foreign_name,
    "another-schema": _another_schema,
    "another-format": _another_format,
    "fifo": _a_fifo,
    "directory": _a_directory,
}


@pytest.mark.parametrize("kind", sorted(FOREIGN_JOURNALS))
@pytest.mark.parametrize("verb", ["run", "status"])
def test_a_file_in_the_journal_that_gradinv_did_not_write_is_named_and_kept(
    kind, verb, results, tmp_path, capsys, no_ray
):
    foreign = FOREIGN_JOURNALS[kind](results)
    before = listing(results)
    assert main(verb_args(verb, results, tmp_path)) == 2
    err = one_line_error(capsys, verb)
    assert f"results file: '{foreign}'" in err and SET_ASIDE_FLAG in err, err
    assert listing(results) == before and os.path.lexists(foreign)


def test_a_foreign_journal_file_is_set_aside_when_asked(results):
    foreign = _foreign_name(results)
    content = foreign.read_bytes()
    with ResultsDir(results, set_aside_bad_files=True) as directory:
        assert len(directory.read()) == 4  # not folded in: it is not ours
    assert not foreign.exists() and (results / SET_ASIDE_DIR / foreign.name).read_bytes() == content


def test_a_journal_written_before_newer_columns_existed_is_folded_in(results):
    journal = _journal_file(results)
    row = {**trial_rows(1)[0], "key": "0" * 20}
    table = to_table([row]).select(["study", "key", "status", "psnr"])
    _stream(journal, table.replace_schema_metadata({FORMAT_KEY: str(RESULTS_FORMAT).encode()}))
    with ResultsDir(results) as directory:
        assert directory.read(["key", "psnr"]).to_pylist()[-1] == {"key": "0" * 20, "psnr": 10.0}
    assert not journal.exists()


def _notes(results: Path) -> Path:
    (results / "notes.txt").write_text("a note\n")
    return results / "notes.txt"


def _plots(results: Path) -> Path:
    (results / "plots").mkdir()
    (results / "plots" / "psnr.png").write_bytes(b"\x89PNG")
    return results / "plots"


def _fifo(results: Path) -> Path:
    os.mkfifo(results / "part-9999999999999999999-fifo.parquet")
    return results / "part-9999999999999999999-fifo.parquet"


FOREIGN_ENTRIES = {
    "notes.txt": (_notes, "pandas and pyarrow read every visible file"),
    "a directory": (_plots, "a directory, not a results file"),
    "a FIFO": (_fifo, "a FIFO, not a results file; Parquet readers of the directory would hang on it"),
}


@pytest.mark.parametrize("entry", sorted(FOREIGN_ENTRIES))
def test_a_visible_entry_that_is_not_a_results_file_is_named_by_every_command(entry, results, tmp_path, driver):
    """pandas and pyarrow read every visible name of the directory, so gradinv names what would break
    them; a FIFO is never opened (reading it would hang: each command runs in its own process here)."""
    make, problem = FOREIGN_ENTRIES[entry]
    foreign = make(results)
    before = listing(results)
    for verb in ("status", "report", "export", "run"):
        code, output = driver(*verb_args(verb, results, tmp_path)).wait(timeout=120)
        assert code == 2, output
        assert output.count("\n") == 1 and output.startswith(f"gradinv {verb}: error: results file: '{foreign}'")
        assert problem in output and SET_ASIDE_FLAG in output, output
    assert listing(results) == before and os.path.lexists(foreign)


def test_a_foreign_entry_set_aside_leaves_a_directory_pandas_reads(results, capsys):
    _notes(results)
    with pytest.raises(pa.ArrowInvalid, match="notes.txt"):
        pd.read_parquet(results)
    with ResultsDir(results, set_aside_bad_files=True):
        pass
    assert (results / SET_ASIDE_DIR / "notes.txt").read_text() == "a note\n"
    assert len(pd.read_parquet(results)) == 4


def test_bad_files_appearing_while_a_driver_writes_are_left_alone_and_the_rows_kept(results):
    rows = trial_rows(6)[4:]
    (good,) = ResultsDir(results).files()
    damage = with_damaged_pages(good.read_bytes())  # the same keys as the good file
    bad = results / "part-9999999999999999999-bad.parquet"
    damaged = results / "part-9999999999999999997-damaged.parquet"
    with ResultsDir(results) as directory:  # they appear after the directory was opened and checked
        bad.write_text("not parquet")
        os.mkfifo(results / "part-9999999999999999998-fifo.parquet")
        damaged.write_bytes(damage)
        directory.write(rows)  # drops replaced keys from the files it can read, never opens the FIFO
        directory.write([{**rows[0], "psnr": 99.0}, {**trial_rows()[0], "psnr": 98.0}])
    assert bad.read_text() == "not parquet" and damaged.read_bytes() == damage
    for each in (bad, damaged, results / "part-9999999999999999998-fifo.parquet"):
        each.unlink()
    frame = pd.read_parquet(results).set_index("key")
    assert len(frame) == 6 and frame.index.is_unique
    assert frame.loc[rows[0]["key"], "psnr"] == 99.0 and frame.loc[trial_rows()[0]["key"], "psnr"] == 98.0


@pytest.mark.parametrize(
    "name, flags", [(JOURNAL_DIR, []), (JOURNAL_DIR, [SET_ASIDE_FLAG]), (SET_ASIDE_DIR, [SET_ASIDE_FLAG])]
)
def test_a_directory_gradinv_writes_in_that_is_a_link_is_refused_and_nothing_is_deleted(
    name, flags, results, tmp_path, capsys, no_ray
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _stream(elsewhere / "123-0000000000000000001.arrows", to_table(trial_rows(1)))  # a journal of ours, even
    (elsewhere / "part-bad.parquet").write_text("someone's file")
    (results / name).symlink_to(elsewhere)
    (results / "part-bad.parquet").write_text("a bad file to set aside")
    outside, before = listing(elsewhere), listing(results)
    assert main([*verb_args("run", results, tmp_path), *flags]) == 2
    err = one_line_error(capsys, "run")
    assert f"results file: '{results / name}' is not valid; it is a symbolic link" in err, err
    assert listing(elsewhere) == outside and listing(results) == before


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(results, tmp_path, capsys, no_ray):
    target = tmp_path / "precious"
    target.write_text("keep me")
    (results / ".gradinv.lock").unlink(missing_ok=True)
    (results / ".gradinv.lock").symlink_to(target)
    assert main(verb_args("run", results, tmp_path)) == 2
    assert f"results file: '{results / '.gradinv.lock'}'" in one_line_error(capsys, "run")
    assert target.read_text() == "keep me"
