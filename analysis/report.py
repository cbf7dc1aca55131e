"""`gradinv report`: one self-contained HTML file about a results directory.

The page answers, in order: does each setting leak (PSNR over what an attacker who knows nothing
scores), do trained victims leak as much as untrained ones (paired per image), was the attack budget
enough, how leakage moves with local steps and images per client, what the reconstructions look
like; then the tuning history, every table (collapsed) and the failures. Everything is inline (plots
as base64 PNG from matplotlib's Agg renderer, the trials' own PNGs as data URIs, a small style
block), so the file opens offline and makes no network request.
"""

from __future__ import annotations

import base64
import html
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from gradinv.errors import ConfigError

from . import figures, load, stats, tuning_history

MAX_GRID_SETTINGS = 24
METRIC_TITLES = {"psnr": "PSNR (dB)", "psnr_gain": "PSNR gain over the no-information baseline (dB)", "ssim": "SSIM",
                 "label_accuracy": "Label accuracy"}  # fmt: skip
FIXED_PER_ROW = 4  # name/value pairs per row of the fixed-settings table
VICTIM_MARGIN = 0.10  # a trained victim within this of chance accuracy has not learnt
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
td { white-space: nowrap; } td.words { white-space: normal; min-width: 12em; } .wide { overflow-x: auto; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.note { color: #555; max-width: 60em; } .plot img { max-width: 100%; height: auto; }
details { margin: .6em 0; } summary { cursor: pointer; color: #1f4f8f; }
.setting { margin: 1em 0; } .picks { display: flex; flex-wrap: wrap; gap: 1.5em; }
.pick > figcaption { font-size: .85em; color: #444; } .row, .strip { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; } figure.image { width: 7.5em; font-size: .75em; color: #444; }
figure.image img { display: block; width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #bbb;
                   margin-bottom: 2px; }
"""


def write_report(results: str | Path, out: str | Path, by: list[str] | None = None,
                 threshold: float = stats.SUCCESS_PSNR, seed: int = 0) -> Path:  # fmt: skip
    out = Path(out)
    if out.is_dir():
        raise ConfigError("--out", str(out), "name a file to write, e.g. report.html")
    load.require_outside("--out", out, results)
    load.result_files(results)  # bad results fail before anything is written
    partial = out.with_name(f".{out.name}.tmp")
    with _writing(out):  # before the work: a place we cannot write fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.touch()
    try:
        page = build_report(results, by, threshold, seed)
        with _writing(out):
            partial.write_text(page, encoding="utf-8")
            partial.replace(out)  # a reader never sees half a report
    finally:
        partial.unlink(missing_ok=True)
    return out


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OSError while writing ``out`` (no such directory, read-only, no permission, disk full) as one line."""
    try:
        yield
    except OSError as error:
        raise ConfigError("--out", str(out), f"cannot write there ({error.strerror or error}: {error.filename}); "
                                             "name a file in a writable directory") from None  # fmt: skip


def build_report(results: str | Path, by: list[str] | None = None, threshold: float = stats.SUCCESS_PSNR,
                 seed: int = 0) -> str:  # fmt: skip
    frame = load.load_trials(results)
    tuned = tuning_history.tuned_studies(frame)
    runs = frame[~frame["study"].isin(tuned)]  # a tuned study's rows are searched, not designed settings
    by = _check_by(frame, by) if by else load.varying_settings(runs)
    leakage = stats.leakage(runs, by, seed)
    sections = [_summary(frame, runs, results, by, leakage)]
    if runs.empty:
        sections.append(_section("Results", _note("Every row belongs to a tuned study; see the tuning section.")))
    else:
        sections += [
            _leakage(leakage, by),
            _trained(runs, by, seed),
            _quality(results, runs, by),
            _gain_against(runs, by, "local_steps", "Leakage vs local steps",
                          "Does leakage fall with more local steps?"),
            _gain_against(runs, by, "images_per_client", "Leakage vs images per client",
                          "Does leakage fall with more images per client?"),
            _one_image(results, runs, by),
            _grids(results, runs, by),
        ]
    sections.append(_tuning(frame, tuned, seed))
    if not runs.empty:
        sections.append(_all_tables(runs, by, threshold, seed))
    sections.append(_failures(frame))
    title = f"gradinv report: {', '.join(sorted(frame['study'].unique()))}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(sections) + "\n</body></html>\n")  # fmt: skip


def _check_by(frame: pd.DataFrame, by: list[str]) -> list[str]:
    allowed = ["study", *load.settings_columns(frame)]
    for name in by:
        if name not in allowed:
            raise ConfigError("--by", name, f"name a setting column: {', '.join(allowed)}")
    return list(dict.fromkeys(by))


# ---------------------------------------------------------------------------------------------
# Summary and context


def _summary(frame: pd.DataFrame, runs: pd.DataFrame, results, by: list[str], leakage: pd.DataFrame) -> str:
    counts = frame["status"].value_counts()
    verdicts = leakage["verdict"].value_counts()
    items = {
        "results": str(Path(results).resolve()),
        "studies": ", ".join(sorted(frame["study"].unique())),
        "trials": len(frame),
        **{status: int(counts.get(status, 0)) for status in ("ok", "failed", "pruned")},
        "tuning rows": int(frame["candidate"].notna().sum()),
        "compute time (sum of each trial's share of its task)": _duration(load.compute_seconds(frame).sum()),
        "settings compared": ", ".join(by) or "none (one setting)",
    }  # fmt: skip
    if not runs.empty:
        items["settings that leak"] = (
            f"{int(verdicts.get(stats.LEAKS, 0))} of {len(leakage)} (median PSNR gain over the no-information "
            "baseline, 95% interval above 0)" if leakage["gain_median"].notna().any()
            else "– (no baseline recorded in these rows)")  # fmt: skip
    rows = "".join(f"<tr><th class=text>{html.escape(k)}</th><td class=text>{html.escape(str(v))}</td></tr>"
                   for k, v in items.items())  # fmt: skip
    parts = [f"<table id=summary>{rows}</table>", _provenance(frame)]
    if not runs.empty:
        parts += [_fixed(runs), _victims(runs)]
    return _section("Summary", *parts)


def _provenance(frame: pd.DataFrame) -> str:
    started, finished = frame["started_at"].min(), frame["finished_at"].max()
    items = {
        "wall-clock span": _duration((finished - started).total_seconds()) if pd.notna(started) else "–",
        "first start / last finish": f"{_when(started)} / {_when(finished)}",
        "hosts": _tally(frame["host"]), "nodes": frame["node_id"].nunique(), "devices": _tally(frame["device"]),
        **{f"{name} version": _tally(frame[f"{name}_version"]) for name in ("gradinv", "torch", "torchvision",
                                                                              "python")},
        "commits": _tally(frame["commit"]),
    }  # fmt: skip
    rows = "".join(f"<tr><th class=text>{html.escape(k)}</th><td class=text>{html.escape(str(v))}</td></tr>"
                   for k, v in items.items())  # fmt: skip
    return f"<details><summary>Where and when it ran</summary><table id=provenance>{rows}</table></details>"


def _fixed(runs: pd.DataFrame) -> str:
    """Settings every trial shares: what a reader needs to tell a toy budget from the paper's."""
    fixed = {name: values[0] for name in load.settings_columns(runs)
             if name != "images" and len(values := runs[name].unique()) == 1 and pd.notna(values[0])}  # fmt: skip
    if not fixed:
        return ""
    cells = [f"<th class=text>{html.escape(name.replace('_', ' '))}</th>"
             f"<td class=num>{html.escape(_cell(value, None))}</td>" for name, value in fixed.items()]  # fmt: skip
    rows = "".join(f"<tr>{''.join(cells[i:i + FIXED_PER_ROW])}</tr>" for i in range(0, len(cells), FIXED_PER_ROW))
    return f"<h3>Fixed in every trial</h3><table id=fixed>{rows}</table>"


def _victims(runs: pd.DataFrame) -> str:
    """The trained victims' test accuracy beside chance: trained vs untrained means something only
    when the trained victim has learnt."""
    trained = runs[runs["trained_epochs"].astype("Float64") > 0]
    if trained.empty:
        return ""
    columns = [c for c in ("dataset", "model", "width", "trained_epochs", "train_subset", "model_seed")
               if trained[c].notna().any()]  # fmt: skip
    table = trained.groupby(columns, dropna=False, sort=True).agg(
        checkpoints=("checkpoint_key", "nunique"), model_accuracy=("model_accuracy", "mean")).reset_index()
    table["chance"] = table["dataset"].map(_chance)
    table["reading"] = [_accuracy_reading(accuracy, chance)
                        for accuracy, chance in zip(table["model_accuracy"], table["chance"])]  # fmt: skip
    note = _note(f"Test accuracy of each trained victim beside chance (1 / classes). Within {VICTIM_MARGIN:.0%} "
                 "of chance the victim has not learnt, and trained vs untrained is not being tested.")  # fmt: skip
    return "<h3>Trained victims</h3>" + note + _table(table, "victims", digits=3)


def _chance(dataset: str) -> float:
    from gradinv.data import DATASETS  # the class counts live with the dataset specs

    spec = DATASETS.get(dataset)
    return 1 / spec.num_classes if spec else float("nan")


def _accuracy_reading(accuracy: float, chance: float) -> str:
    if pd.isna(accuracy):
        return "accuracy not recorded"
    return "near chance: not a trained victim" if accuracy < chance + VICTIM_MARGIN else "above chance"


# ---------------------------------------------------------------------------------------------
# Leakage


def _leakage(table: pd.DataFrame, by: list[str]) -> str:
    question = "Does each setting reconstruct more than an attacker who knows nothing about the client?"
    note = _note(
        "Baseline: the best score of a data-only attacker without the update (the mean image of a pool of "
        "training images, a flat image at the data mean, or the class-mean image for the labels it has). "
        "Gain: a trial's PSNR minus that baseline. A setting leaks when the 95% interval of its median gain "
        "lies above 0 (an order-statistic interval, valid for any distribution; it needs 6 or more trials, "
        "fewer say \u201cn too small\u201d); otherwise it is marked \u201cno leakage detected\u201d. The mean "
        "gain with its interval is under All tables.")  # fmt: skip
    parts = [note]
    if table["gain_median"].notna().any():
        parts.append(_figure(figures.gain_per_setting(table, by, question), question))
    else:
        parts.append(_note("These rows carry no baseline (written before baselines were recorded): their PSNR "
                           "cannot be read as leakage, so there is nothing to plot."))  # fmt: skip
    shown = table[[*by, "trials", "baseline_psnr", "psnr", "gain_median"]].assign(
        interval=_intervals(table["gain_median"], table["median_low"], table["median_high"]), verdict=table["verdict"])
    return _section("Leakage per setting", *parts, _table(shown, "leakage", digits=2))


def _intervals(centre: pd.Series, low: pd.Series, high: pd.Series) -> list[str]:
    """Each interval as text (a no-break space keeps it on one line); "n too small" where there is a
    value but too few observations for an interval, "–" where there is no value."""
    return [("–" if pd.isna(value) else stats.TOO_SMALL) if pd.isna(lo) else f"[{lo:.2f},\u00a0{hi:.2f}]"
            for value, lo, hi in zip(centre, low, high)]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Trained vs untrained


def _trained(runs: pd.DataFrame, by: list[str], seed: int) -> str:
    title = "Trained vs untrained victims"
    epochs = sorted(stats.finished(runs)["trained_epochs"].dropna().unique())
    if len(epochs) < 2 or epochs[0] != 0:
        which = "untrained" if epochs == [0] else f"trained for {epochs} epochs" if epochs else "none finished"
        return _section(title, _note(f"All finished trials share one model state ({which}): nothing to pair."))
    pair_on = [name for name in load.settings_columns(runs) if name not in stats.MODEL_STATE]
    pairs = stats.trained_pairs(runs, pair_on)
    if pairs.empty:
        return _section(title, _note("No image was attacked under both an untrained and a trained victim with every "
                                     "other setting equal: nothing to pair."))  # fmt: skip
    arms = [name for name in stats.MODEL_STATE if pairs[name].nunique(dropna=False) > 1]
    compared = [name for name in by if name not in stats.MODEL_STATE and pairs[name].nunique(dropna=False) > 1]
    table = stats.paired_difference(pairs, [*compared, *arms], seed)
    value = "gain" if table["untrained_gain"].notna().any() else "psnr"
    question = "Do trained victims leak as much as untrained ones? (the same images under both)"
    xlabel = {"gain": "mean PSNR gain over the no-information baseline (dB)", "psnr": "mean PSNR (dB)"}[value]
    panels = [name for name in ("dataset",) if name in compared]
    rows = [name for name in [*compared, *arms] if name not in panels]
    note = _note(
        "Each pair is one image attacked under an untrained and a trained victim with every other setting "
        "equal (images, seeds, FL recipe, attack). Difference: trained minus untrained PSNR, averaged over "
        f"pairs, with a BCa bootstrap interval from {stats.MIN_BOOTSTRAP} pairs on.")  # fmt: skip
    shown = table.drop(columns=["untrained_gain", "trained_gain", "ci_low", "ci_high", "reading"]).assign(
        interval=_intervals(table["difference"], table["ci_low"], table["ci_high"]), reading=table["reading"])
    return _section(title, note, _figure(figures.paired_arms(table, rows, panels, value, question, xlabel), question),
                    _table(shown, "trained", digits=2))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Quality against iterations and against settings


def _quality(results, runs: pd.DataFrame, by: list[str]) -> str:
    title, question = "Attack progress", "Was the attack budget enough? PSNR of the best restart at each checkpoint"
    done = stats.finished(runs)
    curves = load.load_curves(results, done["key"].tolist())
    curves = curves[curves["curve_psnr"].map(len) > 0]
    if curves.empty:
        return _section(title, _note("No quality curves in these rows (written before they were recorded)."))
    points = curves.explode(["curve_iterations", "curve_psnr"]).rename(columns={"curve_iterations": "iteration"})
    points = points.astype({"iteration": int, "curve_psnr": float}).merge(
        done[["key", "baseline_psnr", *by]], on="key")
    panels, series = figures.split_panels(points, by)
    note = _note("Median over a setting's trials of the best restart's PSNR at each checkpoint; the dashed line is "
                 "the median no-information baseline of the panel's trials. A curve still rising at the end "
                 "means the budget was too short.")  # fmt: skip
    return _section(title, note, _panel_cap(points, panels),
                    _figure(figures.quality_curves(points, panels, series, question), question))


def _gain_against(runs: pd.DataFrame, by: list[str], x: str, title: str, question: str) -> str:
    done = stats.finished(runs)
    values = sorted(done[x].dropna().unique())
    if len(values) < 2:
        what = f"One value of {x} ({values[0]})" if values else f"No finished trial has a value of {x}"
        return _section(title, _note(f"{what}: nothing to compare."))
    subset = done[done[x].notna()]
    if subset["psnr_gain"].isna().all():
        return _section(title, _note("These rows carry no baseline (written before baselines were recorded)."))
    others = [name for name in by if name != x and subset[name].nunique(dropna=False) > 1]
    table = stats.leakage(subset, [*others, x])
    panels, series = figures.split_panels(table, others)
    notes = [_note("Median PSNR gain over the no-information baseline, its 95% interval shaded (6 or more trials).")]
    if skipped := len(done) - len(subset):
        notes.append(_note(f"{skipped} finished trials have no {x} (it does not apply to them) and are left out."))
    return _section(title, *notes, _panel_cap(table, panels),
                    _figure(figures.gain_against(table, x, panels, series, question), question))


def _panel_cap(frame: pd.DataFrame, panels: list[str]) -> str:
    count = len(frame.groupby(panels, dropna=False)) if panels else 1
    if count <= figures.MAX_PANELS:
        return ""
    return _note(f"Showing {figures.MAX_PANELS} of {count} panels; group more coarsely with --by.")


# ---------------------------------------------------------------------------------------------
# Reconstructions


def _one_image(results, runs: pd.DataFrame, by: list[str]) -> str:
    """Per dataset, the image attacked under the most settings, as each setting reconstructed it."""
    title = "One image across settings"
    images = stats.per_image(runs)
    if images.empty:
        return _section(title, _note("No finished trials with images."))
    settings = [name for name in by if name != "dataset"]
    parts = [_note("Per dataset, the image attacked under the most settings: ground truth, then its reconstruction "
                   "under each setting (one trial per setting, the lowest key), with its PSNR and gain.")]  # fmt: skip
    for dataset, part in images.groupby("dataset", sort=True):
        spread = part.groupby("image")["key"].nunique()
        image = int(spread[spread == spread.max()].index.min())
        chosen = part[part["image"] == image].sort_values([*settings, "key"])
        chosen = chosen.groupby(settings, dropna=False, sort=True).head(1) if settings else chosen.head(1)
        pngs = load.load_images(results, chosen["key"].tolist())
        figures_html = []
        for position, row in enumerate(chosen.itertuples()):
            truth, recon = pngs.get(row.key, ([], []))
            index = [int(i) for i in str(row.images).split(",")].index(image)
            if position == 0 and index < len(truth):
                figures_html.append(_captioned(truth[index], "ground truth", f"image {image}: ground truth"))
            label = figures.setting_label({name: getattr(row, name) for name in settings})
            if index < len(recon):
                figures_html.append(_captioned(recon[index], "reconstruction",
                                               f"{label}<br>{_db(row.image_psnr)}{_gain_text(row.image_gain)}"))
        parts.append(f"<h3>{html.escape(str(dataset))}: image {image}</h3>"
                     f"<div class=strip>{''.join(figures_html)}</div>")
    return _section(title, *parts)


def _grids(results, runs: pd.DataFrame, by: list[str]) -> str:
    done = stats.finished(runs).dropna(subset=["psnr"])
    if done.empty:
        return _section("Reconstructions per setting", _note("No finished trials with images."))
    settings = list(done.groupby(by, dropna=False, sort=True)) if by else [((), done)]
    shown = settings[:MAX_GRID_SETTINGS]
    picks = [(key, _best_median_worst(group)) for key, group in shown]
    images = load.load_images(results, [row.key for _, chosen in picks for _, row in chosen])
    parts = [_note("Per setting: the best, median and worst trial by PSNR gain (PSNR where no baseline was "
                   "recorded); ground truth above its reconstruction, each captioned with the image's index in the "
                   "dataset, its PSNR and its gain over the no-information baseline.")]  # fmt: skip
    if len(settings) > len(shown):
        parts.append(_note(f"Showing {len(shown)} of {len(settings)} settings; group more coarsely with --by."))
    blocks = []
    for key, chosen in picks:
        label = figures.setting_label(dict(zip(by, key if isinstance(key, tuple) else (key,)))) if by else "all trials"
        picks_html = "".join(_pick(name, row, images.get(row.key, ([], []))) for name, row in chosen)
        blocks.append(f"<div class=setting><h3>{html.escape(label)}</h3><div class=picks>{picks_html}</div></div>")
    parts.append(f"<details open><summary>{len(shown)} settings</summary>{''.join(blocks)}</details>")
    return _section("Reconstructions per setting", *parts)


def _best_median_worst(group: pd.DataFrame) -> list[tuple[str, object]]:
    score = group["psnr_gain"].astype(float).fillna(group["psnr"].astype(float))
    ordered = group.assign(_score=score).sort_values(["_score", "key"], ascending=[False, True])
    ordered = ordered.reset_index(drop=True)
    positions = {"best": 0, "median": (len(ordered) - 1) // 2, "worst": len(ordered) - 1}
    chosen, seen = [], set()
    for name, position in positions.items():
        if position not in seen:
            seen.add(position)
            chosen.append((name, ordered.iloc[position]))
    return chosen


def _pick(name: str, row, pngs: tuple[list[bytes], list[bytes]]) -> str:
    truth, recon = pngs
    indices = [] if pd.isna(row.images) else str(row.images).split(",")
    psnrs = list(row.psnr_per_image) if row.psnr_per_image is not None else []
    gains = list(row.psnr_gain_per_image) if row.psnr_gain_per_image is not None else []
    columns = []
    for position, (truth_png, recon_png) in enumerate(zip(truth, recon)):
        caption = f"image {indices[position] if position < len(indices) else '?'}"
        if position < len(psnrs):
            caption += f"<br>{_db(psnrs[position])}{_gain_text(gains[position] if position < len(gains) else None)}"
        columns.append(f"<figure class=image>{_img(truth_png, 'ground truth')}{_img(recon_png, 'reconstruction')}"
                       f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
    gain = "" if pd.isna(row.psnr_gain) else f", gain {row.psnr_gain:+.2f}"
    caption = f"{name}: mean {_db(row.psnr)}{gain}<br><small>trial {html.escape(row.key)}</small>"
    return f"<figure class=pick><div class=row>{''.join(columns)}</div><figcaption>{caption}</figcaption></figure>"


def _captioned(png: bytes, alt: str, caption: str) -> str:
    return f"<figure class=image>{_img(png, alt)}<figcaption>{caption}</figcaption></figure>"


def _db(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.2f} dB"


def _gain_text(value) -> str:
    return "" if value is None or pd.isna(value) else f" ({value:+.2f})"


# ---------------------------------------------------------------------------------------------
# Tuning, the full tables, failures


def _tuning(frame: pd.DataFrame, tuned: list[str], seed: int) -> str:
    title = "Tuning"
    if not tuned:
        return _section(title, _note("No tuning candidates in these results."))
    parts = [_note("Each candidate's numbers come from its own trials on the tuning images (held-out trials are "
                   "shown only in the comparison). Mean PSNR as the driver scores it (an exact copy counts as "
                   f"{stats.PSNR_CAP:g} dB); pruned and failed candidates carry the best so far.")]  # fmt: skip
    for study in tuned:
        rows = frame[frame["study"] == study]
        tuning, held_tuned, held_defaults = tuning_history.split(rows)
        table = tuning_history.history(tuning)
        question = "Did the search find a stronger attack as it went?"
        baseline = tuning["baseline_psnr"].astype(float).mean()
        parts += [f"<h3>{html.escape(study)}</h3>",
                  _note(f"Compute: {_duration(load.compute_seconds(rows).sum())} (each trial's share of its task)."),
                  _figure(figures.tuning_history(table, baseline, question), question),
                  _table(table, f"tuning-{_slug(study)}", digits=2),
                  _held_out(study, held_tuned, held_defaults, seed)]  # fmt: skip
    return _section(title, *parts)


def _held_out(study: str, tuned: pd.DataFrame, defaults: pd.DataFrame, seed: int) -> str:
    result = tuning_history.comparison(tuned, defaults, seed)
    if result is None:
        return _note("No held-out comparison in these rows (the driver writes it after the search ends).")
    shown = pd.DataFrame([{
        "candidate": result["candidate"], "clients": result["clients"], "baseline_psnr": result["baseline_psnr"],
        "tuned_psnr": result["tuned_psnr"], "defaults_psnr": result["defaults_psnr"], "gain": result["gain"],
        "interval": _intervals(*(pd.Series([result[name]]) for name in ("gain", "ci_low", "ci_high")))[0],
    }])  # fmt: skip
    note = _note(f"The best candidate against the paper's defaults (tv 1e-4, lr 0.1, step decay) on the same held-out "
                 f"clients: mean PSNR of each, and the mean paired gain with a BCa bootstrap interval from "
                 f"{stats.MIN_BOOTSTRAP} clients on.")  # fmt: skip
    return "<h4>Held-out comparison</h4>" + note + _table(shown, f"held-out-{_slug(study)}", digits=2)


def _all_tables(runs: pd.DataFrame, by: list[str], threshold: float, seed: int) -> str:
    parts = [_note(f"One observation per finished trial (its metric is the mean over the client's images). "
                   f"Interval: {stats.CONFIDENCE:.0%} BCa bootstrap interval of the mean ({stats.RESAMPLES} "
                   f"resamples, seed {seed}), none under {stats.MIN_BOOTSTRAP} trials (\u201c{stats.TOO_SMALL}\u201d); "
                   "success rates with Wilson intervals.")]  # fmt: skip
    for metric, table in stats.summarise_all(runs, by, seed).items():
        shown = table.assign(interval=_intervals(table["mean"], table["ci_low"], table["ci_high"]))
        shown = shown[[*by, "trials", "mean", "interval", "median", "std"]]
        parts.append(f"<h3>{METRIC_TITLES[metric]}</h3>" + _table(shown, metric.replace("_", "-")))
    parts += [f"<h3>Success rate</h3>", _note(f"A trial succeeds when its PSNR reaches {threshold:g} dB."),
              _table(stats.success_rate(runs, by, threshold), "success")]  # fmt: skip
    best = stats.best_of_restarts(runs, by, seed)
    parts.append("<h3>Best of restarts</h3>")
    if best is None:
        parts.append(_note("Each client's images were attacked with one attack seed: nothing to pick the best from."))
    else:
        parts += [_note("Per client, the highest PSNR over trials that differ only in the attack seed."),
                  _table(best, "best-of-restarts")]  # fmt: skip
    body = "\n".join(parts)
    return _section("All tables", f"<details><summary>Metrics, success rates and best of restarts per setting"
                                  f"</summary>{body}</details>")  # fmt: skip


def _failures(frame: pd.DataFrame) -> str:
    failed = frame[frame["status"] == "failed"]
    if failed.empty:
        return _section("Failures", _note("No failed trials."))
    table = failed[["key", "study", "attempt", "error"]].sort_values(["study", "key"])
    return _section("Failures", _note(f"{len(failed)} failed trial{'s' * (len(failed) != 1)}."),
                    _table(table, "failures"))


# ---------------------------------------------------------------------------------------------
# HTML pieces


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n" + "\n".join(part for part in parts if part) + "\n</section>"


def _note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def _table(frame: pd.DataFrame, table_id: str, digits: int = 4) -> str:
    """A plain table: outcomes to ``digits`` decimals, settings as written (tv 1e-05), nulls as '–', text
    left-aligned, everything escaped."""
    head = "".join(f"<th class={_align(frame[c])}>{html.escape(str(c).replace('_', ' '))}</th>" for c in frame.columns)
    places = {c: None if c in load.SETTINGS else digits for c in frame.columns}
    kinds = {c: _align(frame[c]) for c in frame.columns}
    body = "".join(
        "<tr>" + "".join(f"<td class={kinds[c]}>{html.escape(_cell(v, places[c]))}</td>" for c, v in row.items())
        + "</tr>"
        for _, row in frame.iterrows()
    )  # fmt: skip
    return f"<div class=wide><table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _cell(value, digits: int | None = 4) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        if digits is None:  # a setting: its shortest exact form
            return f"{value:g}"
        return f"{value:.{digits}f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _align(column: pd.Series) -> str:
    """num (right-aligned), text (left), or words: text long enough to wrap (verdicts, errors)."""
    if pd.api.types.is_numeric_dtype(column):
        return "num"
    return "text words" if column.dropna().astype(str).str.len().max() > 24 else "text"


def _figure(figure, alt: str) -> str:
    return f"<p class=plot>{_img(figures.png(figure), alt)}</p>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"


def _tally(column: pd.Series) -> str:
    counts = column.dropna().value_counts()
    return ", ".join(f"{value} ({n})" for value, n in counts.items()) or "–"


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "–"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def _when(moment) -> str:
    return "–" if pd.isna(moment) else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)
