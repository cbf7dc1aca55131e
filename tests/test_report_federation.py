"""The report's federation section on rows whose PSNRs and global accuracies are known: as the frame
the section receives, and through `gradinv report` on a results directory (the federation columns
joined to the rows as they are read where the results schema does not hold them yet)."""

import hashlib
import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from html_tables import pngs, section, table_frame
from PIL import Image

from analysis import report_federation as federation
from analysis import stats
from analysis.report import write_report
from gradinv.results.schema import SCHEMA
from gradinv.results.store import ResultsDir

DATASET = "fashion-mnist"
BASELINE = 12.0
PARTITIONS = {("iid", None): "IID", ("dirichlet", 0.1): "Dirichlet \u03b1=0.1"}
ROUNDS = (0, 1, 5)
OFFSETS = (-1.5, -0.5, 0.5, 1.5)  # four images around each cell's mean: mean and median are the cell's value
ACCURACY = {"iid": {0: 0.1, 1: 0.42, 5: 0.81}, "dirichlet": {0: 0.1, 1: 0.25, 5: 0.6}}
FEDERATION_COLUMNS = (
    "round",
    "partition",
    "alpha",
    "fed_clients",
    "attacked_client",
    "federation_key",
    "client_label_histogram",
    "client_rounds",
    "train_images",
)


def expected_psnr(partition: str, fl: str, round_: int) -> float:
    """Skewed clients and FedSGD leak more; the global model leaks less as it trains."""
    return 20.0 + 2.0 * (partition == "dirichlet") + 3.0 * (fl == "fedsgd") - 1.5 * round_


def fed_trial(
    partition: str,
    alpha,
    fl: str,
    round_: int,
    image: int,
    psnr: float,
    *,
    accuracy: float | None = None,
    federation_key: str | None = None,
    dataset: str = DATASET,
    status: str = "ok",
) -> dict:
    """One one-image trial of a federation's round as `gradinv run` writes it."""
    setting = {
        "dataset": dataset,
        "fl": fl,
        "round": round_,
        "partition": partition,
        "alpha": alpha,
        "attacked_client": image % 2,
        "images": [image],
    }
    key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]
    pixels = np.full((8, 8, 3), image / 8, dtype=np.float32)
    return {
        "study": "federated",
        "key": key,
        **setting,
        "model": "convnet",
        "width": 16,
        "attack": "ig",
        "iterations": 80,
        "model_seed": 0,
        "attack_seed": 0,
        "images_per_client": 1,
        "local_steps": 3 if fl == "fedavg" else None,
        "fed_clients": 4,
        "federation_key": federation_key or f"{dataset}-{partition}-{alpha}",
        "client_label_histogram": [1, 0, 3],
        "client_rounds": [r for r in (1, 2, 3, 4, 5) if r % 2 == image % 2],
        "train_images": [image, image + 10],
        "model_accuracy": ACCURACY[partition][round_] if accuracy is None else accuracy,
        "status": status,
        "psnr": psnr,
        "psnr_per_image": [psnr],
        "psnr_gain": psnr - BASELINE,
        "psnr_gain_per_image": [psnr - BASELINE],
        "baseline_psnr": BASELINE,
        "ssim": 0.5,
        "label_accuracy": 1.0,
        "truth_png": [png_of(pixels)],
        "reconstruction_png": [png_of(pixels)],
        "attempt": 1,
        "lanes": 1,
        "task_seconds": 1.0,
        "trial_seconds": 1.0,
    }


