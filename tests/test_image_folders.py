"""`dataset: folder:PATH`: torchvision's ImageFolder layout as a dataset, built here from Fashion-MNIST PNGs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradinv import data
from gradinv.baselines import BaselinePool
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec, run_trials
from sweep.cli.main import main

CLASSES = {"coat": 4, "trouser": 1, "bag": 8}  # folder name -> Fashion-MNIST label; ImageFolder sorts the names
PER_CLASS = {"train": 3, "test": 2}


def fashion_by_label(count: int) -> dict[int, list[np.ndarray]]:
    """The first ``count`` Fashion-MNIST test images of each label in CLASSES, as 28x28 uint8 arrays."""
    images, labels = data.load_images("fashion-mnist", list(range(200)))
    arrays = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    found = {label: [arrays[i] for i in range(200) if labels[i] == label][:count] for label in CLASSES.values()}
    assert all(len(found[label]) == count for label in found)
    return found


@pytest.fixture(scope="module")
def fashion():
    return fashion_by_label(sum(PER_CLASS.values()))


def build_folder(root: Path, fashion, *, rgb: bool = False) -> dict[str, list[tuple[str, np.ndarray]]]:
    """root/{train,test}/<class>/NN.png; returns each split's (class, pixels) in ImageFolder's order."""
    written = {"train": [], "test": []}
    for name in sorted(CLASSES):
        arrays = fashion[CLASSES[name]]
        split_arrays = {"train": arrays[: PER_CLASS["train"]], "test": arrays[PER_CLASS["train"] :]}
        for split, chosen in split_arrays.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n, array in enumerate(chosen):
                pixels = np.stack([array, 255 - array, array // 2], axis=-1) if rgb else array
                Image.fromarray(pixels).save(folder / f"{n:02d}.png")
                written[split].append((name, pixels))
    return written


def test_a_trial_on_an_image_folder_reads_its_files(tmp_path, fashion):
    written = build_folder(tmp_path / "fm", fashion)
    name = f"folder:{tmp_path / 'fm'}"
    spec = TrialSpec(dataset=name, images=(0, 3), model="convnet", width=2, iterations=3)
    info = spec.data_spec
    assert (info.channels, info.size, info.num_classes) == (1, 28, 3)
    assert (info.train_images, info.test_images) == (9, 6)
    train = np.stack([pixels for _, pixels in written["train"]]).astype(np.float64) / 255
    assert info.mean == pytest.approx((train.mean(),), abs=1e-9)
    assert info.std == pytest.approx((train.std(),), abs=1e-9)
    low, high = data.pixel_box(info, torch.zeros((), dtype=torch.float64))
    assert low.item() == pytest.approx(-train.mean() / train.std())
    assert high.item() == pytest.approx((1 - train.mean()) / train.std())

    outcome = run_trials([spec])[0]
    assert outcome.status == "ok", outcome.error
    # test images 0 and 3: the first bag and the first coat (classes sorted: bag 0, coat 1, trouser 2)
    assert data.load_images(name, [0, 3])[1].tolist() == [0, 1]
    truth = (outcome.truth[:, 0] * 255).round().to(torch.uint8).numpy()
    expected = [written["test"][0], written["test"][3]]
    assert [cls for cls, _ in expected] == ["bag", "coat"]
    assert np.array_equal(truth[0], expected[0][1]) and np.array_equal(truth[1], expected[1][1])
    for key in ("psnr", "ssim", "baseline_psnr", "baseline_psnr_mean_image", "baseline_psnr_class_mean"):
        assert np.isfinite(outcome.metrics[key]), key

    pool = BaselinePool.for_dataset(name)
    assert pool.pool_size == 9 and set(pool.class_means) == {0, 1, 2}
    assert torch.allclose(pool.mean_image[0].double(), torch.from_numpy(train.mean(0)), atol=1e-6)
    bags = np.stack([pixels for cls, pixels in written["train"] if cls == "bag"]).astype(np.float64) / 255
    assert torch.allclose(pool.class_means[0][0].double(), torch.from_numpy(bags.mean(0)), atol=1e-6)


def test_colour_files_give_three_channels_and_image_size_resizes(tmp_path, fashion):
    written = build_folder(tmp_path / "rgb", fashion, rgb=True)
    name = f"folder:{tmp_path / 'rgb'}"
    spec = TrialSpec(dataset=name, images=(1,), model="convnet", width=2, iterations=3)
    assert (spec.data_spec.channels, spec.data_spec.size, spec.data_spec.num_classes) == (3, 28, 3)
    train = np.stack([pixels for _, pixels in written["train"]]).astype(np.float64) / 255
    assert spec.data_spec.mean == pytest.approx(tuple(train.mean(axis=(0, 1, 2))), abs=1e-9)
    images, labels = data.load_images(name, [1])
    assert images.shape == (1, 3, 28, 28) and labels.tolist() == [0]
    assert np.array_equal(data.to_uint8(images[0]), written["test"][1][1])

    small = TrialSpec(dataset=name, images=(1,), image_size=16, model="convnet", width=2, iterations=3)
    outcome = run_trials([small])[0]
    assert outcome.status == "ok", outcome.error
    assert outcome.truth.shape == (1, 3, 16, 16)
    assert np.isfinite(outcome.metrics["baseline_psnr"])


def _one_line_refusal(capsys, tmp_path, name: str, *extra: str) -> str:
    out = tmp_path / "out"
    flags = ["--model", "convnet", "--width", "2", "--iterations", "3", *extra]
    assert main(["attack", "--dataset", name, "--out", str(out), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists()
    return lines[0]


def test_a_path_that_does_not_exist(tmp_path, capsys):
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'nowhere'}")
    assert line.startswith("gradinv attack: error: dataset: 'folder:") and "is not an existing directory" in line


def test_a_missing_split_directory(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    for file in (tmp_path / "fm" / "test").rglob("*.png"):
        file.unlink()
    for folder in (tmp_path / "fm" / "test").iterdir():
        folder.rmdir()
    (tmp_path / "fm" / "test").rmdir()
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}")
    assert "dataset: 'folder:" in line and "it has no test/ directory" in line


def test_an_empty_class(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    (tmp_path / "fm" / "train" / "dress").mkdir()
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}")
    assert "dataset: 'folder:" in line and "train/: Found no valid file for the classes dress" in line
    assert "put images in every class folder" in line


def test_mixed_sizes_need_image_size(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "fm" / "test" / "bag" / "99.png")
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}")
    assert line.startswith("gradinv attack: error: image_size: None is not valid;")
    assert "are 20x20, 28x28 (width x height)" in line and "set image_size" in line
    images, _ = data.load_images(f"folder:{tmp_path / 'fm'}", [2], image_size=24)  # with it they load
    assert images.shape == (1, 1, 24, 24)


def test_an_unreadable_file(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    bad = tmp_path / "fm" / "train" / "coat" / "07.png"
    bad.write_bytes(b"not a png")
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}")
    assert line.startswith(f"gradinv attack: error: dataset file: '{bad}' is not valid; it is not a readable image")


def test_a_truncated_file(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    bad = tmp_path / "fm" / "test" / "bag" / "00.png"
    bad.write_bytes(bad.read_bytes()[:100])  # a header that opens over data that does not decode
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}")
    assert line.startswith(f"gradinv attack: error: dataset file: '{bad}' is not valid; it is not a readable image")


def test_trained_victims_are_refused(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}", "--trained-epochs", "1")
    assert "trained_epochs: 1 is not valid; an image folder attacks untrained victims only" in line


def test_a_new_file_is_seen_and_the_name_is_checked(tmp_path, fashion):
    build_folder(tmp_path / "fm", fashion)
    name = f"folder:{tmp_path / 'fm'}"
    assert data.dataset_spec(name).test_images == 6
    Image.fromarray(fashion[8][0]).save(tmp_path / "fm" / "test" / "bag" / "50.png")
    assert data.dataset_spec(name).test_images == 7
    with pytest.raises(ConfigError, match="folder:PATH"):
        data.dataset_spec("folders")
    with pytest.raises(ConfigError, match="give a directory after 'folder:'"):
        data.dataset_spec("folder:")


def test_a_federation_on_a_folder_is_refused(tmp_path, fashion, capsys):
    build_folder(tmp_path / "fm", fashion)
    line = _one_line_refusal(capsys, tmp_path, f"folder:{tmp_path / 'fm'}", "--round", "1", "--fl", "fedavg")
    assert "round: 1 is not valid; leave it out: a federation is simulated on the built-in datasets only" in line


def test_every_row_of_a_folder_study_records_its_normalisation(tmp_path, fashion):
    """data_mean/data_std: the folder's per-channel statistics in each row; null for a built-in dataset."""
    from gradinv.results.schema import to_table, trial_key
    from sweep.study import load_study
    from sweep.task_loop import make_packs
    from sweep.worker import run_pack

    build_folder(tmp_path / "fm", fashion)
    rows = []
    for dataset in (f"folder:{tmp_path / 'fm'}", "fashion-mnist"):
        study = tmp_path / f"{len(rows)}.yaml"
        study.write_text(
            f'name: norm\ndata: {{dataset: "{dataset}", images: 1}}\n'
            "fixed: {model: convnet, width: 2, iterations: 2}\n"
        )
        trials = load_study(study).trials
        (pack,) = make_packs(load_study(study), [(trial_key(spec), spec) for spec in trials], "cpu")
        rows += run_pack(pack)
    table = to_table(rows).to_pylist()
    info = data.dataset_spec(f"folder:{tmp_path / 'fm'}")
    assert table[0]["status"] == "ok", table[0]["error"]
    assert table[0]["data_mean"] == list(info.mean) and table[0]["data_std"] == list(info.std)
    assert table[1]["data_mean"] is None and table[1]["data_std"] is None
