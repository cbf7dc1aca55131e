"""The report's privacy–utility section on rows whose defences and scores are known: written through
the results writer where the schema has the columns, as the frame the section receives where it
does not yet (DP-SGD's knobs and the epsilon outcomes)."""

import hashlib
import io
import json
import math
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from html_tables import pngs, section, table_frame
from PIL import Image

from analysis import report_privacy as privacy
from analysis.privacy_table import defence_columns, defence_of, privacy_table, shown_table, strength_of
from analysis.report import write_report
from gradinv.results.schema import to_table
from gradinv.results.store import ResultsDir

BASELINE = 10.0
IMAGES = range(10)  # one-image clients: 10 trials a setting, enough for a bootstrap interval
# defence settings -> (defence, strength, gain over the baseline)
UNTRAINED = [  # in the table's order: no defence, then DEFENCES' order, weakest strength first
    ({}, "none", "none", 8.0),
    (
        {"clip_update": 1.0, "noise_std": 0.1, "clip_aware": False, "dp_delta": 1e-5},
        "update clip+noise",
        "clip 1 · noise_std 0.1",
        1.0,
    ),
    ({"noise_std": 0.01}, "noise", "noise_std 0.01", 6.0),
    ({"noise_std": 0.1}, "noise", "noise_std 0.1", 2.0),
    ({"keep_fraction": 0.5, "prune_scope": "layer"}, "pruning", "keep 50%", 5.0),
    ({"keep_fraction": 0.1, "prune_scope": "layer", "prune_aware": True}, "pruning", "keep 10%", 3.0),
    ({"quant_bits": 4, "quant_rounding": "stochastic"}, "quantisation", "4 bits stochastic", 4.0),
]
TRAINED = [({}, "none", "none", 7.0), ({"noise_std": 0.1}, "noise", "noise_std 0.1", 1.5)]
ACCURACY = 0.8


