"""Command-line mistakes refused before anything runs (one line, exit 2, nothing written), and a stop
during start-up (Ctrl-C, SIGTERM) that ends in one line and the shell's exit code, never a traceback."""

import gzip
import os
import shutil
import signal
import textwrap
import time

import pytest
import torch
from cli_refusals import assert_attack_refuses

from gradinv import data
from sweep.cli.main import main

FACES = [
    "--dataset",
    "faces",
    "--image",
    "0",
    "--model",
    "convnet",
    "--width",
    "2",
    "--iterations",
    "2",
    "--image-size",
    "8",
]


def refusal(argv, capsys) -> tuple[int, list[str]]:
    """main()'s exit code and its stderr lines, whether it returns the code or argparse raises it."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def a_file(tmp_path):
    """A regular file: a directory below it can be neither created nor written, whoever runs the test."""
    path = tmp_path / "a-file"
    path.write_text("")
    return path


# --- gradinv attack --------------------------------------------------------------------------------


def test_a_gpu_device_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_attack_refuses(
        [*FACES, "--device", "cuda"],
        "--device: 'cuda' is not valid; this machine has no GPU that torch can use; use cpu",
        tmp_path,
        capsys,
    )


def test_a_gpu_that_is_not_there(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_attack_refuses(
        [*FACES, "--device", "cuda:1"],
        "--device: 'cuda:1' is not valid; this machine's GPUs are cuda:0; use one of them",
        tmp_path,
        capsys,
    )


@pytest.mark.parametrize(
    "device, fix",
    [
        ("banana", "use cpu, cuda or cuda:N"),
        ("cuda:x", "use cpu, cuda or cuda:N"),
        ("meta", "use cpu, cuda or cuda:N (gradinv runs on CPUs and CUDA GPUs)"),
    ],
)
def test_a_device_that_is_not_one(tmp_path, capsys, device, fix):
    assert_attack_refuses([*FACES, "--device", device], f"--device: {device!r} is not valid; {fix}", tmp_path, capsys)


def test_an_out_directory_that_cannot_be_created_is_refused_before_the_attack(tmp_path, capsys):
    blocker = a_file(tmp_path)
    assert_attack_refuses(
        [*FACES, "--out", str(blocker / "out")],
        f"--out: '{blocker / 'out'}' is not valid; {blocker} is not a directory; name a directory "
        "(it is created if missing)",
        tmp_path,
        capsys,
    )
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_a_cache_that_cannot_be_created_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADINV_CACHE", str(tmp_path / "cache"))  # restored after: --cache sets it
    blocker = a_file(tmp_path)
    assert_attack_refuses(
        [*FACES, "--trained-epochs", "1", "--train-subset", "8", "--cache", str(blocker / "zoo")],
        f"--cache: '{blocker / 'zoo'}' is not valid; {blocker} is not a directory; name a directory "
        "(it is created if missing)",
        tmp_path,
        capsys,
    )
    assert os.environ["GRADINV_CACHE"] == str(tmp_path / "cache") and sorted(tmp_path.iterdir()) == [blocker]


def test_an_empty_out_is_not_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = refusal(["attack", *FACES, "--out", ""], capsys)
    assert code == 2 and err == [
        "gradinv attack: error: argument --out: '' is not valid; name a path (an empty one "
        "is not the current directory: write . for that); see 'gradinv attack --help'"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_cross_field_rule_of_the_trial_is_one_line(tmp_path, capsys):
    """A ConfigError raised while the trial is built, not while it runs: 100000 clients share 150 images."""
    assert_attack_refuses(
        [*FACES, "--fed-clients", "100000", "--round", "0"],
        "fed_clients: 100000 is not valid; use at most 150 clients (the 150 training images of faces)",
        tmp_path,
        capsys,
    )


def test_an_integer_beyond_what_python_parses_is_one_line(tmp_path, capsys):
    huge = "9" * 5000  # int() refuses more than 4300 digits
    assert_attack_refuses(
        [*FACES, "--iterations", huge],
        f"argument --iterations: invalid int value: '{huge}'; see 'gradinv attack --help'",
        tmp_path,
        capsys,
    )


# --- a damaged Fashion-MNIST -------------------------------------------------------------------------


@pytest.fixture
def debian_copy(tmp_path, monkeypatch):
    """A copy of Debian's packed Fashion-MNIST, standing in for /usr/share/datasets/fashion-mnist (torchvision
    wants both splits' files, whichever it reads)."""
    if not data.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    packed = shutil.copytree(data.DEBIAN_FASHION_MNIST, tmp_path / "debian")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", packed)
    return packed


