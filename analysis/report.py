"""`gradinv report`: one self-contained HTML file about a results directory.

Everything is inline (plots as base64 PNG from matplotlib's Agg renderer, the trials' own PNGs as
data URIs, a small style block), so the file opens offline and makes no network request.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradinv.errors import ConfigError

from . import load, stats

MAX_GRID_SETTINGS = 24
METRIC_TITLES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "label_accuracy": "Label accuracy"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.note { color: #555; } .error { font-family: monospace; text-align: left; white-space: pre-wrap; }
.setting { margin: 1em 0; } .picks { display: flex; flex-wrap: wrap; gap: 1.5em; }
.pick figcaption { font-size: .85em; color: #444; } .row { display: flex; gap: 2px; margin: 2px 0; }
.row img { height: 64px; image-rendering: pixelated; border: 1px solid #bbb; }
"""


def write_report(results: str | Path, out: str | Path, by: list[str] | None = None,
                 threshold: float = stats.SUCCESS_PSNR, seed: int = 0) -> Path:  # fmt: skip
    out = Path(out)
    if out.is_dir():
        raise ConfigError("--out", str(out), "name a file to write, e.g. report.html")
    page = build_report(results, by, threshold, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.tmp")
    partial.write_text(page, encoding="utf-8")
    partial.replace(out)  # a reader never sees half a report
    return out


def build_report(results: str | Path, by: list[str] | None = None, threshold: float = stats.SUCCESS_PSNR,
                 seed: int = 0) -> str:  # fmt: skip
    frame = load.load_trials(results)
    runs = frame[frame["candidate"].isna()]  # tuning candidates are searched, not designed settings
    by = _check_by(frame, by) if by else load.varying_settings(runs)
    sections = [_summary(frame, results, by)]
    if runs.empty:
        sections.append(_section("Results", _note("Every row is a tuning candidate; see the tuning history.")))
    else:
        sections += [
            _metrics(runs, by, seed),
            _success(runs, by, threshold, seed),
            _trained(runs, by, seed),
            _curve(runs, by, "local_steps", "PSNR vs local steps", seed),
            _curve(runs, by, "images_per_client", "PSNR vs images per client", seed),
            _grids(results, runs, by),
        ]
    sections += [_tuning(frame), _failures(frame)]
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
# Sections


def _summary(frame: pd.DataFrame, results, by: list[str]) -> str:
    counts = frame["status"].value_counts()
    started, finished = frame["started_at"].min(), frame["finished_at"].max()
    items = {
        "results": str(Path(results).resolve()),
        "studies": ", ".join(sorted(frame["study"].unique())),
        "trials": len(frame),
        **{status: int(counts.get(status, 0)) for status in ("ok", "failed", "pruned")},
        "tuning rows": int(frame["candidate"].notna().sum()),
        "compute time (sum of task times)": _duration(frame["task_seconds"].sum()),
        "wall-clock span": _duration((finished - started).total_seconds()) if pd.notna(started) else "–",
        "first start / last finish": f"{_when(started)} / {_when(finished)}",
        "hosts": _tally(frame["host"]), "nodes": frame["node_id"].nunique(), "devices": _tally(frame["device"]),
        **{f"{name} version": _tally(frame[f"{name}_version"]) for name in ("gradinv", "torch", "torchvision",
                                                                              "python")},
        "commits": _tally(frame["commit"]),
        "settings compared": ", ".join(by) or "none (one setting)",
    }  # fmt: skip
    rows = "".join(f"<tr><th class=text>{html.escape(k)}</th><td class=text>{html.escape(str(v))}</td></tr>"
                   for k, v in items.items())  # fmt: skip
    return _section("Summary", f"<table id=summary>{rows}</table>")


def _metrics(runs: pd.DataFrame, by: list[str], seed: int) -> str:
    parts = [_note(f"One observation per finished trial (its metric is the mean over the client's images); "
                   f"CI: {stats.CONFIDENCE:.0%} percentile bootstrap interval of the mean, "
                   f"{stats.RESAMPLES} resamples, seed {seed}.")]  # fmt: skip
    for metric, table in stats.summarise_all(runs, by, seed).items():
        parts.append(f"<h3>{METRIC_TITLES[metric]}</h3>" + _table(table, metric.replace("_", "-")))
    return _section("Metrics per setting", *parts)


def _success(runs: pd.DataFrame, by: list[str], threshold: float, seed: int) -> str:
    parts = [_note(f"A trial succeeds when its PSNR reaches {threshold:g} dB."),
             _table(stats.success_rate(runs, by, threshold, seed), "success")]  # fmt: skip
    best = stats.best_of_restarts(runs, by, seed)
    parts.append("<h3>Best of restarts</h3>")
    if best is None:
        parts.append(_note("Each client's images were attacked with one attack seed: nothing to pick the best from."))
    else:
        parts += [_note("Per client, the highest PSNR over trials that differ only in the attack seed."),
                  _table(best, "best-of-restarts")]  # fmt: skip
    return _section("Success rate", *parts)


def _trained(runs: pd.DataFrame, by: list[str], seed: int) -> str:
    epochs = sorted(runs.loc[runs["status"] == "ok", "trained_epochs"].dropna().unique())
    if len(epochs) < 2:
        which = "untrained" if epochs == [0] else f"trained for {epochs} epochs" if epochs else "none finished"
        return _section("Trained vs untrained", _note(f"All finished trials share one model state ({which})."))
    others = [name for name in by if name != "trained_epochs"]
    table = stats.summarise(runs, ["trained_epochs", *others], "psnr", seed)
    if others:
        settings = table[others].apply(lambda row: _label(row.to_dict()), axis=1)
    else:
        settings = pd.Series("all", table.index)
    order = list(dict.fromkeys(settings))
    figure = Figure(figsize=(7, 3.6), dpi=100)
    axes = figure.subplots()
    width = 0.8 / len(epochs)
    for i, epoch in enumerate(epochs):
        part = table.assign(setting=settings)[table["trained_epochs"] == epoch].set_index("setting").reindex(order)
        errors = [part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]]
        axes.bar(np.arange(len(order)) + i * width, part["mean"], width, yerr=errors, capsize=3,
                 label=_epoch_label(epoch))
    axes.set_xticks(np.arange(len(order)) + width * (len(epochs) - 1) / 2, order, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("PSNR (dB)")
    axes.legend(fontsize=8)
    return _section("Trained vs untrained", _note("trained_epochs 0 is the untrained model; bars show 95% CIs."),
                    _table(table, "trained"), _figure(figure, "PSNR of trained and untrained models"))  # fmt: skip


def _curve(runs: pd.DataFrame, by: list[str], x: str, title: str, seed: int) -> str:
    done = stats.finished(runs)
    values = sorted(done[x].dropna().unique()) if x in done.columns else []
    if len(values) < 2:
        what = f"One value of {x} ({values[0]})" if values else f"No finished trial has a value of {x}"
        return _section(title, _note(f"{what}: no curve."))
    subset = done[done[x].notna()]
    series = [name for name in by if name != x and subset[name].nunique(dropna=False) > 1]
    table = stats.summarise(subset, [*series, x], "psnr", seed)
    figure = Figure(figsize=(7, 3.6), dpi=100)
    axes = figure.subplots()
    for label, part in (table.groupby(series, dropna=False, sort=True) if series else [("all", table)]):
        part = part.sort_values(x)
        xs = part[x].astype(float)
        name = _label(dict(zip(series, label if isinstance(label, tuple) else (label,)))) if series else "all"
        axes.plot(xs, part["mean"], marker="o", label=name)
        axes.fill_between(xs, part["ci_low"].astype(float), part["ci_high"].astype(float), alpha=0.2)
    axes.set_xlabel(x)
    axes.set_ylabel("PSNR (dB)")
    axes.set_xticks(sorted(subset[x].astype(float).unique()))
    axes.legend(fontsize=8)
    skipped = len(done) - len(subset)
    notes = [_note("Mean PSNR with its 95% bootstrap interval (shaded).")]
    if skipped:
        notes.append(_note(f"{skipped} finished trials have no {x} (it does not apply to them) and are left out."))
    return _section(title, *notes, _figure(figure, title))


def _grids(results, runs: pd.DataFrame, by: list[str]) -> str:
    done = stats.finished(runs).dropna(subset=["psnr"])
    if done.empty:
        return _section("Reconstructions", _note("No finished trials with images."))
    settings = list(done.groupby(by, dropna=False, sort=True)) if by else [((), done)]
    shown = settings[:MAX_GRID_SETTINGS]
    picks = [(key, _best_median_worst(group)) for key, group in shown]
    images = load.load_images(results, [row.key for _, chosen in picks for _, row in chosen])
    parts = [_note("Per setting: the best, median and worst trial by PSNR; ground truth above, reconstruction below.")]
    if len(settings) > len(shown):
        parts.append(_note(f"Showing {len(shown)} of {len(settings)} settings; group more coarsely with --by."))
    for key, chosen in picks:
        label = _label(dict(zip(by, key if isinstance(key, tuple) else (key,)))) if by else "all trials"
        blocks = "".join(_pick(name, row, images.get(row.key, ([], []))) for name, row in chosen)
        parts.append(f"<div class=setting><h3>{html.escape(label)}</h3><div class=picks>{blocks}</div></div>")
    return _section("Reconstructions", *parts)


def _best_median_worst(group: pd.DataFrame) -> list[tuple[str, object]]:
    ordered = group.sort_values(["psnr", "key"], ascending=[False, True]).reset_index(drop=True)
    positions = {"best": 0, "median": (len(ordered) - 1) // 2, "worst": len(ordered) - 1}
    chosen, seen = [], set()
    for name, position in positions.items():
        if position not in seen:
            seen.add(position)
            chosen.append((name, ordered.iloc[position]))
    return chosen


def _pick(name: str, row, pngs: tuple[list[bytes], list[bytes]]) -> str:
    truth, recon = pngs
    rows = "".join(f"<div class=row>{''.join(_img(png, alt) for png in line)}</div>"
                   for line, alt in ((truth, "ground truth"), (recon, "reconstruction")))  # fmt: skip
    caption = f"{name}: {row.psnr:.2f} dB<br><small>{html.escape(row.key)}</small>"
    return f"<figure class=pick>{rows}<figcaption>{caption}</figcaption></figure>"


def _tuning(frame: pd.DataFrame) -> str:
    tuning = frame[frame["candidate"].notna()]
    if tuning.empty:
        return _section("Tuning history", _note("No tuning candidates in these results."))
    parts = [_note("Mean PSNR of each candidate's finished trials, in the order they were proposed, "
                   "and the best so far.")]  # fmt: skip
    for study, rows in tuning.groupby("study", sort=True):
        table = tuning_history(rows)
        figure = Figure(figsize=(7, 3.2), dpi=100)
        axes = figure.subplots()
        axes.plot(table["candidate"], table["psnr"], "o", alpha=0.6, label="candidate")
        axes.step(table["candidate"], table["best_so_far"], where="post", label="best so far")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("candidate")
        axes.set_ylabel("PSNR (dB)")
        axes.legend(fontsize=8)
        parts += [f"<h3>{html.escape(study)}</h3>", _figure(figure, f"tuning history of {study}"),
                  _table(table, f"tuning-{_slug(study)}")]  # fmt: skip
    return _section("Tuning history", *parts)


def tuning_history(rows: pd.DataFrame) -> pd.DataFrame:
    """Per candidate in order: its tuned settings, trials, finished trials, mean PSNR, best so far."""
    tuned = load.varying_settings(rows)
    ok = rows["status"] == "ok"
    grouped = rows.groupby("candidate", sort=True)
    table = grouped[tuned].first() if tuned else pd.DataFrame(index=grouped.size().index)
    table["trials"] = grouped.size()
    table["ok"] = ok.groupby(rows["candidate"]).sum()
    table["psnr"] = rows["psnr"].where(ok).groupby(rows["candidate"]).mean()
    table["best_so_far"] = table["psnr"].cummax()
    return table.reset_index()


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
    return f"<section><h2>{html.escape(title)}</h2>\n" + "\n".join(parts) + "\n</section>"


def _note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def _table(frame: pd.DataFrame, table_id: str) -> str:
    """A plain table: floats with 4 decimals, nulls as '–', text left-aligned, everything escaped."""
    head = "".join(f"<th class={_align(frame[c])}>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td class={_align(frame[c])}>{html.escape(_cell(v))}</td>" for c, v in row.items()) + "</tr>"
        for _, row in frame.iterrows()
    )  # fmt: skip
    return f"<table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, (float, np.floating)):  # metrics to 4 decimals; tiny or huge settings (tv) in full
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _align(column: pd.Series) -> str:
    return "num" if pd.api.types.is_numeric_dtype(column) else "text"


def _figure(figure: Figure, alt: str) -> str:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return f"<p>{_img(buffer.getvalue(), alt)}</p>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"


def _label(values: dict) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in values.items() if _cell(v) != "–") or "all"


def _epoch_label(epochs) -> str:
    return "untrained" if epochs == 0 else f"trained {epochs} epochs"


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

