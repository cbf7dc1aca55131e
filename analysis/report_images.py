"""The report's reconstructions: one image across settings, and per setting its best, median and
worst trial, ground truth above reconstruction."""

from __future__ import annotations

import html

import pandas as pd

from . import figures, load, stats
from . import report_html as markup

MAX_GRID_SETTINGS = 24


def one_image(results, runs: pd.DataFrame, by: list[str]) -> str:
    """Per dataset, the image attacked under the most settings, as each setting reconstructed it."""
    title = "One image across settings"
    images = stats.per_image(runs)
    if images.empty:
        return markup.empty_section(title, "No finished trials with images.")
    settings = [name for name in by if name != "dataset"]
    parts = [
        markup.note(
            "Per dataset, the image attacked under the most settings: ground truth, then its "
            "reconstruction under each setting (one trial per setting, the lowest key), with its PSNR "
            "and gain."
        )
    ]
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
                figures_html.append(markup.captioned(truth[index], "ground truth", f"image {image}: ground truth"))
            label = figures.setting_label({name: getattr(row, name) for name in settings})
            if index < len(recon):
                caption = f"{label}<br>{markup.db(row.image_psnr)}{markup.gain_text(row.image_gain)}"
                figures_html.append(markup.captioned(recon[index], "reconstruction", caption))
        parts.append(
            f"<h3>{html.escape(str(dataset))}: image {image}</h3><div class=strip>{''.join(figures_html)}</div>"
        )
    return markup.section(title, *parts)


def grids(results, runs: pd.DataFrame, by: list[str]) -> str:
    done = stats.finished(runs).dropna(subset=["psnr"])
    if done.empty:
        return markup.empty_section("Reconstructions per setting", "No finished trials with images.")
    settings = list(done.groupby(by, dropna=False, sort=True)) if by else [((), done)]
    shown = settings[:MAX_GRID_SETTINGS]
    picks = [(key, _best_median_worst(group)) for key, group in shown]
    images = load.load_images(results, [row.key for _, chosen in picks for _, row in chosen])
    parts = [
        markup.note(
            "Per setting: the best, median and worst trial by PSNR gain (PSNR where no baseline was "
            "recorded); ground truth above its reconstruction, each captioned with the image's index in "
            "the dataset, its PSNR and its gain over the no-information baseline."
        )
    ]
    if len(settings) > len(shown):
        parts.append(markup.note(f"Showing {len(shown)} of {len(settings)} settings; group more coarsely with --by."))
    blocks = []
    for key, chosen in picks:
        label = figures.setting_label(dict(zip(by, key if isinstance(key, tuple) else (key,)))) if by else "all trials"
        picks_html = "".join(_pick(name, row, images.get(row.key, ([], []))) for name, row in chosen)
        blocks.append(f"<div class=setting><h3>{html.escape(label)}</h3><div class=picks>{picks_html}</div></div>")
    parts.append(f"<details open><summary>{len(shown)} settings</summary>{''.join(blocks)}</details>")
    return markup.section("Reconstructions per setting", *parts)


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
            image_gain = gains[position] if position < len(gains) else None
            caption += f"<br>{markup.db(psnrs[position])}{markup.gain_text(image_gain)}"
        columns.append(
            f"<figure class=image>{markup.img(truth_png, 'ground truth')}"
            f"{markup.img(recon_png, 'reconstruction')}<figcaption>{caption}</figcaption></figure>"
        )
    gain = "" if pd.isna(row.psnr_gain) else f", gain {row.psnr_gain:+.2f}"
    caption = f"{name}: mean {markup.db(row.psnr)}{gain}<br><small>trial {html.escape(row.key)}</small>"
    return f"<figure class=pick><div class=row>{''.join(columns)}</div><figcaption>{caption}</figcaption></figure>"