FASHION = ["--dataset", "fashion-mnist", "--image", "0", "--model", "convnet", "--width", "2", "--iterations", "2"]


@pytest.mark.parametrize(
    "kept_bytes, problem",
    [
        (1000, "it holds 1000 bytes where its header promises 7840016: truncated or damaged"),
        (10, "it is truncated (10 bytes, shorter than its header)"),
        (0, "it is not an IDX file (0 bytes, no IDX header): truncated or damaged"),
    ],
)
def test_a_truncated_fashion_mnist_file_is_named_with_its_fix(debian_copy, tmp_path, capsys, kept_bytes, problem):
    root = tmp_path / "data"
    data.open_dataset("fashion-mnist", root)  # staged from the packed copy
    images = root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    with open(images, "r+b") as cut:
        cut.truncate(kept_bytes)
    assert_attack_refuses(
        [*FASHION, "--data-root", str(root)],
        f"dataset file: '{images}' is not valid; {problem}; delete it and gradinv unpacks it again from {debian_copy}",
        tmp_path,
        capsys,
    )
    images.unlink()  # the fix works
    assert len(data.open_dataset("fashion-mnist", root)) == 10_000


def test_a_damaged_fashion_mnist_package_file_is_named_and_nothing_is_staged(debian_copy, tmp_path, capsys):
    packed = debian_copy / "t10k-images-idx3-ubyte.gz"
    whole = gzip.decompress(packed.read_bytes())
    packed.write_bytes(gzip.compress(whole)[:5000])
    root = tmp_path / "data"
    assert_attack_refuses(
        [*FASHION, "--data-root", str(root)],
        f"dataset file: '{packed}' is not valid; it cannot be unpacked (Compressed file ended before "
        "the end-of-stream marker was reached); reinstall it: apt-get install --reinstall "
        "dataset-fashion-mnist",
        tmp_path,
        capsys,
    )
    assert not (root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").exists()


# --- zoo, report, export -----------------------------------------------------------------------------


def test_zoo_train_checks_the_width_before_the_bar_and_the_cache(tmp_path, capsys):
    cache = tmp_path / "zoo"
    code, err = refusal(
        [
            "zoo",
            "train",
            "--dataset",
            "faces",
            "--model",
            "convnet",
            "--width",
            "-4",
            "--trained-epochs",
            "1",
            "--cache",
            str(cache),
        ],
        capsys,
    )
    assert code == 2 and err == ["gradinv zoo: error: width: -4 is not valid; use a whole number of at least 1"]
    assert not cache.exists()


def test_zoo_train_refuses_a_cache_it_cannot_create(tmp_path, capsys):
    blocker = a_file(tmp_path)
    code, err = refusal(
        [
            "zoo",
            "train",
            "--dataset",
            "faces",
            "--model",
            "convnet",
            "--width",
            "2",
            "--trained-epochs",
            "1",
            "--cache",
            str(blocker / "zoo"),
        ],
        capsys,
    )
    assert code == 2 and err == [
        f"gradinv zoo: error: --cache: '{blocker / 'zoo'}' is not valid; {blocker} is not a "
        "directory; name a directory (it is created if missing)"
    ]


def test_federation_train_refuses_a_cache_it_cannot_create(tmp_path, capsys):
    blocker = a_file(tmp_path)
    code, err = refusal(
        [
            "federation",
            "train",
            "--dataset",
            "faces",
            "--fed-clients",
            "2",
            "--train-subset",
            "8",
            "--in-process",
            "--cache",
            str(blocker / "zoo"),
        ],
        capsys,
    )
    assert code == 2 and err == [
        f"gradinv federation: error: --cache: '{blocker / 'zoo'}' is not valid; {blocker} is "
        "not a directory; name a directory (it is created if missing)"
    ]


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf", "0"])
def test_report_refuses_a_threshold_that_is_not_a_finite_positive_psnr(tmp_path, capsys, threshold):
    out = tmp_path / "report.html"
    code, err = refusal(["report", str(tmp_path / "results"), f"--threshold={threshold}", "--out", str(out)], capsys)
    shown = repr(float(threshold))
    assert code == 2 and err == [
        f"gradinv report: error: --threshold: {shown} is not valid; use a finite, positive PSNR in dB, e.g. 20"
    ]
    assert not out.exists()


def test_export_to_an_empty_path_is_refused_not_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = refusal(["export", str(tmp_path / "results"), "--to", ""], capsys)
    assert code == 2 and err == [
        "gradinv export: error: argument --to: '' is not valid; name a path (an empty one "
        "is not the current directory: write . for that); see 'gradinv export --help'"
    ]
    assert list(tmp_path.iterdir()) == []


# --- a stop during start-up ----------------------------------------------------------------------------

# Imported by the command's interpreter at start (PYTHONPATH): where PAUSE_AT says, it touches PAUSE_READY
# and waits, so that the test's signal lands at that moment and no other.
PAUSE = """
import os, pathlib, time

def pause():
    pathlib.Path(os.environ["PAUSE_READY"]).touch()
    while True:
        time.sleep(0.05)

if os.environ.get("PAUSE_AT") == "start-up":  # while the parser is built (its imports take a second)
    import sweep.cli.main
    sweep.cli.main.build_parser = lambda: pause()
elif os.environ.get("PAUSE_AT") == "ray-start":  # in ray.init, once Ray's own start is done
    import ray
    real_init = ray.init

    def init(*args, **kwargs):
        real_init(*args, **kwargs)
        pause()

    ray.init = init
"""


def paused_command(driver, tmp_path, where: str, *args: str):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE)
    ready = tmp_path / "ready"
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    command = driver(*args, env={"PYTHONPATH": path, "PAUSE_AT": where, "PAUSE_READY": str(ready)})
    deadline = time.monotonic() + 300  # not a measurement: a bound on a wait that should take seconds
    while not ready.exists():
        assert command.process.poll() is None and time.monotonic() < deadline, command.wait(timeout=30)
        time.sleep(0.05)
    return command


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_while_the_command_starts_is_one_line(driver, tmp_path, sent, code):
    command = paused_command(driver, tmp_path, "start-up", "attack", *FACES, "--out", str(tmp_path / "out"))
    command.signal(sent)
    returncode, output = command.wait(timeout=60)
    assert returncode == code and output.strip().splitlines() == ["gradinv: interrupted"], output
    assert "Traceback" not in output and not (tmp_path / "out").exists()


def test_sigterm_while_ray_starts_exits_143_with_one_line(driver, tmp_path, ray_tmpdir):
    study = tmp_path / "study.yaml"
    study.write_text(
        textwrap.dedent("""
        name: stopped-while-starting
        data: {dataset: faces, images: 1, image_size: 8}
        fixed: {model: convnet, width: 2, iterations: 2}
    """)
    )
    command = paused_command(
        driver, tmp_path, "ray-start", "run", str(study), "--results", str(tmp_path / "results"), "--no-progress"
    )
    command.signal(signal.SIGTERM)
    returncode, output = command.wait(timeout=120)
    assert returncode == 143 and output.strip().splitlines()[-1] == "gradinv run: interrupted", output
    assert "Traceback" not in output and "SIGTERM received" not in output
