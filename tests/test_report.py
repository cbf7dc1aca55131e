"""`gradinv report` and `gradinv export` on a small real results dataset (plus derived rows for the
sections a tiny run cannot fill: trained models, tuning candidates, a failure)."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from analysis.export import export
from analysis.report import write_report
from sweep.cli import main

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
METRIC_TABLES = {"psnr": "psnr", "ssim": "ssim", "label-accuracy": "label_accuracy"}


def run_command(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """A command in its own process group, stopped by that group's id however it ends."""
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
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
    done = run_command([sys.executable, "-m", "sweep", "run", str(root / "study.yaml"), "--results",
                        str(root / "results"), "--no-progress"], timeout=300)  # fmt: skip
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
    derived = [{**row, "key": row["key"][:16] + "trnd", "trained_epochs": 1, "psnr": row["psnr"] + 1} for row in rows]
    derived += [
        {**row, "key": f"{row['key'][:16]}tun{i}", "study": "tiny-tune", "candidate": i, "tv": 10.0 ** -i,
         "psnr": row["psnr"] + (i % 3)}
        for i, row in enumerate(rows[:5])
    ]  # fmt: skip
    failed = {name: None for name in schema.names}
    failed.update(study=rows[0]["study"], key="f" * 20, status="failed", attempt=3, fl="fedsgd", images=[0],
                  trained_epochs=0, images_per_client=1, error="RuntimeError: worker died <twice> & gave up")
    derived.append(failed)
    pq.write_table(pa.Table.from_pylist(derived, schema=schema), path / "part-9999999999999999999-derived.parquet")
    return path


# ---------------------------------------------------------------------------------------------
# (a) the tables say what a pandas groupby of the same rows says


class Tables(HTMLParser):
    """Every <table id=...> as a list of rows of cell texts (the header row first)."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._current = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._current = self.tables.setdefault(dict(attrs)["id"], [])
        elif tag == "tr" and self._current is not None:
            self._current.append([])
        elif tag in ("td", "th") and self._current is not None:
            self._current[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._current = None

    def handle_data(self, data):
        if self._current is not None and self._current and self._current[-1]:
            self._current[-1][-1] += data


def frame_of(table: list[list[str]]) -> pd.DataFrame:
    return pd.DataFrame(table[1:], columns=table[0])


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
    for group, stats in expected.iterrows():
        group = group if isinstance(group, tuple) else (group,)
        match = shown[(shown[by] == [key_text(v) for v in group]).all(axis=1)]
        assert len(match) == 1, group
        line = match.iloc[0]
        assert int(line["trials"]) == stats["count"]
        for column in ("mean", "median", "std"):
            assert_close(line[column], stats[column])
        assert number(line["ci_low"]) <= number(line["mean"]) <= number(line["ci_high"])


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
    trained_by = ["trained_epochs", *[name for name in by if name != "trained_epochs"]]
    assert_matches_groupby(frame_of(tables["trained"]), ok, trained_by, "psnr")

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
    for shown_psnr, shown_best, psnr, best in zip(tuning["psnr"], tuning["best_so_far"], candidates["psnr"],
                                                  candidates["psnr"].cummax()):  # fmt: skip
        assert_close(shown_psnr, psnr)
        assert_close(shown_best, best)

    failures = frame_of(tables["failures"])
    assert failures[["key", "error"]].values.tolist() == [["f" * 20, "RuntimeError: worker died <twice> & gave up"]]

    grids = page.count('alt="reconstruction"')
    assert grids >= 3 and page.count('alt="ground truth"') == grids


def test_report_grouped_by_one_field_and_sections_without_data_say_so(real_results, tmp_path):
    page = write_report(real_results, tmp_path / "report.html", by=["fl"]).read_text()
    tables = Tables(page).tables
    frame = pd.read_parquet(real_results)
    assert_matches_groupby(frame_of(tables["psnr"]), frame[frame["status"] == "ok"], ["fl"], "psnr")
    assert "trained" not in tables and "All finished trials share one model state (untrained)." in page
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
    done = run_command([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--log-net-log={net_log}", f"--screenshot={shot}", "--window-size=1200,3000",
        page.resolve().as_uri(),
    ], timeout=120)  # fmt: skip
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
    control.write_text('<html><body><img src="http://example.invalid/a.png">'
                       '<link rel="stylesheet" href="https://cdn.example.invalid/a.css"></body></html>')  # fmt: skip
    _, control_requests = browse(control, tmp_path, "control")
    assert sorted(control_requests) == ["http://example.invalid/a.png", "https://cdn.example.invalid/a.css"]


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
