"""The report as the reader sees it: each <table id=...> as rows of cell texts, a section, its plots."""

import base64
import re
from html.parser import HTMLParser

import pandas as pd


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


def table_frame(page: str, table_id: str) -> pd.DataFrame:
    """One table as shown, its header row as the column names."""
    rows = Tables(page).tables[table_id]
    return pd.DataFrame(rows[1:], columns=rows[0])


def section(page: str, title: str) -> str:
    """The HTML of the report section headed ``title``."""
    start = page.index(f"<h2>{title}</h2>")
    return page[start : page.index("</section>", start)]


def pngs(html_text: str, alt: str) -> list[bytes]:
    """The PNG bytes of every inline image with that alt text."""
    found = re.findall(rf'alt="{re.escape(alt)}" src="data:image/png;base64,([^"]+)"', html_text)
    return [base64.b64decode(data) for data in found]
