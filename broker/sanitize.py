"""Make strings from other qubes or from metadata safe to print on a terminal."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# C0, DEL and C1 controls (ESC starts terminal escape sequences; C1 0x9b is a CSI on its own)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, max_chars: int = 512) -> str:
    """Text with every control, format (bidi overrides, zero-width) and unassigned
    character replaced by '?', and cut to ``max_chars``."""
    # cut first: the work below is per character, and the input may be megabytes
    text = text[: max_chars + 1]
    text = _CONTROL.sub("?", text)
    text = "".join(
        "?" if unicodedata.category(ch) in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp") else ch
        for ch in text
    )
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def printable_tree(value: Any, max_chars: int = 65536) -> Any:
    """A JSON value from another qube with every string in it (keys too) made printable:
    what a script reads from our --json must be as safe as what a person reads."""
    if isinstance(value, str):
        return printable(value, max_chars)
    if isinstance(value, dict):
        return {printable(str(k), 256): printable_tree(v, max_chars) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_tree(v, max_chars) for v in value]
    return value
