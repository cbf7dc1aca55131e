"""Strings read from results files, made safe to show: a crafted row cannot drive the reader's terminal."""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str, keep: str = "") -> str:
    """``text`` from a file with each control character (those in ``keep`` aside) written as an escape
    (\\x1b, \\u202e): a crafted row can then neither retitle, clear nor repaint the reader's terminal."""
    return CONTROL.sub(lambda found: found[0] if found[0] in keep else _escape(found[0]), text)


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
