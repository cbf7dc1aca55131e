"""`gradinv attack`: its files, and one-line errors with exit code 2 for bad input."""

import json
import subprocess
import sys

import pytest

from gradinv import data
from sweep.cli.main import main

TINY = [
    "--dataset",
    "faces",
    "--image",
    "0",
    "--image",
    "1",
    "--model",
    "convnet",
    "--width",
    "4",
    "--iterations",
    "20",
]


def test_attack_writes_metrics_and_picture(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["attack", *TINY, "--threads", "1", "--out", str(out)]) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert len(document["psnr_per_image"]) == 2
    assert document["psnr"] == pytest.approx(sum(document["psnr_per_image"]) / 2)
    assert document["config"]["images"] == [0, 1] and document["config"]["width"] == 4
    assert document["provenance"]["threads"] == 1 and document["provenance"]["torch"]
    assert document["loss_curve"][-1]["iteration"] == 20
    assert len(document["restart_scores"]) == 1
    picture = data.decode_png((out / "reconstruction.png").read_bytes())
    assert picture.shape == (2 * 25, 2 * 25)  # truth over reconstruction, one column per image
    assert "PSNR" in capsys.readouterr().out


def exit_code(argv):
    """main()'s exit code, whether it returns it or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


BAD = [
    (["--model", "vgg"], "model: 'vgg'"),
    (["--dataset", "svhn"], "dataset: 'svhn'"),
    (["--image", "200"], "image: 200"),
    (["--iterations", "-5"], "iterations: -5"),
    (["--width", "0"], "width: 0"),
    (["--tv=-1e-4"], "tv: -0.0001"),
    (["--fl", "fedprox"], "fl: 'fedprox'"),
    (["--labels", "guessed"], "labels: 'guessed'"),
    (["--attack", "analytic"], "images_per_client: 2 is not valid; the analytic attack recovers one image"),
    (["--local-steps", "0", "--fl", "fedavg"], "local_steps: 0"),
    (["--restarts", "0"], "restarts: 0"),
    (["--iterations", "many"], "invalid int value"),
]


@pytest.mark.parametrize("flags, expected", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, expected):
    out = tmp_path / "never"
    code = exit_code(["attack", *TINY, *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_missing_dataset_files_name_where_to_put_them(tmp_path, capsys):
    code = main(["attack", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(tmp_path) in err[0] and "cifar10" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_real_process_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sweep", "attack", "--model", "nope", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gradinv attack: error: model: 'nope' is not valid; choose one of convnet, convnet-paper, lenet-zhu, mlp, "
        "resnet20, resnet32, resnet44, resnet18, resnet50, or your own as package.module:function"
    ]


def test_the_analytic_attack_names_the_model_it_needs(tmp_path, capsys):
    code = exit_code(
        ["attack", "--dataset", "faces", "--image", "0", "--attack", "analytic", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and "model: 'convnet' is not valid; the analytic attack needs the 'mlp'" in err[0]
    ), err
