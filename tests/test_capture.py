"""Captured updates (gradinv.capture, `gradinv attack --update`): a plain PyTorch client's FedSGD step saved
with save_update is reconstructed from the file; the library's attack of a capture equals the ordinary
trial of the same image; bad files and flags are one line, exit 2, nothing written."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from gradinv import data, models
from gradinv.capture import load_update, save_update
from gradinv.errors import ConfigError
from gradinv.trial import TrialSpec, run_trials
from gradinv.trial.captured import attack_captured
from sweep.cli.main import main
from tests.support.captures import client_step as plain_client_step

SIDE = 16
# the quickstart's leaking settings, at 16x16 and half its iterations
ATTACK = ["--iterations", "150", "--lr", "0.3", "--tv", "1e-4", "--decay", "cosine", "--init", "rand"]
VICTIM = ["--dataset", "fashion-mnist", "--image-size", str(SIDE), "--model", "convnet"]


def client_step(path, **options):
    return plain_client_step(path, side=SIDE, **options)


def test_a_plain_client_s_gradient_is_reconstructed_from_the_file(tmp_path, capsys):
    update = client_step(tmp_path / "update.pt")
    out = tmp_path / "out"
    assert (
        main(
            ["attack", "--update", str(update), *VICTIM, "--width", "32", *ATTACK, "--threads", "1", "--out", str(out)]
        )
        == 0
    )
    document = json.loads((out / "metrics.json").read_text())
    # measured on image 0 over five model/attack seeds: gains 11.9 to 19.8 dB (19.1 at these seeds)
    assert document["ground_truth"] is True and document["psnr_gain"] > 6
    assert document["label_accuracy"] == 1 and document["labels"] == [9]
    assert data.decode_png((out / "reconstruction.png").read_bytes()).shape == (2 * SIDE, SIDE)
    assert "PSNR" in capsys.readouterr().out


def fedavg_client(path, indices, *, width, steps, lr):
    """A client in plain PyTorch: FedAvg's local SGD steps on its images, the update new minus old weights."""
    info = data.dataset_spec("fashion-mnist")
    x, y = data.load_images("fashion-mnist", indices, image_size=SIDE)
    model = models.build_model("convnet", channels=1, num_classes=10, image_size=SIDE, width=width)
    before = copy.deepcopy(model)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model((x - info.mean[0]) / info.std[0]), y).backward()
        optimiser.step()
    update = [new.detach() - old.detach() for new, old in zip(model.parameters(), before.parameters())]
    return save_update(
        path, model=before, num_images=len(indices), update=update, local_steps=steps, local_lr=lr, labels=y, images=x
    )


@pytest.mark.parametrize("fl", ["fedsgd", "fedavg"])
def test_the_library_s_attack_of_a_capture_equals_the_ordinary_trial(tmp_path, fl):
    settings = dict(
        dataset="fashion-mnist",
        image_size=SIDE,
        model="convnet",
        width=8,
        iterations=30,
        lr=0.3,
        decay="cosine",
        init="rand",
    )
    if fl == "fedsgd":
        spec = TrialSpec(**settings, images=(2,))
        update = client_step(tmp_path / "u.pt", index=2, width=8)
    else:
        spec = TrialSpec(**settings, images=(1, 3), fl="fedavg", local_steps=3, local_lr=0.1)
        update = fedavg_client(tmp_path / "u.pt", [1, 3], width=8, steps=3, lr=0.1)
    captured = attack_captured(load_update(update), spec)
    ordinary = run_trials([spec])[0]
    assert torch.equal(captured.reconstruction, ordinary.reconstruction)
    assert torch.equal(captured.truth, ordinary.truth)
    for name in ("psnr", "ssim", "psnr_gain", "label_accuracy"):
        assert captured.metrics[name] == ordinary.metrics[name], name
    assert captured.restart_scores == ordinary.restart_scores


