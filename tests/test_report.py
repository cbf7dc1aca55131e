"""`gradinv report` and `gradinv export` on a small real results dataset (plus derived rows for the
sections a tiny run cannot fill: trained models, tuning candidates, a failure), and on synthetic rows
whose leakage is known: one dataset clearly above its no-information baseline, one at it."""

import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from html_tables import Tables
from PIL import Image, ImageStat

from analysis import stats
from analysis.export import export
from analysis.report import write_report
from gradinv.results.store import ResultsDir
from sweep.cli.main import main

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STUDY = """\
name: tiny-report
data: {dataset: faces, images: 4, image_size: 8}
fixed: {model: convnet, width: 2, iterations: 10}
grid:
  fl: [fedsgd, fedavg]
  local_steps: [1, 3]
  images_per_client: [1, 2]
resources: {num_cpus: 1}
"""
METRIC_TABLES = {"psnr": "psnr", "psnr-gain": "psnr_gain", "ssim": "ssim", "label-accuracy": "label_accuracy"}


def run_command(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A command in its own process group, stopped by that group's id however it ends."""
    process = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.fixture(scope="module")
def real_results(tmp_path_factory) -> Path:
    """A real run of a 18-trial study on a local Ray instance."""
    root = tmp_path_factory.mktemp("report")
    (root / "study.yaml").write_text(STUDY)
    done = run_command(
        [
            sys.executable,
            "-m",
            "sweep",
            "run",
            str(root / "study.yaml"),
            "--results",
            str(root / "results"),
            "--no-progress",
        ],
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "results"


@pytest.fixture(scope="module")
def results(real_results, tmp_path_factory) -> Path:
    """The real rows, plus trained copies, tuning candidates and one failure, in one more file."""
    path = tmp_path_factory.mktemp("augmented") / "results"
    shutil.copytree(real_results, path)
    first = sorted(path.glob("*.parquet"))[0]
    schema = pq.read_schema(first)
    rows = pa.concat_tables(pq.read_table(f) for f in sorted(path.glob("*.parquet"))).to_pylist()
    derived = [
        {
            **row,
            "key": row["key"][:16] + "trnd",
            "trained_epochs": 1,
            "psnr": row["psnr"] + 1,
            "psnr_per_image": [p + 1 for p in row["psnr_per_image"]],
        }
        for row in rows
    ]
    derived += [
        {
            **row,
            "key": f"{row['key'][:16]}tun{i}",
            "study": "tiny-tune",
            "candidate": i,
            "tv": 10.0**-i,
            "psnr": row["psnr"] + (i % 3),
        }
        for i, row in enumerate(rows[:5])
    ]
    failed = {name: None for name in schema.names}
    failed.update(
        study=rows[0]["study"],
        key="f" * 20,
        status="failed",
        attempt=3,
        fl="fedsgd",
        images=[0],
        trained_epochs=0,
        images_per_client=1,
        error="RuntimeError: worker died <twice> & gave up",
    )
    derived.append(failed)
    pq.write_table(pa.Table.from_pylist(derived, schema=schema), path / "part-9999999999999999999-derived.parquet")
    return path


# ---------------------------------------------------------------------------------------------
# (a) the tables say what a pandas groupby of the same rows says


def frame_of(table: list[list[str]]) -> pd.DataFrame:
    """A table as shown, its headers back as column names ("ci low" -> "ci_low")."""
    return pd.DataFrame(table[1:], columns=[name.replace(" ", "_") for name in table[0]])


def key_text(value) -> str:
    """A group key as the report prints it."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def number(text: str) -> float:
    return math.nan if text == "–" else float(text)


def assert_close(shown: str, expected: float) -> None:
    if isinstance(expected, float) and math.isnan(expected):
        assert shown == "–"
    else:
        assert abs(number(shown) - expected) <= 6e-5, (shown, expected)


def assert_matches_groupby(shown: pd.DataFrame, rows: pd.DataFrame, by: list[str], metric: str) -> None:
    expected = rows.groupby(by, dropna=False)[metric].agg(["count", "mean", "median", "std"])
    assert len(shown) == len(expected)
    for group, summary in expected.iterrows():
        group = group if isinstance(group, tuple) else (group,)
        match = shown[(shown[by] == [key_text(v) for v in group]).all(axis=1)]
        assert len(match) == 1, group
        line = match.iloc[0]
        assert int(line["trials"]) == summary["count"]
        for column in ("mean", "median", "std"):
            assert_close(line[column], summary[column])
        if summary["count"] < 10:
            assert line["interval"] == ("n too small" if summary["count"] else "–")  # no value: no baseline recorded
        else:
            low, high = (float(v) for v in line["interval"].strip("[]").split(","))
            assert low <= number(line["mean"]) <= high


def test_report_tables_equal_a_pandas_groupby(results, tmp_path):
    page = write_report(results, tmp_path / "report.html").read_text()
    tables = Tables(page).tables
    everything = pd.read_parquet(results)
    runs = everything[everything["candidate"].isna()]
    ok = runs[runs["status"] == "ok"]

    shown = frame_of(tables["psnr"])
    by = list(shown.columns[: list(shown.columns).index("trials")])
    assert set(by) == {"trained_epochs", "fl", "local_steps", "images_per_client"}
    for table_id, metric in METRIC_TABLES.items():
        assert_matches_groupby(frame_of(tables[table_id]), ok, by, metric)
    trained = frame_of(tables["trained"])  # every derived trained trial scores 1 dB more on each image
    images = ok[ok["trained_epochs"] == 0].groupby([b for b in by if b != "trained_epochs"], dropna=False)
    assert sorted(trained["pairs"].astype(int)) == sorted(images["images_per_client"].sum())
    assert set(trained["difference"]) == {"1.00"}
    assert set(trained["reading"]) == {"no difference detected (n too small)"}  # 4 pairs each

    summary = {row[0]: row[1] for row in tables["summary"]}
    counts = everything["status"].value_counts()
    assert int(summary["trials"]) == len(everything)
    for status in ("ok", "failed", "pruned"):
        assert int(summary[status]) == counts.get(status, 0)
    assert int(summary["tuning rows"]) == everything["candidate"].notna().sum() == 5

    success = frame_of(tables["success"])
    expected_hits = (ok["psnr"] >= 20).groupby([ok[b] for b in by], dropna=False).sum()
    assert success["successes"].astype(int).sum() == expected_hits.sum()

    tuning = frame_of(tables["tuning-tiny-tune"])
    candidates = everything[everything["candidate"].notna()].sort_values("candidate")
    assert tuning["candidate"].astype(int).tolist() == candidates["candidate"].astype(int).tolist()
    for shown_psnr, shown_best, psnr, best in zip(
        tuning["psnr"], tuning["best_so_far"], candidates["psnr"], candidates["psnr"].cummax()
    ):
        assert abs(number(shown_psnr) - psnr) <= 0.006 and abs(number(shown_best) - best) <= 0.006

    failures = frame_of(tables["failures"])
    assert failures[["key", "error"]].values.tolist() == [["f" * 20, "RuntimeError: worker died <twice> & gave up"]]

    grids = page.split("<h2>Reconstructions per setting</h2>")[1].split("</section>")[0]
    assert grids.count('alt="reconstruction"') >= 3
    assert grids.count('alt="ground truth"') == grids.count('alt="reconstruction"')


def test_report_grouped_by_one_field_and_sections_without_data_say_so(real_results, tmp_path):
    page = write_report(real_results, tmp_path / "report.html", by=["fl"]).read_text()
    tables = Tables(page).tables
    frame = pd.read_parquet(real_results)
    assert_matches_groupby(frame_of(tables["psnr"]), frame[frame["status"] == "ok"], ["fl"], "psnr")
    assert "trained" not in tables and "All finished trials share one model state (untrained)" in page
    assert "No tuning candidates in these results." in page and "No failed trials." in page


# ---------------------------------------------------------------------------------------------
# (b) a real browser draws it and fetches nothing


def page_requests(net_log: Path) -> list[str]:
    """URLs Chromium requested on behalf of a file:// page (its own background traffic left out)."""
    text = net_log.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if "url" in params and "file://" in str(params.get("site_for_cookies", "")):
            urls.append(params["url"])
    return [url for url in urls if url.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")]


def browse(page: Path, work: Path, name: str) -> tuple[Image.Image, list[str]]:
    profile, shot, net_log = work / f"{name}-profile", work / f"{name}.png", work / f"{name}-net.json"
    done = run_command(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--log-net-log={net_log}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            page.resolve().as_uri(),
        ],
        timeout=120,
    )
    assert shot.exists(), done.stderr[-2000:]
    return Image.open(shot), page_requests(net_log)


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium_without_network_requests(results, tmp_path):
    report = write_report(results, tmp_path / "report.html")
    shot, requests = browse(report, tmp_path, "report")
    assert shot.size == (1200, 3000)
    assert ImageStat.Stat(shot.convert("L")).var[0] > 100, "the screenshot is blank"
    assert requests == []
    # The same check sees a page that does reach out.
    control = tmp_path / "control.html"
    control.write_text(
        '<html><body><img src="http://example.invalid/a.png">'
        '<link rel="stylesheet" href="https://cdn.example.invalid/a.css"></body></html>'
    )
    _, control_requests = browse(control, tmp_path, "control")
    assert sorted(control_requests) == ["http://example.invalid/a.png", "https://cdn.example.invalid/a.css"]


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed (apt-get install -y chromium)")
def test_the_leakage_plot_is_drawn_in_the_first_screen(synthetic, tmp_path):
    report = write_report(synthetic, tmp_path / "report.html")
    shot, requests = browse(report, tmp_path, "synthetic")
    assert requests == []
    pixels = np.asarray(shot.convert("RGB"), dtype=int)[:1600]  # the summary, then the first plot
    leak = np.abs(pixels - [0x1F, 0x77, 0xB4]).sum(axis=2) < 30  # the "leakage" markers and intervals
    assert leak.sum() > 500


# ---------------------------------------------------------------------------------------------
# (c) export


def test_export_writes_every_image_and_a_matching_index(results, tmp_path):
    out = tmp_path / "export"
    index = export(results, out)
    frame = pd.read_parquet(results)
    ok = frame[frame["status"] == "ok"]
    images = sum(len(pngs) for pngs in ok["reconstruction_png"])
    assert len(index) == images and len(list((out / "images").glob("*.png"))) == 2 * images
    from_csv, from_parquet = pd.read_csv(out / "index.csv"), pd.read_parquet(out / "index.parquet")
    assert len(from_csv) == len(from_parquet) == images
    same = ["key", "position", "truth_file", "reconstruction_file"]
    assert from_csv[same].values.tolist() == from_parquet[same].values.tolist()
    assert {"fl", "local_steps", "images_per_client", "trained_epochs", "psnr", "trial_psnr"} <= set(from_parquet)
    rows = ok.set_index("key")
    for entry in from_parquet.itertuples():
        row = rows.loc[entry.key]
        truth, recon = (out / entry.truth_file).read_bytes(), (out / entry.reconstruction_file).read_bytes()
        assert truth == row["truth_png"][entry.position] and recon == row["reconstruction_png"][entry.position]
        assert Image.open(io.BytesIO(recon)).size == Image.open(io.BytesIO(truth)).size == (8, 8)
        assert entry.psnr == pytest.approx(row["psnr_per_image"][entry.position])
        assert entry.image == row["images"][entry.position]
    assert "f" * 20 not in set(from_parquet["key"])  # failed trials have no images


# ---------------------------------------------------------------------------------------------
# (d) user mistakes: one line on stderr, exit 2


@pytest.mark.parametrize("verb", ["report", "export"])
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_results_is_one_line_and_exit_2(verb, state, tmp_path, capsys):
    results = tmp_path / "results"
    if state == "empty":
        results.mkdir()
    target = ["--out", str(tmp_path / "r.html")] if verb == "report" else ["--to", str(tmp_path / "x")]
    assert main([verb, str(results), *target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gradinv {verb}: error: results:") and str(results) in err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "x").exists()


def test_unknown_group_field_is_one_line_and_exit_2(real_results, tmp_path, capsys):
    assert main(["report", str(real_results), "--by", "fl", "no_such_field", "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--by: 'no_such_field'" in err


# ---------------------------------------------------------------------------------------------
# (e) reading a number: baselines, leakage verdicts, paired trained vs untrained, curves, tuning


BASELINES = {"fashion-mnist": 10.9, "faces": 16.0}
ACCURACY = {"fashion-mnist": 0.81, "faces": 0.55}  # faces: near chance (2 classes)
IMAGES = list(range(12))


def png_of(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(pixels) * 255, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_trial(
    study: str,
    setting: dict,
    images: list[int],
    gains: list[float],
    rng,
    *,
    baseline: float,
    candidate: int | None = None,
    status: str = "ok",
    lanes: int = 4,
) -> dict:
    """One finished trial as `gradinv run` writes it (schema 2), with the per-image gains given and
    images that look like what they score: noise around the truth, less of it for a higher gain."""
    psnrs = [baseline + gain for gain in gains]
    truth = [rng.random((8, 8)) for _ in images]
    recon = [t + rng.normal(0, 10 ** (-p / 20), (8, 8)) for t, p in zip(truth, psnrs)]
    iterations = setting.get("iterations", 80)
    checkpoints = [iterations * (k + 1) // 8 for k in range(8)]
    final = float(np.mean(psnrs))
    key_text = json.dumps({"study": study, "candidate": candidate, **setting, "images": images}, sort_keys=True)
    return {
        "study": study,
        "key": hashlib.sha256(key_text.encode()).hexdigest()[:20],
        "candidate": candidate,
        "model": "convnet",
        "width": 16,
        "attack": "ig",
        "iterations": iterations,
        "restarts": 1,
        "lr": 0.1,
        "tv": 1e-4,
        "model_seed": 0,
        "attack_seed": 0,
        **setting,
        "images": images,
        "images_per_client": len(images),
        "status": status,
        "checkpoint_key": f"convnet-{setting['dataset']}-e2" if setting.get("trained_epochs") else None,
        "model_accuracy": ACCURACY[setting["dataset"]] if setting.get("trained_epochs") else None,
        "psnr": final if status == "ok" else None,
        "psnr_per_image": psnrs if status == "ok" else None,
        "psnr_gain": final - baseline if status == "ok" else None,
        "psnr_gain_per_image": gains if status == "ok" else None,
        "baseline_psnr": baseline,
        "baseline_psnr_mean_image": baseline,
        "baseline_psnr_flat": baseline - 1.5,
        "baseline_psnr_class_mean": baseline - 0.5,
        "ssim": 0.5,
        "label_accuracy": 1.0,
        "truth_png": [png_of(t) for t in truth],
        "reconstruction_png": [png_of(r) for r in recon],
        "curve_iterations": checkpoints,
        "curve_psnr": [baseline - 4 + (final - baseline + 4) * (k + 1) / 8 for k in range(8)],  # rising to the end
        "iterations_run": iterations,
        "attempt": 1,
        "lanes": lanes,
        "pack_id": "pack-" + key_text[:8],
        "task_seconds": 8.0,
        "trial_seconds": 8.0 / lanes,
        "host": "here",
        "device": "cpu",
    }


def leaky_and_blind_rows(rng) -> list[dict]:
    """Fashion-MNIST clearly leaks (gain about 8 dB); faces sit at the baseline (gains around 0). Both
    under an untrained and a trained victim, FedSGD and FedAvg with 3 local steps, 12 one-image clients."""
    rows = []
    for dataset, (centre, spread) in {"fashion-mnist": (8.0, 1.0), "faces": (0.0, 0.6)}.items():
        for trained in (0, 2):
            for fl, steps in (("fedsgd", None), ("fedavg", 3)):
                setting = {"dataset": dataset, "trained_epochs": trained, "fl": fl, "local_steps": steps}
                shift = -1.0 if trained and dataset == "fashion-mnist" else 0.0  # trained leaks 1 dB less
                for image in IMAGES:
                    gain = centre + shift + spread * math.sin(7 * image + 3 * trained)
                    rows.append(synthetic_trial("demo", setting, [image], [gain], rng, baseline=BASELINES[dataset]))
    return rows


def tuning_rows(rng) -> list[dict]:
    """A tuned study: 4 candidates on 3 tuning images (candidate 2 pruned), then the best (3) and the
    paper's defaults (no candidate) on 10 held-out images, where the best gains 1.5 dB."""
    rows = []
    for candidate, (gain, status) in enumerate([(2.0, "ok"), (3.0, "ok"), (0.0, "pruned"), (5.0, "ok")]):
        setting = {"dataset": "fashion-mnist", "trained_epochs": 0, "fl": "fedsgd", "tv": 10.0 ** -(candidate + 2)}
        rows += [
            synthetic_trial(
                "tune", setting, [i], [gain + 0.1 * i], rng, baseline=10.9, candidate=candidate, status=status
            )
            for i in range(3)
        ]
    best = {"dataset": "fashion-mnist", "trained_epochs": 0, "fl": "fedsgd", "tv": 1e-5}
    defaults = {"dataset": "fashion-mnist", "trained_epochs": 0, "fl": "fedsgd", "tv": 1e-4}
    for i in range(3, 13):
        rows.append(synthetic_trial("tune", best, [i], [2.0 + 0.3 * (i % 3)], rng, baseline=10.9, candidate=3))
        rows.append(synthetic_trial("tune", defaults, [i], [0.5 + 0.3 * (i % 3) - 0.2 * (i % 2)], rng, baseline=10.9))
    return rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "results"
    rng = np.random.default_rng(0)
    with ResultsDir(path) as results:
        results.write(leaky_and_blind_rows(rng))
        results.write(tuning_rows(rng))
    return path


def test_report_marks_settings_at_the_baseline_as_no_leakage_detected(synthetic, tmp_path):
    page = write_report(synthetic, tmp_path / "report.html").read_text()
    leakage = frame_of(Tables(page).tables["leakage"])
    assert len(leakage) == 8 and set(leakage["dataset"]) == {"fashion-mnist", "faces"}
    verdicts = leakage.groupby("dataset")["verdict"].agg(set).to_dict()
    # the synthetic curves rise to the end: a no-leakage setting's attack was still improving
    assert verdicts == {"fashion-mnist": {"leakage"}, "faces": {stats.STILL_IMPROVING}}
    frame = pd.read_parquet(synthetic)
    runs = frame[frame["study"] == "demo"]
    for row in leakage.itertuples():
        same = runs[
            (runs["dataset"] == row.dataset)
            & (runs["trained_epochs"] == int(row.trained_epochs))
            & (runs["fl"] == row.fl)
        ]
        assert int(row.trials) == len(same) == 12
        assert number(row.baseline_psnr) == pytest.approx(BASELINES[row.dataset], abs=0.006)
        assert number(row.gain_median) == pytest.approx(same["psnr_gain"].median(), abs=0.006)
        low, high = (float(v) for v in row.interval.strip("[]").split(","))
        ordered = np.sort(same["psnr_gain"])
        assert (low, high) == (pytest.approx(ordered[2], abs=0.006), pytest.approx(ordered[9], abs=0.006))
        assert (low > 0) == (row.verdict == "leakage")
    summary = {row[0]: row[1] for row in Tables(page).tables["summary"]}
    assert summary["settings that leak"].startswith("4 of 8 ")
    assert page.count('alt="Does each setting reconstruct more than an attacker who knows nothing') == 1


def test_small_settings_get_no_interval_and_say_so(tmp_path):
    rng = np.random.default_rng(1)
    setting = {"dataset": "faces", "trained_epochs": 0, "fl": "fedsgd", "local_steps": None}
    rows = [
        synthetic_trial("small", {**setting, "fl": fl}, [i], [1.0 + i % 2], rng, baseline=10.0)
        for fl, count in (("fedsgd", 5), ("fedavg", 6))
        for i in range(count)
    ]
    with ResultsDir(tmp_path / "results") as results:
        results.write(rows)
    page = write_report(tmp_path / "results", tmp_path / "report.html").read_text()
    tables = Tables(page).tables
    leakage = frame_of(tables["leakage"]).set_index("fl")
    assert (
        leakage.loc["fedsgd", "verdict"] == f"no leakage detected (n too small), {stats.SETTLED_WORDS[False]}"
    )  # rising curves
    assert leakage.loc["fedsgd", "interval"] == "n too small"
    assert leakage.loc["fedavg", "verdict"] == "leakage"  # all 6 gains above 0: the interval [min, max] is
    assert frame_of(tables["psnr-gain"])["interval"].tolist() == ["n too small", "n too small"]  # mean: under 10
    success = frame_of(tables["success"]).set_index("fl")  # 0 of 5 at 20 dB: Wilson, not [0, 0]
    assert int(success.loc["fedsgd", "successes"]) == 0 and number(success.loc["fedsgd", "ci_high"]) > 0.4
    assert frame_of(tables["psnr"])["interval"].tolist() == ["n too small", "n too small"]


def test_trained_vs_untrained_is_paired_per_image(synthetic, tmp_path):
    page = write_report(synthetic, tmp_path / "report.html").read_text()
    tables = Tables(page).tables
    trained = frame_of(tables["trained"])
    assert len(trained) == 4 and set(trained["pairs"].astype(int)) == {12}
    frame = pd.read_parquet(synthetic)
    runs = frame[frame["study"] == "demo"].assign(image=lambda f: f["images"].map(lambda i: int(i[0])))
    for row in trained.itertuples():
        arm = runs[(runs["dataset"] == row.dataset) & (runs["fl"] == row.fl)]
        psnr = {epochs: arm[arm.trained_epochs == epochs].set_index("image")["psnr"] for epochs in (0, 2)}
        both = psnr[2] - psnr[0]  # aligned on the image index
        assert number(row.difference) == pytest.approx(both.mean(), abs=0.006)
        low, high = (float(v) for v in row.interval.strip("[]").split(","))
        assert low <= both.mean() <= high
    by_dataset = trained.groupby("dataset")["reading"].agg(set).to_dict()
    assert by_dataset == {"fashion-mnist": {"trained leaks less"}, "faces": {"no difference detected"}}
    victims = frame_of(tables["victims"]).set_index("dataset")
    assert number(victims.loc["faces", "chance"]) == 0.5 and number(victims.loc["fashion-mnist", "chance"]) == 0.1
    assert victims.loc["faces", "reading"] == "near chance: not a trained victim"
    assert victims.loc["fashion-mnist", "reading"] == "above chance"
    fixed = dict(pair for row in tables["fixed"] for pair in zip(row[::2], row[1::2]))  # name, value, name, ...
    assert {name: fixed[name] for name in ("iterations", "width", "restarts", "lr", "tv")} == {
        "iterations": "80",
        "width": "16",
        "restarts": "1",
        "lr": "0.1",
        "tv": "0.0001",
    }
    assert "local steps" not in fixed and "images" not in fixed  # local steps: null under FedSGD


def test_curves_grids_and_compute_are_read_from_the_new_columns(synthetic, tmp_path):
    page = write_report(synthetic, tmp_path / "report.html").read_text()
    assert 'alt="Was the attack budget enough?' in page and "No quality curves" not in page
    frame = pd.read_parquet(synthetic)
    scored = {
        (int(image), round(psnr, 2), round(gain, 2))
        for images, psnrs, gains in zip(frame["images"], frame["psnr_per_image"], frame["psnr_gain_per_image"])
        if psnrs is not None
        for image, psnr, gain in zip(images, psnrs, gains)
    }
    captions = re.findall(r"<figcaption>image (\d+)<br>([\d.]+) dB \(([+-][\d.]+)\)</figcaption>", page)
    assert len(captions) == 8 * 3  # 8 settings x best, median and worst one-image trials, each image captioned
    assert {(int(i), float(p), float(g)) for i, p, g in captions} <= scored
    # one image across settings: the first image under each of a dataset's 4 settings
    assert "untrained · fedsgd<br>18.90 dB (+8.00)" in page
    strip = page.split("<h3>fashion-mnist: image 0</h3>")[1].split("</div>")[0]
    assert strip.count('alt="reconstruction"') == 4 and strip.count('alt="ground truth"') == 1
    index = export(synthetic, tmp_path / "export").set_index(["key", "position"])
    for row in frame[frame["status"] == "ok"].itertuples():
        for position, gain in enumerate(row.psnr_gain_per_image):
            assert index.loc[(row.key, position), "psnr_gain"] == pytest.approx(gain)
            assert index.loc[(row.key, position), "baseline_psnr"] == pytest.approx(row.baseline_psnr)
    summary = {row[0]: row[1] for row in Tables(page).tables["summary"]}
    minutes, seconds = divmod(frame["trial_seconds"].sum(), 60)  # each row holds a quarter of its task's 8 s
    assert summary["compute time (sum of each trial's share of its task)"] == f"{minutes:.0f} min {seconds:.0f} s"


def test_tuning_section_shows_each_candidates_own_rows_and_the_held_out_comparison(synthetic, tmp_path):
    page = write_report(synthetic, tmp_path / "report.html").read_text()
    tables = Tables(page).tables
    history = frame_of(tables["tuning-tune"])
    assert history["candidate"].astype(int).tolist() == [0, 1, 2, 3]
    assert history["trials"].astype(int).tolist() == [3, 3, 3, 3]  # held-out rows of 3 are not its own
    assert history["state"].tolist() == ["complete", "complete", "pruned", "complete"]
    assert [number(v) for v in history["psnr"]] == pytest.approx([13.0, 14.0, math.nan, 16.0], abs=0.006, nan_ok=True)
    assert [number(v) for v in history["best_so_far"]] == pytest.approx([13.0, 14.0, 14.0, 16.0], abs=0.006)
    held = frame_of(tables["strongest-tune"]).iloc[0]
    assert int(held["candidate"]) == 3 and int(held["clients"]) == 10 and held["family"] == "ig"
    gains = [2.0 + 0.3 * (i % 3) - (0.5 + 0.3 * (i % 3) - 0.2 * (i % 2)) for i in range(3, 13)]
    assert number(held["gain_over_defaults"]) == pytest.approx(np.mean(gains), abs=0.006)
    gain_over_baseline = number(held["tuned_psnr"]) - number(held["baseline_psnr"])
    assert number(held["gain_over_baseline"]) == pytest.approx(gain_over_baseline, abs=0.011)
    low, high = (float(v) for v in held["interval"].strip("[]").split(","))
    assert 0 < low <= np.mean(gains) <= high
    # the tuned study's rows stay out of the designed settings
    assert set(frame_of(tables["leakage"])["dataset"]) == {"fashion-mnist", "faces"}
    assert int(frame_of(tables["leakage"])["trials"].astype(int).sum()) == 96


def test_page_puts_plots_before_long_tables_and_few_series_per_axes(synthetic, tmp_path):
    from analysis.figures import MAX_SERIES, split_panels

    page = write_report(synthetic, tmp_path / "report.html").read_text()
    first_plot = page.index("<p class=plot>")
    tables = [page[m.start() : page.index("</table>", m.start())] for m in re.finditer(r"<table id=", page)]
    long_tables = [page.index(t) for t in tables if "<thead>" in t and t.count("<tr>") > 8]  # 8+ data rows
    assert long_tables and first_plot < min(long_tables)
    assert "<details><summary>Metrics, success rates" in page  # the long per-metric tables are collapsed
    frame = pd.DataFrame(
        [{"dataset": d, "a": a, "b": b, "c": c} for d in "xy" for a in range(3) for b in range(3) for c in range(2)]
    )
    panels, series = split_panels(frame, ["dataset", "a", "b", "c"])
    assert panels[0] == "dataset" and all(len(part.groupby(series)) <= MAX_SERIES for _, part in frame.groupby(panels))


def test_outcome_columns_are_never_settings():
    from analysis.roles import Roles
    from gradinv.results.schema import SCHEMA

    SETTINGS = Roles.of_schema(SCHEMA).settings
    new = {
        "baseline_psnr",
        "baseline_psnr_mean_image",
        "baseline_psnr_flat",
        "baseline_psnr_class_mean",
        "baseline_ssim_mean_image",
        "baseline_ssim_flat",
        "baseline_ssim_class_mean",
        "psnr_gain",
        "psnr_gain_per_image",
        "curve_psnr",
        "curve_ssim",
        "pack_id",
        "lane_index",
        "trial_seconds",
        "model_accuracy",
        "checkpoint_key",
    }
    assert new <= set(SCHEMA.names) and not new & set(SETTINGS)
    assert set(SETTINGS) <= set(SCHEMA.names)


# ---------------------------------------------------------------------------------------------
# (f) directories written before the schema's version 2 read with nulls


def schema_1_copy(rows: list[dict], path: Path) -> Path:
    """The rows as a schema-1 file: without any column that version 2 added."""
    from gradinv.results.schema import to_table

    added = {
        "baseline_psnr",
        "baseline_psnr_mean_image",
        "baseline_psnr_flat",
        "baseline_psnr_class_mean",
        "baseline_ssim_mean_image",
        "baseline_ssim_flat",
        "baseline_ssim_class_mean",
        "psnr_gain",
        "psnr_gain_per_image",
        "curve_psnr",
        "curve_ssim",
        "pack_id",
        "lane_index",
        "trial_seconds",
    }
    table = to_table(rows)
    table = table.select([name for name in table.schema.names if name not in added])
    path.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({"gradinv.schema_version": "1"}), path / "part-1.parquet")
    return path


def test_a_schema_1_directory_reads_with_nulls_in_report_export_and_status(tmp_path, capsys):
    rows = leaky_and_blind_rows(np.random.default_rng(2))[:24]
    old = schema_1_copy(rows, tmp_path / "old")
    assert "psnr_gain" not in pq.read_schema(old / "part-1.parquet").names
    page = write_report(old, tmp_path / "report.html").read_text()
    leakage = frame_of(Tables(page).tables["leakage"])
    assert set(leakage["verdict"]) == {"no baseline recorded"} and set(leakage["baseline_psnr"]) == {"–"}
    assert "These rows carry no baseline" in page and "No quality curves in these rows" in page
    summary = {row[0]: row[1] for row in Tables(page).tables["summary"]}
    assert summary["compute time (sum of each trial's share of its task)"] == f"{24 * 8.0 / 4:.1f} s"  # task / lanes
    index = export(old, tmp_path / "export")
    assert len(index) == 24 and index["psnr_gain"].isna().all() and index["baseline_psnr"].isna().all()
    assert main(["status", str(old)]) == 0
    assert "24 rows" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# (g) the results page's reading examples run as written on a results directory at results/quickstart


def readme_section(title: str) -> str:
    text = (REPO / "docs" / "results.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_results_pages_reading_examples_run_on_the_demo_layout(synthetic, tmp_path, monkeypatch, capsys):
    import datasets.config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    shutil.copytree(synthetic, tmp_path / "results" / "quickstart")
    section = readme_section("Reading the results")
    commands = [
        shlex.split(line, comments=True)
        for block in re.findall(r"```sh\n(.*?)```", section, re.S)
        for line in block.splitlines()
    ]
    commands = [words for words in commands if words]
    assert commands and all(words[0] == "gradinv" for words in commands)
    for words in commands:  # the shell examples, through the same entry point as the `gradinv` script
        assert main(words[1:]) == 0, words
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 4 and all("results/quickstart" in block or "reconstructions" in block for block in blocks)
    for block in blocks:
        exec(compile(block, "docs/results.md", "exec"), namespace)
    assert len(namespace["trials"]) == len(pd.read_parquet(synthetic))
    # the demo's report lies beside the results, where no reader picks it up
    assert (tmp_path / "results" / "quickstart.html").exists()
    assert len(pd.read_parquet("results/quickstart", columns=["key"])) == len(namespace["trials"])


def test_report_and_export_refuse_to_write_inside_the_results(synthetic, capsys):
    for verb, flag, target in (("report", "--out", "report.html"), ("export", "--to", "images")):
        assert main([verb, str(synthetic), flag, str(synthetic / target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag}:" in err and "outside the results directory" in err
        assert not (synthetic / target).exists()