def png_of(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def federation_trials(dataset: str = DATASET) -> list[dict]:
    """2 partitions x 2 update kinds x rounds 0, 1, 5 x 4 images, PSNRs and accuracies as above."""
    return [
        fed_trial(partition, alpha, fl, round_, image, expected_psnr(partition, fl, round_) + offset, dataset=dataset)
        for partition, alpha in PARTITIONS
        for fl in ("fedsgd", "fedavg")
        for round_ in ROUNDS
        for image, offset in enumerate(OFFSETS)
    ]


def frame_of(rows: list[dict]) -> pd.DataFrame:
    """The rows as the report reads them: nullable integer rounds, settings' lists as text."""
    frame = pd.DataFrame(rows).astype({"round": "Int32"})
    return frame.assign(images=frame["images"].map(lambda images: ",".join(map(str, images))))


def shown(page: str) -> pd.DataFrame:
    return table_frame(page, "federation")


def assert_expected_table(table: pd.DataFrame) -> None:
    """IID first, then Dirichlet; within each fedavg then fedsgd, rounds ascending; each cell's numbers."""
    order = [(label, fl, round_) for label in PARTITIONS.values() for fl in ("fedavg", "fedsgd") for round_ in ROUNDS]
    assert list(zip(table["partition"], table["fl"], table["round"].astype(int))) == order
    raw = {label: partition for (partition, _), label in PARTITIONS.items()}
    for _, line in table.iterrows():
        partition, round_ = raw[line["partition"]], int(line["round"])
        psnr = expected_psnr(partition, line["fl"], round_)
        assert line["dataset"] == DATASET and int(line["trials"]) == len(OFFSETS)
        assert float(line["mean psnr"]) == pytest.approx(psnr, abs=0.006)
        assert line["interval"] == stats.TOO_SMALL  # 4 trials: no bootstrap interval
        assert float(line["median gain"]) == pytest.approx(psnr - BASELINE, abs=0.006)
        assert line["global accuracy"] == f"{ACCURACY[partition][round_]:.3f}"


# ---------------------------------------------------------------------------------------------
# The section on a frame


def test_the_table_gives_each_partition_update_kind_and_round_its_mean_gain_and_accuracy():
    table = shown(federation.section(frame_of(federation_trials()), ["fl", "round"], seed=0))
    assert list(table.columns) == [
        "dataset",
        "partition",
        "fl",
        "round",
        "trials",
        "mean psnr",
        "interval",
        "median gain",
        "global accuracy",
    ]
    assert_expected_table(table)


def test_rows_without_a_round_and_failed_rows_are_left_out():
    others = [
        {**fed_trial("iid", None, "fedsgd", 1, image, 99.0), "round": None, "partition": None, "federation_key": None}
        for image in range(4)
    ]  # zoo or untrained victims beside the federation
    failed = [{**fed_trial("iid", None, "fedsgd", 1, 9, 0.0), "status": "failed", "psnr": None}]
    table = shown(federation.section(frame_of(federation_trials() + others + failed), [], seed=0))
    assert_expected_table(table)


def test_no_section_without_a_federation_row_or_without_the_columns():
    rows = frame_of(federation_trials())
    assert federation.section(rows.assign(round=pd.array([None] * len(rows), dtype="Int32")), [], 0) == ""
    assert federation.section(rows.drop(columns=list(FEDERATION_COLUMNS)), [], 0) == ""
    assert federation.section(rows.assign(status="failed"), [], 0) == ""


def test_the_global_accuracy_counts_each_federation_once():
    """Two federations attacked at round 5, at 0.8 (three trials) and 0.7 (one): 0.75, not 0.775."""
    rows = [fed_trial("iid", None, "fedsgd", 5, image, 20.0, accuracy=0.8, federation_key="a") for image in range(3)]
    rows.append(fed_trial("iid", None, "fedsgd", 5, 3, 20.0, accuracy=0.7, federation_key="b"))
    table = shown(federation.section(frame_of(rows), [], 0))
    assert table["global accuracy"].tolist() == ["0.750"] and table["trials"].tolist() == ["4"]


def test_enough_trials_get_the_bootstrap_interval_of_their_mean():
    psnrs = [18.0 + 0.7 * math.sin(3 * image) for image in range(12)]
    rows = [fed_trial("dirichlet", 0.1, "fedavg", 1, image, psnr) for image, psnr in enumerate(psnrs)]
    line = shown(federation.section(frame_of(rows), [], seed=3)).iloc[0]
    low, high = stats.mean_interval(psnrs, seed=3)
    assert line["interval"] == f"[{low:.2f},\u00a0{high:.2f}]" and low < np.mean(psnrs) < high


@pytest.mark.parametrize(
    "partition, alpha, label",
    [
        ("iid", None, "IID"),
        ("iid", np.nan, "IID"),
        ("dirichlet", 0.1, "Dirichlet \u03b1=0.1"),
        ("dirichlet", 100.0, "Dirichlet \u03b1=100"),
        ("dirichlet", None, "Dirichlet"),
        (None, None, "not recorded"),
    ],
)
def test_partitions_are_labelled_with_their_alpha(partition, alpha, label):
    assert federation.partition_label(partition, alpha) == label


def test_a_figure_per_dataset_with_accuracy_per_partition_whatever_the_update_kind():
    rows = frame_of(federation_trials() + federation_trials("cifar10"))
    page = federation.section(rows, [], 0)
    for dataset in (DATASET, "cifar10"):
        plots = pngs(page, f"{dataset}: does leakage change as the federation trains?")
        assert len(plots) == 1 and Image.open(io.BytesIO(plots[0])).size[0] == 1000  # the page's width
    curves = federation.accuracy_curves(federation.federation_rows(rows))
    assert len(curves) == 2 * len(PARTITIONS) * len(ROUNDS)  # one point per partition and round, not per fl
    iid = curves[(curves["dataset"] == DATASET) & (curves["partition"] == "IID")]
    assert iid["accuracy"].tolist() == pytest.approx([ACCURACY["iid"][r] for r in ROUNDS])
    assert "round 0 is the untrained model" in page and "client_rounds" in page


# ---------------------------------------------------------------------------------------------
# Through `gradinv report`


@pytest.fixture
def federated(tmp_path):
    """A results directory of federation trials, written as `gradinv run` writes them."""
    path = tmp_path / "results"
    with ResultsDir(path) as results:
        results.write(federation_trials())
    return path


def test_the_report_shows_the_section_after_the_trained_comparison(federated, tmp_path):
    page = write_report(federated, tmp_path / "report.html").read_text()
    assert_expected_table(shown(section(page, federation.TITLE)))
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles.index(federation.TITLE) == titles.index("Trained vs untrained victims") + 1
    leakage = re.search(r"<table id=leakage>(.*?)</table>", page, re.S).group(1)
    for setting in ("round", "partition"):  # more settings for the other sections
        assert f">{setting}</th>" in leakage
    assert ">attacked client</th>" not in leakage  # a repetition, like the images: compared across, never by


def test_the_report_has_no_federation_section_for_other_trials(tmp_path):
    rows = [
        {**fed_trial("iid", None, fl, 0, image, 20.0), **dict.fromkeys(FEDERATION_COLUMNS)}
        for image in range(4)
        for fl in ("fedsgd", "fedavg")
    ]  # zoo or untrained victims: no round
    with ResultsDir(tmp_path / "results") as results:
        results.write([{name: value for name, value in row.items() if name in SCHEMA.names} for row in rows])
    assert federation.TITLE not in write_report(tmp_path / "results", tmp_path / "report.html").read_text()


@pytest.mark.parametrize("rounds, scale", [((0, 1, 5), "linear"), ((0, 1, 10, 200), "symlog")])
def test_rounds_far_apart_get_a_log_axis_that_still_shows_round_0(rounds, scale):
    rows = federation.federation_rows(
        frame_of([fed_trial("iid", None, "fedsgd", r, 0, 20.0, accuracy=0.5) for r in rounds])
    )
    table, curves = federation.round_table(rows, 0), federation.accuracy_curves(rows)
    left, right = federation.round_figure(table, curves, DATASET, "question").axes[:2]
    assert left.get_xscale() == right.get_xscale() == scale
    assert [tick.get_text() for tick in left.get_xticklabels()] == [str(r) for r in rounds]
    assert left.get_xlim()[0] < 0 < left.get_xlim()[0] + 1  # round 0 in view, not a decade below it
