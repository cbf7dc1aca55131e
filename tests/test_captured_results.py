"""`gradinv attack --update ... --results DIR`: captured updates become rows of a results dataset (keyed by the
file's sha256 and the settings), read by status, report and export; a rerun computes nothing again; a bad file
among them is one line, exit 2, nothing written."""

import hashlib
import shutil

import pandas as pd
import pytest

from gradinv import data
from sweep.cli import captured_results
from sweep.cli.main import main
from tests.support.captures import client_step

SIDE = 8
FLAGS = ["--dataset", "fashion-mnist", "--image-size", str(SIDE), "--model", "convnet", "--width", "4"]
FLAGS += ["--iterations", "6", "--threads", "1"]


def capture(path, index, *, truth=True):
    """A plain PyTorch client's FedSGD gradient on one Fashion-MNIST image, saved with or without the image."""
    return client_step(path, side=SIDE, index=index, width=4, labels=truth, images=truth)


@pytest.fixture()
def captures(tmp_path):
    """captures/: two files with ground truth, one without (labels recovered)."""
    folder = tmp_path / "captures"
    folder.mkdir()
    capture(folder / "a.pt", 0)
    capture(folder / "b.pt", 1)
    capture(folder / "c.pt", 2, truth=False)
    return folder


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_captures_become_rows_that_status_report_and_export_read(captures, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results" / "flower"
    code, out, err = run(capsys, "attack", "--update", str(captures), "--results", str(results), *FLAGS)
    assert code == 0, err
    frame = pd.read_parquet(results).sort_values("update_file").reset_index(drop=True)
    assert len(frame) == 3 and (frame["status"] == "ok").all() and set(frame["study"]) == {"flower"}
    assert [name.rsplit("/", 1)[-1] for name in frame["update_file"]] == ["a.pt", "b.pt", "c.pt"]
    digests = [hashlib.sha256((captures / name).read_bytes()).hexdigest() for name in ("a.pt", "b.pt", "c.pt")]
    assert frame["update_sha256"].tolist() == digests and frame["key"].nunique() == 3
    with_truth, without = frame.iloc[:2], frame.iloc[2]
    assert with_truth["ground_truth"].all() and with_truth["psnr"].notna().all()
    assert with_truth["label_accuracy"].tolist() == [1.0, 1.0] and with_truth["baseline_psnr"].notna().all()
    assert [len(pngs) for pngs in with_truth["truth_png"]] == [1, 1]
    # no ground truth: the row says so, the scores that need it are null, the attack's own are there
    assert not without["ground_truth"] and without["truth_png"] is None
    for name in ("psnr", "ssim", "psnr_gain", "baseline_psnr", "label_accuracy"):
        assert pd.isna(without[name]), name
    assert without["gradient_cost"] == min(without["restart_scores"]) and len(without["label_per_image"]) == 1
    assert data.decode_png(without["reconstruction_png"][0]).shape == (SIDE, SIDE)
    assert without["labels"] == "recovered" and with_truth["labels"].tolist() == ["known", "known"]
    assert "no ground truth" in out and "3 rows written" in out
    files = sorted(results.glob("*.parquet"))

    # rerun (the directory, and a file named twice): nothing attacked again, nothing written
    again = ["attack", "--update", str(captures), str(captures / "a.pt"), "--results", str(results), *FLAGS]
    with monkeypatch.context() as patch:
        patch.setattr(captured_results, "attack_captured", lambda *a, **k: pytest.fail("attacked again"))
        code, out, _ = run(capsys, *again)
    assert code == 0 and "all 3 captured updates already have rows" in out
    assert sorted(results.glob("*.parquet")) == files and len(pd.read_parquet(results)) == 3

    # another setting: new keys, new rows
    code, _, err = run(
        capsys, "attack", "--update", str(captures / "c.pt"), "--results", str(results), *FLAGS, "--tv", "1e-3"
    )
    assert code == 0, err
    assert len(pd.read_parquet(results)) == 4

    code, out, err = run(capsys, "status", str(results))
    assert code == 0 and "ok" in out, err
    page = tmp_path / "r.html"
    code, _, err = run(capsys, "report", str(results), "--out", str(page))
    assert code == 0 and page.stat().st_size > 0, err
    exported = tmp_path / "export"
    code, _, err = run(capsys, "export", str(results), "--to", str(exported))
    assert code == 0, err
    assert len(list(exported.rglob("*.png"))) >= 4


def test_a_bad_file_among_them_is_one_line_and_nothing_is_written(captures, tmp_path, capsys):
    (captures / "d.pt").write_bytes(b"not a capture")
    results = tmp_path / "results"
    code, out, err = run(capsys, "attack", "--update", str(captures), "--results", str(results), *FLAGS)
    assert code == 2 and len(err) == 1 and "d.pt" in err[0] and "not a captured update" in err[0], err
    assert not results.exists()


def test_flags_that_do_not_go_together(captures, tmp_path, capsys):
    results = str(tmp_path / "results")
    cases = [
        (["--update", str(captures), "--out", str(tmp_path / "o")], "add --results DIR"),
        (["--update", str(captures / "a.pt"), "--results", results, "--out", str(tmp_path / "o")], "--out:"),
        (["--results", results, "--out", str(tmp_path / "o")], "use it with --update"),
        (["--update", str(tmp_path / "empty"), "--results", results], "holds no *.pt captures"),
    ]
    (tmp_path / "empty").mkdir()
    for argv, expected in cases:
        code, _, err = run(capsys, "attack", *argv, *FLAGS)
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
    assert not (tmp_path / "results").exists() and not (tmp_path / "o").exists()


def test_a_capture_under_another_name_is_the_same_row(captures, tmp_path, capsys):
    shutil.copy(captures / "a.pt", tmp_path / "copy.pt")
    results = tmp_path / "results"
    argv = ["attack", "--update", str(captures / "a.pt"), str(tmp_path / "copy.pt"), "--results", str(results)]
    code, _, err = run(capsys, *argv, *FLAGS)
    assert code == 0, err
    assert len(pd.read_parquet(results)) == 1


def test_captures_into_object_storage(captures, tmp_path, capsys, monkeypatch):
    """--results s3://bucket/prefix (moto's server): the same rows, read back by status; a rerun skips them."""
    from gradinv.results.remote import open_store
    from tests.support.s3 import serving

    with serving(monkeypatch, tmp_path, "captures"):
        uri = "s3://captures/audits/flower"
        argv = ["attack", "--update", str(captures / "a.pt"), str(captures / "c.pt"), "--results", uri, *FLAGS]
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        frame = open_store(uri).read(["study", "update_file", "ground_truth"]).to_pandas()
        assert len(frame) == 2 and set(frame["study"]) == {"flower"} and sorted(frame["ground_truth"]) == [False, True]
        code, out, _ = run(capsys, *argv)
        assert code == 0 and "all 2 captured updates already have rows" in out
        code, out, err = run(capsys, "status", uri)
        assert code == 0 and "flower" in out, err


def test_results_without_any_ground_truth_report_and_export(captures, tmp_path, capsys):
    results = tmp_path / "results"
    code, _, err = run(capsys, "attack", "--update", str(captures / "c.pt"), "--results", str(results), *FLAGS)
    assert code == 0, err
    code, out, err = run(capsys, "status", str(results))
    assert code == 0 and "results" in out, err
    page = tmp_path / "r.html"
    code, _, err = run(capsys, "report", str(results), "--out", str(page))
    assert code == 0 and "no baseline recorded" in page.read_text(), err
    code, out, err = run(capsys, "export", str(results), "--to", str(tmp_path / "export"))
    assert code == 0 and out.startswith("0 reconstructions"), err
