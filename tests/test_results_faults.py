"""Every reader of a results directory (`status`, `report`, `export`, and `run` as it opens the directory)
meets a bad directory with one line and exit code 2: damaged or foreign Parquet files, a read-only file
system, an export into the results, crafted keys, a report that cannot be written.

Rows are written directly through sweep.results (no Ray); `run` refuses before it would start Ray.
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

from gradinv import data
from gradinv.trial import TrialSpec
from sweep import results as results_module
from sweep.cli import main
from sweep.results import SET_ASIDE_DIR, SET_ASIDE_FLAG, ResultsDir
from sweep.schema import RESULTS_FORMAT, parameter_columns, results_format, to_table, trial_key

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
        spec = TrialSpec(dataset="faces", images=(i,), image_size=8, width=2, iterations=3,
                         fl=("fedsgd", "fedavg")[i % 2])  # fmt: skip
        truth, recon = (data.png_bytes(torch.rand(1, 8, 8, generator=generator)) for _ in range(2))
        rows.append({
            **parameter_columns(spec), "study": study, "key": trial_key(spec), "status": "ok", "attempt": 1,
            "psnr": 10.0 + i, "ssim": 0.1 * i, "mse": 0.1, "feature_mse": 0.1, "label_accuracy": 1.0,
            "psnr_per_image": [10.0 + i], "ssim_per_image": [0.1 * i], "mse_per_image": [0.1],
            "feature_mse_per_image": [0.1], "truth_png": [truth], "reconstruction_png": [recon],
            "finished_at": datetime(2024, 1, 1, tzinfo=timezone.utc), "attack_seconds": 1.0,
        })  # fmt: skip
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


BAD_FILES = {"zero-bytes": _zero_bytes, "truncated": _truncated, "not-parquet": _not_parquet,
             "foreign-schema": _foreign, "wrong-type": _wrong_type}  # fmt: skip


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


def test_damaged_pages_behind_a_sound_footer_are_named_by_every_reader(results, tmp_path, capsys):
    (file,) = ResultsDir(results).files()
    raw = bytearray(file.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    for i in range(4, len(raw) - footer):  # every data page, the footer left intact
        raw[i] = 0xAB
    file.write_bytes(bytes(raw))
    for verb in ("status", "report", "export"):
        assert main(verb_args(verb, results, tmp_path)) == 2
        err = one_line_error(capsys, verb)
        assert f"results file: '{file}'" in err and "damaged" in err


def test_an_older_file_lacking_newer_columns_is_still_read(results, capsys):
    old = to_table(trial_rows(1, study="old")).select(["study", "key", "status", "fl", "psnr"])
    pq.write_table(old, results / "part-0000000000000000000-old.parquet")
    assert main(["status", str(results)]) == 0
    assert "5 rows in 2 files" in capsys.readouterr().out


def test_status_shows_psnr_beside_the_baseline_and_the_gain_per_setting(tmp_path, capsys):
    rows = trial_rows()
    for i, row in enumerate(rows):
        row.update(baseline_psnr=9.0, psnr_gain=row["psnr"] - 9.0)
    with ResultsDir(tmp_path / "r") as directory:
        directory.write(rows)
    assert main(["status", str(tmp_path / "r")]) == 0
    table = capsys.readouterr().out.split("gain over it (dB):\n")[1].splitlines()
    assert table[0].split() == ["trials", "psnr", "baseline", "median_gain"] and table[1].split() == ["fl"]
    assert table[2].split() == ["fedavg", "2", "12.0", "9.0", "3.0"]  # psnr 11 and 13
    assert table[3].split() == ["fedsgd", "2", "11.0", "9.0", "2.0"]  # psnr 10 and 12


@pytest.mark.parametrize("schema_version", [b"1", b"2", None])
def test_run_into_a_directory_of_another_results_format_refuses_in_one_line(schema_version, results, tmp_path,
                                                                            capsys, no_ray):  # fmt: skip
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