def png_of(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(pixels) * 255, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def trial(defence: dict, image: int, gain: float, rng, trained_epochs: int = 0) -> dict:
    """One finished one-image trial as `gradinv run` writes it, its PSNR the baseline plus ``gain``
    (spread a little per image) and its images noise around the truth."""
    psnr = BASELINE + gain + 0.5 * math.sin(3 * image)
    truth = rng.random((8, 8))
    setting = {
        "dataset": "faces",
        "trained_epochs": trained_epochs,
        "fl": "fedsgd",
        "noise_std": 0.0,
        "keep_fraction": 1.0,
        **defence,
    }  # the knobs that always apply, at their "off" defaults
    key = hashlib.sha256(json.dumps({**setting, "images": [image]}, sort_keys=True).encode()).hexdigest()[:20]
    return {
        "study": "defended",
        "key": key,
        "model": "convnet",
        "width": 16,
        "attack": "ig",
        "iterations": 80,
        "model_seed": 0,
        "attack_seed": 0,
        **setting,
        "images": [image],
        "images_per_client": 1,
        "status": "ok",
        "checkpoint_key": "convnet-faces-e2" if trained_epochs else None,
        "model_accuracy": ACCURACY if trained_epochs else None,
        "psnr": psnr,
        "psnr_per_image": [psnr],
        "psnr_gain": psnr - BASELINE,
        "psnr_gain_per_image": [psnr - BASELINE],
        "baseline_psnr": BASELINE,
        "ssim": 0.5,
        "label_accuracy": 1.0,
        "truth_png": [png_of(truth)],
        "reconstruction_png": [png_of(truth + rng.normal(0, 10 ** (-psnr / 20), (8, 8)))],
        "attempt": 1,
        "lanes": 1,
        "task_seconds": 1.0,
        "trial_seconds": 1.0,
    }


def defended_rows(rng) -> list[dict]:
    rows = [trial(defence, i, gain, rng) for defence, *_, gain in UNTRAINED for i in IMAGES]
    rows += [trial(defence, i, gain, rng, trained_epochs=2) for defence, *_, gain in TRAINED for i in IMAGES]
    return rows


@pytest.fixture(scope="module")
def defended(tmp_path_factory):
    path = tmp_path_factory.mktemp("defended") / "results"
    with ResultsDir(path) as results:
        results.write(defended_rows(np.random.default_rng(0)))
    return path


def test_the_table_shows_each_strengths_rows_mean_interval_gain_and_accuracy(defended, tmp_path):
    page = write_report(defended, tmp_path / "report.html").read_text()
    shown = table_frame(page, "privacy")
    written = pd.read_parquet(defended)
    expected = [("untrained", defence, strength) for _, defence, strength, _ in UNTRAINED]
    expected += [("trained 2 ep", defence, strength) for _, defence, strength, _ in TRAINED]
    assert list(zip(shown["victim"], shown["defence"], shown["strength"])) == expected
    for settings, defence, strength, _ in UNTRAINED:
        rows = written[(written["trained_epochs"] == 0) & rows_with(written, settings)]
        line = shown[(shown["victim"] == "untrained") & (shown["strength"] == strength)].iloc[0]
        assert line["defence"] == defence and int(line["trials"]) == len(rows) == 10
        assert float(line["mean psnr"]) == pytest.approx(rows["psnr"].mean(), abs=0.006)
        assert float(line["median gain"]) == pytest.approx(rows["psnr_gain"].median(), abs=0.006)
        low, high = (float(v) for v in line["interval"].strip("[]").split(","))
        assert low <= rows["psnr"].mean() <= high
        assert line["accuracy"] == "untrained"
    knew = shown.set_index(["victim", "strength"])["attacker knew"]
    assert knew[("untrained", "keep 10%")] == "yes" and knew[("untrained", "keep 50%")] == "no"
    assert knew[("untrained", "clip 1 · noise_std 0.1")] == "no" and knew[("untrained", "noise_std 0.1")] == "–"
    trained = shown[shown["victim"] == "trained 2 ep"].set_index("strength")
    assert set(trained["accuracy"]) == {f"{ACCURACY:.3f}"} and set(trained["accuracy from"]) == {"plain victim"}
    assert "Reusing it here: noise (noise_std 0.1)." in section(page, privacy.TITLE)
    assert "\u03b5 (DP-SGD)" not in shown.columns  # no row records an epsilon in this schema


def rows_with(frame: pd.DataFrame, settings: dict) -> pd.Series:
    """Rows whose defence strengths are exactly ``settings``, every other defence off."""
    strengths = {"noise_std": 0.0, "keep_fraction": 1.0, "quant_bits": None, "clip_update": None}
    mask = pd.Series(True, index=frame.index)
    for name, off in strengths.items():
        value = settings.get(name, off)
        mask &= frame[name].isna() if value is None else frame[name] == value
    return mask


def test_the_figure_and_a_grid_of_the_same_images_at_each_strength_are_embedded(defended, tmp_path):
    page = write_report(defended, tmp_path / "report.html").read_text()
    html_text = section(page, privacy.TITLE)
    plots = pngs(html_text, "faces: how much does each defence stop the attack, and what does it cost the victim?")
    assert len(plots) == 1 and Image.open(io.BytesIO(plots[0])).size[0] == 1000  # the page's width at 100 dpi
    written = pd.read_parquet(defended)
    blocks = re.findall(r"<div class=setting><h3>(.*?)</h3>(.*?)</div></div>(?=<div class=setting>|$)", html_text, re.S)
    titles = [title for title, _ in blocks]
    assert titles == [
        f"faces · {defence} · untrained: images 0"
        for defence in ("update clip+noise", "noise", "pruning", "quantisation")
    ]
    noise = dict(blocks)["faces · noise · untrained: images 0"]
    first_image = written[written["images"].map(lambda images: list(images) == [0])]
    untrained = first_image[
        (first_image["trained_epochs"] == 0)
        & first_image["clip_update"].isna()
        & first_image["keep_fraction"].eq(1)
        & first_image["quant_bits"].isna()
    ]
    by_noise = untrained.set_index("noise_std")
    assert pngs(noise, "ground truth") == [by_noise.loc[0.0, "truth_png"][0]]
    expected = [by_noise.loc[noise_std, "reconstruction_png"][0] for noise_std in (0.0, 0.01, 0.1)]  # weakest first
    assert pngs(noise, "reconstruction") == expected
    captions = re.findall(r"<figcaption>([^<]*)<br>mean ([\d.]+) dB", noise)
    assert [(s, float(p)) for s, p in captions] == [
        (s, pytest.approx(by_noise.loc[n, "psnr"], abs=0.006))
        for s, n in (("none", 0.0), ("noise_std 0.01", 0.01), ("noise_std 0.1", 0.1))
    ]


def test_the_section_is_absent_without_a_defence_and_in_files_without_defence_columns(tmp_path):
    rng = np.random.default_rng(1)
    plain = [trial({}, i, 5.0, rng) for i in IMAGES]
    with ResultsDir(tmp_path / "plain") as results:
        results.write(plain)
    assert privacy.TITLE not in write_report(tmp_path / "plain", tmp_path / "plain.html").read_text()
    table = to_table(plain)  # as written before defences existed: no defence column at all
    table = table.select([name for name in table.schema.names if name not in defence_columns()])
    (tmp_path / "old").mkdir()
    pq.write_table(table, tmp_path / "old" / "part-1.parquet")
    assert "noise_std" not in pq.read_schema(tmp_path / "old" / "part-1.parquet").names
    assert privacy.TITLE not in write_report(tmp_path / "old", tmp_path / "old.html").read_text()
    frame = pd.DataFrame(plain).drop(columns=["images"]).assign(images="0")
    assert privacy_table(frame, ["fl"]) is None


@pytest.mark.parametrize(
    "settings, defence, strength",
    [
        ({}, "none", "none"),
        ({"noise_std": 0.0, "keep_fraction": 1.0, "quant_bits": None, "clip_update": None}, "none", "none"),
        ({"noise_std": 0.01}, "noise", "noise_std 0.01"),
        ({"clip_update": 2.0}, "update clip", "clip 2"),
        ({"clip_update": 1.0, "noise_std": 0.5}, "update clip+noise", "clip 1 · noise_std 0.5"),
        ({"keep_fraction": 0.1}, "pruning", "keep 10%"),
        ({"keep_fraction": 0.005, "prune_scope": "global"}, "pruning", "keep 0.5% global"),
        ({"quant_bits": 4, "quant_rounding": "stochastic"}, "quantisation", "4 bits stochastic"),
        ({"quant_bits": 1, "quant_rounding": "nearest"}, "quantisation", "1 bit nearest"),
        ({"dp_clip": 1.0, "dp_noise": 1.0}, "DP-SGD", "DP σ=1 C=1"),
        ({"dp_clip": 0.5, "dp_noise": 2.0, "dp_sample_rate": 0.25}, "DP-SGD", "DP σ=2 C=0.5 q=0.25"),
        ({"noise_std": 0.01, "keep_fraction": 0.1}, "noise + pruning", "noise_std 0.01, keep 10%"),
        (
            {"keep_fraction": 0.5, "quant_bits": 8, "quant_rounding": "nearest", "dp_clip": 1.0, "dp_noise": 0.5},
            "pruning + quantisation + DP-SGD",
            "keep 50%, 8 bits nearest, DP σ=0.5 C=1",
        ),
    ],
)
def test_each_defence_kind_is_labelled_with_its_strength(settings, defence, strength):
    assert defence_of(settings) == defence
    assert strength_of(settings) == strength
    with_nulls = {name: np.nan for name in ("noise_std", "keep_fraction", "quant_bits", "dp_noise")} | settings
    assert defence_of(with_nulls) == defence  # a null knob (it does not apply) is off


def test_epsilon_delta_awareness_and_a_defended_checkpoint_come_from_the_columns():
    """DP-SGD's knobs and the epsilon outcomes as the frame the section receives (not yet in the schema)."""
    rng = np.random.default_rng(2)
    dp = {"dp_clip": 1.0, "dp_noise": 1.0, "dp_aware": True, "dp_delta": 1e-5, "epsilon": 3.217, "accountant": "rdp"}
    update = {"clip_update": 1.0, "noise_std": 0.5, "clip_aware": True, "dp_delta": 1e-6, "update_epsilon": 12.34}
    rows = [trial({}, i, 7.0, rng, trained_epochs=2) for i in IMAGES]
    rows += [
        {**trial(dp, i, 2.0, rng, trained_epochs=2), "checkpoint_key": "convnet-faces-e2-dp", "model_accuracy": 0.6}
        for i in IMAGES
    ]  # a victim trained under DP-SGD: a checkpoint of its own
    rows += [trial(update, i, 1.0, rng, trained_epochs=2) for i in IMAGES]
    frame = pd.DataFrame(rows).assign(images=lambda f: f["images"].map(lambda i: ",".join(map(str, i))))
    table = privacy_table(frame, []).set_index("defence")
    shown = shown_table(privacy_table(frame, [])).set_index("defence")
    assert shown.loc["DP-SGD", "strength"] == "DP σ=1 C=1" and shown.loc["DP-SGD", "attacker knew"] == "yes"
    assert float(shown.loc["DP-SGD", "\u03b5 (DP-SGD)"]) == pytest.approx(3.217)
    assert float(shown.loc["DP-SGD", "\u03b4"]) == 1e-5 and shown.loc["DP-SGD", "accountant"] == "rdp"
    assert shown.loc["DP-SGD", "\u03b5 (update)"] == "–"
    assert float(shown.loc["update clip+noise", "\u03b5 (update)"]) == pytest.approx(12.34)
    assert float(shown.loc["update clip+noise", "\u03b4"]) == 1e-6
    assert shown.loc["none", "\u03b5 (DP-SGD)"] == shown.loc["none", "\u03b5 (update)"] == "–"
    assert table.loc["DP-SGD", "accuracy_from"] == "defended checkpoint"
    assert table.loc["DP-SGD", "accuracy"] == pytest.approx(0.6)
    assert table.loc["update clip+noise", "accuracy_from"] == "plain victim"
    assert table.loc["update clip+noise", "accuracy"] == pytest.approx(ACCURACY)
    assert table.loc["DP-SGD", "psnr"] == pytest.approx(frame["psnr"].iloc[10:20].mean())
    notes = privacy._epsilon_notes(privacy_table(frame, []))
    assert len(notes) == 2 and "example-level" in notes[0] and "not the federation" in notes[0]
