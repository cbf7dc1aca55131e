"""Bringing your own parts at once (issue 28): a model from your module, an image folder and a weights file,
run as a two-point study on a multi-node Ray cluster with the module shipped by the runtime environment; and
a model factory alone, shipped to the same cluster's worker nodes."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gradinv import data
from gradinv.results.schema import trial_key
from sweep.cli.main import main
from sweep.study import load_study
from tests import test_model_factories as factories  # its model module and study, on worker nodes
from tests.support.local_cluster import run_study_on, two_worker_nodes

MODULE = "own_parts_models"  # unique in the test session: modules stay imported
SOURCE = """
from torch import nn


def tiny(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))
"""
CLASSES = {"bag": 8, "coat": 4, "trouser": 1}  # folder name -> Fashion-MNIST label
PER_SPLIT = {"train": 3, "test": 2}
SIDE = 8
STUDY = """
name: own-parts
data: {{dataset: "folder:{folder}", images: 2}}
fixed: {{model: "{module}:tiny", weights: "{weights}", iterations: 3}}
grid: {{lr: [0.1, 0.3]}}
resources: {{num_cpus: 1}}
"""


def write_folder(root: Path) -> None:
    """root/{train,test}/<class>/NN.png: Fashion-MNIST test images of three labels, shrunk to SIDE x SIDE."""
    images, labels = data.load_images("fashion-mnist", list(range(200)))
    arrays = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    count = sum(PER_SPLIT.values())
    for name, label in CLASSES.items():
        chosen = [arrays[i] for i in range(200) if labels[i] == label][:count]
        assert len(chosen) == count
        splits = {"train": chosen[: PER_SPLIT["train"]], "test": chosen[PER_SPLIT["train"] :]}
        for split, split_arrays in splits.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for n, array in enumerate(split_arrays):
                Image.fromarray(array).resize((SIDE, SIDE), Image.BILINEAR).save(folder / f"{n:02d}.png")


def save_weights(path: Path, seed: int) -> None:
    """A state_dict of the module's model (1 channel, SIDE x SIDE, 3 classes) made under ``seed``."""
    namespace: dict = {}
    exec(textwrap.dedent(SOURCE), namespace)
    torch.manual_seed(seed)
    torch.save(namespace["tiny"](num_classes=len(CLASSES), in_channels=1, image_size=SIDE).state_dict(), path)


@pytest.fixture(scope="module")
def cluster():
    """A head and worker nodes node_a and node_b (`ray start`), shared by this module's studies: each runs as
    a job of its own, its module shipped by its own runtime environment. Stopped after the module."""
    with two_worker_nodes() as nodes:
        yield nodes


def study_keys(study: Path) -> set[str]:
    return {trial_key(spec) for spec in load_study(study).trials}


def test_a_study_over_your_own_model_folder_and_weights_runs_on_ray_and_replays(tmp_path, driver, monkeypatch, cluster):
    module = tmp_path / f"{MODULE}.py"
    module.write_text(textwrap.dedent(SOURCE))
    write_folder(tmp_path / "fm")
    weights = tmp_path / "victim.pt"
    save_weights(weights, seed=1)
    study = tmp_path / "study.yaml"
    study.write_text(textwrap.dedent(STUDY.format(folder=tmp_path / "fm", module=MODULE, weights=weights)).lstrip())
    results = tmp_path / "results"

    code, output = run_study_on(cluster, driver, study, results)
    assert code == 0, output

    frame = pd.read_parquet(results)  # 2 images x 2 learning rates, one trial per image
    assert len(frame) == 4 and (frame["status"] == "ok").all(), frame["error"].tolist()
    assert set(frame["model"]) == {f"{MODULE}:tiny"} and sorted(set(frame["lr"])) == [0.1, 0.3]
    assert set(frame["dataset"]) == {f"folder:{tmp_path / 'fm'}"}
    keys = set(frame["key"])
    assert len(keys) == 4 and study_keys(study) == keys  # read again, nothing changed: the same keys

    # replay one row here (the module on this process's path, as for `gradinv attack`): the same numbers
    monkeypatch.syspath_prepend(str(tmp_path))
    row = frame.sort_values("key").iloc[0]
    out = tmp_path / "again"
    assert main(["attack", "--replay", str(results), row["key"], "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["psnr"] == row["psnr"]
    assert np.isfinite(row["psnr"])

    # the module's source edited: new keys; the weights changed as well: new keys again
    module.write_text(module.read_text() + "\n# edited\n")
    edited = study_keys(study)
    assert len(edited) == 4 and edited.isdisjoint(keys)
    assert study_keys(study) == edited
    save_weights(weights, seed=2)
    reweighted = study_keys(study)
    assert len(reweighted) == 4 and reweighted.isdisjoint(keys | edited)


def test_a_study_runs_on_a_multi_node_cluster_with_the_module_shipped(tmp_path, write_study, driver, cluster):
    """(From tests/test_model_factories.py.) Worker nodes of their own (`ray start`), the module only beside
    the study: it reaches them through the runtime environment, not a shared path."""
    name = "multinode_factories"  # unique in the test session: modules stay imported
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(factories.SOURCE))
    study = write_study(factories.STUDY.format(module=name))
    results = tmp_path / "results"
    code, output = run_study_on(cluster, driver, study, results)
    assert code == 0, output
    frame = pd.read_parquet(results)
    assert len(frame) == 4 and (frame["status"] == "ok").all(), frame["error"].tolist()
    assert sorted(set(frame["width"])) == [3, 4]