def test_without_ground_truth_the_reconstruction_labels_and_costs_are_written(tmp_path, capsys):
    update = client_step(tmp_path / "u.pt", width=4, labels=False, images=False)
    out = tmp_path / "out"
    assert (
        main(["attack", "--update", str(update), *VICTIM, "--width", "4", "--iterations", "5", "--out", str(out)]) == 0
    )
    document = json.loads((out / "metrics.json").read_text())
    assert document["ground_truth"] is False and "psnr" not in document
    assert document["labels"] == [9]  # recovered from the gradient (bias_counts)
    assert document["gradient_cost"] == min(document["restart_scores"]) and document["loss_curve"]
    assert document["config"]["labels"] == "recovered"
    assert data.decode_png((out / "reconstruction.png").read_bytes()).shape == (SIDE, SIDE)
    assert "no ground truth" in capsys.readouterr().out


def test_save_update_refuses_a_gradient_and_an_update_together(tmp_path):
    model = models.build_model("convnet", channels=1, num_classes=10, image_size=SIDE, width=4)
    tensors = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(ConfigError, match="exactly one"):
        save_update(tmp_path / "u.pt", model=model, num_images=1, gradient=tensors, update=tensors)
    assert not (tmp_path / "u.pt").exists()
    with pytest.raises(ConfigError, match="local_lr"):  # FedAvg's update needs its learning rate
        save_update(tmp_path / "u.pt", model=model, num_images=1, update=tensors, local_steps=2)


def _edited(path, edit):
    document = torch.load(path, weights_only=True)
    edit(document)
    torch.save(document, path)


class Foreign:  # an object that weights_only loading refuses to build
    pass


BAD = {
    "missing file": (lambda p: p.unlink(), [], "update"),
    "not a torch file": (lambda p: p.write_text("hello"), [], "not a captured update"),
    "a pickled object": (lambda p: torch.save({"format": Foreign()}, p), [], "not a captured update"),
    "another torch file": (lambda p: torch.save({"weight": torch.zeros(2)}, p), [], "format"),
    "wrong version": (lambda p: _edited(p, lambda d: d.update(version=99)), [], "version"),
    "update shape": (lambda p: _edited(p, lambda d: d["update"].__setitem__(0, torch.zeros(3))), [], "update["),
    "no images": (lambda p: _edited(p, lambda d: d.update(num_images=0)), [], "num_images"),
    "label out of range": (lambda p: _edited(p, lambda d: d.update(labels=torch.tensor([10]))), [], "labels"),
    "fedavg without lr": (lambda p: _edited(p, lambda d: d.update(fl="fedavg", local_lr=None)), [], "local_lr"),
    "pixels outside [0, 1]": (lambda p: _edited(p, lambda d: d["images"].mul_(3)), [], "images"),
    "another width": (lambda p: None, ["--width", "8"], "state["),
    "flags contradict the file": (lambda p: None, ["--fl", "fedavg"], "the update file says fl fedsgd"),
    "local steps under FedSGD": (lambda p: None, ["--local-steps", "5"], "the update file says local_steps 1"),
    "more images than the file": (lambda p: None, ["--image", "0", "--image", "1"], "the update file says 1 images"),
    "with --replay": (lambda p: None, ["--replay", "results", "key"], "--replay"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    spoil, flags, expected = BAD[case]
    update = client_step(tmp_path / "u.pt", width=4)
    spoil(update)
    out = tmp_path / "out"
    code = main(["attack", "--update", str(update), *VICTIM, "--width", "4", *flags, "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("gradinv attack: error:") and error.count("\n") == 1, error
    assert expected in error
    assert not out.exists()


def test_a_weights_file_beside_an_update_is_refused(tmp_path, capsys):
    update = client_step(tmp_path / "u.pt", width=4)
    torch.save(torch.load(update, weights_only=True)["state"], tmp_path / "w.pt")  # fits the model
    out = tmp_path / "out"
    argv = ["attack", "--update", str(update), *VICTIM, "--width", "4", "--weights", str(tmp_path / "w.pt")]
    assert main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "weights: " in error and "the update file holds the weights" in error
    assert not out.exists()
