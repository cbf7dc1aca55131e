"""The HTML pieces the report's sections are built of: the page, sections, notes, tables, inline
images and the formatting of numbers, intervals, durations and times."""

from __future__ import annotations

import base64
import html
from collections.abc import Collection
from datetime import timezone

import numpy as np
import pandas as pd

from gradinv.results.text import visible

from . import figures, stats

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
figure { margin: 0; } figure.image { width: 7.5em; font-size: .75em; color: #444; overflow-wrap: anywhere; }
figure.image img { display: block; width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #bbb;
                   margin-bottom: 2px; }
"""


def page(title: str, sections: list[str]) -> str:
    """The document; every section escapes its text for HTML, and here the control characters that text
    from the files may hold (an error with terminal escapes) become visible escapes: HTML forbids them,
    and they would drive a terminal that shows the file."""
    document = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return visible(document, keep="\t\n")


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>\n" + "\n".join(part for part in parts if part) + "\n</section>"


def note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def empty_section(title: str, why: str) -> str:
    """A section with nothing to show, saying why."""
    return section(title, note(why))


def table(frame: pd.DataFrame, table_id: str, digits: int = 4, settings: Collection[str] = ()) -> str:
    """A plain table: numbers to ``digits`` decimals, ``settings`` columns as written (tv 1e-05), nulls as
    '–', text left-aligned, everything escaped."""
    head = "".join(f"<th class={align(frame[c])}>{html.escape(str(c).replace('_', ' '))}</th>" for c in frame.columns)
    places = {c: None if c in settings else digits for c in frame.columns}
    kinds = {c: align(frame[c]) for c in frame.columns}
    body = "".join(
        "<tr>"
        + "".join(f"<td class={kinds[c]}>{html.escape(cell(v, places[c]))}</td>" for c, v in row.items())
        + "</tr>"
        for _, row in frame.iterrows()
    )
    return f"<div class=wide><table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def cell(value, digits: int | None = 4) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        if digits is None:  # a setting: its shortest exact form
            return f"{value:g}"
        return f"{value:.{digits}f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def align(column: pd.Series) -> str:
    """num (right-aligned), text (left), or words: text long enough to wrap (verdicts, errors)."""
    if pd.api.types.is_numeric_dtype(column):
        return "num"
    return "text words" if column.dropna().astype(str).str.len().max() > 24 else "text"


def figure(plot, alt: str) -> str:
    return f"<p class=plot>{img(figures.png(plot), alt)}</p>"


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def tally(column: pd.Series) -> str:
    counts = column.dropna().value_counts()
    return ", ".join(f"{value} ({n})" for value, n in counts.items()) or "–"


def duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "–"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def when(moment) -> str:
    return "–" if pd.isna(moment) else moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def intervals(centre: pd.Series, low: pd.Series, high: pd.Series) -> list[str]:
    """Each interval as text (a no-break space keeps it on one line); "n too small" where there is a
    value but too few observations for an interval, "–" where there is no value."""
    return [
        ("–" if pd.isna(value) else stats.TOO_SMALL) if pd.isna(lo) else f"[{lo:.2f},\u00a0{hi:.2f}]"
        for value, lo, hi in zip(centre, low, high)
    ]


def captioned(png: bytes, alt: str, caption: str) -> str:
    return f"<figure class=image>{img(png, alt)}<figcaption>{caption}</figcaption></figure>"


def db(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.2f} dB"


def gain_text(value) -> str:
    return "" if value is None or pd.isna(value) else f" ({value:+.2f})"
